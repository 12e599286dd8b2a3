"""Loading a causal LM: a plain Hugging Face model for generation and a TransformerLens bridge for hooks.

``TransformerBridge.boot_transformers(hf_model=m)`` rewrites ``m`` in place, and with
transformers 5.x and transformer-lens 4.3.0 cached generation through the rewritten model is
wrong after the first new token (DESIGN §9). So :func:`load_model` keeps two views of one set
of weights:

* ``hf`` – the untouched Hugging Face model: KV-cached ``generate`` and option scoring;
* ``bridge`` – a TransformerBridge booted on a *structural copy* of ``hf`` whose parameters and
  buffers are the same tensors (no second copy of the weights): every forward through it fires
  TransformerLens hook points (``blocks.{i}.hook_resid_post`` …).

The bridge forces eager attention; ``hf`` keeps the model's default. Runs capture on ``hf``, at
the module boundaries the bridge names (:mod:`workbench.capture`), so capture rides along
generation; ``model.bridge`` stays for names, for that check and for users' own hooked passes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, get_args

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
        }


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def library_versions() -> dict[str, str]:
    """Versions of the libraries a run's numbers depend on: ``{"torch": "2.13.0", ...}``."""
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
        h = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 23), b""):
                h.update(chunk)
        hashes[file.name] = h.hexdigest()
    return hashes


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


def resolve_model_path(name: str) -> str:
    """``organism`` → the shipped checkpoint folder; an existing folder → itself; else a hub name."""
    if name == "organism":
        from workbench.organism import organism_path

        return str(organism_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise WorkbenchError(f"--model {name}: folder has no config.json (not a Hugging Face model folder)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise WorkbenchError(f"--model {name}: no such folder")
    return name


def load_model(
    name: str = "organism",
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    on_status: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a causal LM by hub name, local folder or ``organism`` (see the module docstring).

    ``on_status`` is told each step ("loading the weights of …", "booting the TransformerBridge …")
    so a command line can show it; Hugging Face's own progress bars are silenced.
    """
    status = on_status or (lambda message: None)
    path = resolve_model_path(name)
    check_model_folder(path, name)
    status(f"loading {name}: importing transformers")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    kwargs["local_files_only"] = Path(path).exists() or _in_hub_cache(path, revision)
    if not kwargs["local_files_only"] and not _hub_reachable():
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
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise failed("tokenizer", e) from None
    status(f"loading the weights of {name} ({type(config).__name__.removesuffix('Config')}, {torch_dtype}, {device})")
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise failed("weights", e) from None
    hf = hf.to(device).eval()
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
    )


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an invalid repo id is simply not cached
        return False
    return isinstance(found, str)


def _hub_reachable(timeout: float = 3.0) -> bool:
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

    shared = {id(t): t for t in [*hf.parameters(), *hf.buffers()]}
    shadow = copy.deepcopy(hf, shared)  # same tensors, separate module tree for the bridge to rewrite
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        bridge = TransformerBridge.boot_transformers(
            path, hf_model=shadow, tokenizer=tokenizer, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (ValueError, KeyError, NotImplementedError) as e:
        raise WorkbenchError(f"TransformerLens does not support {type(hf).__name__} ({str(e).splitlines()[0]})") from None
    return bridge.eval()
