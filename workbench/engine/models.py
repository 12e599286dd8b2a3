"""Loading a causal LM (or an image-text-to-text model): a plain Hugging Face model for generation and a TransformerLens bridge for hooks.

``TransformerBridge.boot_transformers(hf_model=m)`` rewrites ``m`` in place, and with
transformers 5.x and transformer-lens 4.3.0 cached generation through the rewritten model is
wrong after the first new token (DESIGN §9). So :func:`load_model` keeps two views of one set
of weights:

* ``hf`` – the untouched Hugging Face model: KV-cached ``generate`` and option scoring;
* ``bridge`` – a TransformerBridge booted on a *structural copy* of ``hf`` whose parameters and
  buffers are the same tensors (no second copy of the weights): every forward through it fires
  TransformerLens hook points (``blocks.{i}.hook_resid_post`` …).

The bridge forces eager attention; ``hf`` keeps the model's default. Runs capture on ``hf``, at
the module boundaries the bridge names (:mod:`workbench.engine.capture`), so capture rides along
generation; ``model.bridge`` stays for names, for that check and for users' own hooked passes.

An image-text-to-text model (a config with a ``vision_config``) of a supported family
(:data:`VISION_FAMILIES`: LLaVA, LLaVA-NeXT, Gemma3) loads with ``AutoModelForImageTextToText``
and its ``AutoProcessor`` (``LoadedModel.processor``; the tokenizer is the processor's); its bridge
has the language model's hooks as for text and the vision tower's and projector's
(``vision_encoder.*``, ``vision_projector.*``). Another family is refused in one line. The boot
runs under :func:`no_package_installs`: TransformerLens would otherwise ``pip install torchvision``
when a processor fails to load, replacing the pinned torch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, get_args

from workbench.errors import WorkbenchError

Device = Literal["auto", "cpu", "cuda", "mps"]
ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
DEVICES: tuple[str, ...] = get_args(Device)
DTYPES: tuple[str, ...] = get_args(ModelDtype)

# A plain format for tokenizers without a chat template (documented in README "Real models").
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\\n\\n' }}"
    "{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the engine: ``hf`` generates, ``bridge`` exposes hook points, same weights."""

    name: str  # what the user asked for ("organism", a hub name or a folder)
    path: str  # what was loaded (a resolved folder or the hub name)
    revision: str
    hf: Any  # transformers PreTrainedModel, eval mode
    bridge: Any  # transformer_lens TransformerBridge sharing hf's weights
    tokenizer: Any
    device: str
    dtype: str  # the real parameter dtype, e.g. "float32"
    n_layers: int
    d_model: int
    chat_template_source: str  # "model" or "plain"
    placement: dict[str, Any] | None = None  # device_map runs: {"requested", "max_memory", "placed": {module: device}}
    processor: Any = None  # an image-text-to-text model's processor (images → pixel values, image tokens); None for text
    image_token_id: int | None = None  # the token id of one image position in the language model's input (config.image_token_id)

    @property
    def vision(self) -> bool:
        """Whether the model takes images (an image-text-to-text model loaded with its processor)."""
        return self.processor is not None
    adapter: dict[str, Any] | None = None  # a merged LoRA adapter: {"path", "sha256", ...} (workbench.engine.adapter)

    def metadata(self) -> dict[str, Any]:
        """What the run file records about the model (DESIGN §4), with what a rerun needs to be
        checked against it: library versions, sha256 of every weight file and of the chat template."""
        return {
            "model_name": self.name,
            "model_path": self.path,
            "model_revision": self.revision,
            "model_dtype": self.dtype,
            "model_class": type(self.hf).__name__,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "hook_style": "transformer-lens-bridge",
            "compatibility_mode": False,
            "chat_template": self.chat_template_source,
            "chat_template_sha256": hashlib.sha256(str(self.tokenizer.chat_template).encode()).hexdigest(),
            "weights_sha256": weight_hashes(self.path, self.revision or None),
            "library_versions": library_versions(),
            "device_map": self.placement or {},  # {} on one device (`device`)
            **({"vision": {"family": vision_family(self.hf.config), "image_token_id": self.image_token_id,
                           "processor_class": type(self.processor).__name__,
                           "image_processor_class": type(getattr(self.processor, "image_processor", None)).__name__}}
               if self.vision else {}),
            "adapter": self.adapter or {},  # {} without --adapter
        }


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def library_versions() -> dict[str, str]:
    """Versions of the libraries a run's numbers depend on: ``{"torch": "2.13.0", ...}`` (a new
    dict each call; read from the installed packages' metadata once per process, which costs a
    few milliseconds of every run)."""
    return dict(_library_versions())


