"""The built-in tasks and their data: ``bbq`` (BBQ JSONL files as published), ``prompts`` (open-ended
prompts from JSONL), and ``organism`` (the shipped synthetic world, :mod:`workbench.organism.task`);
:func:`get_task` picks one by name. The task type itself (:class:`~workbench.engine.task.Task`, what the
engine calls) is in :mod:`workbench.engine.task`.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from workbench.engine.task import LETTERS, Sample, Task
from workbench.errors import WorkbenchError

# ----------------------------------------------------------------------------- multiple choice


def letter_choices(options: tuple[str, ...]) -> str:
    """``"(a) X (b) Y (c) Z"`` – the choice list of the study's BBQ prompt."""
    return " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def letter_continuations(sample: Sample) -> list[str]:
    """``[" (a)", " (b)", ...]`` – each option's letter as the model would write it after the prefix
    (``--option-scoring letter``, the study's scoring)."""
    return [f" ({LETTERS[i]})" for i in range(len(sample.options))]


def letter_text_continuations(sample: Sample) -> list[str]:
    """``[" (a) X", " (b) Y", ...]`` – each option's letter and text (``--option-scoring letter-text``)."""
    return [f" ({LETTERS[i]}) {o}" for i, o in enumerate(sample.options)]


def parse_letter_or_text(sample: Sample, text: str) -> int:
    """The option a response names: a letter in parentheses first, else exactly one option's text.

    Returns the option index, or -1 when the response names none or several.
    """
    n = len(sample.options)
    letters = set(re.findall(r"\(([a-j])\)", text.lower()))
    picked = {LETTERS.index(c) for c in letters if LETTERS.index(c) < n}
    if len(picked) == 1:
        return picked.pop()
    if picked:
        return -1
    lowered = text.lower()
    named = [i for i, o in enumerate(sample.options) if o and o.lower() in lowered]
    return named[0] if len(named) == 1 else -1


BBQ = Task(
    name="bbq",
    multiple_choice=True,
    format_choices=letter_choices,
    option_continuations=letter_continuations,
    parse_answer=parse_letter_or_text,
)


MAX_LINE_BYTES = 1 << 20  # one JSONL line (a BBQ item is ~1 KB): past this a file is refused before it is read whole


def read_jsonl(path: Path, max_rows: int | None = None, cap_option: str = "") -> list[tuple[int, dict[str, Any]]]:
    """``[(line number, object)]`` of a JSONL file, read line by line; one clean :class:`WorkbenchError`
    for a missing file, a folder, a FIFO or device, bytes that are not UTF-8, a malformed line, a line
    that is not an object, a line longer than :data:`MAX_LINE_BYTES` (refused as soon as it is met),
    or more than ``max_rows`` objects (``cap_option`` names the option that raises the cap)."""
    from workbench.store.trust import refuse_special_file

    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"data file not found: {path}")
    if path.is_dir():
        raise WorkbenchError(f"{path} is a folder, not a JSONL file")
    refuse_special_file(path)
    rows = []
    try:
        with open(path, "rb") as fh:
            lineno = 0
            while True:
                raw = fh.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    break
                lineno += 1
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    raise WorkbenchError(f"{path}:{lineno}: a line longer than {MAX_LINE_BYTES >> 20} MiB (not a JSONL data line)")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise WorkbenchError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line)") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise WorkbenchError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
                except RecursionError:
                    raise WorkbenchError(f"{path}:{lineno}: JSON nested too deeply") from None
                if not isinstance(row, dict):
                    raise WorkbenchError(f"{path}:{lineno}: expected a JSON object per line")
                rows.append((lineno, row))
                if max_rows is not None and len(rows) > max_rows:
                    raise WorkbenchError(f"{path}: more than {max_rows:,} lines" + (f" (raise the cap with {cap_option})" if cap_option else ""))
    except OSError as e:
        raise WorkbenchError(f"{path}: cannot read ({e.strerror})") from None
    return rows


BBQ_FIELDS = ("example_id", "context", "question", "ans0", "ans1", "ans2", "label", "context_condition", "category")


