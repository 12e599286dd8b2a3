"""The workbench against every peer a researcher could run the same self-correction rounds with (issue 28).

Each peer is written as its users would write it and is checked, before it is timed, to give the
workbench's greedy tokens on every (sample, round) (and its activations, where the peer captures):

- ``workbench no lookup``: the workbench itself with ``--no-lookup`` (one pass per generated
  token, no drafts from earlier answers: ``workbench/engine/lookup.py``), to show what lookup
  decoding gives on each setting.

- ``hand loop``: Hugging Face ``generate`` in ``torch.inference_mode()``, batch by batch, each
  round continuing on the KV cache the round before left (the new tokens appended to the last
  round's sequences; the mask hides left padding and the steps after a row stopped). Tokens only:
  no capture, no entropies, no option scores — the strongest baseline a person writes by hand.
  ``hand loop no_grad``: the same under ``generate``'s own ``no_grad``, as most people call it.
- ``HF re-prefill``: the same, every round's whole conversation generated from scratch.
- ``nnsight`` / ``nnsight cached``: nnsight 0.8's ``LanguageModel.generate`` on a copy of the
  model (nnsight wraps every module's ``forward`` for good; on the shared model that would slow the
  other peers and send the workbench's passes through ``hf(...)``), saving every layer's residual
  stream (the prefill's last token and each decode step's input), re-prefilling or carrying a
  ``DynamicCache`` across rounds.
- ``TL bridge``: TransformerLens 4.3's bridge, one sample at a time, ``generate`` without its KV
  cache (its cached generate gives other greedy tokens, DESIGN §9), then ``run_with_cache`` over the
  prompt and answer for the residual stream of every layer.
- ``study's way``: the authors' loop (``bench_run.study_way``): one sample at a time, every round's
  chat re-rendered and re-encoded, hidden states and each option from separate passes.

The workbench is ``run_protocol`` as ``workbench run`` calls it: every layer's ``hook_resid_post``
at two positions, token entropies, option probabilities, the run file written (created, every
batch flushed, finished). The peers get each round's new prompt tokens precomputed (from an
untimed workbench run; the study's way renders its own), so their tokenizing is free: that
favours them. Timing: all peers interleaved in one process, ``--repeats`` rounds of them in a
rotating order, wall time and this process's CPU time (one torch thread), the median of the
per-repeat ratios peer ÷ workbench. The slow peers (TL bridge, the study's way) go one sample at a
time: they run on the first ``--slow-samples`` samples in the first ``--slow-repeats`` repeats, and
their time, scaled to the whole set, is divided by the workbench's median (a throughput ratio).

Settings: the organism, 64 samples, R = 5/10/20; the BBQ setting (a tiny random Llama as in
``tests/tiny_models.py``, Religion.jsonl, ``bbq-paper``, 32 samples, 10 new tokens), R = 5/10/20;
and a small run, the organism 16 samples × 2 rounds (fixed costs). Batch 16 throughout.

    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py
    OMP_NUM_THREADS=1 python benchmarks/bench_peers.py --quick

Prints a table and writes ``benchmarks/results/peers.json`` (per setting, ``workbench_forward``:
"lean", or why the workbench's passes went through ``hf(...)``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from workbench.engine.batch import run_batch  # noqa: E402
from workbench.engine.capture import check_layers, hook_sites  # noqa: E402
from workbench.engine.generation import pad, stop_ids  # noqa: E402
from workbench.engine.models import load_model  # noqa: E402
from workbench.engine.protocol import load_protocol  # noqa: E402
from workbench.engine.run import RunConfig, load_samples, run_protocol  # noqa: E402
from workbench.engine.tasks import get_task  # noqa: E402

SHARED_BBQ = Path("/work/shared/data/bbq/Religion.jsonl")
for _up in ROOT.parents:
    if (_up / "shared" / "data" / "bbq" / "Religion.jsonl").is_file():
        SHARED_BBQ = _up / "shared" / "data" / "bbq" / "Religion.jsonl"
        break
FIXTURE_BBQ = ROOT / "tests" / "fixtures" / "bbq_fixture.jsonl"
PEERS = ("workbench no lookup", "hand loop", "hand loop no_grad", "HF re-prefill", "nnsight", "nnsight cached", "TL bridge", "study's way")
SLOW = ("TL bridge", "study's way")
TOLERANCE = 1e-4  # activations, relative to each array's scale (float32)


def default_bbq() -> Path:
    """The BBQ file the BBQ setting reads: the real Religion.jsonl where ../shared has it, else the tests' fixture."""
    return SHARED_BBQ if SHARED_BBQ.is_file() else FIXTURE_BBQ


