"""`workbench theory`: the study's two-concept Bayesian account of convergence (after Xie et al.).

Two latent concepts, C_p (e.g. "unbiased") and C_n = not C_p, with prior c_p = p(C_p). The query of
round t, q_t, holds the question x, and for each earlier round an instruction i and the model's
answer y: 1 + 2(t − 1) pieces of evidence. Given the concept the pieces are independent, and each
is described by the posterior it gives alone: c_x = p(C_p | x), c_i = p(C_p | i), c_y = p(C_p | y).
By Bayes' rule p(e | C) ∝ p(C | e) / p(C), so

    odds(C_p | q_t) = odds(c_x) · [odds(c_i) · odds(c_y) / odds(c_p)²]^(t − 1)

(with odds(c) = c / (1 − c)), and p(C_p | q_t) = odds / (1 + odds): the properly normalised
posterior. The study wrote p(C_p | q_t) ∝ (c_i · c_y)^(t − 1) · p(C_p | q_0) and used it as a
probability; without the normalisation over both concepts (and the prior's correction) it is not
one — it falls towards 0 whenever c_i · c_y < 1, whatever the evidence says. Both are printed side
by side. Pure NumPy; no torch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class TheoryParams:
    """The two-concept model's parameters (each a probability in (0, 1))."""

    c_x: float
    c_i: float
    c_y: float
    c_p: float

    def check(self) -> None:
        for name, value in (("--c-x", self.c_x), ("--c-i", self.c_i), ("--c-y", self.c_y), ("--c-p", self.c_p)):
            if not 0.0 < value < 1.0:
                raise WorkbenchError(f"{name} must be a probability strictly between 0 and 1, not {value}")


def _logit(p: float) -> float:
    return float(np.log(p) - np.log1p(-p))


def posterior(params: TheoryParams, rounds: int) -> np.ndarray:
    """The normalised p(C_p | q_t) for t = 1..``rounds``: ``[rounds]`` float64 (see the module docstring)."""
    params.check()
    if rounds < 1:
        raise WorkbenchError(f"--rounds must be ≥ 1, not {rounds}")
    step = _logit(params.c_i) + _logit(params.c_y) - 2 * _logit(params.c_p)
    log_odds = _logit(params.c_x) + step * np.arange(rounds)
    return 1.0 / (1.0 + np.exp(-log_odds))


def study_expression(params: TheoryParams, rounds: int) -> np.ndarray:
    """The study's unnormalised (c_i · c_y)^(t − 1) · p(C_p | q_1) with p(C_p | q_1) = c_x, t = 1..``rounds``."""
    params.check()
    return (params.c_i * params.c_y) ** np.arange(rounds) * params.c_x


def enumerate_posterior(params: TheoryParams, rounds: int, miss: float = 0.3) -> np.ndarray:
    """p(C_p | q_t) by brute force: a generative model in which each piece of evidence is a binary
    variable drawn given the concept, with likelihoods chosen so that observing it alone gives the
    stated posterior (p(e = 1 | C_n) = ``miss``); the joint table over the concept and all 2^m
    evidence values is enumerated and conditioned on every piece observed. ``[rounds]`` float64.
    An independent check of :func:`posterior` (exponential in the rounds: for tests)."""
    params.check()
    prior_odds = params.c_p / (1 - params.c_p)

    def likelihoods(c: float) -> tuple[float, float]:  # (p(e=1 | C_p), p(e=1 | C_n))
        ratio = (c / (1 - c)) / prior_odds
        scale = min(miss, 0.999 / ratio)
        return ratio * scale, scale

    out = []
    for t in range(1, rounds + 1):
        pieces = [likelihoods(params.c_x)] + [likelihoods(params.c_i), likelihoods(params.c_y)] * (t - 1)
        observed = {True: 0.0, False: 0.0}
        for concept in (True, False):
            prior = params.c_p if concept else 1 - params.c_p
            for values in itertools.product((0, 1), repeat=len(pieces)):
                p = prior
                for v, (lp, ln) in zip(values, pieces):
                    q = lp if concept else ln
                    p *= q if v else 1 - q
                if all(values):
                    observed[concept] += p
        out.append(observed[True] / (observed[True] + observed[False]))
    return np.asarray(out)


