"""Token ids → the text pieces they stand for, with the model's own tokenizer (``tokenizers``, no
torch): from the run's model folder, or the Hugging Face cache for a hub name. Without a tokenizer
the pieces are shown as ``⟨id⟩``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

Decoder = Callable[[Sequence[int]], str]
WINDOW = 4  # earlier tokens decoded with each one, so spacing and multi-byte characters come out right


def load_decoder(meta: dict[str, Any]) -> Any | None:
    """A ``tokenizers.Tokenizer`` for the run's model (``model_path`` folder, else the Hugging Face
    cache entry of ``model_path`` at ``model_revision``), or None when there is none here."""
    from tokenizers import Tokenizer

    source = str(meta.get("model_path") or meta.get("model_name") or "")
    if not source:
        return None
    local = Path(source) / "tokenizer.json"
    if local.is_file():
        return Tokenizer.from_file(str(local))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "tokenizer.json", revision=meta.get("model_revision") or None)
    except Exception:  # not a hub name (a folder that moved, a stray string): no tokenizer
        return None
    return Tokenizer.from_file(cached) if isinstance(cached, str) else None


_DECODERS: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


def decoder_for(meta: dict[str, Any]) -> Any | None:
    """:func:`load_decoder`, loaded once per model (path, revision) per process; thread-safe."""
    key = (str(meta.get("model_path") or meta.get("model_name") or ""), str(meta.get("model_revision") or ""))
    with _LOCK:
        if key not in _DECODERS:
            _DECODERS[key] = load_decoder(meta)
        return _DECODERS[key]


def token_pieces(tokenizer: Any | None, ids: np.ndarray | Sequence[int]) -> list[str]:
    """The text each token adds, in order (``len(ids)`` strings). A token that decodes to nothing
    (a special token) shows as its vocabulary entry; with no tokenizer each piece is ``⟨id⟩``."""
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [f"⟨{i}⟩" for i in ids]
    pieces = []
    for k, token in enumerate(ids):
        context = ids[max(0, k - WINDOW):k]
        before = tokenizer.decode(context) if context else ""
        text = tokenizer.decode([*context, token])
        piece = text[len(before):] if text.startswith(before) else tokenizer.decode([token])
        pieces.append(piece if piece else (tokenizer.id_to_token(token) or f"⟨{token}⟩"))
    return pieces
