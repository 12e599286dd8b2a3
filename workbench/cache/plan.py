"""What an export will write: the run's tokens (:class:`RunTokens`), the rows, rounds and roles chosen
(:class:`ExportPlan`), each token's label, and the token table the cache file keeps. No model is needed here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workbench.cache.file import ROLES, TokenTable
from workbench.errors import WorkbenchError


EXPORT_DTYPES = ("auto", "float32", "float16")


@dataclass(frozen=True)
class ExportPlan:
    """What an export computes, fixed before the first batch (a resumed export must match it)."""

    run_file: str
    run_digest: str
    rows: list[int]  # run-file rows exported, in order
    sample_index: list[int]  # their stable global indices
    rounds: list[int] | None  # 0-based; None: all
    roles: list[str]
    hooks: list[str]
    dtype: str
    batch_size: int
    key_length: int  # the key axis of attention maps: the longest chosen transcript
    batch_tokens: list[int]  # chosen tokens per batch

    @property
    def n_batches(self) -> int:
        return len(self.batch_tokens)

    def batch_rows(self, k: int) -> list[int]:
        return self.rows[k * self.batch_size : (k + 1) * self.batch_size]


# --------------------------------------------------------------------------- the run's tokens


def token_labels(length: int, prompt_span: np.ndarray, response_span: np.ndarray,
                 image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Round and role of every position of one transcript.

    prompt_span, response_span ``[R, 2]`` → (round ``[length]`` int16, role ``[length]`` uint8 index
    into ``ROLES``): a round's prompt span is ``prompt``, its response span ``response``; what
    follows the last response (the chat template's closing text) is ``template`` of the last round.
    ``image`` ``[length]`` bool (a VLM run: the transcript's image tokens) makes those ``image``."""
    rounds = np.full(length, -1, dtype=np.int16)
    roles = np.full(length, ROLES.index("template"), dtype=np.uint8)
    for t, ((ps, pe), (rs, re_)) in enumerate(zip(prompt_span, response_span)):
        rounds[ps:pe], roles[ps:pe] = t, ROLES.index("prompt")
        rounds[rs:re_], roles[rs:re_] = t, ROLES.index("response")
    end = int(max(prompt_span[:, 1].max(), response_span[:, 1].max())) if len(prompt_span) else 0
    rounds[end:] = len(prompt_span) - 1
    if image is not None:
        roles[image] = ROLES.index("image")
    return rounds, roles


def _chosen(rounds: np.ndarray, roles: np.ndarray, want_rounds: list[int] | None, want_roles: list[str]) -> np.ndarray:
    keep = np.isin(roles, [ROLES.index(r) for r in want_roles])
    if want_rounds is not None:
        keep &= np.isin(rounds, want_rounds)
    return np.flatnonzero(keep)


@dataclass(frozen=True)
class RunTokens:
    """The done samples of a run file: transcripts and spans, read once."""

    meta: dict[str, Any]
    rows: np.ndarray  # [n_done] run-file rows
    index: np.ndarray  # [n_done] stable global sample index
    transcripts: list[np.ndarray]  # [n_done][len] int32
    prompt_span: np.ndarray  # [n_done, R, 2]
    response_span: np.ndarray  # [n_done, R, 2]
    digest: str
    images: list[dict[str, Any]] | None = None  # [n_done] a VLM run's image records (samples/extra "image"); None: text

    def image_mask(self, i: int) -> np.ndarray | None:
        """``[len]`` bool: the image tokens of done sample ``i``'s transcript (None for a text run)."""
        if self.images is None:
            return None
        return self.transcripts[i] == int(self.meta["vision"]["image_token_id"])


