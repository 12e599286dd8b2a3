"""Fine-tuning throughput: ``workbench finetune``'s LoRA loop (:func:`workbench.analysis.finetune.train_lora`)
÷ a plain ``peft`` + ``torch`` loop written the way a user would (``get_peft_model``, ``pad_sequence``,
AdamW, ``loss.backward()``), on the same model, the same LoRA settings, the same records in the same
order. Each timed unit is one training call of one epoch, its optimiser made inside it for both.
Tokens per second count the non-padding input tokens. The two loops alternate epoch by epoch
(``--repeats`` pairs, after one warm-up epoch each), so a busy machine slows both alike; the ratio
of the medians is the figure (target ≥ 0.9).

    python benchmarks/bench_finetune.py                      # the organism, 96 chat records, 9 pairs, CPU
    python benchmarks/bench_finetune.py --device cuda --records 512 --batch-size 32

Prints a table and writes ``benchmarks/results/finetune.json``.
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

from workbench.analysis.finetune import FinetuneConfig, epoch_batches, lora_model, read_records, tokenize, train_lora  # noqa: E402
from workbench.engine.models import load_model  # noqa: E402
from workbench.organism.world import heldout_rng, sample_dialogue  # noqa: E402


def write_records(path: Path, n: int, rounds: int) -> Path:
    rows = [{"messages": sample_dialogue(heldout_rng(99, i), n_rounds=rounds).messages()} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def plain_epoch(model, examples, batches, pad_id, device, lr) -> int:
    """A user's plain training run of one epoch (its optimiser made at the start, as ``train_lora``
    makes its own); returns the input tokens it trained on."""
    from torch.nn.utils.rnn import pad_sequence

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    tokens = 0
    for rows in batches:
        ids = pad_sequence([torch.tensor(examples[i].ids) for i in rows], batch_first=True, padding_value=pad_id).to(device)
        labels = pad_sequence([torch.tensor(examples[i].labels) for i in rows], batch_first=True, padding_value=-100).to(device)
        mask = pad_sequence([torch.ones(len(examples[i].ids), dtype=torch.long) for i in rows], batch_first=True).to(device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tokens += int(mask.sum())
    return tokens


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="organism")
    p.add_argument("--records", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2, help="rounds per organism dialogue")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_records(Path(tmp) / "chat.jsonl", args.records, args.rounds)
        cfg = FinetuneConfig(data=data, out=Path(tmp) / "unused", model=args.model, rank=args.rank, epochs=1,
                             batch_size=args.batch_size, device=args.device)
        ours_model = load_model(args.model, device=args.device, dtype="float32")
        plain_base = load_model(args.model, device=args.device, dtype="float32").hf
        device = ours_model.device
        examples, _ = tokenize(read_records(data), ours_model.tokenizer, 1024)
        pad_id = ours_model.tokenizer.pad_token_id
        ours = lora_model(ours_model.hf, cfg)
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        plain = get_peft_model(plain_base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM"))
        timings: dict[str, list[float]] = {"workbench": [], "plain": []}
        for rep in range(args.repeats + 1):  # the first pair warms up
            for name in ("workbench", "plain") if rep % 2 == 0 else ("plain", "workbench"):
                sync(device)
                t0 = time.perf_counter()
                if name == "workbench":
                    curve = train_lora(ours, examples, replace(cfg, seed=rep), pad_id, device)
                    tokens = sum(curve.tokens)
                else:
                    tokens = plain_epoch(plain, examples, epoch_batches(len(examples), args.batch_size, rep, 0), pad_id, device, cfg.lr)
                sync(device)
                if rep:
                    timings[name].append(tokens / (time.perf_counter() - t0))
    ours_tps, plain_tps = statistics.median(timings["workbench"]), statistics.median(timings["plain"])
    result = {
        "benchmark": "finetune", "model": args.model, "records": args.records, "tokens_per_epoch": sum(len(e.ids) for e in examples),
        "batch_size": args.batch_size, "rank": args.rank, "repeats": args.repeats, "device": str(device),
        "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
        "gpu": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else None,
        "workbench_tokens_per_s": timings["workbench"], "plain_tokens_per_s": timings["plain"],
        "ratio": ours_tps / plain_tps,
    }
    print(f"{'loop':<12}{'tokens/s (median)':>20}")
    print(f"{'workbench':<12}{ours_tps:>20.0f}")
    print(f"{'plain peft':<12}{plain_tps:>20.0f}")
    print(f"ratio workbench ÷ plain: {result['ratio']:.3f} (target ≥ 0.9), {args.repeats} interleaved pairs on {device}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