def load_bbq(
    paths: list[Path],
    condition: str | None = None,
    category: str | None = None,
    offset: int = 0,
    limit: int | None = None,
) -> list[Sample]:
    """Samples from BBQ JSONL files exactly as published (Parrish et al., 2022).

    ``condition`` keeps ``ambig`` or ``disambig`` items; ``category`` keeps one category
    (case-insensitive); ``offset``/``limit`` then slice. Indices are positions after filtering.
    """
    if condition not in (None, "ambig", "disambig"):
        raise WorkbenchError(f"--condition must be ambig or disambig, not {condition!r}")
    kept: list[Sample] = []
    for path in paths:
        for lineno, row in read_jsonl(Path(path)):
            missing = [k for k in BBQ_FIELDS if k not in row]
            if missing:
                raise WorkbenchError(f"{path}:{lineno}: not a BBQ line (missing {', '.join(missing)})")
            _check_bbq_row(row, f"{path}:{lineno}")
            if condition and row["context_condition"] != condition:
                continue
            if category and str(row["category"]).lower() != category.lower():
                continue
            kept.append(
                Sample(
                    index=len(kept),
                    id=f"{row['category']}-{row['example_id']}",
                    context=row["context"],
                    question=row["question"],
                    options=(row["ans0"], row["ans1"], row["ans2"]),
                    gold=row["label"],
                    category=str(row["category"]),
                    condition=str(row["context_condition"]),
                    extra={k: row[k] for k in ("question_polarity", "answer_info", "additional_metadata") if k in row},
                )
            )
    return _slice(kept, offset, limit)


def _check_bbq_row(row: dict[str, Any], where: str) -> None:
    for key in ("context", "question", "ans0", "ans1", "ans2", "category"):
        if not isinstance(row[key], str):
            raise WorkbenchError(f"{where}: {key} must be a string, not {json.dumps(row[key])[:40]}")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 2:
        raise WorkbenchError(f"{where}: label must be 0, 1 or 2 (the index of the correct answer), not {json.dumps(label)[:40]}")
    if row["context_condition"] not in ("ambig", "disambig"):
        raise WorkbenchError(f"{where}: context_condition must be ambig or disambig, not {json.dumps(row['context_condition'])[:40]}")
    if isinstance(row["example_id"], (dict, list)) or row["example_id"] is None:
        raise WorkbenchError(f"{where}: example_id must be a number or a string")


def _slice(samples: list[Sample], offset: int, limit: int | None) -> list[Sample]:
    if offset < 0 or (limit is not None and limit < 1):
        raise WorkbenchError("--offset must be ≥ 0 and --limit ≥ 1")
    chosen = samples[offset : None if limit is None else offset + limit]
    if not chosen:
        raise WorkbenchError("no samples left after filtering (check --condition, --category, --offset)")
    # re-index so indices are the stable global positions of this run's dataset
    return [Sample(**{**s.__dict__, "index": offset + i}) for i, s in enumerate(chosen)]


# ----------------------------------------------------------------------------- open-ended

PROMPTS = Task(
    name="prompts",
    multiple_choice=False,
    format_choices=lambda options: "",
    option_continuations=lambda sample: [],
    parse_answer=lambda sample, text: -1,
)


def load_prompts(path: Path, prompt_field: str = "prompt", offset: int = 0, limit: int | None = None) -> list[Sample]:
    """Open-ended samples: one JSON object per line; the prompt is ``row[prompt_field]``."""
    samples = []
    for lineno, row in read_jsonl(Path(path)):
        if prompt_field not in row:
            raise WorkbenchError(f"{path}:{lineno}: no field {prompt_field!r} (set --prompt-field)")
        if not isinstance(row[prompt_field], str) or not row[prompt_field].strip():
            raise WorkbenchError(f"{path}:{lineno}: {prompt_field} must be a non-empty string")
        extra = {k: v for k, v in row.items() if k != prompt_field}
        samples.append(
            Sample(index=len(samples), id=str(row.get("id", lineno)), context=str(row[prompt_field]), question="", extra=extra)
        )
    return _slice(samples, offset, limit)


TASKS = ("bbq", "prompts", "organism")
DEFAULT_PROTOCOLS = {"bbq": "bbq-paper", "prompts": "prompts", "organism": "organism"}


def default_protocol(task: str) -> str:
    """The built-in protocol a task runs when none is given (``bbq`` → ``bbq-paper``)."""
    get_task(task)
    return DEFAULT_PROTOCOLS[task]


def get_task(name: str, option_scoring: str = "letter") -> Task:
    """The task called ``name`` (``bbq``, ``prompts``, ``organism``).

    ``option_scoring`` picks what BBQ scores per option: ``letter`` (`` (a)``, the study's) or
    ``letter-text`` (`` (a) option text``). The organism's options are single letter tokens, so it
    takes only ``letter``; open-ended prompts have no options.
    """
    if option_scoring not in ("letter", "letter-text"):
        raise WorkbenchError(f"--option-scoring must be letter or letter-text, not {option_scoring!r}")
    if name == "bbq":
        return BBQ if option_scoring == "letter" else replace(BBQ, option_continuations=letter_text_continuations)
    if name == "prompts":
        return PROMPTS
    if name == "organism":
        from workbench.organism.task import ORGANISM

        if option_scoring != "letter":
            raise WorkbenchError("--option-scoring letter-text: the organism's options are single letters; use letter")
        return ORGANISM
    raise WorkbenchError(f"unknown task {name!r} (choose bbq, prompts or organism)")