def read_run(path: Path) -> RunTokens:
    """Transcripts, spans and metadata of the run's finished samples (through ``RunFile``)."""
    from workbench.store.reader import RunFile

    with RunFile(path) as run:
        meta = run.meta
        rows = np.flatnonzero(run.done)
        transcripts = [np.asarray(t, dtype=np.int32) for t in run.array("transcripts/token_ids")]
        prompt_span = run.array("rounds/prompt_span")
        response_span = run.array("rounds/response_span")
        index = run.array("samples/index")
        images = None
        if isinstance(meta.get("vision"), dict):
            images = [json.loads(e).get("image", {}) for e in run.array("samples/extra")]
    h = hashlib.sha256()
    for part in (rows.astype(np.int64), prompt_span.astype(np.int64), response_span.astype(np.int64)):
        h.update(part.tobytes())
    for t in transcripts:
        h.update(np.int64(len(t)).tobytes() + t.tobytes())
    return RunTokens(meta, rows, np.asarray(index, dtype=np.int64), transcripts, prompt_span, response_span, h.hexdigest(), images)


def run_images(run: RunTokens, rows: list[int]) -> list[Any] | None:
    """The pictures of a VLM run's ``rows`` (PIL RGB), each checked against the sha256 the run
    recorded; None for a text run. One line naming the file when one is gone or changed."""
    if run.images is None:
        return None
    from workbench.engine.images import load_image

    position_of_row = {int(r): i for i, r in enumerate(run.rows)}
    pictures = []
    for r in rows:
        record = run.images[position_of_row[r]]
        path = Path(str(record.get("path", "")))
        where = f"sample row {r}"
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as e:
            raise WorkbenchError(f"{where}: the run's image {path} cannot be read ({e.strerror}); the export recomputes "
                                 "its activations from the picture") from None
        if digest != record.get("sha256"):
            raise WorkbenchError(f"{where}: the image {path} changed since the run (sha256 {digest[:12]}…, the run "
                                 f"recorded {str(record.get('sha256'))[:12]}…)")
        pictures.append(load_image(path, where))
    return pictures


# --------------------------------------------------------------------------- the export


def parse_rows(text: str | None, n_samples: int) -> list[int] | None:
    """``--samples``: ``A:B`` (a slice of run-file rows), ``A,B,C``, or None (all)."""
    if text is None:
        return None
    try:
        if ":" in text:
            lo, _, hi = text.partition(":")
            return list(range(*slice(int(lo) if lo else None, int(hi) if hi else None).indices(n_samples)))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise WorkbenchError(f"--samples takes A:B or comma-separated run-file rows, not {text!r}") from None


def recorded_adapter(meta: dict[str, Any]) -> str | None:
    """The folder of the LoRA adapter a run was made with (``adapter`` of its settings), or None."""
    adapter = meta.get("adapter")
    return str(adapter["path"]) if isinstance(adapter, dict) and adapter.get("path") else None


def check_same_model(model: Any, meta: dict[str, Any], run_path: Path) -> None:
    """Refuse a run file made with another model than the loaded one (or with another LoRA adapter merged)."""
    ours = model.metadata()
    same_place = (ours["model_name"] == meta.get("model_name") == "organism") or (
        Path(str(meta.get("model_path", ""))).expanduser().resolve() == Path(ours["model_path"]).expanduser().resolve()
        if Path(str(meta.get("model_path", ""))).exists() else meta.get("model_path") == ours["model_path"])
    keys = ("model_class", "n_layers", "d_model")
    if not same_place or meta.get("model_revision", "") != ours["model_revision"] or any(meta.get(k) != ours[k] for k in keys):
        raise WorkbenchError(f"{run_path} was made with model {meta.get('model_name')!r} ({meta.get('model_path')}), "
                             f"not the loaded {ours['model_name']!r} ({ours['model_path']}); pass --model {meta.get('model_name')}")
    theirs = meta.get("adapter") if isinstance(meta.get("adapter"), dict) else {}
    if (theirs or {}).get("sha256") != (ours.get("adapter") or {}).get("sha256"):
        raise WorkbenchError(f"{run_path} was made with {'the adapter ' + str(theirs['path']) if theirs else 'no adapter'}, "
                             f"the loaded model has {'the adapter ' + str(ours['adapter']['path']) if ours.get('adapter') else 'none'}")


