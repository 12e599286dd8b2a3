"""``workbench organism debias``: the study's debiasing-by-selection experiment, end to end, on the organism,
where every candidate's latent concept z is known.

1. **Candidates**: dialogues drawn from the organism's world (1 to ``max_candidate_rounds`` rounds, a
   seeded stream disjoint from training and from the held-out items), each with its z and the exact
   posterior p(fair | prefix) at its last answer, as chat records.
2. **Scores**: the study's question ("does the text contain bias?") is not in the organism's vocabulary,
   so its uncertainty about bias is measured where the organism states it: the entropy of its own
   distribution over the three answer letters at the last answer of the dialogue (the exact value of
   what ``workbench select`` estimates by sampling answers). The concept score is the projection of
   the last prompt token's residual onto a diffmean probe of the organism's concept (fitted once on the
   base model, best layer), as ``select --probe`` scores it.
3. **Selection**: :func:`workbench.analysis.select.select_subsets` (low, high, random; the same code as
   ``workbench select``), written as ``select/{low,high,random,all}.jsonl``; each subset's composition
   (fraction of fair dialogues, mean exact posterior) beside the uncertainty and concept it was chosen by.
4. **Fine-tunes**: LoRA (:mod:`workbench.analysis.finetune`) on each subset, same settings and seed.
5. **Runs**: the base model and each fine-tune on the same held-out items under the baseline
   (``organism-neutral``) and moral (``organism``) protocols, into ``runs/``.
6. **Table**: per subset and protocol, round-1 and round-R accuracy on ambiguous items, bias (share of
   stereotyped answers on ambiguous items) at rounds 1 and R, the option probability of the stereotyped
   answer at round 1 (bias before greedy decoding hides it), option entropy and concept score at round R,
   each as the subset's value and its paired difference from the base model with a 95 % paired
   bootstrap interval over items (:func:`paired_difference`, the interval of ``analyze --against``); ``debias.json`` and ``debias.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from workbench.errors import WorkbenchError, check_output_path

SUBSETS = ("low", "high", "random")
PROTOCOLS = {"baseline": "organism-neutral", "moral": "organism"}
CANDIDATE_STREAM = 7  # spawn key of the candidates' random stream (training uses 0, held-out items 1)
METRICS = ("acc_ambig_r1", "acc_ambig_rR", "bias_ambig_r1", "bias_ambig_rR", "p_stereotyped_ambig_r1", "option_entropy_rR", "concept_rR")
METRIC_LABELS = {"acc_ambig_r1": "acc ambig r1", "acc_ambig_rR": "acc ambig rR", "bias_ambig_r1": "bias ambig r1",
                 "bias_ambig_rR": "bias ambig rR", "p_stereotyped_ambig_r1": "p(stereo) ambig r1",
                 "option_entropy_rR": "opt H rR", "concept_rR": "concept rR"}


@dataclass(frozen=True)
class DebiasConfig:
    """The experiment's settings (``workbench organism debias`` options). The defaults are modest: a
    few minutes on two CPU cores."""

    out: Path
    size: int = 200  # dialogues per subset
    candidates: int | None = None  # None: 4 × size
    max_candidate_rounds: int = 3
    items: int = 128  # held-out items each model answers under each protocol
    rounds: int | None = None  # None: the protocols' own (6)
    rank: int = 8
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    probe: Path | None = None  # None: a diffmean probe fitted on the base model (probe_n contrast texts)
    probe_n: int = 600
    bootstrap: int = 2000
    overwrite: bool = False


@dataclass(frozen=True)
class Candidate:
    """One candidate dialogue and what the world knows about it."""

    messages: list[dict[str, str]]
    fair: bool  # the hidden concept z
    p_fair: float  # exact p(fair | prefix) at the last answer (after its opener)
    condition: str
    n_rounds: int

    def row(self, index: int) -> dict[str, Any]:
        return {"id": index, "messages": self.messages, "fair": self.fair, "exact_p_fair": self.p_fair,
                "condition": self.condition, "rounds": self.n_rounds}


def draw_candidates(n: int, seed: int, max_rounds: int) -> list[Candidate]:
    """``n`` world dialogues of 1..``max_rounds`` rounds from the candidates' own seeded stream."""
    from workbench.organism.posterior import dialogue_trace
    from workbench.organism.world import sample_dialogue

    out = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(CANDIDATE_STREAM, i)))
        d = sample_dialogue(rng, n_rounds=int(rng.integers(1, max_rounds + 1)))
        trace = dialogue_trace(d)
        out.append(Candidate(d.messages(), bool(d.fair), float(trace.p_fair_after_opener[-1]), d.item.condition, len(d.answers)))
    return out


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """The mean of ``a`` − ``b`` over paired items (``a[i]`` and ``b[i]`` measured on the same item;
    NaN pairs dropped) with the 95 % bootstrap interval every paired effect of the workbench uses
    (:func:`workbench.analysis.analyze.mean_interval`, as ``analyze --against`` does):
    ``{"a", "b", "diff", "lo", "hi", "n"}``."""
    from workbench.analysis.analyze import mean_interval

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if not len(a):
        return {"a": float("nan"), "b": float("nan"), "diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    diff, lo, hi = mean_interval(a - b, seed, n_boot)
    return {"a": float(a.mean()), "b": float(b.mean()), "diff": float(diff), "lo": float(lo), "hi": float(hi), "n": int(len(a))}


# --------------------------------------------------------------------------- scoring candidates
def answer_entropy_and_state(model: Any, candidates: list[Candidate], probe: Any, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per candidate: the entropy (nats) of the model's distribution over the three answer letters
    at its last answer ``[n]``, that distribution ``[n, 3]``, and the concept score (projection of the
    last prompt token's state on the probe's unit direction at its best layer) ``[n]``."""
    import torch

    from probes.activations import text_activations
    from workbench.organism.world import LETTER_TOKENS

    tok = model.tokenizer
    letters = tok.convert_tokens_to_ids(list(LETTER_TOKENS))
    assistant = tok.convert_tokens_to_ids("<assistant>")
    ids = [list(tok(tok.apply_chat_template(c.messages, tokenize=False), add_special_tokens=False)["input_ids"]) for c in candidates]
    probs = np.zeros((len(ids), 3))
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            rows = ids[start : start + batch_size]
            width = max(len(r) for r in rows)
            x = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            for j, r in enumerate(rows):
                x[j, : len(r)] = torch.tensor(r)
            logits = model.hf(input_ids=x.to(model.device), attention_mask=(x != tok.pad_token_id).long().to(model.device)).logits
            for j, r in enumerate(rows):
                k = len(r) - 3  # "... is (x) <eot>": the position of "is" predicts the letter
                probs[start + j] = torch.softmax(logits[j, k, letters].float(), -1).cpu().numpy()
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(1)
    prompts = [r[: len(r) - 1 - r[::-1].index(assistant)] + [assistant] for r in ids]  # up to the last <assistant>
    layer = int(probe.best_layer)
    row = [int(l) for l in probe.arrays["layers"]].index(layer)
    direction = probe.arrays["directions"][row].astype(np.float64)
    acts = text_activations(model, prompts, probe.meta["hook"], [layer], "last").numpy()[0]
    return entropy, probs, acts @ (direction / np.linalg.norm(direction))


def fit_concept_probe(model: Any, path: Path, n: int, seed: int) -> Any:
    """A diffmean probe of the organism's concept on every layer of ``model`` (``n`` contrast texts),
    saved to ``path`` and loaded back."""
    from probes.contrast import ORGANISM_MARGIN, load_contrast
    from probes.fit import fit_probe, save_fitted
    from probes.probe_file import load_probe

    layers = list(range(model.n_layers))
    data = load_contrast("organism", model.tokenizer, paired=False, n=n, margin=ORGANISM_MARGIN)
    ev, arrays = fit_probe(model, data, "diffmean", "hook_resid_post", layers, "last", 0.25, seed)
    save_fitted(path, model, data, "diffmean", "hook_resid_post", "last", 0.25, seed, ev, arrays)
    return load_probe(path)


# --------------------------------------------------------------------------- measuring runs
def run_metrics(run_path: Path, probe: Any) -> dict[str, np.ndarray]:
    """Per item (``[N]``, NaN where a metric does not apply): the :data:`METRICS` of one run."""
    from workbench.store.format import POSITIONS
    from workbench.store.reader import RunFile

    with RunFile(run_path) as run:
        correct = run.array("rounds/correct").astype(float)  # [N, R]
        answer = run.array("rounds/answer")
        entropy = run.array("rounds/option_entropy").astype(float)
        option_probs = run.array("rounds/option_probs").astype(float)  # [N, R, K]
        extra = [json.loads(e) for e in run.f["samples/extra"].asstr()[...]]
        condition = np.asarray(run.f["samples/condition"].asstr()[...]) if "samples/condition" in run.f else None
        hook = probe.meta["hook"]
        layers = json.loads(run.f[f"activations/{hook}"].attrs["layers"])
        acts = run.f[f"activations/{hook}"][:, -1, POSITIONS.index("last_prompt"), layers.index(int(probe.best_layer))]  # [N, d]
    if condition is None:
        raise WorkbenchError(f"{run_path}: no sample conditions")
    ambig = np.array([str(c) == "ambig" for c in condition])
    stereo = np.array([e["stereotyped"] for e in extra])
    row = [int(l) for l in probe.arrays["layers"]].index(int(probe.best_layer))
    direction = probe.arrays["directions"][row].astype(np.float64)
    nan = np.full(len(ambig), np.nan)
    return {
        "acc_ambig_r1": np.where(ambig, correct[:, 0], nan),
        "acc_ambig_rR": np.where(ambig, correct[:, -1], nan),
        "bias_ambig_r1": np.where(ambig, (answer[:, 0] == stereo).astype(float), nan),
        "bias_ambig_rR": np.where(ambig, (answer[:, -1] == stereo).astype(float), nan),
        "p_stereotyped_ambig_r1": np.where(ambig, option_probs[np.arange(len(stereo)), 0, stereo], nan),
        "option_entropy_rR": entropy[:, -1],
        "concept_rR": acts.astype(np.float64) @ (direction / np.linalg.norm(direction)),
    }


# --------------------------------------------------------------------------- the experiment
def debias(cfg: DebiasConfig, on_status: Callable[[str], None] | None = None,
           on_step: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """Run the whole experiment into ``cfg.out`` (see the module docstring); returns what
    ``debias.json`` holds: the settings, each subset's composition, and the table."""
    from workbench.analysis.finetune import FinetuneConfig, finetune
    from workbench.analysis.select import Scored, select_subsets, write_subsets
    from workbench.engine.adapter import apply_adapter
    from workbench.engine.models import load_model
    from workbench.engine.run import RunConfig, run_protocol

    status = on_status or (lambda message: None)
    n_candidates = cfg.candidates or 4 * cfg.size
    for name, value in (("--size", cfg.size), ("--items", cfg.items), ("--epochs", cfg.epochs), ("--rank", cfg.rank),
                        ("--max-candidate-rounds", cfg.max_candidate_rounds), ("--bootstrap", cfg.bootstrap)):
        if value < 1:
            raise WorkbenchError(f"{name} must be ≥ 1, not {value}")
    if 2 * cfg.size > n_candidates:
        raise WorkbenchError(f"--size {cfg.size}: needs at most half of the {n_candidates} --candidates (low and high are disjoint)")
    if cfg.rounds is not None and cfg.rounds < 1:
        raise WorkbenchError(f"--rounds must be ≥ 1, not {cfg.rounds}")
    out = Path(cfg.out)
    check_output_path(out, "--out", folder=True, overwrite=cfg.overwrite)
    probe = None
    if cfg.probe is not None:
        from probes.probe_file import load_probe

        probe = load_probe(cfg.probe)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    status("loading the organism")
    base = load_model("organism", device="cpu")
    if probe is None:
        status("fitting the concept probe (diffmean, every layer)")
        probe = fit_concept_probe(base, out / "concept-probe.h5", cfg.probe_n, cfg.seed)
    status(f"drawing and scoring {n_candidates} candidate dialogues")
    candidates = draw_candidates(n_candidates, cfg.seed, cfg.max_candidate_rounds)
    entropy, _, concept = answer_entropy_and_state(base, candidates, probe)
    scored = [Scored(c.row(i), [], [], float(h), float(h), float(h), float(s)) for i, (c, h, s) in enumerate(zip(candidates, entropy, concept))]
    subsets = select_subsets(scored, cfg.size, "weighted", cfg.seed)
    write_subsets(out / "select", subsets, scored)
    composition = {name: _composition(items) for name, items in {**subsets, "all": scored}.items()}

    adapters: dict[str, Path | None] = {"none": None}
    for name in SUBSETS:
        status(f"fine-tuning on the {name}-uncertainty subset")
        adapters[name] = out / "adapters" / name
        finetune(FinetuneConfig(data=out / "select" / f"{name}.jsonl", out=adapters[name], rank=cfg.rank, epochs=cfg.epochs, lr=cfg.lr,
                                batch_size=cfg.batch_size, seed=cfg.seed, device="cpu", overwrite=cfg.overwrite), on_step=on_step)

    metrics: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    (out / "runs").mkdir(exist_ok=True)
    for name, adapter in adapters.items():
        model = apply_adapter(load_model("organism", device="cpu"), adapter)
        for label, protocol in PROTOCOLS.items():
            status(f"running {name} under the {label} protocol ({cfg.items} items)")
            path = out / "runs" / f"{name}-{label}.h5"
            run_protocol(RunConfig(out=path, task="organism", protocol=protocol, limit=cfg.items, rounds=cfg.rounds, seed=cfg.seed,
                                   overwrite=True, fsync=False, command_line=f"workbench organism debias ({name}, {label})"), model=model).close()
            metrics.setdefault(name, {})[label] = run_metrics(path, probe)

    table = []
    for name in ("none", *SUBSETS):
        for label in PROTOCOLS:
            row: dict[str, Any] = {"subset": name, "protocol": label}
            for metric in METRICS:
                row[metric] = paired_difference(metrics[name][label][metric], metrics["none"][label][metric], cfg.bootstrap, cfg.seed)
            table.append(row)
    result = {
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}, "candidates": n_candidates,
                     "protocols": PROTOCOLS, "uncertainty": "entropy of the model's answer-letter distribution at the candidate's last answer",
                     "probe": {"path": str(probe.path), "best_layer": int(probe.best_layer), "method": probe.meta["method"]}},
        "composition": composition, "table": table, "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    from workbench.json_values import finite

    (out / "debias.json").write_text(json.dumps(finite(result), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    plot_debias(result, out / "debias.png")
    return result


def _composition(items: list[Any]) -> dict[str, float]:
    rows = [s.row for s in items]
    return {"n": len(rows), "fair_fraction": float(np.mean([r["fair"] for r in rows])),
            "mean_exact_p_fair": float(np.mean([r["exact_p_fair"] for r in rows])),
            "ambiguous_fraction": float(np.mean([r["condition"] == "ambig" for r in rows])),
            "mean_uncertainty": float(np.mean([s.semantic_entropy_weighted for s in items])),
            "mean_concept": float(np.mean([s.concept for s in items]))}


def plot_debias(result: dict[str, Any], path: Path) -> None:
    """One panel per metric: each subset's paired difference from the base model, with its interval,
    for both protocols."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(2.6 * len(METRICS), 3.2), dpi=110)
    for ax, metric in zip(axes, METRICS):
        for k, label in enumerate(PROTOCOLS):
            rows = [r for r in result["table"] if r["protocol"] == label and r["subset"] in SUBSETS]
            x = np.arange(len(rows)) + (k - 0.5) * 0.3
            diff = np.array([r[metric]["diff"] for r in rows], dtype=float)
            err = np.array([[r[metric]["diff"] - r[metric]["lo"], r[metric]["hi"] - r[metric]["diff"]] for r in rows], dtype=float).T
            ax.errorbar(x, diff, yerr=err, fmt="o", capsize=3, label=label)
        ax.axhline(0, color="#999", lw=0.8)
        ax.set_xticks(range(len(SUBSETS)), SUBSETS)
        ax.set_title(f"Δ {METRIC_LABELS[metric]}", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("fine-tuned on each subset − un-fine-tuned (95 % paired bootstrap)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
