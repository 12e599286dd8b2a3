"""``workbench export --format saelens``: the layout SAELens' cached-activations loader reads.

SAELens (``ActivationsStore(cached_activations_path=...)``) loads a Hugging Face ``datasets``
folder (``save_to_disk``) with one column named after the hook, ``Array2D((context_size, d_in))``,
and a ``token_ids`` column, ``Sequence(int32, length=context_size)``. The export's chosen tokens,
sample after sample in the order of the cache file, are packed into windows of ``context_size``
tokens; the last, incomplete window is dropped (its token count is recorded). Each token keeps the
activation of its own transcript (the windows are not recomputed as new contexts). A hook with
several values per token (``attn.hook_z``: heads × d_head) is flattened to ``d_in`` as SAELens does.

The folder's ``dataset_info.json`` ``description`` holds the export's metadata as JSON (its
``format`` is ``self-correction-workbench-saelens``). ``datasets`` is imported only here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from workbench.cache.file import HookLayout, TokenTable, is_attention_map
from workbench.errors import WorkbenchError, import_optional

FORMAT = "self-correction-workbench-saelens"
WRITER_BYTES = 64 << 20  # rows buffered by the Arrow writer


def check_saelens_ready(context_size: int) -> None:
    """Refuse early: no ``datasets`` package, or a context size below 1."""
    import_optional("datasets", "--format saelens")
    if context_size < 1:
        raise WorkbenchError("--context-size must be at least 1")


def check_saelens_hooks(names: Sequence[str]) -> None:
    """SAELens reads one vector per token: attention maps (with a key axis) cannot go there."""
    bad = [n for n in names if is_attention_map(n)]
    if bad:
        raise WorkbenchError(f"--format saelens takes hooks with one vector per token; {bad[0]} has a key-position axis")


def features(layouts: Sequence[HookLayout], context_size: int) -> Any:
    """The ``datasets.Features`` of the export (what SAELens' cache runner writes)."""
    from datasets import Array2D, Features, Sequence as Seq, Value

    cols: dict[str, Any] = {h.name: Array2D(shape=(context_size, int(np.prod(h.per_token))), dtype=h.dtype) for h in layouts}
    cols["token_ids"] = Seq(Value("int32"), length=context_size)
    return Features(cols)


def write_saelens(
    out: Path,
    attrs: dict[str, Any],
    tokens: TokenTable,
    layouts: Sequence[HookLayout],
    blocks: Iterable[tuple[int, dict[str, np.ndarray]]],
    context_size: int,
    fsync: bool = False,
) -> Path:
    """Pack ``blocks`` (``(first_token_row, {hook: [n, *per_token]})`` in token order) into windows
    and save them as a ``datasets`` folder at ``out`` (built beside it, then renamed; with
    ``fsync`` its files are fsynced before the rename and the rename after)."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # the export's own progress bar is the one that matters

    from workbench.store.durability import fsync_path

    n_windows = tokens.n_tokens // context_size
    if n_windows == 0:
        raise WorkbenchError(f"--context-size {context_size} is longer than the {tokens.n_tokens} chosen tokens")
    build = out.with_name(out.name + ".build")
    tmp = out.with_name(out.name + ".tmp")
    for p in (build, tmp):
        shutil.rmtree(p, ignore_errors=True)
    build.mkdir(parents=True)
    feats = features(layouts, context_size)
    row_bytes = sum(context_size * int(np.prod(h.per_token)) * np.dtype(h.dtype).itemsize for h in layouts)
    per_write = max(1, WRITER_BYTES // max(1, row_bytes))
    token_ids = tokens.token_id.astype(np.int32)
    pending: dict[str, list[np.ndarray]] = {h.name: [] for h in layouts}
    held = 0
    window = 0
    with ArrowWriter(features=feats, path=str(build / "data.arrow"), writer_batch_size=per_write) as writer:
        for _, arrays in blocks:
            for h in layouts:
                pending[h.name].append(arrays[h.name].reshape(len(arrays[h.name]), -1))
            held += len(next(iter(arrays.values())))
            full = held // context_size
            if not full:
                continue
            joined = {h: np.concatenate(v) for h, v in pending.items()}
            take = full * context_size
            ids = token_ids[window * context_size : (window + full) * context_size].reshape(full, context_size)
            writer.write_batch({**{h: list(v[:take].reshape(full, context_size, -1)) for h, v in joined.items()},
                                "token_ids": list(ids)})
            pending = {h: [v[take:]] for h, v in joined.items()}
            held -= take
            window += full
        writer.finalize()
    info = {"format": FORMAT, "context_size": context_size, "n_windows": n_windows,
            "dropped_tokens": tokens.n_tokens - n_windows * context_size, **attrs}
    ds = Dataset.from_file(str(build / "data.arrow"))
    ds.info.description = json.dumps(info, default=str)
    ds.save_to_disk(str(tmp))
    del ds
    if fsync:
        for f in tmp.iterdir():
            fsync_path(f)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if fsync:
        fsync_path(out.parent)
    shutil.rmtree(build)
    return out


def saelens_info(path: Path) -> dict[str, Any] | None:
    """The export metadata of a saelens export folder, or None if ``path`` is not one."""
    info = Path(path) / "dataset_info.json"
    if not info.is_file():
        return None
    try:
        meta = json.loads(json.loads(info.read_text()).get("description") or "{}")
    except (json.JSONDecodeError, AttributeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None
