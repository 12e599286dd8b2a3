"""--samples-per-round benchmarks: what drawing the k samples on the round's KV cache buys, and what
the samples cost a run. Side by side in one process, on the same prompts and tokens (the two ways
draw the same tokens: ``tests/test_samples_per_round.py`` checks it):

1. per round, k samples of every row drawn with a fresh prefill of the whole round prompt ÷ drawn on
   the round's cache (:func:`workbench.engine.sampling.sample_round` with ``reuse_cache`` False / True, the
   same seed, interleaved in the same round), at each round of an R-round conversation (the prompt
   grows with the rounds, so the gain should too);
2. a run's rounds with ``--samples-per-round k`` ÷ the same rounds without (the round engine, every
   layer's ``hook_resid_post`` captured, no file): the price of the samples.

The setting is the long-transcript BBQ one of ``bench_session.py``: a tiny random Llama as in
``tests/tiny_models.py``, Religion.jsonl, ``bbq-paper``, answers of ``--max-new-tokens`` tokens.

    OMP_NUM_THREADS=1 python benchmarks/bench_sampling.py --threads 1
    python benchmarks/bench_sampling.py --quick

Prints a table and writes ``benchmarks/results/sampling.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from workbench.engine.batch import run_batch  # noqa: E402
from workbench.engine.models import load_model  # noqa: E402
from workbench.engine.open_ended import check_open_ended, round_extras  # noqa: E402
from workbench.engine.protocol import load_protocol  # noqa: E402
from workbench.engine.sampling import round_seed, sample_round, sampled_decoding  # noqa: E402
from workbench.engine.session import Session  # noqa: E402
from workbench.engine.tasks import get_task, load_bbq  # noqa: E402

SHARED_BBQ = ROOT.parents[0] / "shared" / "data" / "bbq" / "Religion.jsonl"
FIXTURE_BBQ = ROOT / "tests" / "fixtures" / "bbq_fixture.jsonl"


def per_round_sampling(model, samples, protocol, k: int, repeats: int) -> list[dict]:
    """Seconds of drawing k samples per row on the cache and with a fresh prefill, at every round
    (each pair timed ``repeats`` times inside the round, order alternating; the median kept)."""
    decoding = sampled_decoding(protocol.decoding)
    times: list[dict] = []

    def timed(out, prompts, batch, round_):
        pairs = []
        for rep in range(repeats):
            pair = {}
            for reuse in ((True, False) if rep % 2 == 0 else (False, True)):
                t0 = time.perf_counter()
                sample_round(model.hf, model.tokenizer, out, prompts, k, decoding, model.device,
                             round_seed(0, batch[0].index, round_), reuse_cache=reuse)
                pair["cached_s" if reuse else "fresh_s"] = time.perf_counter() - t0
            pairs.append(pair)
        pairs.sort(key=lambda p: p["fresh_s"] / p["cached_s"])
        median = pairs[len(pairs) // 2]
        prompt_tokens = sum(len(p) for p in prompts)
        times.append({"round": round_, "prompt_tokens": prompt_tokens, **median, "speedup": median["fresh_s"] / median["cached_s"]})
        return {}

    s = Session(model, get_task("bbq"), protocol, samples, hooks=[], round_extras=timed)
    for _ in range(protocol.rounds):
        s.step()
    return times


def run_overhead(model, samples, protocol, k: int, repeats: int) -> dict:
    """Seconds of the round engine over ``samples`` with and without k samples per round, interleaved."""
    from workbench.engine.capture import hook_sites

    sites = hook_sites(model, ["hook_resid_post"], list(range(model.n_layers)))
    extras = round_extras(check_open_ended("bbq", None, None, k, "exact"), model, protocol.decoding, seed=0)
    pairs = []
    for _ in range(repeats):
        pair = {}
        for name, fn in (("plain_s", None), ("sampled_s", extras)):
            t0 = time.perf_counter()
            run_batch(model, get_task("bbq"), protocol, samples, sites, seed=0, round_extras=fn)
            pair[name] = time.perf_counter() - t0
        pairs.append(pair)
    pairs.sort(key=lambda p: p["sampled_s"] / p["plain_s"])
    median = pairs[len(pairs) // 2]
    return {**median, "overhead": median["sampled_s"] / median["plain_s"], "overheads": [p["sampled_s"] / p["plain_s"] for p in pairs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bbq", default=str(SHARED_BBQ if SHARED_BBQ.exists() else FIXTURE_BBQ), help="a BBQ file")
    p.add_argument("--samples", type=int, default=8, help="samples in the batch")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--k", type=int, default=5, help="samples per round")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sampling.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.samples, args.rounds, args.k, args.repeats = 2, 2, 2, 1

    from tiny_models import build_model

    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(str(build_model("llama", Path(tmp) / "llama")), device="cpu", dtype="float32")
        samples = load_bbq([Path(args.bbq)], limit=args.samples)
        protocol = load_protocol("bbq-paper", rounds=args.rounds)
        protocol = replace(protocol, decoding=replace(protocol.decoding, max_new_tokens=args.max_new_tokens))
        results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                   "setting": {"data": Path(args.bbq).name, "samples": len(samples), "rounds": args.rounds, "k": args.k,
                               "max_new_tokens": args.max_new_tokens, "repeats": args.repeats},
                   "per_round": per_round_sampling(model, samples, protocol, args.k, args.repeats),
                   "run": run_overhead(model, samples, protocol, args.k, args.repeats)}
    print(f"k = {args.k} samples per row, {len(samples)} rows, {args.max_new_tokens}-token answers ({results['machine']})")
    print(f"{'round':>5} {'prompt tokens':>13} {'fresh prefill':>13} {'on the cache':>12} {'fresh ÷ cache':>13}")
    for r in results["per_round"]:
        print(f"{r['round']:>5} {r['prompt_tokens']:>13} {r['fresh_s']:>12.3f}s {r['cached_s']:>11.3f}s {r['speedup']:>12.2f}×")
    run = results["run"]
    print(f"run of {args.rounds} rounds: without samples {run['plain_s']:.2f}s, with {run['sampled_s']:.2f}s: "
          f"{run['overhead']:.2f}× (range {min(run['overheads']):.2f}–{max(run['overheads']):.2f})")
    results["median_per_round_speedup"] = statistics.median(r["speedup"] for r in results["per_round"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
