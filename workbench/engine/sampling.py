"""k sampled answers per round beside the greedy one, and the semantic entropy over them
(``workbench run --samples-per-round k [--equivalence exact|nli:MODEL]``; DESIGN §6).

**Where the samples come from.** The conversation goes on with the round's own answer; the k samples
are drawn from the same round prompt (the whole conversation so far, the new instruction and the
assistant prefix) after the round has run. They reuse the round's KV cache: the prompt's cached
keys and values, all but the last position, are copied k times along the batch, so the samples run
only the last prompt token and their own steps, never the prefill again (a model whose cache is not
a plain per-layer key/value cache re-runs the prompt for them instead). All B·k samples of a batch
are generated together, seeded by (seed, the batch's first sample index, round) in a forked RNG, so
the same seed gives the same samples, a resumed run draws the same ones, and the main conversation's
own random state (a sampled protocol) is untouched.

**The estimates** (:mod:`workbench.engine.uncertainty`), each ``[B]``, named apart:

* ``semantic_entropy_discrete`` — −Σ p(C) log p(C) with p(C) the fraction of samples in cluster C;
* ``semantic_entropy_weighted`` — the same with p(C) from the samples' mean-token log-likelihoods
  (logsumexp within a cluster, normalised over the k samples);
* ``study_cluster_uncertainty`` — the study's estimator, the mean over clusters of the mean NLL;
  not an entropy, kept because the study's figures were computed with it.

**Equivalence.** ``exact`` (default): equal after lower-casing, collapsing whitespace and stripping
surrounding punctuation. ``nli:MODEL``: bidirectional entailment (Kuhn et al., 2023): two answers
are equivalent when a Hugging Face NLI classifier (labels named entailment and contradiction) puts
``entailment`` first both ways; identical answers are equivalent without asking it.
``nli-nocontra:MODEL``: the study's looser rule (``analysis/uncerntainty.py`` lines 378-393 of
HaitaoMao/LLM-self-correction, with ``microsoft/deberta-large-mnli``, labels 0/1/2 =
contradiction/neutral/entailment): equivalent unless either direction's argmax is
``contradiction``. Every ordered pair a round needs is classified in one batched pass. Clusters:
each answer joins the first cluster whose first member it is equivalent to.

**Likelihood.** An answer's mean token log-likelihood is, by default, Farquhar et al.'s
(``jlko/semantic_uncertainty``, ``huggingface_models.py``: ``log_likelihoods[:n_generated]``): the
mean of log p over its tokens, the stop token excluded; an answer that is only a stop token takes
the stop token's (as their code does). ``--likelihood with-stop`` also counts the stop token (the
workbench's earlier rule). The answers' token ids are stored (``rounds/sampled_token_ids``), so
every likelihood can be recomputed from the run file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import numpy as np

from workbench.errors import WorkbenchError
from workbench.engine.uncertainty import (
    cluster_by_equivalence,
    normalised_exact_match,
    semantic_entropy_discrete,
    semantic_entropy_weighted,
    study_cluster_uncertainty,
)

if TYPE_CHECKING:
    import torch

    from workbench.engine.generation import RoundOutput
    from workbench.engine.protocol import Decoding

ESTIMATES = ("semantic_entropy_discrete", "semantic_entropy_weighted", "study_cluster_uncertainty")
LIKELIHOODS = ("no-stop", "with-stop")  # --likelihood: Farquhar et al.'s (the stop token excluded), or with it
SAMPLE_ROWS = 32  # sampled rows generated at once: their step logits [rows, steps, vocab] are kept until decoded


# ----------------------------------------------------------------------------- equivalence


@dataclass(frozen=True)
class EquivalenceSpec:
    """A checked ``--equivalence``: ``exact``, or ``nli`` with the model and its label indices."""

    kind: str
    model: str = ""
    entailment: int = -1
    contradiction: int = -1

    def record(self) -> dict[str, Any]:
        """How answers were clustered, for the run file's ``sampling`` attribute."""
        if self.kind == "exact":
            return {"kind": "exact", "rule": "equal after lower-casing, collapsing whitespace, stripping surrounding punctuation"}
        if self.kind == "nli-nocontra":
            return {"kind": "nli-nocontra", "model": self.model,
                    "rule": "the study's: equivalent unless the classifier's argmax is contradiction in either direction",
                    "source": "HaitaoMao/LLM-self-correction analysis/uncerntainty.py lines 378-393",
                    "entailment_label": self.entailment, "contradiction_label": self.contradiction}
        return {"kind": "nli", "model": self.model, "rule": "bidirectional entailment: the classifier's argmax is entailment both ways",
                "entailment_label": self.entailment, "contradiction_label": self.contradiction}