@functools.cache
def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "transformer-lens", "numpy", "h5py"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = ""
    return found


def weight_hashes(path: str, revision: str | None = None) -> dict[str, str]:
    """``{file name: sha256}`` of the weight files of a model folder, or of a hub model's cached
    snapshot (there the blob's own name is its sha256; nothing is read). Empty when neither is found."""
    folder = Path(path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, revision=revision, local_files_only=True))
        except Exception:  # not cached (or not a valid repo id): nothing to record
            return {}
    hashes = {}
    for file in sorted(folder.iterdir()):
        if file.suffix not in WEIGHT_SUFFIXES or not file.is_file():
            continue
        blob = file.resolve()
        if file.is_symlink() and blob.parent.name == "blobs" and len(blob.name) == 64:
            hashes[file.name] = blob.name
            continue
        stat = file.stat()
        hashes[file.name] = _file_sha256(str(blob), stat.st_size, stat.st_mtime_ns)
    return hashes


@functools.lru_cache(maxsize=512)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, read once per process while its size and modification time stay the same
    (a run file records the weights' hashes: a 14 GB local model took ~15 s to hash at every
    `Session.save`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)
    return h.hexdigest()


def check_model_folder(path: str, name: str) -> None:
    """Refuse a local model folder that cannot load, without importing torch: a ``config.json``
    that is not JSON or names no ``model_type``, no weight files, or a safetensors file whose header
    is damaged or promises more bytes than the file has. Hub names pass (checked when they load)."""
    folder = Path(path)
    if not folder.is_dir():
        return
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkbenchError(f"--model {name}: config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise WorkbenchError(f"--model {name}: config.json names no model_type (not a Hugging Face model config)")
    weights = [f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file()]
    if not weights:
        raise WorkbenchError(f"--model {name}: no weight files in the folder (expected model.safetensors or pytorch_model.bin)")
    for file in weights:
        if file.suffix == ".safetensors":
            _check_safetensors(file, name)


def _check_safetensors(file: Path, name: str) -> None:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100_000_000):
            raise WorkbenchError(f"--model {name}: {file.name} is not a safetensors file (damaged header)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WorkbenchError(f"--model {name}: {file.name} is damaged (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise WorkbenchError(f"--model {name}: {file.name} is damaged (its header is not a JSON object)")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    if 8 + n + max(ends, default=0) > size:
        raise WorkbenchError(f"--model {name}: {file.name} is truncated or damaged ({size} bytes, "
                             f"the header describes {8 + n + max(ends, default=0)})")


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` if available, else ``mps``, else ``cpu``; others are checked."""
    import torch

    if device not in DEVICES:
        raise WorkbenchError(f"--device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError("--device cuda: no CUDA device is available")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise WorkbenchError("--device mps: MPS is not available")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """``auto`` → bfloat16 on CUDA with bf16 support, float32 elsewhere; otherwise the named dtype."""
    import torch

    if dtype not in DTYPES:
        raise WorkbenchError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)


def parse_device_map(value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """``--device-map``: a strategy (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``),
    a JSON object ``{module: device}`` or a JSON file holding one → what Hugging Face's
    ``from_pretrained(device_map=...)`` takes. Devices are a GPU index, ``cuda:N``, ``cpu``,
    ``mps`` or ``disk`` (offloaded, read back layer by layer). Checked without importing torch;
    raises :class:`WorkbenchError` in one line."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in DEVICE_MAP_STRATEGIES:
            return text
        source = "--device-map"
        if not text.startswith(("{", "[")):
            path = Path(text).expanduser()
            if not path.is_file():
                raise WorkbenchError(f"--device-map must be {', '.join(DEVICE_MAP_STRATEGIES)}, a JSON object or a JSON file, "
                                     f"not {value!r}")
            source, text = f"--device-map {path}", path.read_text(encoding="utf-8", errors="replace")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(value, dict) or not value:
        raise WorkbenchError("--device-map: a JSON device map is an object of module name → device, e.g. "
                             '{"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", ...}')
    for module, device in value.items():
        if not _map_device(device):
            raise WorkbenchError(f"--device-map: module {module!r} → {device!r} is not a device "
                                 "(a GPU index, cuda:N, cpu, mps or disk)")
    return value


def _map_device(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return device >= 0
    return isinstance(device, str) and (device in ("cpu", "disk", "mps", "cuda") or re.fullmatch(r"cuda:\d+", device) is not None)


def parse_max_memory(value: str | dict[Any, Any] | None) -> dict[int | str, str] | None:
    """``--max-memory 0=70GiB,1=70GiB,cpu=200GiB`` (or a dict) → ``{0: "70GiB", 1: "70GiB", "cpu":
    "200GiB"}``, what ``from_pretrained(max_memory=...)`` takes: a budget per GPU index, ``cpu``,
    ``mps`` or ``disk``, as bytes or a size (``500MiB``, ``2GB``). Raises :class:`WorkbenchError`."""
    if value is None:
        return None
    items = value.items() if isinstance(value, dict) else [part.partition("=")[::2] for part in str(value).split(",")]
    budget: dict[int | str, str] = {}
    for key, size in items:
        key, size = str(key).strip(), str(size).strip()
        if not key or not size:
            raise WorkbenchError(f"--max-memory takes DEVICE=SIZE pairs separated by commas (e.g. 0=70GiB,cpu=200GiB), "
                                 f"not {value!r}")
        if not (key.isdigit() or key in ("cpu", "mps", "disk")):
            raise WorkbenchError(f"--max-memory: {key!r} is not a device (a GPU index, cpu, mps or disk)")
        if not _SIZE.match(size):
            raise WorkbenchError(f"--max-memory: {key}={size} is not a size (e.g. 70GiB, 500MB, or bytes)")
        device: int | str = int(key) if key.isdigit() else key
        if device in budget:
            raise WorkbenchError(f"--max-memory names {key} twice")
        budget[device] = size.upper().replace("IB", "iB") if not size.isdigit() else size
    return budget


def check_placement(device: str, device_map: Any, max_memory: Any) -> tuple[str | dict[str, Any] | None, dict[int | str, str] | None]:
    """Both placement options parsed and checked together (:func:`parse_device_map`,
    :func:`parse_max_memory`): ``--max-memory`` needs ``--device-map``, which places the model
    itself (so ``--device`` stays ``auto``). Returns ``(device_map, max_memory)``."""
    device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    if max_memory is not None and device_map is None:
        raise WorkbenchError("--max-memory needs --device-map (e.g. --device-map auto): it is the budget the map is made in")
    if device_map is not None and device != "auto":
        raise WorkbenchError(f"--device {device} and --device-map: give one (the device map places every module itself)")
    return device_map, max_memory


def resolve_model_path(name: str) -> str:
    """``organism`` → the shipped checkpoint folder, ``organism-visual`` → the shipped visual organism's;
    an existing folder → itself; else a hub name."""
    if name == "organism":
        from workbench.organism import organism_path

        return str(organism_path())
    if name == "organism-visual":
        from workbench.organism import organism_visual_path

        path = organism_visual_path()
        if not (path / "config.json").is_file():
            raise WorkbenchError(f"--model organism-visual: no visual organism checkpoint at {path} (train one: "
                                 f"workbench organism train --visual --out {path})")
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise WorkbenchError(f"--model {name}: folder has no config.json (not a Hugging Face model folder)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise WorkbenchError(f"--model {name}: no such folder")
    return name


# ----------------------------------------------------------------------------- vision-language models
# model_type → the family's name. Each is tested end to end on a tiny random model
# (tests/test_vlm.py): the carried cache against a full recompute, capture against Hugging Face.
VISION_FAMILIES = {"llava": "LLaVA", "llava_next": "LLaVA-NeXT", "gemma3": "Gemma3"}


def vision_family(config: Any) -> str:
    """The supported family of an image-text-to-text config (``"LLaVA"``, ``"Gemma3"``), or ``""``."""
    return VISION_FAMILIES.get(getattr(config, "model_type", ""), "")


def supported_families() -> str:
    """``"LLaVA (llava), LLaVA-NeXT (llava_next), Gemma3 (gemma3)"``: the image-text-to-text families the workbench runs."""
    return ", ".join(f"{name} ({key})" for key, name in VISION_FAMILIES.items())


def takes_images(path: str) -> bool | None:
    """Whether a local model folder's ``config.json`` describes an image-text-to-text model (it has a
    ``vision_config``), read without importing torch; None for a hub name (known when it loads)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        return isinstance(json.loads(config.read_text(encoding="utf-8")).get("vision_config"), dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


@contextlib.contextmanager
def no_package_installs() -> Iterator[None]:
    """TransformerLens installs torchvision by itself (``pip``/``uv pip install``) when a model's
    processor fails to load during a boot (``_ensure_torchvision``), which would replace the
    pinned torch. For the duration of the block that function answers "not available" and pip
    may use no index; the boot goes on without the bridge's own processor (the workbench loads
    its own, and names what is missing in one line)."""
    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:  # another TransformerLens layout: nothing of the kind to stop
        helpers = None
    saved = getattr(helpers, "_ensure_torchvision", None)
    saved_env = {k: os.environ.get(k) for k in ("PIP_NO_INDEX", "UV_OFFLINE")}
    os.environ.update({"PIP_NO_INDEX": "1", "UV_OFFLINE": "1"})
    if saved is not None:
        helpers._ensure_torchvision = lambda: False
    try:
        yield
    finally:
        if saved is not None:
            helpers._ensure_torchvision = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _load_processor(path: str, name: str, kwargs: dict[str, Any]) -> Any:
    """An image-text-to-text model's processor; one line naming what is missing when it cannot load
    (an image processor that needs torchvision, which the workbench never installs: it would
    replace the pinned torch)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, **kwargs)
    except (ImportError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "torchvision" in str(e).lower():
            raise WorkbenchError(f"--model {name}: its image processor needs torchvision, which is not installed (the "
                                 "workbench does not install it: it would replace the pinned torch; install a torchvision "
                                 "built for this torch, or give the model a Pillow image processor)") from None
        raise WorkbenchError(f"--model {name}: could not load its processor ({text[:200]})") from None
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise WorkbenchError(f"--model {name}: its processor ({type(processor).__name__}) has no image processor or "
                             "no tokenizer")
    return processor


def load_model(
    name: str = "organism",
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    on_status: Callable[[str], None] | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, Any] | None = None,
) -> LoadedModel:
    """Load a causal LM by hub name, local folder or ``organism`` (see the module docstring).

    ``device_map`` (``auto``, ``balanced``, ``sequential``, a ``{module: device}`` dict, its JSON
    or a JSON file) and ``max_memory`` (``"0=70GiB,cpu=200GiB"`` or a dict) place a model too
    large for one device through Hugging Face/accelerate (:func:`check_placement`); modules mapped
    to ``disk`` are offloaded to a temporary folder and read back as they run. ``device`` is then
    the device the inputs go to (the first GPU of the map, else ``cpu``).
    ``on_status`` is told each step ("loading the weights of …", "booting the TransformerBridge …")
    so a command line can show it; Hugging Face's own progress bars are silenced.
    """
    status = on_status or (lambda message: None)
    device_map, max_memory = check_placement(device, device_map, max_memory)
    path = resolve_model_path(name)
    check_model_folder(path, name)
    status(f"loading {name}: importing transformers")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    placing = _placement_kwargs(device_map, max_memory)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    kwargs["local_files_only"] = Path(path).exists() or _in_hub_cache(path, revision)
    if not kwargs["local_files_only"] and not hub_reachable():
        raise WorkbenchError(f"--model {name}: not a local folder, not in the Hugging Face cache, and the hub is unreachable")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    from safetensors import SafetensorError

    def failed(what: str, e: Exception) -> WorkbenchError:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return WorkbenchError(f"--model {name}: could not load its {what} ({first[:200]})")

    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise failed("config (unknown architecture?)", e) from None
    processor = None
    if getattr(config, "vision_config", None) is not None:  # an image-text-to-text model
        if not vision_family(config):
            raise WorkbenchError(f"--model {name}: the workbench does not run {type(config).__name__.removesuffix('Config')} "
                                 f"image-text-to-text models yet (supported: {supported_families()})")
        processor = _load_processor(path, name, kwargs)
        tokenizer = processor.tokenizer
        if not getattr(tokenizer, "chat_template", None) and getattr(processor, "chat_template", None):
            tokenizer.chat_template = processor.chat_template
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise failed("tokenizer", e) from None
    if isinstance(device_map, dict):
        check_device_map_modules(device_map, config, name)
    where = device if device_map is None else f"device map {device_map if isinstance(device_map, str) else 'from the JSON'}"
    status(f"loading the weights of {name} ({type(config).__name__.removesuffix('Config')}, {torch_dtype}, {where})")
    try:
        if processor is not None:
            from transformers import AutoModelForImageTextToText

            hf = AutoModelForImageTextToText.from_pretrained(path, config=config, dtype=torch_dtype, **kwargs, **placing)
        else:
            hf = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch_dtype, **kwargs, **placing)
    except (OSError, ValueError, KeyError, SafetensorError, ImportError) as e:
        raise failed("weights", e) from None
    except RuntimeError as e:  # accelerate's own refusals (a map that names no module of this model …)
        raise failed("weights onto the device map", e) from None
    placement = None
    if device_map is None:
        hf = hf.to(device)
    else:  # accelerate placed (and hooked) every module; moving the model would undo it
        placed = {k: (v if isinstance(v, str) else int(v)) for k, v in (getattr(hf, "hf_device_map", None) or {}).items()}
        device = _input_device(placed)
        placement = {"requested": device_map, "max_memory": {str(k): v for k, v in (max_memory or {}).items()}, "placed": placed}
    hf = hf.eval()
    from workbench.engine.lean import lean_problem

    lean_problem(hf)  # checks the lean forward against hf's own now, before anything wraps its modules
    template_source = "model"
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        template_source = "plain"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    status("booting the TransformerBridge (hook points on every layer)")
    bridge = _boot_bridge(hf, path, tokenizer, device, torch_dtype, trust_remote_code)
    return LoadedModel(
        name=name,
        path=path,
        revision=revision or "",
        hf=hf,
        bridge=bridge,
        tokenizer=tokenizer,
        device=device,
        dtype=str(next(hf.parameters()).dtype).removeprefix("torch."),
        n_layers=int(bridge.cfg.n_layers),
        d_model=int(bridge.cfg.d_model),
        chat_template_source=template_source,
        placement=placement,
        processor=processor,
        image_token_id=None if processor is None else int(config.image_token_id),
    )


def check_device_map_modules(device_map: dict[str, Any], config: Any, name: str) -> None:
    """Refuse a ``{module: device}`` map that names a module the model does not have (accelerate would
    place the model anyway, ignoring it): the model is built on the meta device (no memory, no weights)
    to list its modules. Raises WorkbenchError naming the first unknown key and the top-level modules."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    modules = {n for n, _ in skeleton.named_modules()}
    unknown = [key for key in device_map if key and key not in modules]
    if unknown:
        top = sorted({n.split(".")[0] for n in modules if n})
        raise WorkbenchError(f"--device-map names {unknown[0]!r}, not a module of {name} (its modules: {', '.join(top)}, and "
                             "their children such as model.layers.0)")


def _placement_kwargs(device_map: Any, max_memory: Any) -> dict[str, Any]:
    """``from_pretrained`` keywords for a device map (with a temporary folder for modules that
    ``auto`` or the map sends to ``disk``); none without one."""
    if device_map is None:
        return {}
    try:
        import accelerate  # noqa: F401  (from_pretrained needs it for a device map)
    except ImportError:
        raise WorkbenchError("--device-map needs the accelerate package (pip install accelerate)") from None
    import atexit
    import shutil
    import tempfile

    placing: dict[str, Any] = {"device_map": device_map}
    if isinstance(device_map, str) or "disk" in device_map.values():  # a strategy may offload what does not fit
        placing["offload_folder"] = tempfile.mkdtemp(prefix="workbench-offload-")
        atexit.register(shutil.rmtree, placing["offload_folder"], ignore_errors=True)
    if max_memory is not None:
        placing["max_memory"] = dict(max_memory)  # from_pretrained rewrites it in place
    return placing


def _input_device(placed: dict[str, Any]) -> str:
    """Where a placed model's inputs go: the first GPU (or MPS) in the map, as accelerate's main
    device, else ``cpu`` (modules on ``cpu`` and ``disk`` run on the CPU)."""
    for where in placed.values():
        if isinstance(where, int):
            return f"cuda:{where}"
        if where not in ("cpu", "disk"):
            return where
    return "cpu"


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an invalid repo id is simply not cached
        return False
    return isinstance(found, str)


def hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _boot_bridge(hf: Any, path: str, tokenizer: Any, device: str, dtype: Any, trust_remote_code: bool) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    shared: dict[int, Any] = {id(t): t for t in [*hf.parameters(), *hf.buffers()]}
    for module in hf.modules():  # a placed model: both trees share accelerate's hooks (and their offloaded weights)
        hook = getattr(module, "_hf_hook", None)
        if hook is not None:
            shared[id(hook)] = hook
    shadow = copy.deepcopy(hf, shared)  # same tensors, separate module tree for the bridge to rewrite
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with no_package_installs():
            bridge = TransformerBridge.boot_transformers(
                path, hf_model=shadow, tokenizer=tokenizer, device=device, dtype=dtype, trust_remote_code=trust_remote_code
            )
    except (ValueError, KeyError, NotImplementedError) as e:
        if getattr(hf, "hf_device_map", None):
            raise WorkbenchError(f"TransformerLens cannot boot {type(hf).__name__} on this device map ({str(e).splitlines()[0]})") from None
        raise WorkbenchError(f"TransformerLens does not support {type(hf).__name__} ({str(e).splitlines()[0]})") from None
    return bridge.eval()
