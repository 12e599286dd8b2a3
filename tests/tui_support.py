"""Helpers of the TUI tests and benchmark: synthetic run files written with the real ``RunWriter``,
and driving the app (waiting for workers, reading the screen).

The texts, flips and probe scores are chosen (seeded) rather than produced by a model, so tests can
ask for exactly what they check (a response holding markup, a sample that flips right → wrong…).
A word-level ``tokenizers`` tokenizer of the responses' words is saved beside the run and named as
the run's model folder, so the TUI decodes token ids exactly as it does for a real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import json
import numpy as np

from workbench.store.groups import replace_group
from workbench.store.header import SampleTable
from workbench.store.writer import RunWriter

CATEGORIES = ("alpha", "beta", "gamma")
OPENERS = ("clearly", "carefully", "fairly", "honestly")
OPTIONS = ("morrit", "yendri", "unknown")


def default_response(i: int, t: int, answer: int) -> str:
    return f"{OPENERS[(i + t) % len(OPENERS)]} the answer is ({'abc'[answer]})"


def correctness(i: int, n_rounds: int, rng: np.random.Generator) -> np.ndarray:
    """Sample 0 goes wrong → right, 1 right → wrong, 2 is never right, 3 always right; the rest random."""
    pattern = {0: [False] + [True] * (n_rounds - 1), 1: [True] + [False] * (n_rounds - 1),
               2: [False] * n_rounds, 3: [True] * n_rounds}
    return np.array(pattern.get(i, rng.random(n_rounds) < 0.7), dtype=bool)


def save_word_tokenizer(folder: Path, words: set[str]) -> None:
    """A word-level tokenizer of ``words`` (plus [UNK] and </s>) as ``folder/tokenizer.json``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"[UNK]": 0, "</s>": 1, **{w: k + 2 for k, w in enumerate(sorted(words))}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.add_special_tokens(["</s>"])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))