def check_equivalence(spec: str) -> EquivalenceSpec:
    """Parse and check ``--equivalence`` (``exact``, ``nli:MODEL`` or ``nli-nocontra:MODEL``) without
    loading a model."""
    from workbench.engine.scorers import choose_label, read_classifier_config

    if spec == "exact":
        return EquivalenceSpec("exact")
    kind, sep, target = spec.partition(":")
    if kind not in ("nli", "nli-nocontra") or not sep or not target:
        raise WorkbenchError(f"--equivalence {spec!r}: expected exact, nli:MODEL (bidirectional entailment with a Hugging Face "
                             "NLI classifier) or nli-nocontra:MODEL (the study's: merged unless either direction is contradiction)")
    what = f"--equivalence {spec}"
    config = read_classifier_config(target, what)
    lowered = [l.lower() for l in config.labels]
    if "entailment" not in lowered or "contradiction" not in lowered:
        raise WorkbenchError(f"{what}: an NLI model needs labels named entailment and contradiction "
                             f"(its labels: {', '.join(config.labels)})")
    return EquivalenceSpec(kind, config.path, choose_label(config.labels, "entailment", what), choose_label(config.labels, "contradiction", what))


Equivalence = Callable[[list[list[str]]], list[np.ndarray]]  # per sample, k answers → [k, k] bool


def exact_equivalence(groups: list[list[str]]) -> list[np.ndarray]:
    """``[k, k]`` bool matrices of :func:`workbench.engine.uncertainty.normalised_exact_match`, one per group."""
    return [np.array([[normalised_exact_match(a, b) for b in g] for a in g], dtype=bool) for g in groups]


def entailment_equivalence(entails: Callable[[list[str], list[str]], np.ndarray]) -> Equivalence:
    """Bidirectional entailment from ``entails(premises, hypotheses) → [m] bool`` (one batched call
    per round over every ordered pair of distinct answers of every group)."""

    def equivalence(groups: list[list[str]]) -> list[np.ndarray]:
        premises, hypotheses, where = [], [], []
        for g, answers in enumerate(groups):
            for i, a in enumerate(answers):
                for j, b in enumerate(answers):
                    if i != j and a != b:
                        premises.append(a)
                        hypotheses.append(b)
                        where.append((g, i, j))
        decided = entails(premises, hypotheses) if premises else np.zeros(0, dtype=bool)
        forward = [np.array([[a == b for b in g] for a in g], dtype=bool) for g in groups]
        for (g, i, j), yes in zip(where, decided):
            forward[g][i, j] = bool(yes)
        return [m & m.T for m in forward]

    return equivalence


def no_contradiction_equivalence(labels: Callable[[list[str], list[str]], np.ndarray], contradiction: int) -> Equivalence:
    """The study's rule from ``labels(premises, hypotheses) → [m]`` NLI label ids (the argmax): two
    answers are equivalent unless the label is ``contradiction`` in either direction (one batched
    call per round over every ordered pair of distinct answers; identical answers are equivalent)."""
    return entailment_equivalence(lambda p, h: np.asarray(labels(p, h)) != contradiction)


def build_equivalence(spec: EquivalenceSpec, device: str = "cpu") -> Equivalence:
    """The equivalence a checked spec names, its model loaded."""
    if spec.kind == "exact":
        return exact_equivalence
    from workbench.engine.scorers import SequenceClassifier

    classifier = SequenceClassifier(spec.model, device)
    if spec.kind == "nli-nocontra":
        return no_contradiction_equivalence(lambda p, h: classifier.logits(p, h).argmax(-1), spec.contradiction)
    return entailment_equivalence(lambda p, h: classifier.logits(p, h).argmax(-1) == spec.entailment)


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SampledAnswers:
    """k sampled answers of each of B samples."""

    texts: list[list[str]]  # [B][k]
    mean_log_likelihood: np.ndarray  # [B, k] float64: mean over each answer's tokens (and its stop, with-stop) of log p
    token_ids: list[list[list[int]]] | None = None  # [B][k][tokens] without the stop token


