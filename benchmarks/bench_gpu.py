"""GPU benchmark (issue 14): a random-weight model with a real architecture's config, no download.

On whatever accelerator it finds (``cuda``, else ``mps``, else the CPU), side by side in one
process, for every batch size × rounds setting, with bench_run.py's measuring code
(:func:`bench_run.measure`: pairs of a full ``workbench run`` and plain Hugging Face ``generate``
of the same prompts batch by batch, the median of ``--repeats``):

1. capture overhead: the full run (every layer's ``hook_resid_post``, token entropies, option
   confidences, HDF5 writes) ÷ plain ``generate`` carrying its KV cache across rounds, no capture
   (target ≤ 1.05 on a GPU);
2. the study's way ÷ the workbench (one sample at a time, every round re-encoded from scratch;
   timed on ``--study-samples`` samples and scaled; target ≥ 10×);
3. generated tokens per second of the workbench and peak accelerator memory of the run
   (``torch.cuda.max_memory_allocated``).

The model: a Llama of about 1.2B parameters shaped like Llama 3.2 1B (16 layers, d_model 2048,
32 heads, 8 KV heads, MLP 8192, vocabulary 128,256, tied embeddings), random weights, bfloat16,
saved to a temporary folder and loaded by path as a user's model would be. Prompts are BBQ items
(the shared data if present, else the test fixture repeated) with the study's protocol and 32-token
answers; a BPE tokenizer trained locally (as ``tests/tiny_models.py`` does) encodes them, so the
prompts have realistic lengths while the model may answer with any of its 128,256 ids (random
weights rarely stop early: every answer runs to ``max_new_tokens``). On the CPU it runs a tiny
config (3 layers, d_model 64) at small sizes instead and says so.

    python benchmarks/bench_gpu.py                 # on a machine with one NVIDIA GPU: the full grid
    python benchmarks/bench_gpu.py --threads 1     # CPU: the tiny config (a smoke test of the same code)

Prints a table and writes ``benchmarks/results/gpu.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_run import measure  # noqa: E402

from workbench.engine.models import load_model, resolve_device  # noqa: E402
from workbench.engine.protocol import load_protocol  # noqa: E402
from workbench.engine.run import RunConfig  # noqa: E402
from workbench.engine.tasks import get_task  # noqa: E402

SHARED_BBQ = ROOT.parents[0] / "shared" / "data" / "bbq" / "Religion.jsonl"
FIXTURE_BBQ = ROOT / "tests" / "fixtures" / "bbq_fixture.jsonl"
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True,
                rms_norm_eps=1e-5, head_dim=64)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=None, max_position_embeddings=2048, tie_word_embeddings=False)


def build_random_llama(folder: Path, shape: dict, device: str, seed: int = 0) -> Path:
    """A random-weight Llama of ``shape`` (``vocab_size`` None: the tokenizer's) with a locally
    trained BPE chat tokenizer, saved to ``folder`` in bfloat16 on an accelerator (float32 on the
    CPU); returns the folder."""
    from tiny_models import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    shape = {**shape, "vocab_size": shape["vocab_size"] or len(tok)}
    cfg = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with torch.device(device):  # initialise where it will run: 1.2B normal draws take minutes on a CPU
        model = LlamaForCausalLM(cfg).to(dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    del model
    return folder


def bbq_file(folder: Path, n: int) -> Path:
    """A BBQ JSONL of at least ``n`` items: the shared Religion file, else the fixture repeated
    with new example ids."""
    if SHARED_BBQ.is_file() and sum(1 for _ in SHARED_BBQ.open()) >= n:
        return SHARED_BBQ
    items = [json.loads(line) for line in FIXTURE_BBQ.read_text().splitlines() if line.strip()]
    out = folder / "bbq.jsonl"
    with out.open("w") as f:
        for i in range(n):
            f.write(json.dumps({**items[i % len(items)], "example_id": i}) + "\n")
    return out


def one_setting(model, data: Path, tmp: Path, batch: int, rounds: int, samples: int, max_new_tokens: int,
                repeats: int, study_samples: int) -> dict:
    """bench_run's measures for one batch size × rounds, with tokens/s and peak accelerator memory."""
    task = get_task("bbq")
    protocol = load_protocol("bbq-paper", rounds=rounds)
    protocol = dataclasses.replace(protocol, decoding=dataclasses.replace(protocol.decoding, max_new_tokens=max_new_tokens))
    cfg = RunConfig(out=tmp / "bench.h5", model=model.path, task="bbq", data=(str(data),), protocol="bbq-paper",
                    rounds=rounds, limit=samples, batch_size=batch, max_new_tokens=max_new_tokens)
    cuda = model.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    r = measure(model, cfg, task, protocol, repeats, study_samples)
    r.update(batch_size=batch, rounds=rounds, samples=samples, wall_s=time.perf_counter() - t0,
             tokens_per_s=r["generated_tokens"] / r["workbench_s"],
             peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto: cuda, else mps, else cpu")
    p.add_argument("--batches", default=None, help="batch sizes, comma-separated (default: 16,64,256 on a GPU; 4,16 on the CPU)")
    p.add_argument("--rounds", default="5,10", help="rounds, comma-separated")
    p.add_argument("--samples", type=int, default=None, help="samples per setting (default: the batch size, at least 64 on a GPU)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 32 on a GPU, 8 on the CPU")
    p.add_argument("--repeats", type=int, default=None, help="paired repetitions, median reported (default: 3 on a GPU, 1 on the CPU)")
    p.add_argument("--study-samples", type=int, default=None, help="samples the study's way is timed on (default: 4 on a GPU, 2 on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    accelerator = device != "cpu"
    batches = [int(b) for b in (args.batches or ("16,64,256" if accelerator else "4,16")).split(",")]
    rounds = [int(r) for r in (args.rounds if accelerator or args.rounds != "5,10" else "2,5").split(",")]
    max_new = args.max_new_tokens or (32 if accelerator else 8)
    repeats = args.repeats or (3 if accelerator else 1)
    study = args.study_samples or (4 if accelerator else 2)
    shape = LLAMA_1B if accelerator else TINY
    results: dict = {"device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                     "config": "llama-1b-shaped (random weights)" if accelerator else "tiny llama (CPU: not the 1B config)",
                     "shape": {k: v for k, v in shape.items()}, "dtype": "bfloat16" if accelerator else "float32",
                     "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads",
                     "torch": torch.__version__, "max_new_tokens": max_new, "repeats": repeats, "settings": []}
    if not accelerator:
        print("no accelerator found: running the tiny config on the CPU (a smoke test; these are not GPU figures)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        folder = build_random_llama(tmp / "model", shape, device)
        model = load_model(str(folder), device=device, dtype="bfloat16" if accelerator else "float32")
        results["params"] = sum(t.numel() for t in model.hf.parameters())
        results["build_and_load_s"] = time.perf_counter() - t0
        print(f"model: {_count(results['params'])} parameters, {model.dtype}, on {model.device} "
              f"(built and loaded in {results['build_and_load_s']:.0f} s)", flush=True)
        data = bbq_file(tmp, max(max(batches), 64))
        for batch in batches:
            for r in rounds:
                samples = args.samples or (max(batch, 64) if accelerator else batch)
                print(f"batch {batch} × {r} rounds, {samples} samples …", flush=True)
                row = one_setting(model, data, tmp, batch, r, samples, max_new, repeats, study)
                results["settings"].append(row)
                print(f"  overhead {row['capture_overhead_ratio']:.3f}, study ÷ workbench {row['study_over_workbench']:.1f}×, "
                      f"{row['tokens_per_s']:.0f} tokens/s ({row['wall_s']:.0f} s)", flush=True)
    _report(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


def _report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    where = f"{r['device']}" + (f" ({r['gpu']})" if r["gpu"] else "")
    table = Table(title=f"GPU benchmark: {r['config']}, {_count(r['params'])} parameters, {r['dtype']}, {where}, "
                        f"{r['max_new_tokens']}-token answers; targets: overhead ≤ 1.05, study ÷ workbench ≥ 10×")
    for c in ("batch", "rounds", "samples", "run s", "plain s", "overhead (range)", "like for like", "study ÷ wb", "tokens/s", "peak GiB"):
        table.add_column(c, justify="right")
    for s in r["settings"]:
        spread = f" ({min(s['capture_overhead_ratios']):.2f}–{max(s['capture_overhead_ratios']):.2f})"
        table.add_row(str(s["batch_size"]), str(s["rounds"]), str(s["samples"]), f"{s['workbench_s']:.2f}", f"{s['plain_generate_s']:.2f}",
                      f"{s['capture_overhead_ratio']:.3f}{spread}", f"{s['over_plain_inference']:.3f}", f"{s['study_over_workbench']:.1f}×",
                      f"{s['tokens_per_s']:.0f}",
                      "" if s["peak_memory_gib"] is None else f"{s['peak_memory_gib']:.1f}")
    Console().print(table)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


if __name__ == "__main__":
    main()
