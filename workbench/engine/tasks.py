"""The built-in tasks and their data: ``bbq`` (BBQ JSONL files as published), ``mc`` (any
multiple-choice file, fields mapped by ``--fields``), ``prompts`` (open-ended prompts), ``vqa`` and
``vqa-open`` (questions about pictures, for vision-language models), and ``organism`` (the shipped
synthetic world, :mod:`workbench.organism.task`);
:func:`get_task` picks one by name. The task type itself (:class:`~workbench.engine.task.Task`, what the
engine calls) is in :mod:`workbench.engine.task`.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from workbench.engine.records import get_path, iter_jsonl, json_safe, read_jsonl, read_rows, text_value
from workbench.engine.task import LETTERS, Sample, Task
from workbench.errors import WorkbenchError

__all__ = ["read_jsonl"]  # re-exported: the JSONL reader lives in workbench.engine.records

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
    With a ``limit`` the files are read only as far as the last sample kept (a line past it is
    never read, so never refused).
    """
    if condition not in (None, "ambig", "disambig"):
        raise WorkbenchError(f"--condition must be ambig or disambig, not {condition!r}")
    kept: list[Sample] = []
    wanted = None if limit is None else offset + limit
    for path in paths:
        if wanted is not None and len(kept) >= wanted:
            break
        for lineno, row in iter_jsonl(Path(path)):
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
            if wanted is not None and len(kept) >= wanted:
                break
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


PROMPT_FIELDS = ("text", "id", "label")  # --fields names of the prompts task


def load_prompts(path: Path, prompt_field: str = "prompt", offset: int = 0, limit: int | None = None,
                 fields: dict[str, str] | None = None) -> list[Sample]:
    """Open-ended samples from a JSONL, CSV or saved-dataset file (:func:`workbench.engine.records.read_rows`).
    The prompt is the field ``fields["text"]`` (a dotted path such as ``prompt.text``, RTP's layout),
    else ``prompt_field``; the id is ``fields["id"]``, else the record's ``id``, else its line. The
    record's other top-level fields are kept in ``extra`` (a scorer that takes samples reads them)."""
    fields = fields or {}
    text_path = fields.get("text", prompt_field)
    samples = []
    for row in read_rows(Path(path)):
        hint = "" if "text" in fields else " (set --prompt-field, or --fields text=PATH)"
        value = get_path(row.record, text_path, row.where, "the prompt" + hint)
        if not isinstance(value, str) or not value.strip():
            raise WorkbenchError(f"{row.where}: {text_path} must be a non-empty string")
        ident = get_path(row.record, fields["id"], row.where, "id") if "id" in fields else row.record.get("id", row.default_id)
        top = text_path.split(".")[0] if text_path not in row.record else text_path
        extra = json_safe({k: v for k, v in row.record.items() if k != top})
        if "label" in fields:  # the gold text a scorer such as label-match reads
            extra["label"] = text_value(get_path(row.record, fields["label"], row.where, "label"), row.where, "label", fields["label"])
        samples.append(Sample(index=len(samples), id=str(ident), context=value, question="", extra=extra))
    return _slice(samples, offset, limit)


# ----------------------------------------------------------------------------- any multiple-choice file

MC_FIELDS = ("id", "context", "question", "options", "label", "category")  # --fields names of the mc task


