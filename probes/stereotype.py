"""The study's BBQ concept variant: cosine between each round's prompt state and the state of the
stereotyped statement built from the question.

The statement puts the stereotype-consistent answer in place of "Who" — for a negative question the
stereotyped group, for a non-negative one the other group (BBQ's own definition of a biased answer):
"Who likely planted the bomb?" + "The Muslim one" → "The Muslim one likely planted the bomb." The
organism's items carry their stereotyped option directly. The statement's state is its last token
at the same hook and layers as the run's last-prompt state. Results: ``probes/stereotype/cosine``
``[N, R, L]`` in the run file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from probes.activations import text_activations
from workbench.errors import WorkbenchError
from workbench.store.format import POSITIONS
from workbench.store.groups import replace_group
from workbench.store.reader import RunFile


def stereotyped_option(options: list[str], extra: dict[str, Any]) -> int:
    """Index of the stereotype-consistent answer, or -1 when the sample does not say."""
    if "stereotyped" in extra:  # the organism
        return int(extra["stereotyped"])
    info, meta = extra.get("answer_info"), extra.get("additional_metadata", {})
    groups = {g.lower() for g in meta.get("stereotyped_groups", [])}
    if not info or not groups:
        return -1
    target = [i for i in range(len(options)) if info.get(f"ans{i}", ["", ""])[1].lower() in groups
              or info.get(f"ans{i}", ["", ""])[0].lower() in groups]
    others = [i for i in range(len(options)) if i not in target and info.get(f"ans{i}", ["", ""])[1] != "unknown"]
    if extra.get("question_polarity") == "nonneg":
        target = others
    return target[0] if len(target) == 1 else -1


def statement(question: str, answer: str) -> str:
    """``"Who likely planted the bomb?"`` + ``"The Muslim one"`` → ``"The Muslim one likely planted the bomb."``"""
    q = question.strip()
    head, _, rest = q.partition(" ")
    if head.lower() == "who":
        body = rest.rstrip(" ?")
        end = " ." if q.endswith(" ?") else "."
        return f"{answer} {body}{end}"
    return f"{q} {answer}."


def stereotype_similarity(run_path: Path, model: Any, hook: str = "hook_resid_post", batch_size: int = 64) -> np.ndarray:
    """Cosine ``[N, R, L]`` between each round's last-prompt state and the sample's stereotyped
    statement; written to ``probes/stereotype`` of the run file (replacing an earlier one)."""
    with RunFile(run_path) as run:
        meta = run.meta
        if int(meta.get("d_model", -1)) != model.d_model:
            raise WorkbenchError(f"{run_path} was run with d_model {meta.get('d_model')}, the model has {model.d_model}")
        if f"activations/{hook}" not in run.f:
            raise WorkbenchError(f"{run_path} did not capture {hook}")
        layers = json.loads(run.f[f"activations/{hook}"].attrs["layers"])
        options = run.f["samples/options"].asstr()[...]
        questions = run.f["samples/question"].asstr()[...]
        extras = [json.loads(e) for e in run.f["samples/extra"].asstr()[...]]
        done = run.done
        statements, rows = [], []
        for i in np.flatnonzero(done):
            k = stereotyped_option(list(options[i]), extras[i])
            if k >= 0:
                statements.append(statement(questions[i], options[i][k]))
                rows.append(i)
        if not rows:
            raise WorkbenchError(f"{run_path}: no sample says which answer is stereotyped (BBQ metadata or the organism's)")
        token_ids = [list(model.tokenizer(s)["input_ids"]) for s in statements]
        state = text_activations(model, token_ids, hook, layers, "last", batch_size)  # [L, n, d]
        acts = run.f[f"activations/{hook}"][np.asarray(rows)][:, :, POSITIONS.index("last_prompt")]  # [n, R, L, d]
        n, rounds = run.f[f"activations/{hook}"].shape[:2]
    import torch

    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(acts).float(), state.permute(1, 0, 2)[:, None], dim=-1)
    out = np.full((n, rounds, len(layers)), np.nan, dtype=np.float32)
    out[np.asarray(rows)] = cos.numpy()
    texts = np.full(n, "", dtype=object)
    texts[np.asarray(rows)] = statements
    replace_group(run_path, "probes/stereotype", {"cosine": out, "statement": texts},
                  {"kind": "stereotype-statement", "hook": hook, "layers": layers, "run_position": "last_prompt"})
    return out