def build_tiny_llama(folder: Path) -> Path:
    """The BBQ setting's model, saved under ``folder``: a tiny random Llama as in ``tests/tiny_models.py``,
    with room for 20 rounds of BBQ (which outgrow its 1024 positions)."""
    from tiny_models import build_model

    path = build_model("llama", folder / "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return path


@dataclass(frozen=True)
class Setting:
    """One benchmark setting: a loaded model, its run config and what the workbench did on it."""

    name: str
    model: Any
    cfg: RunConfig
    task: Any
    protocol: Any
    samples: list
    pieces: list  # [batch][round][row]: token ids the round adds after the last answer
    responses: list  # [batch][round][row]: the workbench's response tokens
    acts: list  # [batch]: [rows, rounds, 2, L, d] the workbench's hook_resid_post


def make_setting(name: str, model: Any, cfg: RunConfig) -> Setting:
    """Run the workbench's round engine once (untimed; a warm-up too) and keep its prompts, tokens
    and activations, which every peer must reproduce."""
    task = get_task(cfg.task)
    protocol = load_protocol(cfg.protocol, rounds=cfg.rounds)
    if cfg.max_new_tokens is not None:
        protocol = replace(protocol, decoding=replace(protocol.decoding, max_new_tokens=cfg.max_new_tokens))
    samples = load_samples(cfg)
    sites = hook_sites(model, list(cfg.hooks), check_layers(None, model.n_layers))
    pieces, responses, acts = [], [], []
    for start in range(0, len(samples), cfg.batch_size):
        res = run_batch(model, task, protocol, samples[start : start + cfg.batch_size], sites, cfg.seed)
        rows = range(len(res.transcripts))
        ends = [[0] + [int(res.response_spans[i, t, 1]) for t in range(cfg.rounds - 1)] for i in rows]
        pieces.append([[res.transcripts[i][ends[i][t] : int(res.prompt_spans[i, t, 1])] for i in rows] for t in range(cfg.rounds)])
        responses.append([[res.response_ids[i][t] for i in rows] for t in range(cfg.rounds)])
        acts.append(res.activations["hook_resid_post"])
    return Setting(name, model, cfg, task, protocol, samples, pieces, responses, acts)


# ---------------------------------------------------------------------------------------- peers
# Each takes (setting, n_samples) and returns (responses [batch][round][row], activations
# {(batch, round): (last prompt token [rows, L, d], response-mean [rows, L, d] or None)} or None).


def workbench(s: Setting, n: int, out: Path, lookup: bool = True) -> tuple[list, None]:
    """``run_protocol`` into a run file, as ``workbench run`` calls it (``lookup=False``: as
    ``workbench run --no-lookup``, one pass per generated token)."""
    cfg = replace(s.cfg, out=out, limit=n, overwrite=True, lookup=lookup)
    run = run_protocol(cfg, model=s.model)
    ids = run.array("tokens/response_token_ids")
    run.close()
    bs = s.cfg.batch_size
    return [[[list(ids[i, t]) for i in range(b, min(b + bs, n))] for t in range(s.cfg.rounds)] for b in range(0, n, bs)], None


def _cut(generated: list[list[int]], stops: set[int]) -> list[int]:
    return [next((j for j, tok in enumerate(g) if tok in stops), len(g)) for g in generated]


def hf_loop(s: Setting, n: int, carry: bool, inference: bool = True) -> tuple[list, None]:
    """Hugging Face ``generate``, batch by batch, the cache carried across rounds or not; in
    ``torch.inference_mode()`` (the fastest a person can call it) or, ``inference=False``, under
    ``generate``'s own ``no_grad`` as most people call it."""
    model, tok = s.model, s.model.tokenizer
    stops = stop_ids(model.hf, tok)
    stop_set, out_all = set(stops), []
    for b, batch in enumerate(s.pieces[: _batches(s, n)]):
        seqs = mask = cache = None
        conv = [[] for _ in batch[0]]
        rounds = []
        for t, new in enumerate(batch):
            if carry and cache is not None:
                new_ids, new_mask = pad(new, tok.pad_token_id, model.device, "left")
                ids, mask = torch.cat([seqs, new_ids], 1), torch.cat([mask, new_mask], 1)
            else:
                conv = [c + p for c, p in zip(conv, new)]
                ids, mask = pad(conv, tok.pad_token_id, model.device, "left")
            with torch.inference_mode(inference):
                out = model.hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=s.protocol.decoding.max_new_tokens,
                                        eos_token_id=stops, pad_token_id=tok.pad_token_id, top_k=None, return_dict_in_generate=True,
                                        **({"cache": cache} if carry and cache is not None else {}))
            generated = out.sequences[:, ids.shape[1]:].tolist()
            lengths = _cut(generated, stop_set)
            rounds.append([g[:k] for g, k in zip(generated, lengths)])
            if carry:
                seqs, cache = out.sequences, out.cache
                steps = torch.arange(seqs.shape[1] - ids.shape[1], device=mask.device)
                mask = torch.cat([mask, (steps[None] < torch.tensor(lengths, device=mask.device)[:, None]).long()], 1)
            else:
                conv = [c + r for c, r in zip(conv, rounds[-1])]
        out_all.append(rounds)
    return out_all, None


