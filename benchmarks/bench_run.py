"""Run benchmarks (DESIGN §8), as ratios measured side by side in one process on the same prompts:

1. capture overhead: a full ``workbench run`` (all layers captured, token entropies, option
   confidences, HDF5 writes) ÷ plain Hugging Face ``generate`` of the same tokens, same batches,
   no capture and no metrics, in two ways: carrying each round's KV cache to the next round as the
   workbench does (``cache=`` the last round's, the new tokens appended; target ≤ 1.15), and
   re-running every round's whole conversation, as a user would write it (report; below 1 when
   the cache reuse pays). They are paired batch by batch (plain generate of a batch runs right
   after the workbench wrote it), and the median of ``--repeats`` runs is reported, because whole
   runs timed apart drift by ±5 % on a shared machine.
2. the study's way ÷ the workbench: one sample at a time, every round's chat re-rendered and
   re-encoded from scratch, hidden states and each option from separate passes. Target ≥ 5×.
3. peak memory (max RSS of a fresh process) at ``--mem-large`` samples ÷ at ``--mem-small``.
   Target ≤ 1.2 (streaming, not accumulating).

    python benchmarks/bench_run.py                      # the organism, 256 samples × 5 rounds
    python benchmarks/bench_run.py --quick              # a smoke-sized run
    python benchmarks/bench_run.py --model PATH --task bbq --data Religion.jsonl --protocol bbq-paper
    python benchmarks/bench_run.py --threads 1 --engine-repeats 6   # also the round engine alone, in CPU time

Prints a table and writes ``benchmarks/results/run.json``.
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

from workbench.engine.batch import conversation_texts  # noqa: E402
from workbench.engine.generation import pad, stop_ids  # noqa: E402
from workbench.engine.models import load_model  # noqa: E402
from workbench.engine.protocol import load_protocol  # noqa: E402
from workbench.engine.run import RunConfig, load_samples, run_protocol  # noqa: E402
from workbench.engine.tasks import get_task  # noqa: E402


def round_prompts(run, batch_size: int) -> list[list[tuple[list[list[int]], list[list[int]]]]]:
    """Per batch, per round: (the workbench's prompt token ids, the tokens it generated), from a run file."""
    transcripts = run.array("transcripts/token_ids")
    spans = run.array("rounds/prompt_span")
    expected = run.array("tokens/response_token_ids")
    n, rounds = spans.shape[:2]
    batches = []
    for start in range(0, n, batch_size):
        rows = range(start, min(start + batch_size, n))
        batches.append([([list(transcripts[i][: spans[i, t, 1]]) for i in rows], [list(expected[i, t]) for i in rows])
                        for t in range(rounds)])
    return batches


def plain_generate(model, batch, max_new_tokens: int, reuse: bool, inference: bool = False) -> tuple[float, float, int, int]:
    """Time HF ``generate`` over one batch's rounds, no capture, no metrics; returns (seconds, CPU
    seconds of this process, tokens the workbench generated, (sample, round) pairs where the tokens
    differ).

    ``inference``: under ``torch.inference_mode()``, as the workbench's rounds run (``generate``'s
    own ``no_grad`` otherwise, as a user's call runs); on a small model that alone makes
    ``generate`` about a tenth faster, so this is the like-for-like baseline of the capture's cost.

    ``reuse``: each round continues on the cache the round before left: ``input_ids`` is the last
    round's sequences with the new tokens appended (generate runs only what the cache lacks: the
    last generated column and the new tokens), the mask hides what is not the conversation (left
    padding, the steps after a stop). Otherwise every round's whole prompt, left-padded."""
    tok, hf = model.tokenizer, model.hf
    stops = stop_ids(hf, tok)
    elapsed, cpu, tokens, mismatches = 0.0, 0.0, 0, 0
    seqs = mask = cache = held = None
    for prompts, expected in batch:
        if reuse and cache is not None:
            new_ids, new_mask = pad([p[h:] for p, h in zip(prompts, held)], tok.pad_token_id, model.device, "left")
            ids, mask = torch.cat([seqs, new_ids], 1), torch.cat([mask, new_mask], 1)
        else:
            ids, mask = pad(prompts, tok.pad_token_id, model.device, "left")
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode() if inference else torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                              eos_token_id=stops, pad_token_id=tok.pad_token_id, top_k=None,
                              return_dict_in_generate=True, **({"cache": cache} if reuse and cache is not None else {}))
        _sync(model.device)
        elapsed += time.perf_counter() - t0
        cpu += time.process_time() - c0
        generated = out.sequences[:, ids.shape[1]:].tolist()
        lengths = [next((j for j, t in enumerate(g) if t in stops), len(g)) for g in generated]
        for j, want in enumerate(expected):
            mismatches += generated[j][: lengths[j]] != want
            tokens += len(want)
        seqs, cache = out.sequences, out.cache
        steps = torch.arange(seqs.shape[1] - ids.shape[1], device=mask.device)
        mask = torch.cat([mask, (steps[None] < torch.tensor(lengths, device=mask.device)[:, None]).long()], 1)
        held = [len(p) + n for p, n in zip(prompts, lengths)]
    return elapsed, cpu, tokens, mismatches


