"""Session benchmarks (issue 10): what carrying each conversation's KV cache to the next round buys.

Side by side in one process, on the same prompts and tokens (the two ways give the same tokens;
``tests/test_session.py`` checks every number):

1. prefill tokens per run ÷ final transcript tokens, carrying the cache and re-running every
   round's whole conversation, at R = 2, 5, 10, 20 rounds (counts, not timings; target ≤ 1.05
   with the cache carried), on the organism and on the long-transcript BBQ setting;
2. wall time, re-running every round ÷ carrying the cache, at R = 5, 10, 20 on the BBQ setting (a
   tiny random Llama as in ``tests/tiny_models.py``, BBQ prompts, 32-token answers, transcripts of
   about 1000 tokens at 5 rounds): the two are interleaved ``--repeats`` times, the median of the
   per-pair ratios reported; it must grow with R;
3. peak memory (max RSS of a fresh process) of a 20-round organism run of ``--mem-samples``
   samples ÷ a 5-round one (target ≤ 1.2: a run holds one batch's cache).

    python benchmarks/bench_session.py --threads 1
    python benchmarks/bench_session.py --quick

Prints a table and writes ``benchmarks/results/session.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from workbench.engine.batch import run_batch  # noqa: E402
from workbench.engine.models import load_model  # noqa: E402
from workbench.engine.protocol import load_protocol  # noqa: E402
from workbench.engine.session import Session  # noqa: E402
from workbench.engine.tasks import get_task, load_bbq  # noqa: E402

SHARED_BBQ = ROOT.parents[0] / "shared" / "data" / "bbq" / "Religion.jsonl"


def token_counts(model, task, protocol_name: str, samples, rounds: int, batch_size: int, max_new_tokens: int | None) -> dict:
    """Prefill tokens with the cache carried and with every round re-run, and the final transcripts'
    tokens, over ``samples`` in batches. Re-running round t prefills its whole prompt
    (``prompt_span[..., 1]``), which ``tests/test_session.py`` checks against a re-running session."""
    protocol = _protocol(protocol_name, rounds, max_new_tokens)
    carried = rerun = transcript = 0
    for start in range(0, len(samples), batch_size):
        s = Session(model, task, protocol, samples[start : start + batch_size], hooks=[])
        for _ in range(rounds):
            s.step()
        carried += s.prefill_tokens
        rerun += int(sum(r.prompt_spans[:, 1].sum() for r in s.rounds))
        transcript += sum(len(t) for t in s.transcripts)
    return {"rounds": rounds, "prefill_carried": carried, "prefill_rerun": rerun, "transcript_tokens": transcript,
            "carried_over_transcript": carried / transcript, "rerun_over_transcript": rerun / transcript}


def wall_times(model, task, protocol_name: str, samples, rounds: int, batch_size: int, max_new_tokens: int, repeats: int) -> dict:
    """Seconds of the round engine (every layer's ``hook_resid_post`` captured, options scored)
    over ``samples``, re-running every round and carrying the cache, interleaved."""
    from workbench.engine.capture import hook_sites

    protocol = _protocol(protocol_name, rounds, max_new_tokens)
    sites = hook_sites(model, ["hook_resid_post"], list(range(model.n_layers)))
    pairs = []
    for _ in range(repeats):
        pair = {}
        for reuse in (False, True):
            t0 = time.perf_counter()
            for start in range(0, len(samples), batch_size):
                run_batch(model, task, protocol, samples[start : start + batch_size], sites, seed=0, reuse_cache=reuse)
            pair["carried_s" if reuse else "rerun_s"] = time.perf_counter() - t0
        pairs.append(pair)
    pairs.sort(key=lambda p: p["rerun_s"] / p["carried_s"])
    median = pairs[len(pairs) // 2]
    return {"rounds": rounds, **median, "speedup": median["rerun_s"] / median["carried_s"],
            "speedups": [p["rerun_s"] / p["carried_s"] for p in pairs]}


def peak_rss_mib(rounds: int, samples: int, batch_size: int, out: Path, threads: int) -> float:
    """Max RSS (MiB) of a fresh process running the organism protocol for ``rounds`` rounds."""
    code = (
        "import resource, sys; sys.path.insert(0, %r)\n"
        "from workbench.engine.run import RunConfig, run_protocol\n"
        "run_protocol(RunConfig(out=%r, rounds=%d, limit=%d, batch_size=%d, device='cpu')).close()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    ) % (str(ROOT), str(out), rounds, samples, batch_size)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(res.stdout.strip().splitlines()[-1])


def _protocol(name: str, rounds: int, max_new_tokens: int | None):
    from dataclasses import replace

    p = load_protocol(name, rounds=rounds)
    return p if max_new_tokens is None else replace(p, decoding=replace(p.decoding, max_new_tokens=max_new_tokens))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bbq", default=str(SHARED_BBQ), help="a BBQ file for the long-transcript setting")
    p.add_argument("--samples", type=int, default=16, help="samples of the BBQ wall-time setting")
    p.add_argument("--count-samples", type=int, default=32, help="samples of the token counts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-samples", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "session.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.samples, args.count_samples, args.repeats, args.mem_samples = 4, 4, 1, 32
    wall_rounds = (2, 3) if args.quick else (5, 10, 20)
    count_rounds = (2, 3) if args.quick else (2, 5, 10, 20)

    from tiny_models import build_model

    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                     "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        organism = load_model("organism", device="cpu")
        llama = load_model(str(build_model("llama", Path(tmp) / "llama")), device="cpu", dtype="float32")
        from workbench.organism.task import load_organism_samples

        org_samples = load_organism_samples(args.count_samples)
        bbq_samples = load_bbq([Path(args.bbq)], limit=max(args.samples, args.count_samples))
        results["counts_organism"] = [token_counts(organism, get_task("organism"), "organism", org_samples, r, args.batch_size, None)
                                      for r in count_rounds]
        results["counts_bbq"] = [token_counts(llama, get_task("bbq"), "bbq-paper", bbq_samples[: args.count_samples], r, args.batch_size, 32)
                                 for r in count_rounds]
        run_batch(llama, get_task("bbq"), _protocol("bbq-paper", 2, 32), bbq_samples[:2], [], seed=0)  # warm-up
        results["wall_bbq"] = [wall_times(llama, get_task("bbq"), "bbq-paper", bbq_samples[: args.samples], r, args.batch_size, 32, args.repeats)
                               for r in wall_rounds]
        results["bbq_samples"] = args.samples
        if not args.skip_memory:
            threads = torch.get_num_threads()
            small = peak_rss_mib(5, args.mem_samples, args.batch_size, Path(tmp) / "r5.h5", threads)
            large = peak_rss_mib(20, args.mem_samples, args.batch_size, Path(tmp) / "r20.h5", threads)
            results["memory"] = {"samples": args.mem_samples, "rss_5_rounds_mib": small, "rss_20_rounds_mib": large,
                                 "ratio": large / small}
    _report(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


def _report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for key, title in (("counts_organism", "organism"), ("counts_bbq", "BBQ setting (tiny Llama, 32-token answers)")):
        table = Table(title=f"prefill tokens ÷ final transcript tokens, {title}")
        for c in ("rounds", "transcript", "prefill, cache carried", "ratio (≤ 1.05)", "prefill, every round re-run", "ratio"):
            table.add_column(c, justify="right")
        for row in r[key]:
            table.add_row(str(row["rounds"]), str(row["transcript_tokens"]), str(row["prefill_carried"]),
                          f"{row['carried_over_transcript']:.3f}", str(row["prefill_rerun"]), f"{row['rerun_over_transcript']:.2f}")
        console.print(table)
    table = Table(title=f"wall time, BBQ setting, {r['bbq_samples']} samples, batch {r['batch_size']}, {r['machine']}")
    for c in ("rounds", "every round re-run (s)", "cache carried (s)", "re-run ÷ carried, median (range)"):
        table.add_column(c, justify="right")
    for row in r["wall_bbq"]:
        table.add_row(str(row["rounds"]), f"{row['rerun_s']:.2f}", f"{row['carried_s']:.2f}",
                      f"{row['speedup']:.2f} ({min(row['speedups']):.2f}–{max(row['speedups']):.2f})")
    console.print(table)
    if "memory" in r:
        m = r["memory"]
        console.print(f"peak RSS, organism, {m['samples']} samples: 5 rounds {m['rss_5_rounds_mib']:.0f} MiB, "
                      f"20 rounds {m['rss_20_rounds_mib']:.0f} MiB, ratio {m['ratio']:.2f} (≤ 1.2)")


if __name__ == "__main__":
    main()
