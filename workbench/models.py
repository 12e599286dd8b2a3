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
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")

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
        """What the run file records about the model (DESIGN §4)."""
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
        }


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
) -> LoadedModel:
    """Load a causal LM by hub name, local folder or ``organism`` (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    kwargs["local_files_only"] = Path(path).exists() or _in_hub_cache(path, revision)
    if not kwargs["local_files_only"] and not _hub_reachable():
        raise WorkbenchError(f"--model {name}: not a local folder, not in the Hugging Face cache, and the hub is unreachable")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WorkbenchError(f"--model {name}: could not load ({first})") from None
    hf = hf.to(device).eval()
    template_source = "model"
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        template_source = "plain"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
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