def nnsight_loop(s: Setting, n: int, carry: bool, lm: Any) -> tuple[list, dict]:
    """nnsight's ``generate`` saving every layer's output (the prefill, then each decode step)."""
    from transformers import DynamicCache

    model, tok = s.model, s.model.tokenizer
    stops = stop_ids(model.hf, tok)
    stop_set, max_new = set(stops), s.protocol.decoding.max_new_tokens
    layers = model.n_layers
    out_all, acts = [], {}
    for b, batch in enumerate(s.pieces[: _batches(s, n)]):
        seqs = mask = None
        cache = DynamicCache(config=model.hf.config) if carry else None
        conv = [[] for _ in batch[0]]
        rounds = []
        for t, new in enumerate(batch):
            if carry and seqs is not None:
                new_ids, new_mask = pad(new, tok.pad_token_id, model.device, "left")
                ids, mask = torch.cat([seqs, new_ids], 1), torch.cat([mask, new_mask], 1)
            else:
                conv = [c + p for c, p in zip(conv, new)]
                ids, mask = pad(conv, tok.pad_token_id, model.device, "left")
            box: dict = {}
            kwargs = {"cache": cache} if carry else {}
            tokens = _Collect()  # generate's streamer: code after an unfinished ``tracer.iter`` never runs (early stop)
            with torch.inference_mode():
                with lm.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=stops, pad_token_id=tok.pad_token_id, top_k=None, streamer=tokens, **kwargs) as tracer:
                    box["first"] = [lm.model.layers[i].output[:, -1].save() for i in range(layers)]
                    box["steps"] = steps = list().save()
                    with tracer.iter[1:max_new]:
                        steps.append(torch.stack([lm.model.layers[i].output[:, -1] for i in range(layers)], 1))
            sequences = torch.cat([ids, *tokens.steps], 1)
            generated = sequences[:, ids.shape[1]:].tolist()
            lengths = _cut(generated, stop_set)
            rounds.append([g[:k] for g, k in zip(generated, lengths)])
            fed = torch.stack(box["steps"], 1) if box["steps"] else None  # [rows, steps, L, d]
            mean = None
            if fed is not None:
                w = (torch.arange(fed.shape[1])[None] < torch.tensor(lengths)[:, None]).float()
                mean = (w[:, :, None, None] * fed).sum(1) / w.sum(1).clamp(min=1)[:, None, None]
            acts[(b, t)] = (torch.stack(box["first"], 1), mean, [k < fed.shape[1] + 1 if fed is not None else False for k in lengths])
            if carry:
                seqs = sequences
                steps_mask = torch.arange(seqs.shape[1] - ids.shape[1], device=mask.device)
                mask = torch.cat([mask, (steps_mask[None] < torch.tensor(lengths, device=mask.device)[:, None]).long()], 1)
            else:
                conv = [c + r for c, r in zip(conv, rounds[-1])]
        out_all.append(rounds)
    return out_all, acts