def _parse_fixed_options(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    options = tuple(o.strip() for o in text.split("|"))
    if len(options) < 2 or any(not o for o in options):
        raise WorkbenchError(f"--options {text!r}: expected two or more non-empty options separated by |")
    if len(options) > len(LETTERS):
        raise WorkbenchError(f"--options: at most {len(LETTERS)} options (they are lettered (a) … (j))")
    return options


def gold_index(label: Any, options: tuple[str, ...], where: str, path: str) -> int:
    """The option a gold label names: an index (an integer, or a string of digits), else an option's
    text (case-insensitive, surrounding space ignored), else the one option that begins with it as a
    word (``Yes`` → ``yes, this is harmful``). One error line naming the row otherwise."""
    if isinstance(label, bool):
        label = str(label).lower()
    if isinstance(label, int) or (isinstance(label, float) and label.is_integer()):
        if 0 <= int(label) < len(options):
            return int(label)
        raise WorkbenchError(f"{where}: label ({path}) is {label}, not an index of its {len(options)} options")
    if not isinstance(label, str):
        raise WorkbenchError(f"{where}: label ({path}) must be an option's index or text, not {json.dumps(label, default=str)[:40]}")
    wanted = label.strip().lower()
    if re.fullmatch(r"[0-9]+", wanted):
        return gold_index(int(wanted), options, where, path)
    lowered = [o.strip().lower() for o in options]
    if wanted in lowered:
        return lowered.index(wanted)
    starts = [i for i, o in enumerate(lowered) if wanted and re.match(re.escape(wanted) + r"(?![a-z0-9])", o)]
    if len(starts) == 1:
        return starts[0]
    raise WorkbenchError(f"{where}: label ({path}) {label[:40]!r} is neither an index nor one of the options "
                         f"({' | '.join(o[:30] for o in options)})")


def load_mc(
    paths: list[Path],
    fields: dict[str, str],
    fixed_options: str | None = None,
    offset: int = 0,
    limit: int | None = None,
) -> list[Sample]:
    """Samples of any multiple-choice file (JSONL, CSV or a saved dataset, :func:`read_rows`), its
    fields mapped by ``fields`` (``--fields``: :data:`MC_FIELDS` → dotted paths). The options come
    from ``fields["options"]``: one field holding a list, or several fields joined by ``|``
    (``ans0|ans1|ans2``); or from ``fixed_options`` (``--options "yes|no"``), the same for every row.
    The gold label (optional) is an index or an option's text (:func:`gold_index`). The record's
    other top-level fields are kept in ``extra``. A row that does not fit is one line naming it."""
    fixed = _parse_fixed_options(fixed_options)
    if fixed is not None and "options" in fields:
        raise WorkbenchError("give the options either as --fields options=PATH or as --options, not both")
    if fixed is None and "options" not in fields:
        raise WorkbenchError("--task mc needs its options: --fields options=FIELD (a list, or FIELD1|FIELD2|…) or --options \"A|B\"")
    if "question" not in fields and "context" not in fields:
        raise WorkbenchError("--task mc needs the text asked: --fields question=PATH (and/or context=PATH)")
    field_paths = [part.strip() for name, spec in fields.items() for part in (spec.split("|") if name == "options" else [spec])]
    kept: list[Sample] = []
    for path in paths:
        for row in read_rows(Path(path)):
            rec, where = row.record, row.where
            text = {name: text_value(get_path(rec, fields[name], where, name), where, name, fields[name])
                    for name in ("context", "question", "category") if name in fields}
            if fixed is not None:
                options = fixed
            else:
                options = _row_options(rec, fields["options"], where)
            gold = -1
            if "label" in fields:
                gold = gold_index(get_path(rec, fields["label"], where, "label"), options, where, fields["label"])
            ident = text_value(get_path(rec, fields["id"], where, "id"), where, "id", fields["id"]) if "id" in fields else row.default_id
            used = {fp if fp in rec else fp.split(".")[0] for fp in field_paths}  # the top-level fields read
            extra = json_safe({k: v for k, v in rec.items() if k not in used})
            kept.append(Sample(index=len(kept), id=ident, context=text.get("context", ""), question=text.get("question", ""),
                               options=options, gold=gold, category=text.get("category", ""), extra=extra))
    return _slice(kept, offset, limit)


def _row_options(record: dict[str, Any], spec: str, where: str) -> tuple[str, ...]:
    """A row's options: the list at one path, or the texts at several (``ans0|ans1|ans2``)."""
    if "|" in spec:
        options = tuple(text_value(get_path(record, p.strip(), where, "options"), where, "an option", p.strip(), allow_empty=False)
                        for p in spec.split("|"))
    else:
        value = get_path(record, spec, where, "options")
        if isinstance(value, str) and value.strip().startswith("["):  # a list written as JSON text (a CSV cell)
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        if not isinstance(value, (list, tuple)):
            raise WorkbenchError(f"{where}: options ({spec}) must be a list of texts, not {json.dumps(value, default=str)[:40]} "
                                 "(several fields: --fields options=A|B|C)")
        options = tuple(text_value(v, where, "an option", f"{spec}.{i}", allow_empty=False) for i, v in enumerate(value))
    if not 2 <= len(options) <= len(LETTERS):
        raise WorkbenchError(f"{where}: {len(options)} options ({spec}); a multiple-choice row needs 2 to {len(LETTERS)}")
    return options


MC = replace(BBQ, name="mc")


# ----------------------------------------------------------------------------- images (vision-language models)

VQA = replace(BBQ, name="vqa")  # multiple choice about a picture: letters scored and parsed as for BBQ
VQA_OPEN = replace(PROMPTS, name="vqa-open")  # open-ended answers about a picture (a --scorer grades them)
VISION_TASKS = ("vqa", "vqa-open", "organism-visual")


def load_vqa(path: Path, open_ended: bool = False, offset: int = 0, limit: int | None = None) -> list[Sample]:
    """Samples about pictures from a JSONL file, one object per line:
    ``{"image": "imgs/001.png", "question": "...", "options": ["...", "..."], "label": 1}``
    (``options`` and ``label`` for ``vqa``; ``vqa-open`` needs only ``image`` and ``question``;
    optional ``id`` and ``category``; other fields are kept in ``extra``). The image path is
    relative to the JSONL file. Every image of the samples ``offset``/``limit`` keep is opened before
    anything else happens (:func:`workbench.engine.images.image_record`): a missing, unreadable or
    non-image file is one line naming it. Its record (path, sha256, a thumbnail) goes into
    ``extra["image"]``. Lines before ``offset`` are checked but their images are not opened, and
    the file is read no further than the last sample kept."""
    from workbench.engine.images import image_record

    path = Path(path)
    samples = []
    wanted = None if limit is None else offset + limit
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        for key in ("image", "question"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise WorkbenchError(f"{where}: {key} must be a non-empty string (a VQA line is "
                                     '{"image": "imgs/001.png", "question": "...", "options": [...], "label": 0})')
        options: tuple[str, ...] = ()
        gold = -1
        if not open_ended:
            raw = row.get("options")
            if not isinstance(raw, list) or not 2 <= len(raw) <= len(LETTERS) or not all(isinstance(o, str) and o for o in raw):
                raise WorkbenchError(f"{where}: options must be a list of 2 to {len(LETTERS)} non-empty strings")
            label = row.get("label")
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(raw):
                raise WorkbenchError(f"{where}: label must be the index of the correct option (0..{len(raw) - 1}), "
                                     f"not {json.dumps(label)[:40]}")
            options, gold = tuple(raw), label
        given = row["image"]
        if "\x00" in given:
            raise WorkbenchError(f"{where}: the image path holds a NUL character")
        image = (path.parent / given) if not Path(given).is_absolute() else Path(given)
        record = image_record(image, given, where) if len(samples) >= offset else None  # None: sliced off below
        extra = {k: v for k, v in row.items() if k not in ("image", "question", "options", "label", "id", "category")}
        extra["image"] = record
        samples.append(Sample(index=len(samples), id=str(row.get("id", lineno)), context="", question=row["question"],
                              options=options, gold=gold, category=str(row.get("category", "")), extra=extra,
                              image=str(image)))
        if wanted is not None and len(samples) >= wanted:
            break  # before the next line is read
    return _slice(samples, offset, limit)



TASKS = ("bbq", "mc", "prompts", "organism", *VISION_TASKS)
DEFAULT_PROTOCOLS = {"bbq": "bbq-paper", "mc": "mc", "prompts": "prompts", "organism": "organism", "vqa": "vqa-moral",
                     "vqa-open": "vqa-open", "organism-visual": "organism"}
PROTOCOL_TASK = {"organism-visual": "organism"}  # a task that runs the protocols written for another one


def default_protocol(task: str) -> str:
    """The built-in protocol a task runs when none is given (``bbq`` → ``bbq-paper``)."""
    get_task(task)
    return DEFAULT_PROTOCOLS[task]


def get_task(name: str, option_scoring: str = "letter") -> Task:
    """The task called ``name`` (``bbq``, ``mc``, ``prompts``, ``organism``, ``vqa``, ``vqa-open``,
    ``organism-visual``: the organism's world with its people in a picture, for ``--model organism-visual``).

    ``option_scoring`` picks what BBQ and mc score per option: ``letter`` (`` (a)``, the study's) or
    ``letter-text`` (`` (a) option text``). The organism's options are single letter tokens, so it
    takes only ``letter``; open-ended prompts have no options.
    """
    if option_scoring not in ("letter", "letter-text"):
        raise WorkbenchError(f"--option-scoring must be letter or letter-text, not {option_scoring!r}")
    if name == "bbq":
        return BBQ if option_scoring == "letter" else replace(BBQ, option_continuations=letter_text_continuations)
    if name == "mc":
        return MC if option_scoring == "letter" else replace(MC, option_continuations=letter_text_continuations)
    if name == "prompts":
        return PROMPTS
    if name == "vqa":
        return VQA if option_scoring == "letter" else replace(VQA, option_continuations=letter_text_continuations)
    if name == "vqa-open":
        return VQA_OPEN
    if name == "organism":
        from workbench.organism.task import ORGANISM

        if option_scoring != "letter":
            raise WorkbenchError("--option-scoring letter-text: the organism's options are single letters; use letter")
        return ORGANISM
    if name == "organism-visual":
        from workbench.organism.task import ORGANISM_VISUAL

        if option_scoring != "letter":
            raise WorkbenchError("--option-scoring letter-text: the organism's options are single letters; use letter")
        return ORGANISM_VISUAL
    raise WorkbenchError(f"unknown task {name!r} (choose {', '.join(TASKS[:-1])} or {TASKS[-1]})")