def paired_times(model, cfg, batches, max_new_tokens: int) -> dict[str, float]:
    """One ``workbench run`` with plain ``generate`` of each batch's same prompts (carrying the
    cache, and re-running every round) right after that batch (from the progress callback), so
    all see the same moments of a noisy machine.

    Returns seconds of the workbench (the run's wall time minus the whole callback's, so the
    comparison's own bookkeeping around the timed ``generate`` calls is charged to neither), of
    plain generate with cache reuse (as a user calls it, and in inference mode) and without, the
    tokens, and the worst mismatch count.
    """
    plain = {"reuse_s": 0.0, "reuse_inference_s": 0.0, "reprefill_s": 0.0, "tokens": 0, "mismatches": 0, "callback_s": 0.0,
             "reuse_cpu_s": 0.0, "callback_cpu_s": 0.0}
    ways = [("reuse", True, False), ("reuse_inference", True, True), ("reprefill", False, False)]

    def after_batch(progress) -> None:
        if progress.batch_rounds or progress.done_samples == 0:
            return  # a round of a batch in flight, or the call before the first batch
        t0, c0 = time.perf_counter(), time.process_time()
        batch = batches[(progress.done_samples - 1) // cfg.batch_size]
        for name, reuse, inference in ways:
            seconds, cpu, tokens, mismatches = plain_generate(model, batch, max_new_tokens, reuse, inference)
            plain[f"{name}_s"] += seconds
            plain["reuse_cpu_s"] += cpu if name == "reuse" else 0.0
            plain["mismatches"] = max(plain["mismatches"], mismatches)
        plain["tokens"] += tokens
        plain["callback_s"] += time.perf_counter() - t0
        plain["callback_cpu_s"] += time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    run_protocol(cfg, model=model, on_batch=after_batch).close()
    _sync(model.device)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"workbench_s": total - plain["callback_s"], "workbench_cpu_s": total_cpu - plain["callback_cpu_s"], **plain}


def study_way(model, task, protocol, samples) -> float:
    """One sample at a time; each round re-renders and re-encodes the whole chat as text, generates
    alone, then runs separate passes for hidden states and for every option (the authors' loop)."""
    tok, hf = model.tokenizer, model.hf
    t0 = time.perf_counter()
    for s in samples:
        instructions, prefixes = conversation_texts(protocol, task, s)
        messages: list[dict[str, str]] = []
        for t in range(protocol.rounds):
            messages.append({"role": "user", "content": instructions[t]})
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefixes[t]
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], device=model.device)
            with torch.no_grad():
                out = hf.generate(input_ids=ids, do_sample=False, max_new_tokens=protocol.decoding.max_new_tokens,
                                  eos_token_id=stop_ids(hf, tok), pad_token_id=tok.pad_token_id,
                                  output_scores=True, return_dict_in_generate=True, top_k=None)
                gen = out.sequences[0, ids.shape[1]:]
                response = tok.decode(gen, skip_special_tokens=True)
                hf(ids, output_hidden_states=True)  # capture: its own pass over the prompt
                full = torch.cat([ids, gen[None]], 1)
                hf(full, output_hidden_states=True)  # response states: another pass
                lead = tok.decode(gen[: task.lead_length(gen.tolist(), tok)])
                for option in task.option_continuations(s):  # one pass per option, prompt included
                    opt = tok(text + lead + option, add_special_tokens=False, return_tensors="pt")["input_ids"]
                    hf(opt.to(model.device))
            messages.append({"role": "assistant", "content": prefixes[t] + response})
    _sync(model.device)
    return time.perf_counter() - t0