class _Collect:
    """A ``generate`` streamer keeping each step's new tokens ``[batch, 1]``."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []
        self.prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:
            self.prompt = False
            return
        self.steps.append(value.reshape(-1, 1))

    def end(self) -> None:
        pass


def bridge_loop(s: Setting, n: int) -> tuple[list, dict]:
    """The TransformerLens bridge, one sample at a time: uncached ``generate``, then
    ``run_with_cache`` over prompt and answer for every layer's ``hook_resid_post``."""
    model, tok = s.model, s.model.tokenizer
    stop_set = set(stop_ids(model.hf, tok))
    bridge = model.bridge
    names = [f"blocks.{i}.hook_resid_post" for i in range(model.n_layers)]
    out_all, acts = [], {}
    bs = s.cfg.batch_size
    for b, batch in enumerate(s.pieces[: _batches(s, n)]):
        rows = min(len(batch[0]), n - b * bs)
        rounds = [[None] * rows for _ in batch]
        for i in range(rows):
            conv: list[int] = []
            for t, new in enumerate(batch):
                conv = conv + new[i]
                toks = torch.tensor([conv], device=model.device)
                with torch.inference_mode():
                    out = bridge.generate(toks, max_new_tokens=s.protocol.decoding.max_new_tokens, do_sample=False,
                                          use_past_kv_cache=False, stop_at_eos=True, eos_token_id=tok.eos_token_id,
                                          return_type="tokens", verbose=False)
                    generated = out[0, len(conv):].tolist()
                    k = _cut([generated], stop_set)[0]
                    full = torch.tensor([conv + generated[:k]], device=model.device)
                    _, cache = bridge.run_with_cache(full, names_filter=names)
                resid = torch.stack([cache[name][0] for name in names], 1)  # [pos, L, d]
                last = resid[len(conv) - 1]
                mean = resid[len(conv):].mean(0) if k else None
                acts[(b, t, i)] = (last, mean)
                rounds[t][i] = generated[:k]
                conv = conv + generated[:k]
        out_all.append(rounds)
    return out_all, acts


