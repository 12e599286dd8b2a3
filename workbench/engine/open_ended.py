"""What ``--scorer`` and ``--samples-per-round`` add to a run: checked before the model loads, loaded
after it, and called by the session once per round (``Session(round_extras=…)``).

Per round and sample the run file gains (docs/FORMAT.md, "Open-ended scoring and sampled answers"):

* with ``--scorer``: ``rounds/score`` ``[N, R]`` float32, the scorer's value of the round's response;
* with ``--samples-per-round k``: ``rounds/sampled_response`` ``[N, R, k]`` str,
  ``rounds/sampled_token_ids`` ``[N, R, k, max_new_tokens]`` int32 (each answer's ids, -1 after them),
  ``rounds/sampled_mean_log_likelihood`` ``[N, R, k]`` float32, ``rounds/sampled_cluster``
  ``[N, R, k]`` int16 and the three estimates of :mod:`workbench.engine.sampling` ``[N, R]`` float32;

and the root attributes ``scorer`` and ``sampling`` (JSON) say how they were made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from workbench.errors import WorkbenchError
from workbench.engine.sampling import EquivalenceSpec, check_equivalence
from workbench.engine.scorers import ScorerSpec, check_scorer

SETTINGS_KEYS = ("scorer", "sampling")  # root attributes; --resume must find them as they were
NUL_STAND_IN = "\u2400"  # as workbench.store.writer writes text: HDF5 strings cannot hold NUL


@dataclass(frozen=True)
class OpenEnded:
    """A checked ``--scorer`` / ``--samples-per-round`` / ``--equivalence``."""

    scorer: ScorerSpec | None
    samples_per_round: int
    equivalence: EquivalenceSpec
    likelihood: str = "no-stop"  # the sampled answers' mean log-likelihood: no-stop (Farquhar et al.) | with-stop

    def settings(self, decoding: Any) -> dict[str, Any]:
        """The root attributes the run file records (``scorer``, ``sampling``), only those in use.
        ``decoding``: the protocol's, from which the samples' own decoding follows."""
        from workbench.engine.sampling import sampled_decoding

        out: dict[str, Any] = {}
        if self.scorer is not None:
            out["scorer"] = self.scorer.record()
        if self.samples_per_round:
            d = sampled_decoding(decoding)
            out["sampling"] = {"samples_per_round": self.samples_per_round, "equivalence": self.equivalence.record(),
                               "temperature": d.temperature, "top_p": d.top_p, "max_new_tokens": d.max_new_tokens,
                               "likelihood": self.likelihood, "likelihood_rule": LIKELIHOOD_RULES[self.likelihood],
                               "seeded_by": "seed, the batch's first sample index, the round"}
        return out


LIKELIHOOD_RULES = {
    "no-stop": "mean log p of the answer's tokens, the stop token excluded (an answer of only a stop: the stop's); "
               "Farquhar et al., jlko/semantic_uncertainty huggingface_models.py log_likelihoods[:n_generated]",
    "with-stop": "mean log p of the answer's tokens and, when it stopped before the limit, of the stop",
}


def check_open_ended(task: str, scorer: str | None, scorer_label: str | None, samples_per_round: int,
                     equivalence: str, likelihood: str = "no-stop") -> OpenEnded | None:
    """Check the open-ended options of a run without loading a model; None when none is used."""
    if likelihood not in LIKELIHOOD_RULES:
        raise WorkbenchError(f"--likelihood must be no-stop (Farquhar et al.) or with-stop, not {likelihood!r}")
    if likelihood != "no-stop" and not samples_per_round:
        raise WorkbenchError("--likelihood sets the sampled answers' likelihood: give --samples-per-round k too")
    if samples_per_round < 0 or samples_per_round == 1:
        raise WorkbenchError(f"--samples-per-round must be 0 (off) or ≥ 2 to measure uncertainty over samples, not {samples_per_round}")
    if scorer_label is not None and scorer is None:
        raise WorkbenchError("--scorer-label needs --scorer toxicity:MODEL")
    if equivalence != "exact" and not samples_per_round:
        raise WorkbenchError(f"--equivalence {equivalence} clusters sampled answers: give --samples-per-round k too")
    if scorer is not None and task not in ("prompts", "vqa-open"):
        raise WorkbenchError(f"--scorer scores open-ended answers: use it with --task prompts or vqa-open (not {task}, "
                             "whose answers are scored against gold options)")
    if scorer is None and not samples_per_round:
        return None
    spec = check_scorer(scorer, scorer_label) if scorer is not None else None
    return OpenEnded(spec, samples_per_round, check_equivalence(equivalence), likelihood)


def check_resume(path: Path, settings: dict[str, Any]) -> None:
    """Refuse ``--resume`` of a run made with other open-ended settings (or without them, or with
    them when none are given now): the batches still to run would lack or change those arrays."""
    import json

    from workbench.store.reader import RunFile

    with RunFile(path) as run:
        attrs = run.f.attrs
        for key in SETTINGS_KEYS:
            have = attrs.get(key)
            have = have.decode() if isinstance(have, bytes) else have
            if key == "sampling" and have is not None and "likelihood" not in json.loads(have):
                # made before the likelihood was recorded: it counted the stop token (with-stop)
                have = json.dumps(_with_likelihood(json.loads(have), "with-stop"))
            want = json.dumps(settings[key]) if key in settings else None
            if have != want:
                raise WorkbenchError(f"--resume: {path} was made with a different --{'scorer' if key == 'scorer' else 'samples-per-round/--equivalence'} "
                                     f"({'none' if have is None else have[:60]} in the file, {'none' if want is None else want[:60]} now)")


def _with_likelihood(sampling: dict[str, Any], likelihood: str) -> dict[str, Any]:
    """A ``sampling`` record with the likelihood keys where :meth:`OpenEnded.settings` puts them."""
    out: dict[str, Any] = {}
    for k, v in sampling.items():
        if k == "seeded_by":
            out.update(likelihood=likelihood, likelihood_rule=LIKELIHOOD_RULES[likelihood])
        out[k] = v
    return out


RoundExtras = Callable[[Any, list[list[int]], list[Any], int], dict[str, np.ndarray]]


def round_extras(checked: OpenEnded, model: Any, decoding: Any, seed: int) -> RoundExtras:
    """Load the scorer and equivalence models (on the main model's device) and return the callback a
    :class:`workbench.engine.session.Session` calls after each round: ``(round output, round prompts [B][tokens],
    samples [B], round) → {name: [B, ...]}`` (the arrays of the module docstring)."""
    from workbench.engine.sampling import (build_equivalence, padded_token_ids, round_seed, sample_round, sampled_decoding,
                                           semantic_uncertainty)
    from workbench.engine.scorers import build_scorer

    scorer = build_scorer(checked.scorer, model.device) if checked.scorer is not None else None
    equivalence = build_equivalence(checked.equivalence, model.device) if checked.samples_per_round else None
    sampling = sampled_decoding(decoding)
    k = checked.samples_per_round

    def extras(out: Any, prompts: list[list[int]], samples: list[Any], round_: int, intervene: Any = None) -> dict[str, np.ndarray]:
        result: dict[str, np.ndarray] = {}
        if scorer is not None:
            result["score"] = scorer([model.tokenizer.decode(ids) for ids in out.response_ids], samples)
        if k:
            answers = sample_round(model.hf, model.tokenizer, out, prompts, k, sampling, model.device,
                                   round_seed(seed, samples[0].index, round_), likelihood=checked.likelihood, intervene=intervene)
            texts = np.empty((len(samples), k), dtype=object)
            for i, row in enumerate(answers.texts):
                texts[i] = [t.replace("\0", NUL_STAND_IN) for t in row]
            result["sampled_response"] = texts
            result["sampled_token_ids"] = padded_token_ids(answers, sampling.max_new_tokens)
            result["sampled_mean_log_likelihood"] = answers.mean_log_likelihood.astype(np.float32)
            result.update(semantic_uncertainty(answers, equivalence))
        return result

    extras.settings = checked.settings(decoding)  # type: ignore[attr-defined]  # what Session.save records
    extras.runs_model = bool(k)  # type: ignore[attr-defined]  # sampled answers run the model; a scorer only reads the texts
    extras.takes_interventions = True  # type: ignore[attr-defined]  # the session's intervene=… steers the sampled answers too
    return extras