def engine_alone(model, cfg, task, protocol, batches, repeats: int, other: Path | None = None) -> dict[str, float]:
    """The round engine alone (no run file: :func:`workbench.engine.batch.run_batch` with every layer
    captured) ÷ plain ``generate`` carrying the cache, batch by batch interleaved ``repeats``
    times; each side's time is the sum over batches of its fastest repeat, in wall time and in
    this process's CPU time (on a shared CPU the fastest repeat and CPU time are what other jobs
    disturb least). ``other``: another checkout of the project (e.g. the commit before a change),
    whose round engine runs interleaved with this one's in the same process, on the same model,
    order alternating per batch, reported as ``other_over_plain`` beside ``engine_over_plain``."""
    from workbench.engine.capture import check_layers, hook_sites
    from workbench.engine.batch import run_batch

    samples = load_samples(cfg)
    sites = hook_sites(model, list(cfg.hooks), check_layers(None, model.n_layers))
    engines = {"engine": (lambda chunk: run_batch(model, task, protocol, chunk, sites, cfg.seed))}
    if other is not None:
        engines["other"] = _other_engine(other, model, cfg)
    best = {f"{k}_{t}": [float("inf")] * len(batches) for k in [*engines, "plain"] for t in ("s", "cpu_s")}
    for rep in range(repeats):
        for j, batch in enumerate(batches):
            chunk = samples[j * cfg.batch_size : (j + 1) * cfg.batch_size]
            names = list(engines) if (rep + j) % 2 == 0 else list(engines)[::-1]
            for name in names:
                t0, c0 = time.perf_counter(), time.process_time()
                engines[name](chunk)
                _sync(model.device)
                best[f"{name}_s"][j] = min(best[f"{name}_s"][j], time.perf_counter() - t0)
                best[f"{name}_cpu_s"][j] = min(best[f"{name}_cpu_s"][j], time.process_time() - c0)
                seconds, cpu, _, _ = plain_generate(model, batch, protocol.decoding.max_new_tokens, reuse=True)
                best["plain_s"][j] = min(best["plain_s"][j], seconds)
                best["plain_cpu_s"][j] = min(best["plain_cpu_s"][j], cpu)
    total = {k: sum(v) for k, v in best.items()}
    result = {**total, "engine_repeats": repeats}
    for name in engines:
        result[f"{name}_over_plain"] = total[f"{name}_s"] / total["plain_s"]
        result[f"{name}_over_plain_cpu"] = total[f"{name}_cpu_s"] / total["plain_cpu_s"]
    if other is not None:
        result["other"] = str(other)
    return result


def _other_engine(root: Path, model, cfg):
    """``chunk of samples → None``: the round engine of the checkout at ``root`` over that chunk,
    with its own task, protocol, samples and sites. Its ``workbench`` modules are imported apart
    (this process's are set aside meanwhile) and put in place around each call, so its functions'
    imports inside them find its own modules."""
    def ours() -> dict:
        return {k: v for k, v in sys.modules.items() if k == "workbench" or k.startswith("workbench.")}

    mine = ours()
    for name in mine:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        import workbench.engine.capture as capture
        import workbench.engine.batch as engine
        import workbench.engine.protocol as protocol_module
        import workbench.engine.run as run_module
        import workbench.engine.tasks as tasks
        if not Path(engine.__file__).resolve().is_relative_to(Path(root).resolve()):
            raise SystemExit(f"--compare-with {root}: its workbench package did not load from there")
        theirs = ours()
        task = tasks.get_task(cfg.task)
        protocol = protocol_module.load_protocol(cfg.protocol, rounds=cfg.rounds)
        samples = {s.index: s for s in run_module.load_samples(cfg)}
        sites = capture.hook_sites(model, list(cfg.hooks), capture.check_layers(None, model.n_layers))
    finally:
        sys.path.remove(str(root))
        for name in ours():
            del sys.modules[name]
        sys.modules.update(mine)

    def run(chunk) -> None:
        sys.modules.update(theirs)
        try:
            engine.run_batch(model, task, protocol, [samples[s.index] for s in chunk], sites, cfg.seed)
        finally:
            for name in [k for k in ours() if k not in mine]:  # a module it imported only now stays its own
                theirs[name] = sys.modules.pop(name)
            sys.modules.update(mine)

    return run