def study(s: Setting, n: int) -> tuple[list, None]:
    """The authors' loop (``bench_run.study_way``), its tokens kept for the check."""
    from bench_run import study_way

    got: list = []
    real = s.model.hf.generate

    def keep(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        got.append(out.sequences[0, kwargs["input_ids"].shape[1]:].tolist())
        return out

    s.model.hf.generate = keep
    try:
        study_way(s.model, s.task, s.protocol, s.samples[:n])
    finally:
        del s.model.hf.generate
    stop_set = set(stop_ids(s.model.hf, s.model.tokenizer))
    rows, bs, R = n, s.cfg.batch_size, s.cfg.rounds
    out_all = [[[None] * min(bs, rows - b) for _ in range(R)] for b in range(0, rows, bs)]
    for j, seq in enumerate(got):
        i, t = divmod(j, R)
        out_all[i // bs][t][i % bs] = seq[: _cut([seq], stop_set)[0]]
    return out_all, None


def _batches(s: Setting, n: int) -> int:
    return -(-n // s.cfg.batch_size)


# ---------------------------------------------------------------------------------------- checks


def check(s: Setting, name: str, n: int, responses: list, acts: dict | None) -> dict:
    """Token mismatches (sample, round) against the workbench, and the worst activation error
    (relative to the array's scale) where the peer captures."""
    mismatches = 0
    bs = s.cfg.batch_size
    for b in range(_batches(s, n)):
        for t in range(s.cfg.rounds):
            for i, want in enumerate(s.responses[b][t][: n - b * bs]):
                mismatches += responses[b][t][i] != want
    worst = None
    if acts:
        errors = []
        for key, value in acts.items():
            b, t = key[0], key[1]
            ref = s.acts[b][:, t]  # [rows, 2, L, d]
            scale = float(np.nanmax(np.abs(ref)))
            if len(key) == 3:  # one sample
                i = key[2]
                last, mean = value
                errors.append(float(np.abs(last.float().cpu().numpy() - ref[i, 0]).max()) / scale)
                if mean is not None:
                    errors.append(float(np.abs(mean.float().cpu().numpy() - ref[i, 1]).max()) / scale)
            else:
                last, mean, whole = value
                errors.append(float(np.abs(last.float().cpu().numpy() - ref[:, 0]).max()) / scale)
                if mean is not None:  # rows whose every answer token was fed back (not cut off, not empty)
                    lengths = [len(r) for r in s.responses[b][t]]
                    rows = [i for i, (k, ok) in enumerate(zip(lengths, whole)) if 0 < k and ok and k < s.protocol.decoding.max_new_tokens]
                    if rows:
                        errors.append(float(np.abs(mean.float().cpu().numpy()[rows] - ref[rows, 1]).max()) / scale)
        worst = max(errors) if errors else None
    if mismatches or (worst is not None and worst > TOLERANCE):
        print(f"  {s.name}: {name} differs from the workbench: {mismatches} (sample, round) token mismatches, "
              f"activations {worst}", file=sys.stderr)
    return {"token_mismatches": mismatches, "max_activation_error": worst}


# ---------------------------------------------------------------------------------------- timing


def measure(s: Setting, repeats: int, slow_samples: int, slow_repeats: int, peers: tuple[str, ...], tmp: Path) -> dict:
    """Every peer checked once, then timed interleaved with the workbench ``repeats`` times."""
    lm = None
    if any(p.startswith("nnsight") for p in peers):
        from nnsight import LanguageModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # its own copy of the model: nnsight wraps every module's forward for good, and on the shared
            # model those wrappers would slow every other peer's passes and send the workbench's through
            # hf(...) (its lean forward steps aside for wrappers it does not know)
            lm = LanguageModel(copy.deepcopy(s.model.hf), tokenizer=s.model.tokenizer)
    n = len(s.samples)
    small = min(n, slow_samples)
    runs: dict[str, Callable[[], tuple]] = {
        "workbench": lambda: workbench(s, n, tmp / f"{s.name}.h5"),
        "workbench no lookup": lambda: workbench(s, n, tmp / f"{s.name}-no-lookup.h5", lookup=False),
        "hand loop": lambda: hf_loop(s, n, carry=True),
        "hand loop no_grad": lambda: hf_loop(s, n, carry=True, inference=False),
        "HF re-prefill": lambda: hf_loop(s, n, carry=False),
        "nnsight": lambda: nnsight_loop(s, n, carry=False, lm=lm),
        "nnsight cached": lambda: nnsight_loop(s, n, carry=True, lm=lm),
        "TL bridge": lambda: bridge_loop(s, small),
        "study's way": lambda: study(s, small),
    }
    from workbench.engine.lean import plan

    result: dict = {"setting": s.name, "samples": n, "rounds": s.cfg.rounds, "slow_samples": small, "checks": {}}
    for name in ("workbench", *peers):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            responses, acts = runs[name]()
        result["checks"][name] = check(s, name, small if name in SLOW else n, responses, acts)
    times: dict[str, list[tuple[float, float]]] = {}
    fast = [p for p in ("workbench", *peers) if p not in SLOW]
    for rep in range(repeats):
        order = fast[rep % len(fast):] + fast[: rep % len(fast)]
        if rep < slow_repeats:
            order += [p for p in peers if p in SLOW]
        for name in order:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0, c0 = time.perf_counter(), time.process_time()
                runs[name]()
                times.setdefault(name, []).append((time.perf_counter() - t0, time.process_time() - c0))
    result["seconds"] = {k: {"wall": [w for w, _ in v], "cpu": [c for _, c in v]} for k, v in times.items()}
    result["peer_over_workbench"] = peer_ratios(result["seconds"], peers, n / small)
    result["workbench_s"] = {"wall": _median([w for w, _ in times["workbench"]]), "cpu": _median([c for _, c in times["workbench"]])}
    # "lean", or why the workbench's passes went through hf(...) (e.g. another library's wrappers left on the model)
    lean, why = plan(s.model.hf)
    real = 0 if lean is None else sum(how is None for how in lean.layers)  # layers that ran their real forward
    result["workbench_forward"] = why or ("lean" if not real else f"lean, {real} of {len(lean.layers)} layers through their own forward")
    if result["workbench_forward"] != "lean":
        print(f"  {s.name}: the workbench's forward was hf(...)'s: {result['workbench_forward']}", file=sys.stderr)
    return result


def peer_ratios(seconds: dict, peers: tuple[str, ...] | list[str], scale: float) -> dict:
    """Peer time ÷ workbench time per repeat and their medians, wall and CPU. A fast peer is paired
    with the workbench run of its own repeat; a slow one (run on a subset) is scaled by ``scale``
    (samples ÷ subset: it goes one sample at a time) and divided by the workbench's median time
    over the whole set, as a throughput."""
    ratios = {}
    for name in peers:
        got = {}
        for kind in ("wall", "cpu"):
            if name in SLOW:
                values = [t * scale / _median(seconds["workbench"][kind]) for t in seconds[name][kind]]
            else:
                values = [t / w for t, w in zip(seconds[name][kind], seconds["workbench"][kind])]
            got[kind], got[f"{kind}_all"] = _median(values), values
        ratios[name] = got
    return ratios


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the median ratio is reported")
    p.add_argument("--slow-samples", type=int, default=4, help="samples the slow peers (TL bridge, study's way) run on")
    p.add_argument("--slow-repeats", type=int, default=1)
    p.add_argument("--settings", default="organism,bbq,small", help="comma-separated: organism, bbq, small")
    p.add_argument("--rounds", default="5,10,20", help="R for the organism and BBQ settings")
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of: " + ", ".join(PEERS))
    p.add_argument("--bbq", default=str(default_bbq()))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the issue's setting; on a shared machine)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    peers = tuple(x.strip() for x in args.peers.split(",") if x.strip())
    unknown = [x for x in peers if x not in PEERS]
    if unknown:
        raise SystemExit(f"unknown peer {unknown[0]!r}; peers: {', '.join(PEERS)}")
    if any(x.startswith("nnsight") for x in peers):
        try:
            import nnsight  # noqa: F401
        except ImportError:
            print("nnsight is not installed (pip install -e '.[bench]'): its columns are left out", file=sys.stderr)
            peers = tuple(x for x in peers if not x.startswith("nnsight"))
    rounds = [int(r) for r in args.rounds.split(",")]
    org_n, bbq_n = 64, 32
    if args.quick:
        rounds, org_n, bbq_n, args.repeats, args.slow_samples = [2], 16, 8, 1, 2
    wanted = args.settings.split(",")
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                f"{torch.get_num_threads()} torch thread(s)",
                     "load_average_before": os.getloadavg(), "torch": torch.__version__, "peers": list(peers), "settings": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        organism = load_model("organism", device="cpu")
        plans: list[tuple[str, Any, RunConfig, bool]] = []  # (name, model, config, every peer or the hand loop only)
        if "organism" in wanted:
            plans += [(f"organism {org_n} × {r}", organism, RunConfig(out=tmp / "x.h5", rounds=r, limit=org_n, protocol="organism"), True)
                      for r in rounds]
        if "bbq" in wanted:
            path = build_tiny_llama(tmp)
            llama = load_model(str(path), device="cpu", dtype="float32")
            plans += [(f"BBQ tiny Llama {bbq_n} × {r}", llama,
                       RunConfig(out=tmp / "x.h5", model=str(path), task="bbq", data=(args.bbq,), protocol="bbq-paper", rounds=r,
                                 limit=bbq_n, max_new_tokens=10), True) for r in rounds]
        if "small" in wanted:
            plans.append(("organism 16 × 2 (small run)", organism, RunConfig(out=tmp / "x.h5", rounds=2, limit=16, protocol="organism"), False))
        for name, model, cfg, every in plans:
            print(f"{name} …", file=sys.stderr)
            setting = make_setting(name, model, cfg)
            chosen = peers if every else tuple(x for x in peers if x.startswith(("hand loop", "workbench")))
            results["settings"].append(measure(setting, args.repeats, args.slow_samples, args.slow_repeats, chosen, tmp))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))  # what is measured so far
    results["load_average_after"] = os.getloadavg()
    _report(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


def _report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"peer time ÷ workbench time, median of interleaved repeats: CPU / wall ({r['machine']})")
    table.add_column("setting")
    table.add_column("workbench (s, CPU)", justify="right")
    for peer in r["peers"]:
        table.add_column(peer, justify="right")
    marked = False
    for row in r["settings"]:
        cells = []
        for peer in r["peers"]:
            ratio = row["peer_over_workbench"].get(peer)
            bad = bool(row["checks"].get(peer, {}).get("token_mismatches")) and ratio is not None
            marked |= bad
            cells.append("" if ratio is None else f"{ratio['cpu']:.2f} / {ratio['wall']:.2f}" + (" ✗" if bad else ""))
        table.add_row(row["setting"], f"{row['workbench_s']['cpu']:.2f}", *cells)
    Console(width=200).print(table)
    if marked:
        print("✗: the peer's tokens differ from the workbench's (see the checks in the JSON)")


if __name__ == "__main__":
    main()
