"""Vision-language benchmarks (issue 26), side by side in one process on the tiny random LLaVA of
``tests/tiny_models.py`` (its processor included), the same pictures, prompts and tokens:

1. the image is encoded once per sample, not once per round: the pictures the vision tower
   encodes over a whole run (counted by a forward hook on it: the batch dimension of each call)
   with the cache carried (= samples) and when every round re-runs its whole conversation
   (= samples × rounds);
2. a VLM run ÷ plain Hugging Face ``generate`` carrying the cache the same way (round 1 with the
   processor's pixel values and a plain ``DynamicCache``, later rounds on that cache with no pixel
   values), both under ``torch.inference_mode()`` on the same round prompts (the plain calls check
   that they produce the run's tokens). Two figures: the rounds alone (``run_batch``: generation,
   capture of every layer's ``hook_resid_post`` at the three positions, option scoring, metrics)
   and the whole ``workbench run`` (loading aside: the hook check, the data with its images, the
   file); the rounds also with the same questions open-ended (``vqa-open``: no option-scoring pass,
   which plain ``generate`` does not make). Interleaved ``--repeats`` times; the median of the
   per-pair ratios. Target ≤ 1.15.

    python benchmarks/bench_vlm.py --threads 1
    python benchmarks/bench_vlm.py --quick

Prints a table and writes ``benchmarks/results/vlm.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import build_vlm, write_images  # noqa: E402
from workbench.engine.batch import run_batch  # noqa: E402
from workbench.engine.capture import hook_sites  # noqa: E402
from workbench.engine.generation import pad, stop_ids  # noqa: E402
from workbench.engine.images import load_image  # noqa: E402
from workbench.engine.models import load_model  # noqa: E402
from workbench.engine.protocol import load_protocol  # noqa: E402
from workbench.engine.run import run_protocol  # noqa: E402
from workbench.engine.tasks import VQA, VQA_OPEN, load_vqa  # noqa: E402
from workbench.store.reader import RunFile  # noqa: E402

QUESTIONS = ["What colour is the square in the middle of the picture?", "Which colour do you see?",
             "Describe the colour of the shape, please.", "Colour of the square?"]


def write_items(folder: Path, n: int) -> Path:
    write_images(folder / "imgs", n)
    rows = [json.dumps({"image": f"imgs/{i:03d}.png", "question": QUESTIONS[i % 4], "options": ["red", "green", "blue"],
                        "label": i % 3}) for i in range(n)]
    (folder / "items.jsonl").write_text("\n".join(rows) + "\n")
    return folder / "items.jsonl"


def count_encoded(model, fn) -> int:
    """Pictures the vision tower encodes while ``fn()`` runs."""
    seen = []
    handle = model.hf.model.vision_tower.register_forward_hook(lambda m, args, out: seen.append(int(args[0].shape[0])))
    try:
        fn()
    finally:
        handle.remove()
    return sum(seen)


def plain_rounds(model, samples, transcripts, prompt_spans, response_ids, max_new_tokens: int) -> tuple[float, int]:
    """Plain HF ``generate`` over one batch's rounds carrying the cache as the workbench does; returns
    (seconds, (sample, round) pairs whose tokens differ from the run's)."""
    from transformers import DynamicCache

    tok, hf = model.tokenizer, model.hf
    stops = stop_ids(hf, tok)
    rounds = prompt_spans.shape[1]
    mismatches = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        pixels = model.processor.image_processor([load_image(s.image) for s in samples], return_tensors="pt")["pixel_values"]
        seqs = mask = cache = held = None
        for t in range(rounds):
            prompts = [list(transcripts[i][: prompt_spans[i, t, 1]]) for i in range(len(samples))]
            if cache is None:
                ids, mask = pad(prompts, tok.pad_token_id, model.device, "left")
                extra = {"pixel_values": pixels.to(model.device), "cache": DynamicCache()}
            else:
                new_ids, new_mask = pad([p[h:] for p, h in zip(prompts, held)], tok.pad_token_id, model.device, "left")
                ids, mask = torch.cat([seqs, new_ids], 1), torch.cat([mask, new_mask], 1)
                extra = {"cache": cache}
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                              eos_token_id=stops, pad_token_id=tok.pad_token_id, top_k=None, return_dict_in_generate=True,
                              **extra)
            generated = out.sequences[:, ids.shape[1]:].tolist()
            lengths = [next((j for j, x in enumerate(g) if x in stops), len(g)) for g in generated]
            mismatches += sum(g[:n] != response_ids[i][t] for i, (g, n) in enumerate(zip(generated, lengths)))
            seqs, cache = out.sequences, out.cache
            steps = torch.arange(seqs.shape[1] - ids.shape[1], device=mask.device)
            mask = torch.cat([mask, (steps[None] < torch.tensor(lengths, device=mask.device)[:, None]).long()], 1)
            held = [len(p) + n for p, n in zip(prompts, lengths)]
    return time.perf_counter() - t0, mismatches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="8 samples, 3 rounds, 2 repeats")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vlm.json"))
    args = p.parse_args()
    if args.quick:
        args.samples, args.rounds, args.repeats = 8, 3, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-vlm-"))
    model = load_model(str(build_vlm("llava", tmp / "llava")), device="cpu", dtype="float32")
    items = write_items(tmp / "data", args.samples)
    samples = load_vqa(items)
    protocol = load_protocol("vqa-moral")
    protocol = dataclasses.replace(protocol, rounds=args.rounds,
                                   decoding=dataclasses.replace(protocol.decoding, max_new_tokens=args.max_new_tokens))
    sites = hook_sites(model, ["hook_resid_post"], list(range(model.n_layers)))
    batches = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]

    carried = count_encoded(model, lambda: [run_batch(model, VQA, protocol, b, sites, 0) for b in batches])
    rerun = count_encoded(model, lambda: [run_batch(model, VQA, protocol, b, sites, 0, reuse_cache=False) for b in batches])

    rounds_ratios, open_ratios, run_ratios, mismatches = [], [], [], 0
    for k in range(args.repeats):
        # the rounds alone, batch by batch, each beside plain generate of its own prompts: multiple
        # choice (the options scored every round: a pass plain generate does not make), and the
        # same questions open-ended (no options)
        for task, ratios in ((VQA, rounds_ratios), (VQA_OPEN, open_ratios)):
            wb, plain = 0.0, 0.0
            for b in batches:
                t0 = time.perf_counter()
                res = run_batch(model, task, protocol, b, sites, 0)
                wb += time.perf_counter() - t0
                seconds, bad = plain_rounds(model, b, res.transcripts, np.asarray(res.prompt_spans), res.response_ids,
                                            args.max_new_tokens)
                plain += seconds
                mismatches = max(mismatches, bad)
            ratios.append(wb / plain)
        # the whole run (model loaded), beside plain generate of every batch
        out = tmp / f"run{k}.h5"
        t0 = time.perf_counter()
        run_protocol(model=model, out=str(out), task="vqa", data=(str(items),), rounds=args.rounds,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size).close()
        whole = time.perf_counter() - t0
        with RunFile(out) as run:
            transcripts = run.array("transcripts/token_ids")
            spans = run.array("rounds/prompt_span")
            responses = run.array("tokens/response_token_ids") if "tokens/response_token_ids" in run.f else None
        plain_whole = 0.0
        for i, b in enumerate(batches):
            rows = range(i * args.batch_size, i * args.batch_size + len(b))
            ids = [[list(responses[r][t]) for t in range(args.rounds)] for r in rows] if responses is not None else None
            seconds, bad = plain_rounds(model, b, [transcripts[r] for r in rows], spans[list(rows)],
                                        ids or [[[]] * args.rounds for _ in rows], args.max_new_tokens)
            plain_whole += seconds
            mismatches = max(mismatches, bad if ids else 0)
        run_ratios.append(whole / plain_whole)

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "model": "tiny random LLaVA (tests/tiny_models.py: CLIP tower of 4 patches, Llama of 3 layers, d_model 64)",
        "samples": args.samples, "batch_size": args.batch_size, "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
        "images_encoded_cache_carried": carried, "images_encoded_rerun_every_round": rerun,
        "rounds_over_plain_generate": statistics.median(rounds_ratios), "rounds_over_plain_generate_all": rounds_ratios,
        "open_rounds_over_plain_generate": statistics.median(open_ratios), "open_rounds_over_plain_generate_all": open_ratios,
        "run_over_plain_generate": statistics.median(run_ratios), "run_over_plain_generate_all": run_ratios,
        "token_mismatches": mismatches,
    }
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"VLM runs, {results['machine']}, {args.samples} samples, batch {args.batch_size}, {args.rounds} rounds")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("pictures encoded, cache carried (= samples)", str(carried))
    table.add_row("pictures encoded, every round re-run (= samples × rounds)", str(rerun))
    table.add_row("rounds (run_batch) ÷ plain generate, cache carried, median", f"{results['rounds_over_plain_generate']:.3f}")
    table.add_row("rounds, open-ended (no option scoring) ÷ plain generate, median", f"{results['open_rounds_over_plain_generate']:.3f}")
    table.add_row("whole run ÷ plain generate, cache carried, median", f"{results['run_over_plain_generate']:.3f}")
    table.add_row("(sample, round) pairs whose plain tokens differ (must be 0)", str(mismatches))
    Console().print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