def measure(model, cfg, task, protocol, repeats: int, study_samples: int | None = None, engine_repeats: int = 0,
            compare_with: Path | None = None) -> dict[str, object]:
    """Capture overhead (run ÷ plain ``generate``, paired batch by batch, the median of ``repeats``
    runs) and the study's way ÷ the workbench (timed on ``study_samples`` samples, scaled to the
    run's), for the run ``cfg`` (its ``out`` names a scratch folder's file) on a loaded model."""
    n_samples = len(load_samples(cfg))
    tmp = Path(cfg.out).parent
    # an untimed first run: warms up (first calls allocate) and gives the prompts and tokens plain generate must reproduce
    first = run_protocol(RunConfig(**{**cfg.__dict__, "out": tmp / "first.h5"}), model=model)
    batches = round_prompts(first, cfg.batch_size)
    first.close()
    (tmp / "first.h5").unlink()
    pairs = []
    for rep in range(repeats):
        out = tmp / f"bench{rep}.h5"
        pairs.append(paired_times(model, RunConfig(**{**cfg.__dict__, "out": out}), batches, protocol.decoding.max_new_tokens))
        out.unlink()
    mismatches = max(p["mismatches"] for p in pairs)
    if mismatches:
        print(f"warning: plain generate differed from the run on {mismatches} (sample, round) pairs", file=sys.stderr)
    pairs.sort(key=lambda p: p["workbench_s"] / p["reuse_s"])
    median = pairs[len(pairs) // 2]
    workbench_s = median["workbench_s"]
    results: dict[str, object] = dict(
        workbench_s=workbench_s, plain_generate_s=median["reuse_s"], plain_reprefill_s=median["reprefill_s"],
        generated_tokens=median["tokens"], plain_mismatches=mismatches,
        capture_overhead_ratio=workbench_s / median["reuse_s"],
        capture_overhead_ratios=[p["workbench_s"] / p["reuse_s"] for p in pairs],
        plain_generate_inference_s=median["reuse_inference_s"],
        over_plain_inference=_median([p["workbench_s"] / p["reuse_inference_s"] for p in pairs]),
        over_plain_inference_ratios=sorted(p["workbench_s"] / p["reuse_inference_s"] for p in pairs),
        over_plain_reprefill=workbench_s / median["reprefill_s"],
        over_plain_reprefill_ratios=sorted(p["workbench_s"] / p["reprefill_s"] for p in pairs))
    if not str(model.device).startswith(("cuda", "mps")):  # on a CPU, the process's CPU time too: it ignores other jobs' load
        cpu_ratios = sorted(p["workbench_cpu_s"] / p["reuse_cpu_s"] for p in pairs)
        results.update(capture_overhead_cpu_ratio=cpu_ratios[len(cpu_ratios) // 2], capture_overhead_cpu_ratios=cpu_ratios)
    if engine_repeats:
        results["engine_alone"] = engine_alone(model, cfg, task, protocol, batches, engine_repeats, compare_with)
    n_study = min(study_samples or n_samples, n_samples)
    samples = load_samples(cfg)[:n_study]
    study_s = study_way(model, task, protocol, samples) * (n_samples / n_study)
    results.update(study_way_s=study_s, study_samples_measured=n_study, study_over_workbench=study_s / workbench_s)
    return results


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_mib(args: argparse.Namespace, limit: int, out: Path) -> float:
    """Max RSS (MiB) of a fresh process running the workbench over ``limit`` samples."""
    code = (
        "import resource, sys; sys.path.insert(0, %r)\n"
        "from workbench.engine.run import RunConfig, run_protocol\n"
        "run_protocol(RunConfig(out=%r, model=%r, task=%r, data=%r, protocol=%r, rounds=%d, limit=%d, batch_size=%d, device=%r)).close()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    ) % (str(ROOT), str(out), args.model, args.task, tuple(args.data), args.protocol, args.rounds, limit, args.batch_size, args.device)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism")
    p.add_argument("--task", default="organism")
    p.add_argument("--data", nargs="*", default=[])
    p.add_argument("--protocol", default="organism")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--study-samples", type=int, default=None, help="samples for the study's way (default: --samples)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--mem-small", type=int, default=200)
    p.add_argument("--mem-large", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5, help="paired repetitions; the median ratio is reported")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--engine-repeats", type=int, default=0, help="also time the round engine alone (no run file) against "
                   "plain generate, batch by batch, the fastest of this many repeats (0: skip)")
    p.add_argument("--compare-with", default=None, metavar="CHECKOUT", help="with --engine-repeats: also time the round "
                   "engine of another checkout of the project (e.g. a `git worktree add` of the commit before), interleaved")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own; 1 on a shared machine)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "run.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.samples, args.mem_small, args.mem_large = 32, 20, 200

    model = load_model(args.model, device=args.device)
    args.device = model.device
    task = get_task(args.task)
    protocol = load_protocol(args.protocol, rounds=args.rounds)
    results: dict[str, object] = {"model": args.model, "task": args.task, "protocol": args.protocol, "rounds": args.rounds,
                                  "samples": args.samples, "batch_size": args.batch_size, "device": model.device,
                                  "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                                  "gpu": torch.cuda.get_device_name() if model.device == "cuda" else None}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(out=Path(tmp) / "bench.h5", model=args.model, task=args.task, data=tuple(args.data),
                        protocol=args.protocol, rounds=args.rounds, limit=args.samples, batch_size=args.batch_size)
        results.update(measure(model, cfg, task, protocol, args.repeats, args.study_samples, args.engine_repeats,
                               Path(args.compare_with) if args.compare_with else None))
        if not args.skip_memory:
            small = peak_rss_mib(args, args.mem_small, Path(tmp) / "small.h5")
            large = peak_rss_mib(args, args.mem_large, Path(tmp) / "large.h5")
            results.update(mem_small_samples=args.mem_small, mem_large_samples=args.mem_large,
                           peak_rss_small_mib=small, peak_rss_large_mib=large, memory_ratio=large / small)
    _report(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


def _report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run benchmarks: {r['model']} / {r['protocol']}, {r['samples']} samples × {r['rounds']} rounds, "
                        f"batch {r['batch_size']}, {r['device']}")
    for c in ("measure", "value", "target"):
        table.add_column(c)
    table.add_row("workbench run (s)", f"{r['workbench_s']:.2f}", "")
    table.add_row("plain HF generate, same tokens, cache carried across rounds (s)", f"{r['plain_generate_s']:.2f}", "")
    if "plain_generate_inference_s" in r:
        table.add_row("the same in inference mode (s)", f"{r['plain_generate_inference_s']:.2f}", "")
    table.add_row("plain HF generate, same tokens, every round re-run (s)", f"{r['plain_reprefill_s']:.2f}", "")
    spread = f" ({min(r['capture_overhead_ratios']):.2f}–{max(r['capture_overhead_ratios']):.2f})"
    table.add_row("capture overhead: run ÷ plain, cache carried, median (range)", f"{r['capture_overhead_ratio']:.2f}{spread}", "≤ 1.15")
    if "capture_overhead_cpu_ratio" in r:
        cpu = r["capture_overhead_cpu_ratios"]
        table.add_row("the same in CPU time of this process (not waiting: other jobs, fsync), median (range)",
                      f"{r['capture_overhead_cpu_ratio']:.2f} ({min(cpu):.2f}–{max(cpu):.2f})", "")
    if "over_plain_inference" in r:
        like = r["over_plain_inference_ratios"]
        table.add_row("like for like: run ÷ plain in inference mode (as the run's rounds), cache carried, median (range)",
                      f"{r['over_plain_inference']:.2f} ({min(like):.2f}–{max(like):.2f})", "")
    spread = f" ({min(r['over_plain_reprefill_ratios']):.2f}–{max(r['over_plain_reprefill_ratios']):.2f})"
    table.add_row("run ÷ plain, every round re-run, median pair (range)", f"{r['over_plain_reprefill']:.2f}{spread}", "< 1")
    if "engine_alone" in r:
        e = r["engine_alone"]
        table.add_row(f"round engine alone (no file) ÷ plain, cache carried, fastest of {e['engine_repeats']}: wall / CPU time",
                      f"{e['engine_over_plain']:.2f} / {e['engine_over_plain_cpu']:.2f}", "")
        if "other" in e:
            table.add_row(f"the same, round engine of {e['other']}, interleaved: wall / CPU time",
                          f"{e['other_over_plain']:.2f} / {e['other_over_plain_cpu']:.2f}", "")
    table.add_row("study's way (s)", f"{r['study_way_s']:.2f}", "")
    table.add_row("study's way ÷ workbench", f"{r['study_over_workbench']:.1f}×", "≥ 5×")
    if "memory_ratio" in r:
        table.add_row(f"peak RSS at {r['mem_small_samples']} / {r['mem_large_samples']} samples (MiB)",
                      f"{r['peak_rss_small_mib']:.0f} / {r['peak_rss_large_mib']:.0f}", "")
        table.add_row("peak memory ratio", f"{r['memory_ratio']:.2f}", "≤ 1.2")
    Console().print(table)


if __name__ == "__main__":
    main()
