"""What is left in a decode pass on the CPU (issue 28): the workbench's lean pass against two ways
of running the same layer arithmetic with fewer operations, side by side in one process.

A decode pass of the benchmark's small models is a few hundred microseconds: per layer, ~45 small
PyTorch operations around three tiny matrix products and an attention over the cache. This
measures how much of that a leaner formulation could still take away, to decide whether the
workbench should carry one (docs/PERFORMANCE.md, "What is left"):

- ``lean``: :func:`workbench.engine.lean.lean_logits`, the pass every decode step and lookup
  draft of a run makes (HF's operations in HF's order);
- ``fused``: the same layer with its weights joined once — q, k, v and the rotated q and k
  (``rotate_half`` folded into the weight's rows, an exact signed permutation) in one matrix,
  gate and up in one — PyTorch's ``rms_norm`` and ``scaled_dot_product_attention`` called
  directly: about 17 operations a layer instead of ~45;
- ``compiled`` (``--compile``): ``fused`` for one-token passes with a fixed-size cache, through
  ``torch.compile`` (inductor's C++ on the CPU; its compile time is reported beside).

Beside them, counted (not timed) on the peers benchmark's settings: the share of round 1's prefill
positions that are left padding (``--padding``; a packed prefill would skip their projections and
MLP, which the hand loop computes too).

And where a run's time goes (``--breakdown``): the peers benchmark's organism 64 × 5 and BBQ 32 × 5
runs (``run_protocol`` into a run file, as ``workbench run`` calls it), every forward pass timed by
kind (prefills; one-token passes; wider lookup passes, option scoring's among them) against the
whole run, so each lever above can be weighed against what it could reach.

Each is checked against ``lean`` (the largest logit difference, float rounding) before it is timed.
Settings: the organism (4 layers, d 64, vocab 124) over a 100-position cache (a late round of
``organism 64 × 5``), and the benchmark's tiny Llama (3 layers, d 64, grouped keys, vocab 400) over
600 (a late round of the BBQ setting); 16 rows; one-token passes and 6-token lookup passes.
Interleaved ``--repeats`` times, the median per pass (process CPU time).

    OMP_NUM_THREADS=1 python benchmarks/bench_decode_step.py
    OMP_NUM_THREADS=1 python benchmarks/bench_decode_step.py --padding --breakdown --compile

Prints a table and writes ``benchmarks/results/decode_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from workbench.engine.generation import crop_cache, new_cache  # noqa: E402
from workbench.engine.lean import attention_bias, pass_plan, lean_logits, text_stack  # noqa: E402
from workbench.engine.models import load_model  # noqa: E402

ROWS = 16


def _rotation(head_dim: int) -> torch.Tensor:
    """``R`` with ``x @ R == rotate_half(x)`` ``[head_dim, head_dim]``: a signed permutation (exact)."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r


def fused_weights(hf: Any) -> list[dict[str, Any]]:
    """Per decoder layer: the joined weights of ``fused`` (q, k, rotated q, rotated k, v in one
    ``[(2H + 3KV)·hd, d]`` matrix; gate and up in one) and what the layer needs beside them."""
    out = []
    for layer in text_stack(hf)[0].layers:
        attn, mlp = layer.self_attn, layer.mlp
        hd, heads, kv = attn.head_dim, hf.config.num_attention_heads, hf.config.num_key_value_heads
        r = _rotation(hd)

        def rotated(w: torch.Tensor, n: int) -> torch.Tensor:  # rows of x·Wᵀ·R, head by head
            return (w.view(n, hd, -1).transpose(1, 2) @ r).transpose(1, 2).reshape(n * hd, -1)

        q, k = attn.q_proj.weight, attn.k_proj.weight
        out.append({
            "qkv": torch.cat([q, k, rotated(q, heads), rotated(k, kv), attn.v_proj.weight]).contiguous(),
            "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
            "o": attn.o_proj.weight, "down": mlp.down_proj.weight, "inner": mlp.gate_proj.weight.shape[0],
            "n1": layer.input_layernorm.weight, "e1": layer.input_layernorm.variance_epsilon,
            "n2": layer.post_attention_layernorm.weight, "e2": layer.post_attention_layernorm.variance_epsilon,
            "heads": heads, "kv": kv, "hd": hd, "scale": attn.scaling, "index": attn.layer_idx,
        })
    return out