def round_seed(seed: int, first_index: int, round_: int) -> int:
    """The torch seed of one batch's samples in one round (1-based): a function of the run's seed, the
    batch's first global sample index and the round only."""
    return int(np.random.SeedSequence([seed, first_index, round_]).generate_state(1)[0])


def mean_log_likelihoods(step_logits: torch.Tensor, response_ids: list[list[int]], stops: list[int],
                         likelihood: str = "no-stop") -> np.ndarray:
    """Mean per-token log-likelihood of each generated answer under the model (temperature 1).
    ``no-stop`` (Farquhar et al.): the mean of log p over its tokens, the stop token excluded; an
    answer with no token before its stop takes the stop's log-probability. ``with-stop``: its tokens,
    then (when it ended before the step limit) the probability of stopping there. The stop's
    probability is summed over the stop tokens. step_logits ``[rows, steps, vocab]`` → ``[rows]``
    float64 (NaN for an answer with no step). One row at a time, so no second ``[rows, steps, vocab]``
    tensor is made."""
    import torch

    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, not {likelihood!r}")
    out = np.full(len(response_ids), np.nan)
    for row, ids in enumerate(response_ids):
        steps = step_logits.shape[1]
        n = min(len(ids), steps)
        with_stop = n < steps and (likelihood == "with-stop" or n == 0)
        used = n + (1 if with_stop else 0)
        if used == 0:
            continue
        logp = torch.log_softmax(step_logits[row, :used].float(), -1)
        terms = logp[torch.arange(n), torch.tensor(ids[:n], dtype=torch.long)]
        if with_stop:
            terms = torch.cat([terms, torch.logsumexp(logp[n, stops], 0)[None]])
        out[row] = float(terms.mean())
    return out


def decode_samples(tokenizer: Any, rnd: RoundOutput, k: int, stops: list[int], likelihood: str = "no-stop") -> SampledAnswers:
    """A round output of B·k rows (sample b's answers at rows b·k … b·k + k − 1) as answers per sample."""
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in rnd.response_ids]
    ll = mean_log_likelihoods(rnd.step_logits, rnd.response_ids, stops, likelihood)
    b = len(texts) // k
    ids = [rnd.response_ids[i * k : (i + 1) * k] for i in range(b)]
    return SampledAnswers([texts[i * k : (i + 1) * k] for i in range(b)], ll.reshape(b, k), ids)