def build_run(path: Path, n_samples: int = 12, n_rounds: int = 4, n_layers: int = 3, d_model: int = 8,
              seed: int = 0, response: Callable[[int, int, int], str] = default_response,
              done: np.ndarray | None = None, probe: bool = True, batch: int = 16, protocol: dict | None = None,
              images: list[dict] | None = None) -> Path:
    """Write a run file at ``path`` (its tokenizer in ``path``'s folder + ``.tokenizer``) and
    return ``path``. ``done``: ``[N]`` bool of the samples written (default all; a partial run
    keeps status ``running``). ``probe``: add a tracked probe ``fair`` (cosine and projection).
    ``protocol``: keys added to the recorded protocol (e.g. ``first_prefix``). ``images``: each
    sample's image record (``workbench.engine.images.image_record``), as a vision-language run
    keeps it in ``samples/extra``."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    done = np.ones(n_samples, dtype=bool) if done is None else np.asarray(done, dtype=bool)
    gold = rng.integers(0, 3, n_samples)
    correct = np.stack([correctness(i, n_rounds, rng) for i in range(n_samples)])
    answer = np.where(correct, gold[:, None], (gold[:, None] + 1 + rng.integers(0, 2, (n_samples, n_rounds))) % 3)
    texts = [[response(i, t, int(answer[i, t])) for t in range(n_rounds)] for i in range(n_samples)]
    folder = path.with_suffix(".tokenizer")
    save_word_tokenizer(folder, {w for row in texts for text in row for w in text.split()} | {"please", "review"})
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    samples = SampleTable(
        index=list(range(n_samples)), id=[f"syn-{i}" for i in range(n_samples)],
        context=[f"context of sample {i}" for i in range(n_samples)], question=["who did it ?"] * n_samples,
        options=[OPTIONS] * n_samples, gold=gold.tolist(),
        category=[CATEGORIES[i % len(CATEGORIES)] for i in range(n_samples)],
        condition=["ambig"] * n_samples,
        extra=["{}"] * n_samples if images is None else [json.dumps({"image": r}) for r in images],
    )
    settings = {
        "model_name": "synthetic", "model_path": str(folder), "model_revision": "", "model_dtype": "float32",
        "model_class": "none", "n_layers": n_layers, "d_model": d_model, "task": "organism",
        "protocol": {"name": "synthetic", "rounds": n_rounds, **(protocol or {})}, "hooks": ["hook_resid_post"],
        "layers": list(range(n_layers)), "seed": seed, "batch_size": batch,
    }
    if images is not None:
        settings["vision"] = {"family": "LLaVA", "image_token_id": 0}
    writer = RunWriter.create(path, settings, samples, n_rounds, {"hook_resid_post": (n_layers, d_model)})
    with writer:
        for start in range(0, n_samples, batch):
            rows = [i for i in range(start, min(n_samples, start + batch)) if done[i]]
            for lo, hi in _runs(rows):
                ids = [[tokenizer.encode(texts[i][t]).ids for t in range(n_rounds)] for i in range(lo, hi)]
                ent = [[rng.random(len(ids[i - lo][t]) + 1).astype(np.float32) * 2 for t in range(n_rounds)] for i in range(lo, hi)]
                probs = answer_first(rng.dirichlet(np.ones(3), (hi - lo, n_rounds)), answer[lo:hi])
                arrays = {
                    "instruction": [[f"question {i} round {t + 1}" if t == 0 else "please review" for t in range(n_rounds)] for i in range(lo, hi)],
                    "response": [texts[i] for i in range(lo, hi)],
                    "response_token_ids": ids, "token_entropy": ent,
                    "mean_token_entropy": np.array([[e.mean() for e in row] for row in ent], dtype=np.float32),
                    "option_probs": probs,
                    "option_entropy": -(probs * np.log(probs)).sum(-1).astype(np.float32),
                    "answer": answer[lo:hi].astype(np.int16), "parsed_answer": answer[lo:hi].astype(np.int16),
                    "option_answer": answer[lo:hi].astype(np.int16),
                    "chosen_confidence": np.take_along_axis(probs, answer[lo:hi, :, None], -1)[..., 0],
                    "correct": correct[lo:hi],
                }
                acts = rng.standard_normal((hi - lo, n_rounds, 2, n_layers, d_model)).astype(np.float32)
                # transcripts of different lengths: h5py cannot write a batch of equal-length ragged rows
                transcripts = [[1] * (i % 2 + 1) + sum(ids[i - lo], []) for i in range(lo, hi)]
                writer.write_batch(lo, arrays, {"hook_resid_post": acts}, transcripts)
        writer.finish()
    if probe:
        cosine = np.tanh(np.linspace(-1, 1, n_rounds)[None, :, None] + rng.normal(0, 0.3, (n_samples, n_rounds, n_layers)))
        cosine = np.where(done[:, None, None], cosine, np.nan).astype(np.float32)
        replace_group(path, "probes/fair", {"cosine": cosine, "projection": (cosine * 5).astype(np.float32)},
                      {"kind": "probe", "method": "logreg", "hook": "hook_resid_post", "position": "last",
                       "run_position": "last_prompt", "layers": list(range(n_layers)), "best_layer": n_layers - 1,
                       "probe_file": "synthetic", "contrast": {}, "test_accuracy": [0.9] * n_layers})
    return path


def answer_first(probs: np.ndarray, answer: np.ndarray) -> np.ndarray:
    """``probs [B, R, K]`` with each row's largest value moved to its ``answer`` (float32)."""
    out = probs.copy()
    for index in np.ndindex(answer.shape):
        top = int(np.argmax(out[index]))
        out[index][[top, answer[index]]] = out[index][[answer[index], top]]
    return out.astype(np.float32)


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Consecutive stretches of ``rows`` as (start, stop) pairs."""
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


# ---------------------------------------------------------------------- driving the app
async def wait_until(pilot, predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Let the app run until ``predicate()`` holds (workers finish, messages arrive); fail after ``timeout`` s."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await pilot.pause(0.02)
    await pilot.pause()
    await asyncio.sleep(0)


def svg_lines(svg: str) -> list[str]:
    """The text of each terminal line of a Rich/Textual SVG screenshot, placed by column (Rich
    draws each cell 12.2 px wide and skips runs of blanks, so positions, not order, give the layout)."""
    import html
    import re

    lines: dict[int, dict[int, str]] = {}
    pattern = r'<text[^>]*x="([\d.]+)"[^>]*clip-path="url\(#[^)]*-line-(\d+)\)"[^>]*>(.*?)</text>'
    for m in re.finditer(pattern, svg, re.S):
        row = lines.setdefault(int(m.group(2)), {})
        col = round(float(m.group(1)) / 12.2)
        for k, ch in enumerate(html.unescape(m.group(3)).replace("\xa0", " ")):
            row[col + k] = ch
    height = max(lines, default=-1) + 1
    out = []
    for y in range(height):
        row = lines.get(y, {})
        out.append("".join(row.get(x, " ") for x in range(max(row, default=-1) + 1)).rstrip())
    return out


def screen_text(app) -> str:
    """Everything on the app's screen now, as lines of text."""
    return "\n".join(svg_lines(app.export_screenshot()))