def export_dtype(requested: str, model_dtype: str) -> str:
    """``auto``: the model's dtype when HDF5 has it, float32 for bfloat16 (exact)."""
    if requested not in EXPORT_DTYPES:
        raise WorkbenchError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, not {requested!r}")
    if requested == "auto":
        return model_dtype if model_dtype in ("float32", "float16") else "float32"
    return requested


def plan_export(run: RunTokens, run_path: Path, hooks: list[str], rows: list[int] | None, rounds: list[int] | None,
                roles: list[str], dtype: str, batch_size: int) -> tuple[ExportPlan, list[np.ndarray]]:
    """The fixed plan and, per exported sample, its chosen positions."""
    n_rounds = run.prompt_span.shape[1] if len(run.prompt_span) else int(run.meta.get("n_rounds", 0))
    known = ROLES[:3] + (("image",) if run.images is not None else ())
    bad = [r for r in roles if r not in known]
    if bad:
        also = "" if run.images is not None or bad[0] != "image" else " (image: a vision-language model's run only)"
        raise WorkbenchError(f"--roles: unknown role {bad[0]!r} (roles: {', '.join(known)}){also}")
    if rounds is not None and any(not 0 <= r < n_rounds for r in rounds):
        raise WorkbenchError(f"--rounds: the run has rounds 1..{n_rounds}")
    if batch_size < 1:
        raise WorkbenchError("--batch-size must be at least 1")
    position_of_row = {int(r): i for i, r in enumerate(run.rows)}
    if rows is None:
        rows = [int(r) for r in run.rows]
    n_samples = int(run.meta.get("n_samples", len(run.rows)))
    outside = [r for r in rows if not 0 <= r < n_samples]
    if outside:
        raise WorkbenchError(f"--samples: row {outside[0]} is out of range (the run has rows 0..{n_samples - 1})")
    not_done = [r for r in rows if r not in position_of_row]
    if not_done:
        raise WorkbenchError(f"--samples: row {not_done[0]} is not finished in {run_path} ({len(not_done)} rows are not)")
    chosen = []
    for r in rows:
        i = position_of_row[r]
        rnd, role = token_labels(len(run.transcripts[i]), run.prompt_span[i], run.response_span[i], run.image_mask(i))
        chosen.append(_chosen(rnd, role, rounds, roles))
    if not sum(len(c) for c in chosen):
        raise WorkbenchError("the selection (--samples, --rounds, --roles) holds no tokens")
    lengths = [len(run.transcripts[position_of_row[r]]) for r in rows]
    batch_tokens = [int(sum(len(c) for c in chosen[k : k + batch_size])) for k in range(0, len(rows), batch_size)]
    plan = ExportPlan(
        run_file=str(run_path), run_digest=run.digest, rows=rows,
        sample_index=[int(run.index[position_of_row[r]]) for r in rows], rounds=rounds, roles=list(roles),
        hooks=hooks, dtype=dtype, batch_size=batch_size, key_length=max(lengths), batch_tokens=batch_tokens,
    )
    return plan, chosen


def token_table(run: RunTokens, plan: ExportPlan, chosen: list[np.ndarray], tokenizer: Any) -> TokenTable:
    position_of_row = {int(r): i for i, r in enumerate(run.rows)}
    sample, rnd, role, position, ids = [], [], [], [], []
    for r, c in zip(plan.rows, chosen):
        i = position_of_row[r]
        rr, ro = token_labels(len(run.transcripts[i]), run.prompt_span[i], run.response_span[i], run.image_mask(i))
        sample.append(np.full(len(c), r, dtype=np.int32))
        rnd.append(rr[c])
        role.append(ro[c])
        position.append(c.astype(np.int32))
        ids.append(run.transcripts[i][c])
    token_id = np.concatenate(ids)
    strings = {int(u): tokenizer.decode([int(u)]) for u in np.unique(token_id)}
    return TokenTable(
        offsets=np.concatenate([[0], np.cumsum([len(c) for c in chosen])]).astype(np.int64),
        sample=np.concatenate(sample), round=np.concatenate(rnd), role=np.concatenate(role),
        position=np.concatenate(position), token_id=token_id, token_str=[strings[int(u)] for u in token_id],
    )