def sample_round(
    hf: Any, tokenizer: Any, rnd: RoundOutput, prompts: list[list[int]], k: int, decoding: Decoding,
    device: str, seed: int, reuse_cache: bool = True, likelihood: str = "no-stop",
    intervene: Callable[[int], ContextManager[None]] | None = None,
) -> SampledAnswers:
    """k sampled answers to each row's round prompt (see the module docstring; ``likelihood``: how
    their mean log-likelihoods are taken, :func:`mean_log_likelihoods`). ``rnd`` is the
    round's own output (its cache holds the prompt at its first ``prompt_mask.shape[1]`` positions);
    ``prompts[b]`` is row b's whole round prompt (transcript so far + the new tokens), used for the
    last token and when the cache cannot be reused. ``decoding``: sampled, as the samples are drawn.
    ``intervene(n)``: the round's interventions installed around each pass of ``n`` sampled rows
    (:meth:`workbench.engine.session.Session.step` gives it when interventions act this round); it
    needs the round's cache (the samples then see what the round's own answer saw)."""
    import contextlib

    import torch

    from workbench.engine.generation import generate_round, stop_ids
    from workbench.engine.generation import plain_cache

    batch = len(prompts)
    reuse = reuse_cache and plain_cache(rnd.cache)
    if intervene is not None and not reuse:
        raise WorkbenchError("sampled answers under interventions continue the round's own KV cache, which this model's "
                             "cache kind (or reuse_cache=False) does not allow")
    devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    texts: list[list[str]] = []
    ids: list[list[list[int]]] = []
    lls: list[np.ndarray] = []
    stops = stop_ids(hf, tokenizer)
    per_chunk = max(1, SAMPLE_ROWS // k)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, batch, per_chunk):
            rows = list(range(start, min(start + per_chunk, batch)))
            if reuse:
                past = _repeated_prefix(rnd, rows, k)
                with intervene(len(rows) * k) if intervene is not None else contextlib.nullcontext():
                    out = generate_round(hf, tokenizer, [[prompts[r][-1]] for r in rows for _ in range(k)], decoding, device, past)
            else:
                out = generate_round(hf, tokenizer, [prompts[r] for r in rows for _ in range(k)], decoding, device)
            got = decode_samples(tokenizer, out, k, stops, likelihood)
            texts += got.texts
            ids += got.token_ids
            lls.append(got.mean_log_likelihood)
            del out
    return SampledAnswers(texts, np.concatenate(lls, 0), ids)


def _repeated_prefix(rnd: RoundOutput, rows: list[int], k: int) -> Any:
    """A new cache with ``rows``' prompt positions but the last, each row repeated k times, and its mask."""
    import torch
    from transformers import DynamicCache

    from workbench.engine.generation import CarriedCache

    width = rnd.prompt_mask.shape[1] - 1
    index = torch.tensor(rows, device=rnd.prompt_mask.device).repeat_interleave(k)
    cache = DynamicCache()
    for layer, held in enumerate(rnd.cache.layers):
        cache.update(held.keys[index.to(held.keys.device), :, :width].clone(), held.values[index.to(held.values.device), :, :width].clone(), layer)
    return CarriedCache(cache, rnd.prompt_mask[index, :width])


def sampled_decoding(protocol_decoding: Decoding) -> Decoding:
    """How the samples are drawn: the protocol's temperature and top-p when it samples, else
    temperature 1 and top-p 1; its ``max_new_tokens``."""
    from dataclasses import replace

    if protocol_decoding.do_sample:
        return replace(protocol_decoding, do_sample=True)
    return replace(protocol_decoding, do_sample=True, temperature=1.0, top_p=1.0)


def padded_token_ids(answers: SampledAnswers, width: int) -> np.ndarray:
    """The answers' token ids as ``[B, k, width]`` int32, each answer's ids (the stop token excluded)
    from the left, -1 after them (``rounds/sampled_token_ids``; an answer shorter than ``width``
    ended with a stop token)."""
    ids = answers.token_ids or []
    out = np.full((len(ids), len(ids[0]) if ids else 0, width), -1, dtype=np.int32)
    for b, row in enumerate(ids):
        for j, seq in enumerate(row):
            out[b, j, : min(len(seq), width)] = seq[:width]
    return out


def semantic_uncertainty(answers: SampledAnswers, equivalence: Equivalence = exact_equivalence) -> dict[str, np.ndarray]:
    """Clusters and the three estimates of every sample: ``sampled_cluster`` ``[B, k]`` int16 (0, 1, …
    in order of first appearance) and each of :data:`ESTIMATES` ``[B]`` float32 (nats; NaN where an
    answer's log-likelihood is undefined for the weighted and study estimates)."""
    matrices = equivalence(answers.texts)
    clusters = np.stack([cluster_by_equivalence(m) for m in matrices]) if matrices else np.zeros((0, 0), dtype=np.int64)
    ll = answers.mean_log_likelihood
    out = {"sampled_cluster": clusters.astype(np.int16)}
    out["semantic_entropy_discrete"] = np.array([semantic_entropy_discrete(c) for c in clusters], dtype=np.float32)
    out["semantic_entropy_weighted"] = np.array([semantic_entropy_weighted(c, l) if np.isfinite(l).all() else np.nan
                                                 for c, l in zip(clusters, ll)], dtype=np.float32)
    out["study_cluster_uncertainty"] = np.array([study_cluster_uncertainty(c, -l) if np.isfinite(l).all() else np.nan
                                                 for c, l in zip(clusters, ll)], dtype=np.float32)
    return out
