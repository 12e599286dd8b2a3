"""What a run file records about how it was made: the root attributes (:func:`run_settings`) and the
per-sample table (:func:`sample_table`). ``workbench run`` (:mod:`workbench.engine.run`) and
:meth:`workbench.engine.session.Session.save` both write these, so both live here, below both.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from workbench.store.header import SampleTable


def sample_table(samples: list[Any]) -> SampleTable:
    """The per-sample table a run file keeps (``samples/*``), from the run's samples."""
    return SampleTable(
        index=[s.index for s in samples],
        id=[s.id for s in samples],
        context=[s.context for s in samples],
        question=[s.question for s in samples],
        options=[tuple(s.options) for s in samples],
        gold=[s.gold for s in samples],
        category=[s.category for s in samples],
        condition=[s.condition for s in samples],
        extra=[json.dumps(s.extra, ensure_ascii=False, sort_keys=True) for s in samples],
    )


def data_fingerprint(samples: list[Any]) -> str:
    """16 hex digits of sha256 over the samples' index, id, context, question, options and gold (and,
    for a sample with an image, the image file's sha256: a resumed run refuses changed pictures)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.index, s.id, s.context, s.question, list(s.options), s.gold], ensure_ascii=False).encode())
        if getattr(s, "image", None):
            h.update(str(s.extra.get("image", {}).get("sha256", "")).encode())
    return h.hexdigest()[:16]


def run_settings(
    model: Any, task: Any, protocol: Any, samples: list[Any], data: dict[str, Any], hooks: list[str], layers: list[int],
    batch_size: int, activation_dtype: str, seed: int, command_line: str = "", lookup: bool = True,
) -> dict[str, Any]:
    """The root attributes a run file records (docs/FORMAT.md): the model's metadata (library
    versions, weight hashes, placement …), the task, ``data`` (with the samples' fingerprint
    added), the protocol and decoding, capture and batching. ``workbench run`` and
    ``Session.save`` both write these."""
    return {
        **model.metadata(),
        "task": task.name,
        "data": {**data, "fingerprint": data_fingerprint(samples)},
        "protocol": json.loads(protocol.to_json()),
        "option_scoring": protocol.option_scoring if task.multiple_choice else "none",
        "command_line": command_line,
        "decoding": json.loads(json.dumps(protocol.decoding.__dict__)),
        "lookup_decoding": bool(lookup and not protocol.decoding.do_sample),  # greedy rounds verified lookup drafts
        "seed": seed,
        "hooks": list(hooks),
        "layers": list(layers),
        "batch_size": batch_size,
        "activation_dtype": activation_dtype,
        "n_samples": len(samples),
        "n_rounds": protocol.rounds,
        "device": model.device,
    }