def organism_params() -> tuple[TheoryParams, str]:
    """Parameters read off the shipped organism's world: C_p = fair, c_p its prior, c_x = c_p (the
    item alone carries no evidence), c_i = p(fair | one moral instruction), c_y = p(fair | one
    assistant turn with a fair-style opener and the correct option in an ambiguous item); and a note
    saying so."""
    from workbench.organism.world import DEFAULT_PARAMS, answer_probs, instruction_probs, opener_probs

    w = DEFAULT_PARAMS
    prior = _logit(w.prior_fair)
    llr_moral = float(np.log(instruction_probs(True, w)[0]) - np.log(instruction_probs(False, w)[0]))
    llr_opener = float(np.log(opener_probs(True, w)[0]) - np.log(opener_probs(False, w)[0]))
    correct, stereotyped = 0, 1  # an ambiguous item: the correct option is "unknown", not the stereotyped group
    llr_answer = float(np.log(answer_probs(correct, stereotyped, True, w)[correct]) - np.log(answer_probs(correct, stereotyped, False, w)[correct]))
    sig = lambda x: float(1 / (1 + np.exp(-x)))  # noqa: E731
    params = TheoryParams(c_x=w.prior_fair, c_i=sig(prior + llr_moral), c_y=sig(prior + llr_opener + llr_answer), c_p=w.prior_fair)
    note = ("organism world: C_p = fair, c_p = c_x = prior; c_i = p(fair | a moral instruction); c_y = p(fair | a fair-style "
            "opener and the correct answer, ambiguous item) — the dialogue of moral follow-ups and fair answers every round")
    return params, note


def organism_exact(rounds: int) -> np.ndarray:
    """The organism's exact p(fair | prefix) at round t's last prompt token for the dialogue the
    organism parameters describe (moral follow-ups; every answer fair-style and correct in an
    ambiguous item): ``[rounds]``, from :func:`workbench.organism.posterior.exact_trace`."""
    from workbench.organism.posterior import exact_trace
    from workbench.organism.world import DEFAULT_PARAMS

    opener = DEFAULT_PARAMS.openers_fair[0]
    trace = exact_trace(0, 1, [None] + ["moral"] * (rounds - 1), [opener] * rounds, [0] * rounds)
    return trace.p_fair


def run_columns(path: str, rounds: int) -> dict[str, list[float]]:
    """Per-round means from a run file: the exact p(fair) of the dialogues the model actually had and
    each tracked probe's best-layer score (``{column: [rounds]}``, NaN beyond the run's rounds)."""
    from workbench.store.reader import RunFile

    out: dict[str, list[float]] = {}
    with RunFile(path) as run:
        series = {}
        if "exact_p_fair" in run.names("rounds"):
            series["run exact"] = run.array("rounds/exact_p_fair").astype(float)
        for name, values in run.concept_scores().items():
            series[f"run {name.replace('concept:', 'c:')} projection"] = values.astype(float)
    for name, values in series.items():
        means = np.nanmean(values, 0) if len(values) else np.array([])
        out[name] = [float(means[t]) if t < len(means) else float("nan") for t in range(rounds)]
    return out


def plot(columns: dict[str, np.ndarray | list[float]], path: str) -> None:
    """Plot every probability column against the round (and projections on a second axis) to ``path``
    (PNG or SVG by its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    second = None
    for i, (name, values) in enumerate(columns.items()):
        values = np.asarray(values, dtype=float)
        x = np.arange(1, len(values) + 1)
        if "projection" in name:
            second = second or ax.twinx()
            second.plot(x, values, ":", marker="x", color="grey", label=name)
            second.set_ylabel("probe score (projection)")
        else:
            ax.plot(x, values, ("-", "--", "-.", ":")[i % 4], marker="o", ms=3, label=name)  # styles tell coinciding curves apart
    ax.set_xlabel("round t")
    ax.set_ylabel("p(C_p | q_t)")
    ax.set_ylim(-0.02, 1.02)
    handles, labels = ax.get_legend_handles_labels()
    if second is not None:
        h2, l2 = second.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=7, frameon=False, loc="best")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
