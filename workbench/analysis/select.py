"""`workbench select`: task-agnostic debiasing sample selection by the model's uncertainty (the study's §6).

For each candidate text the model is asked the study's question
(``<text>\\nQuestion: Does the above text contain bias or stereotypes?\\nAnswer:``, raw text, no chat
template, as the study's code does), k answers are sampled (seeded), and the uncertainty over them is
measured as semantic entropy (:mod:`workbench.engine.uncertainty`: discrete, probability-weighted, and the
study's own estimator), beside the concept score of the question's last token when a probe is given.
The candidates with the lowest and with the highest uncertainty, and a random subset, each of the same
size, are written as JSONL with every score: both directions, because the study's code and its notes
disagree on which one helps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from workbench.errors import WorkbenchError
from workbench.engine.uncertainty import normalised_exact_match

QUESTION = "{text}\nQuestion: Does the above text contain bias or stereotypes?\nAnswer:"
ESTIMATORS = ("weighted", "discrete", "study")


@dataclass(frozen=True)
class Scored:
    """One candidate's answers and scores."""

    row: dict[str, Any]
    answers: list[str]
    mean_log_likelihood: list[float]  # per answer: mean over its tokens and its stop of log p
    semantic_entropy_discrete: float
    semantic_entropy_weighted: float
    study_cluster_uncertainty: float
    concept: float  # NaN without a probe

    def record(self) -> dict[str, Any]:
        """The JSONL line: the candidate's own fields, then the scores under ``selection``."""
        scores = {"answers": self.answers, "mean_log_likelihood": self.mean_log_likelihood, "semantic_entropy_discrete": self.semantic_entropy_discrete,
                  "semantic_entropy_weighted": self.semantic_entropy_weighted,
                  "study_cluster_uncertainty": self.study_cluster_uncertainty,
                  "concept": None if not np.isfinite(self.concept) else self.concept}
        return {**self.row, "selection": scores}


def read_candidates(path: Path, text_field: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, each with a string ``text_field``."""
    from workbench.engine.tasks import read_jsonl

    rows = []
    for lineno, row in read_jsonl(Path(path)):
        if not isinstance(row.get(text_field), str) or not row[text_field].strip():
            raise WorkbenchError(f"{path}:{lineno}: no text in field {text_field!r} (set --text-field)")
        rows.append(row)
    if not rows:
        raise WorkbenchError(f"{path}: no candidates")
    return rows


def score_candidates(model: Any, rows: list[dict[str, Any]], text_field: str, k: int, seed: int = 0,
                     max_new_tokens: int = 8, batch_size: int = 16, probe: Any = None,
                     equivalent: Callable[[str, str], bool] = normalised_exact_match) -> list[Scored]:
    """Ask ``model`` the study's question about every row, k sampled answers each (temperature 1,
    seeded per batch), and score them. ``probe``: a loaded probe file whose best-layer projection of
    the question's last-token state is the concept score."""
    import torch

    from workbench.engine.generation import generate_round, stop_ids
    from workbench.engine.protocol import Decoding

    from workbench.engine.sampling import ESTIMATES, decode_samples, semantic_uncertainty  # ESTIMATES: Scored's field order

    def pairwise(groups: list[list[str]]) -> list[np.ndarray]:
        return [np.array([[equivalent(a, b) for b in g] for a in g], dtype=bool) for g in groups]

    if k < 2:
        raise WorkbenchError(f"--k must be ≥ 2 to measure uncertainty over sampled answers, not {k}")
    tok = model.tokenizer
    stops = stop_ids(model.hf, tok)
    prompts = [list(tok(QUESTION.format(text=r[text_field]), add_special_tokens=True)["input_ids"]) for r in rows]
    decoding = Decoding(do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens)
    concept = _concept_scores(model, prompts, probe) if probe is not None else np.full(len(rows), np.nan)
    out: list[Scored] = []
    for start in range(0, len(rows), batch_size):
        batch = prompts[start : start + batch_size]
        torch.manual_seed(seed + start)
        res = generate_round(model.hf, tok, [p for p in batch for _ in range(k)], decoding, model.device)
        answers = decode_samples(tok, res, k, stops)
        est = semantic_uncertainty(answers, pairwise)
        for b in range(len(batch)):
            out.append(Scored(rows[start + b], answers.texts[b], answers.mean_log_likelihood[b].tolist(),
                              *(float(est[name][b]) for name in ESTIMATES), float(concept[start + b])))
    return out


def _concept_scores(model: Any, prompts: list[list[int]], probe: Any) -> np.ndarray:
    from probes.activations import text_activations

    layer = int(probe.best_layer)
    acts = text_activations(model, prompts, probe.meta["hook"], [layer], "last").numpy()[0]  # [n, d]
    row = [int(l) for l in probe.arrays["layers"]].index(layer)
    direction = probe.arrays["directions"][row].astype(np.float64)
    return acts @ (direction / np.linalg.norm(direction))


def select_subsets(scored: list[Scored], size: int, by: str, seed: int = 0) -> dict[str, list[Scored]]:
    """``{"low": …, "high": …, "random": …}``: the ``size`` candidates of lowest and of highest
    uncertainty (estimator ``by``; ties by input order) and ``size`` drawn at random (seeded)."""
    if by not in ESTIMATORS:
        raise WorkbenchError(f"--by must be one of {', '.join(ESTIMATORS)}, not {by!r}")
    if size < 1 or 2 * size > len(scored):
        raise WorkbenchError(f"--size {size}: needs 1 ≤ size ≤ half the {len(scored)} candidates (low and high are disjoint)")
    key = {"weighted": "semantic_entropy_weighted", "discrete": "semantic_entropy_discrete", "study": "study_cluster_uncertainty"}[by]
    values = np.array([getattr(s, key) for s in scored])
    order = np.argsort(values, kind="stable")
    rng = np.random.default_rng(seed)
    return {"low": [scored[i] for i in order[:size]], "high": [scored[i] for i in order[::-1][:size]],
            "random": [scored[i] for i in sorted(rng.choice(len(scored), size, replace=False))]}


def write_subsets(out: Path, subsets: dict[str, list[Scored]], scored: list[Scored]) -> list[Path]:
    """``low.jsonl``, ``high.jsonl``, ``random.jsonl`` and ``all.jsonl`` (every candidate's scores) under ``out``."""
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, items in (*subsets.items(), ("all", scored)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(s.record(), ensure_ascii=False) + "\n" for s in items), encoding="utf-8")
        paths.append(path)
    return paths