def fused_layer(w: dict[str, Any], x: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                write: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One Llama layer ``[rows, q, d]`` → ``[rows, q, d]`` on the joined weights; ``write(layer, k, v)``
    stores the pass's keys and values and returns every cached one."""
    rows, q, d = x.shape
    h_, kv, hd = w["heads"], w["kv"], w["hd"]
    h = F.rms_norm(x, (d,), w["n1"], w["e1"])
    y = F.linear(h, w["qkv"]).view(rows, q, 2 * h_ + 3 * kv, hd).transpose(1, 2)
    qk = y[:, : h_ + kv] * cos + y[:, h_ + kv: 2 * (h_ + kv)] * sin  # rotary on q and k at once
    keys, values = write(w["index"], qk[:, h_:], y[:, 2 * (h_ + kv):])
    o = F.scaled_dot_product_attention(qk[:, :h_], keys, values, attn_mask=mask, scale=w["scale"], enable_gqa=h_ != kv)
    x = x + F.linear(o.transpose(1, 2).reshape(rows, q, h_ * hd), w["o"])
    gate, up = F.linear(F.rms_norm(x, (d,), w["n2"], w["e2"]), w["gate_up"]).split(w["inner"], -1)
    return x + F.linear(F.silu(gate) * up, w["down"])


def fused_logits(hf: Any, weights: list[dict[str, Any]], ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                 write: Callable) -> torch.Tensor:
    """``fused``'s pass → the last position's logits ``[rows, 1, vocab]``."""
    base = text_stack(hf)[0]
    x = F.embedding(ids, base.embed_tokens.weight)
    freqs = positions[..., None].float() * base.rotary_emb.inv_freq
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    for w in weights:
        x = fused_layer(w, x, mask, cos, sin, write)
    x = F.rms_norm(x[:, -1:], (x.shape[-1],), base.norm.weight, base.norm.variance_epsilon)
    return F.linear(x, hf.lm_head.weight)


def _cpu_per_call(fn: Callable[[], Any], calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls


def measure(name: str, hf: Any, width: int, q: int, repeats: int, calls: int, compile_: bool) -> dict:
    """One setting: a cache of ``width`` positions (some rows left-padded), then passes of ``q`` tokens."""
    gen = torch.Generator().manual_seed(0)
    vocab = hf.config.vocab_size
    lean = pass_plan(hf)
    weights = fused_weights(hf)
    with torch.inference_mode():
        ids = torch.randint(4, vocab, (ROWS, width), generator=gen)
        held = torch.ones(ROWS, width, dtype=torch.long)
        held[:, : width // 8] = 0  # round 1's left padding and later holes, about what a run's cache holds
        held[3, : width // 3] = 0
        positions = (held.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache(hf)
        for layer in cache.layers:
            layer.reserve = width + 64
        lean_logits(hf, ids, held, positions, cache, 1, lean)
        step = torch.randint(4, vocab, (ROWS, q), generator=gen)
        sees = torch.cat([held.bool()[:, None, None, :].expand(-1, 1, q, -1),
                          torch.ones(q, q, dtype=torch.bool).tril()[None, None].expand(ROWS, 1, q, q)], -1)
        bias = attention_bias(sees, torch.float32)  # [rows, 1, q, width + q], as the decode loop makes it once per round
        step_pos = positions[:, -1:] + 1 + torch.arange(q)

        def write(index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return cache.layers[index].update(k, v)

        def run_lean() -> torch.Tensor:
            out = lean_logits(hf, step, bias, step_pos, cache, 1, lean)
            crop_cache(cache, width)
            return out

        def run_fused() -> torch.Tensor:
            out = fused_logits(hf, weights, step, bias, step_pos, write)
            crop_cache(cache, width)
            return out

        ways: dict[str, Callable[[], Any]] = {"lean": run_lean, "fused": run_fused}
        diff = {"fused": float((run_lean() - run_fused()).abs().max())}
        compile_s = None
        if compile_ and q == 1:  # a fixed-size cache: every step the same shapes
            room = width + 1
            layers = [cache.layers[w["index"]] for w in weights]  # the cache's positions and one free slot, copied
            keys = [torch.cat([c.keys, c.keys[:, :, :1]], 2) for c in layers]
            values = [torch.cat([c.values, c.values[:, :, :1]], 2) for c in layers]
            slot = torch.tensor([width])

            def static_write(index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                keys[index].index_copy_(2, slot, k)
                values[index].index_copy_(2, slot, v)
                return keys[index], values[index]

            step_mask = bias[..., :room]
            compiled = torch.compile(lambda i, m, p: fused_logits(hf, weights, i, m, p, static_write), dynamic=False)
            start = time.perf_counter()
            compiled(step, step_mask, step_pos)
            compile_s = time.perf_counter() - start
            ways["compiled"] = lambda: compiled(step, step_mask, step_pos)
            diff["compiled"] = float((run_lean() - compiled(step, step_mask, step_pos)).abs().max())
        for fn in ways.values():
            for _ in range(10):
                fn()
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(repeats):
            for k, fn in ways.items():
                times[k].append(_cpu_per_call(fn, calls))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"setting": name, "cache": width, "tokens": q, "us_per_pass": {k: round(v * 1e6, 1) for k, v in median.items()},
            "lean_over": {k: round(median["lean"] / v, 3) for k, v in median.items() if k != "lean"},
            "max_logit_difference": diff, "compile_s": None if compile_s is None else round(compile_s, 1)}


def peer_settings(tmp: Path, organism: Any, llama: Any, llama_path: Path) -> list[Any]:
    """The peers benchmark's organism 64 × 5 and BBQ tiny Llama 32 × 5 settings (``bench_peers.Setting``:
    the workbench run once on each, its prompts kept)."""
    import bench_peers
    from workbench.engine.run import RunConfig

    return [
        bench_peers.make_setting("organism 64 × 5", organism, RunConfig(out=tmp / "x.h5", rounds=5, limit=64, protocol="organism")),
        bench_peers.make_setting("BBQ tiny Llama 32 × 5", llama, RunConfig(
            out=tmp / "x.h5", model=str(llama_path), task="bbq", data=(str(bench_peers.default_bbq()),), protocol="bbq-paper",
            rounds=5, limit=32, max_new_tokens=10)),
    ]


def padding(settings: list[Any]) -> list[dict]:
    """Round 1's left padding on each setting (batch 16): padded positions ÷ all positions of its
    round-1 prefills."""
    out = []
    for setting in settings:
        lengths = [[len(row) for row in batch[0]] for batch in setting.pieces]  # [batch][row]: round 1's prompt
        held, padded = sum(map(sum, lengths)), sum(len(b) * max(b) for b in lengths)
        out.append({"setting": setting.name, "round1_positions": padded, "round1_padding_share": round(1 - held / padded, 3)})
    return out


def breakdown(settings: list[Any], repeats: int, tmp: Path) -> list[dict]:
    """Process CPU time of each setting's whole run and of its forward passes by kind
    (``lean_logits`` timed where the decode loop calls it), the median over ``repeats`` runs after
    a warm-up."""
    import bench_peers
    from workbench.engine import generation

    timed: dict[str, float] = {}
    counted: dict[str, int] = {}
    real = generation.lean_logits

    def timing(hf: Any, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.process_time()
        out = real(hf, ids, *args, **kwargs)
        kind = "prefill" if ids.shape[1] > 12 else "one-token" if ids.shape[1] == 1 else "wider"
        timed[kind] = timed.get(kind, 0.0) + time.process_time() - start
        counted[kind] = counted.get(kind, 0) + 1
        return out

    out = []
    for setting in settings:
        runs = []
        generation.lean_logits = timing
        try:
            for k in range(repeats + 1):
                timed.clear()
                counted.clear()
                start = time.process_time()
                bench_peers.workbench(setting, setting.cfg.limit, tmp / "x.h5")
                if k:  # the first is a warm-up
                    runs.append((time.process_time() - start, dict(timed), dict(counted)))
        finally:
            generation.lean_logits = real
        runs.sort(key=lambda r: r[0])
        total, kinds, counts = runs[len(runs) // 2]
        out.append({"setting": setting.name, "run_ms": round(total * 1e3, 1),
                    "passes_ms": {k: round(v * 1e3, 1) for k, v in kinds.items()}, "passes": counts,
                    "other_ms": round((total - sum(kinds.values())) * 1e3, 1)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=200, help="passes per timing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also torch.compile the fused one-token pass (~15 s a setting)")
    p.add_argument("--breakdown", action="store_true", help="also time a run's forward passes by kind on the peers settings")
    p.add_argument("--padding", action="store_true", help="also count round 1's left padding on the peers settings")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_step.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import bench_peers

    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)",
                     "torch": torch.__version__, "load_average_before": os.getloadavg(), "settings": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = bench_peers.build_tiny_llama(tmp)
        organism, llama = load_model("organism", device="cpu"), load_model(str(path), device="cpu", dtype="float32")
        for name, hf, width in (("organism", organism.hf, 100), ("tiny Llama (BBQ)", llama.hf, 600)):
            for q in (1, 6):
                print(f"{name}, {q}-token passes …", file=sys.stderr)
                results["settings"].append(measure(name, hf, width, q, args.repeats, args.calls, args.compile))
        if args.breakdown or args.padding:
            settings = peer_settings(tmp, organism, llama, path)
            if args.breakdown:
                results["breakdown"] = breakdown(settings, args.repeats, tmp)
            if args.padding:
                results["padding"] = padding(settings)
    results["load_average_after"] = os.getloadavg()
    print(f"\n{'setting':<18} {'cache':>5} {'tokens':>6}  {'lean µs':>8}  {'fused µs':>8}  {'lean ÷ fused':>12}  "
          f"{'compiled µs':>11}  {'lean ÷ compiled':>15}  max |Δlogit|")
    for r in results["settings"]:
        us, over = r["us_per_pass"], r["lean_over"]
        compiled = f"{us['compiled']:>11.0f}  {over['compiled']:>15.2f}" if "compiled" in us else f"{'':>11}  {'':>15}"
        print(f"{r['setting']:<18} {r['cache']:>5} {r['tokens']:>6}  {us['lean']:>8.0f}  {us['fused']:>8.0f}  {over['fused']:>12.2f}  "
              f"{compiled}  {max(r['max_logit_difference'].values()):.1e}" + (f"  (compile {r['compile_s']} s)" if r["compile_s"] else ""))
    for r in results.get("breakdown", []):
        parts = ", ".join(f"{k} {v} ms ({r['passes'][k]} passes)" for k, v in r["passes_ms"].items())
        print(f"{r['setting']}: run {r['run_ms']} ms CPU = {parts}, everything else {r['other_ms']} ms")
    for r in results.get("padding", []):
        print(f"{r['setting']}: round 1's prefills are {r['round1_padding_share']:.1%} left padding ({r['round1_positions']} positions)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
