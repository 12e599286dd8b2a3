"""What the TUI reads from a run file: a small overview at open, one sample's rounds on demand.

Every function here blocks on disk, so the app calls them from thread workers. Reads go through
:class:`workbench.store.writer.RunFile` (no torch). Each call opens the file, reads, and closes it again:
a file that is still being written is never held open by the viewer, and a reopened file shows
the batches that landed since.

The per-token datasets (``response_token_ids``, ``token_entropy``) are read only by the two
accessors below, so a change of where the store keeps them is a change of one line each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from workbench.store.reader import RunFile

ROUNDS = "rounds"
SCORES = ("cosine", "projection")  # the concept scores a probe group may hold, the first one shown by default


def response_token_ids(run: RunFile, positions: Sequence[int]) -> np.ndarray:
    """Generated token ids of the given done samples: object array ``[n, R]`` of int32 ``[T]``
    (the stop token excluded)."""
    return run.array("tokens/response_token_ids", samples=list(positions))


def token_entropies(run: RunFile, positions: Sequence[int]) -> np.ndarray:
    """Token entropies (nats) of the given done samples: object array ``[n, R]`` of float32
    ``[T]`` or ``[T + 1]`` (the stop token's step included when the answer ended with one)."""
    return run.array("tokens/token_entropy", samples=list(positions))


@dataclass(frozen=True)
class ProbeInfo:
    """A tracked probe (a ``probes/{name}`` group): its scores and the colour range of each."""

    name: str
    kind: str  # "probe" (workbench probe track) or "stereotype-statement"
    layers: tuple[int, ...]
    best_layer: int | None
    method: str
    hook: str
    ranges: dict[str, tuple[float, float]]  # score ("cosine", "projection") → its 1st and 99th percentile over the run


@dataclass(frozen=True)
class RunOverview:
    """What the first screen needs: run metadata and one small row per finished sample."""

    path: Path
    meta: dict[str, Any]
    status: str
    n_samples: int
    n_rounds: int
    multiple_choice: bool
    positions: np.ndarray  # [n_done] file rows of the finished samples (position p ↔ file row positions[p])
    ids: tuple[str, ...]  # [n_done]
    categories: tuple[str, ...]  # [n_done]
    correct: np.ndarray  # [n_done, R] bool (all False for open-ended tasks)
    probes: tuple[ProbeInfo, ...]

    @property
    def n_done(self) -> int:
        return len(self.ids)

    @property
    def model(self) -> str:
        return str(self.meta.get("model_name", "?"))

    @property
    def protocol(self) -> str:
        protocol = self.meta.get("protocol")
        return str(protocol.get("name", "?")) if isinstance(protocol, dict) else str(protocol)

    def probe(self, name: str | None) -> ProbeInfo | None:
        return next((p for p in self.probes if p.name == name), None)

    def interventions_at(self, round_: int) -> str | None:
        """What acted in ``round_`` (1-based), in short (``steer fair.h5@3 α=+4``; ``–`` for
        nothing), or None for a run without interventions (its ``interventions`` setting)."""
        records = self.meta.get("interventions")
        if not isinstance(records, list) or not records:
            return None
        said = []
        for r in records:
            if not isinstance(r, dict):
                continue
            rounds = r.get("rounds")
            if rounds is None or (isinstance(rounds, list) and round_ in rounds):
                amount = f" α={r['alpha']:+g}" if isinstance(r.get("alpha"), (int, float)) else \
                    f" ={r['value']:g}" if isinstance(r.get("value"), (int, float)) else ""
                said.append(f"{r.get('kind', '?')} {r.get('label', '')}{amount}".replace("  ", " "))
        return "; ".join(said) or "–"


@dataclass(frozen=True)
class SampleRounds:
    """One sample, every round it has (``R`` = len(responses); live mode grows it round by round)."""

    position: int  # among the finished samples (the sample list's order)
    id: str
    category: str
    context: str
    question: str
    options: tuple[str, ...]  # the sample's own options (padding dropped)
    gold: int  # -1 when there is none
    instructions: tuple[str, ...]  # [R] the user message of each round
    responses: tuple[str, ...]  # [R]
    token_ids: tuple[np.ndarray, ...]  # [R] of int32 [T_r]
    token_entropies: tuple[np.ndarray, ...]  # [R] of float32 [T_r] or [T_r + 1]
    option_probs: np.ndarray  # [R, K] float32, NaN beyond the sample's options
    answer: np.ndarray  # [R] int, -1 = none
    correct: np.ndarray  # [R] bool
    mean_token_entropy: np.ndarray  # [R] float32
    option_entropy: np.ndarray  # [R] float32
    concept: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # probe → score → [R, L_probe]
    prefixes: tuple[str, ...] = ()  # [R] the assistant prefix the protocol forced before each response ("" none)
    thumbnail: bytes | None = None  # a vision-language run's picture (PNG bytes, samples/extra "image"); None: no picture

    @property
    def n_rounds(self) -> int:
        return len(self.responses)


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def round_prefixes(protocol: Any, n_rounds: int) -> tuple[str, ...]:
    """``[n_rounds]`` the assistant prefix of each round under ``protocol`` (the run's protocol
    JSON as a dict: ``first_prefix`` for round 1, ``followup_prefix`` after, as
    :meth:`workbench.engine.protocol.Protocol.prefix` gives them); "" where there is none or the
    run recorded no protocol."""
    if not isinstance(protocol, dict):
        return ("",) * n_rounds
    first, followup = (protocol.get(k, "") for k in ("first_prefix", "followup_prefix"))
    first, followup = (x if isinstance(x, str) else "" for x in (first, followup))
    return tuple(first if t == 0 else followup for t in range(n_rounds))


def _robust_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return 0.0, 1.0
    lo, hi = float(np.percentile(finite, 1)), float(np.percentile(finite, 99))
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def _probe_infos(run: RunFile) -> tuple[ProbeInfo, ...]:
    out = []
    for name in run.names("probes"):
        group = run.f[f"probes/{name}"]
        ranges = {score: _robust_range(run.array(f"probes/{name}/{score}")) for score in SCORES if score in group}
        if not ranges:
            continue
        best = group.attrs.get("best_layer")
        out.append(ProbeInfo(
            name=name, kind=_str(group.attrs.get("kind", "probe")), layers=tuple(json.loads(_str(group.attrs["layers"]))),
            best_layer=None if best is None else int(best), method=_str(group.attrs.get("method", "")),
            hook=_str(group.attrs.get("hook", "")), ranges=ranges,
        ))
    return tuple(out)


def read_overview(path: str | Path) -> RunOverview:
    """Open ``path`` and read its metadata, the finished samples' ids, categories and per-round
    correctness ``[n_done, R]``, and the tracked probes."""
    with RunFile(path) as run:
        meta = run.meta
        done = run.done
        correct = run.array(f"{ROUNDS}/correct").astype(bool)
        return RunOverview(
            path=Path(path),
            meta=meta,
            status=str(meta.get("status", "?")),
            n_samples=int(meta.get("n_samples", len(done))),
            n_rounds=run.n_rounds,
            multiple_choice=int(meta.get("n_options", 0)) > 0,
            positions=np.flatnonzero(done),
            ids=tuple(run.array("samples/id").tolist()),
            categories=tuple(run.array("samples/category").tolist()),
            correct=correct,
            probes=_probe_infos(run),
        )


def read_sample(path: str | Path, position: int, probes: Sequence[ProbeInfo] = ()) -> SampleRounds:
    """Every round of the finished sample at ``position`` (0-based among finished samples), with
    each score of each probe in ``probes`` per round and probe layer ``[R, L_probe]``."""
    return read_samples(path, [position], probes)[0]


def read_samples(path: str | Path, positions: Sequence[int], probes: Sequence[ProbeInfo] = ()) -> list[SampleRounds]:
    """:func:`read_sample` of several finished samples with the file opened once (the sample
    screen reads a sample's neighbours ahead this way), in the order of ``positions``."""
    order = sorted(set(int(p) for p in positions))  # the store reads rows in increasing order
    if not order:
        return []
    with RunFile(path) as run:
        def rows(name: str) -> Any:
            return run.array(name, samples=order)

        n_rounds = run.n_rounds
        prefixes = round_prefixes(run.meta.get("protocol"), n_rounds)
        columns = {name: rows(name) for name in (
            "samples/id", "samples/category", "samples/context", "samples/question", "samples/gold",
            f"{ROUNDS}/instruction", f"{ROUNDS}/response", f"{ROUNDS}/option_probs", f"{ROUNDS}/answer",
            f"{ROUNDS}/correct", f"{ROUNDS}/mean_token_entropy", f"{ROUNDS}/option_entropy")}
        options = rows("samples/options") if "samples/options" in run.f else None
        ids, entropies = response_token_ids(run, order), token_entropies(run, order)
        concept = {p.name: {score: rows(f"probes/{p.name}/{score}") for score in p.ranges} for p in probes}
        thumbnails = sample_thumbnails(rows("samples/extra")) if isinstance(run.meta.get("vision"), dict) else [None] * len(order)
    out = {}
    for k, position in enumerate(order):
        def one(name: str) -> Any:
            return columns[name][k]

        out[position] = SampleRounds(
            position=position,
            id=_str(one("samples/id")),
            category=_str(one("samples/category")),
            context=_str(one("samples/context")),
            question=_str(one("samples/question")),
            options=tuple(o for o in options[k].tolist() if o) if options is not None else (),
            gold=int(one("samples/gold")),
            instructions=tuple(one(f"{ROUNDS}/instruction").tolist()),
            responses=tuple(one(f"{ROUNDS}/response").tolist()),
            token_ids=tuple(np.asarray(t, dtype=np.int32) for t in ids[k]),
            token_entropies=tuple(np.asarray(t, dtype=np.float32) for t in entropies[k]),
            option_probs=np.asarray(one(f"{ROUNDS}/option_probs"), dtype=np.float32).reshape(n_rounds, -1),
            answer=np.asarray(one(f"{ROUNDS}/answer"), dtype=np.int64),
            correct=np.asarray(one(f"{ROUNDS}/correct")).astype(bool),
            mean_token_entropy=np.asarray(one(f"{ROUNDS}/mean_token_entropy"), dtype=np.float32),
            option_entropy=np.asarray(one(f"{ROUNDS}/option_entropy"), dtype=np.float32),
            concept={p.name: {score: np.asarray(v[k], dtype=np.float32) for score, v in concept[p.name].items()} for p in probes},
            prefixes=prefixes,
            thumbnail=thumbnails[k],
        )
    return [out[int(p)] for p in positions]


def sample_thumbnails(extras: Any) -> list[bytes | None]:
    """Each sample's thumbnail (PNG bytes) from its ``samples/extra`` JSON, None where it has none
    or the JSON is damaged (a file is a stranger's)."""
    from workbench.engine.images import thumbnail_from_extra

    out: list[bytes | None] = []
    for text in extras:
        try:
            out.append(thumbnail_from_extra(json.loads(_str(text))))
        except (ValueError, TypeError):
            out.append(None)
    return out


def search_text(path: str | Path, needle: str) -> np.ndarray:
    """``[n_done]`` bool: finished samples whose id, context, question or any round's response
    contains ``needle`` (case-insensitive). Reads those columns whole."""
    needle = needle.lower()
    with RunFile(path) as run:
        hit = np.zeros(int(run.done.sum()), dtype=bool)
        for name in ("samples/id", "samples/context", "samples/question", f"{ROUNDS}/response"):
            values = run.array(name)
            values = values.reshape(len(hit), -1)
            hit |= np.array([any(needle in str(v).lower() for v in row) for row in values], dtype=bool)
        return hit
