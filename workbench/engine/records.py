"""Rows of a user's data file, and fields picked out of them by name (``--fields``).

A data file is read as a list of :class:`Row` (its place for error messages, and the record as a
dict), whatever its format:

* ``.jsonl`` (or any other file): one JSON object per line (:func:`read_jsonl`);
* ``.csv``: a header line, then one record per row (Python's ``csv`` module: quoted fields may hold
  commas, quotes and line breaks);
* ``.txt``: one record per non-empty line, ``{"prompt": the line}`` (the study's
  ``datasets/winogender/wino_gender.txt``);
* a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict`` with one split, or
  ``FOLDER/SPLIT``): read with ``datasets.load_from_disk``. ``datasets`` is imported only then.

``--fields`` maps the names a task knows to paths into each record: ``context=ctx,question=q``;
a path is a key, or dotted keys into nested records (``text=prompt.text``, RTP's layout), where a
whole-number step indexes a list (``choices.0``). A key that itself holds a dot is found as it is
before the path is split. :func:`get_path` returns a field's value or raises one line naming the
row and the field.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from workbench.errors import WorkbenchError

_MISSING = object()


@dataclass(frozen=True)
class Row:
    """One record of a data file: ``where`` names it in errors (``file.csv:row 3``), ``number`` is
    its 1-based position among the file's records, ``record`` the record itself, ``line`` its line
    in a JSONL or text file (else ``number``): a sample's id when the record names none."""

    where: str
    number: int
    record: dict[str, Any]
    line: int = 0

    @property
    def default_id(self) -> str:
        """The id of a record that has none: its line (JSONL, text), else its position."""
        return str(self.line or self.number)


MAX_LINE_BYTES = 1 << 20  # one JSONL line (a BBQ item is ~1 KB): past this a file is refused before it is read whole


def read_jsonl(path: Path, max_rows: int | None = None, cap_option: str = "") -> list[tuple[int, dict[str, Any]]]:
    """``[(line number, object)]`` of a JSONL file, read line by line; one clean :class:`WorkbenchError`
    for a missing file, a folder, a FIFO or device, bytes that are not UTF-8, a malformed line, a line
    that is not an object, a line longer than :data:`MAX_LINE_BYTES` (refused as soon as it is met),
    or more than ``max_rows`` objects (``cap_option`` names the option that raises the cap)."""
    return list(iter_jsonl(path, max_rows, cap_option))


def iter_jsonl(path: Path, max_rows: int | None = None, cap_option: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """:func:`read_jsonl`'s ``(line number, object)`` pairs one at a time, with its errors, each
    raised when its line is reached: a reader that needs only the first lines (``--limit``) stops
    there and never reads the rest of a large file."""
    from workbench.store.trust import refuse_special_file

    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"data file not found: {path}")
    if path.is_dir():
        raise WorkbenchError(f"{path} is a folder, not a JSONL file")
    refuse_special_file(path)
    n_rows = 0
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
                n_rows += 1
                if max_rows is not None and n_rows > max_rows:
                    raise WorkbenchError(f"{path}: more than {max_rows:,} lines" + (f" (raise the cap with {cap_option})" if cap_option else ""))
                yield lineno, row
    except OSError as e:
        raise WorkbenchError(f"{path}: cannot read ({e.strerror})") from None


def _read_bytes(path: Path, what: str) -> bytes:
    if not path.exists():
        raise WorkbenchError(f"data file not found: {path}")
    if path.is_dir():
        raise WorkbenchError(f"{path} is a folder, not {what}")
    from workbench.store.trust import refuse_special_file

    refuse_special_file(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise WorkbenchError(f"{path}: cannot read ({e.strerror})") from None


def read_csv(path: Path) -> list[Row]:
    """The records of a CSV file with a header line (quoted fields may hold commas and line breaks);
    each value a string. A record with more fields than the header is refused."""
    path = Path(path)
    data = _read_bytes(path, "a CSV file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise WorkbenchError(f"{path}: not UTF-8 text (byte {e.start})") from None
    reader = csv.DictReader(text.splitlines(keepends=True), restkey="\0extra")
    rows = []
    try:
        for number, record in enumerate(reader, 1):
            where = f"{path}:row {number} (line {reader.line_num})"
            if "\0extra" in record:
                raise WorkbenchError(f"{where}: more fields than the header names ({len(reader.fieldnames or [])})")
            rows.append(Row(where, number, {k: ("" if v is None else v) for k, v in record.items()}))
    except csv.Error as e:
        raise WorkbenchError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
    if reader.fieldnames is None:
        raise WorkbenchError(f"{path}: empty CSV file (expected a header line)")
    return rows


def read_lines(path: Path) -> list[Row]:
    """The non-empty lines of a text file as records ``{"prompt": line}`` (surrounding space removed)."""
    path = Path(path)
    data = _read_bytes(path, "a text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise WorkbenchError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return [Row(f"{path}:{lineno}", i + 1, {"prompt": line.strip()}, lineno)
            for i, (lineno, line) in enumerate((n, l) for n, l in enumerate(text.splitlines(), 1) if l.strip())]


def read_saved_dataset(folder: Path) -> list[Row]:
    """The rows of a Hugging Face dataset saved with ``save_to_disk`` (a ``Dataset``, a
    ``DatasetDict`` with a single split, or ``FOLDER/SPLIT`` of one)."""
    try:
        import datasets
    except ImportError:
        raise WorkbenchError(f"{folder} is a saved Hugging Face dataset: reading it needs the datasets package "
                             "(pip install 'workbench[data]', or pip install datasets)") from None
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:  # not a saved dataset, or damaged: one line whatever datasets raises
        raise WorkbenchError(f"{folder}: not a dataset saved with save_to_disk ({type(e).__name__}: {str(e)[:120]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise WorkbenchError(f"{folder} holds the splits {', '.join(loaded)}: give one as --data {folder}/SPLIT")
        loaded = next(iter(loaded.values()))
    return [Row(f"{folder}: row {i + 1}", i + 1, dict(record)) for i, record in enumerate(loaded)]


def read_rows(path: Path) -> list[Row]:
    """The records of a data file by its kind: a folder is a saved dataset, ``.csv`` is CSV, ``.txt``
    one prompt per line, anything else JSONL (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        return read_saved_dataset(path)
    if path.suffix.lower() == ".csv":
        return read_csv(path)
    if path.suffix.lower() == ".txt":
        return read_lines(path)
    return [Row(f"{path}:{lineno}", i + 1, record, lineno) for i, (lineno, record) in enumerate(read_jsonl(path))]


def parse_fields(text: str | None, known: tuple[str, ...], option: str = "--fields") -> dict[str, str]:
    """``"context=ctx,question=q"`` → ``{"context": "ctx", "question": "q"}``; every name must be one
    of ``known`` and given once. A path may not hold a comma (split on commas)."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for item in text.split(","):
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise WorkbenchError(f"{option} {item!r}: expected NAME=PATH (e.g. context=ctx or text=prompt.text)")
        if name not in known:
            raise WorkbenchError(f"{option}: unknown name {name!r} (this task takes {', '.join(known)})")
        if name in out:
            raise WorkbenchError(f"{option}: {name} is given twice")
        out[name] = path
    return out


def get_path(record: dict[str, Any], path: str, where: str, name: str, default: Any = _MISSING) -> Any:
    """The value at ``path`` in ``record``: the key itself, else dotted steps (a whole number indexes a
    list). Missing: ``default`` when given, else one :class:`WorkbenchError` naming ``where`` and the
    field (``name`` the task's name for it)."""
    if path in record:
        return record[path]
    value: Any = record
    walked: list[str] = []
    for step in path.split("."):
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            if default is not _MISSING:
                return default
            at = f" (no {step!r} in {'.'.join(walked)})" if walked else ""
            raise WorkbenchError(f"{where}: no field {path!r} for {name}{at}")
        walked.append(step)
    return value


def text_value(value: Any, where: str, name: str, path: str, allow_empty: bool = True) -> str:
    """A field's value as text: a string as it is, a number written out; anything else (a list, an
    object, null) is one error line naming the row and the field."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise WorkbenchError(f"{where}: {name} ({path}) must be text, not {json.dumps(value, default=str)[:40]}")
    text = value if isinstance(value, str) else str(value)
    if not allow_empty and not text.strip():
        raise WorkbenchError(f"{where}: {name} ({path}) is empty")
    return text


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with every value JSON can hold kept and any other (bytes, an image) written as text,
    so it can be stored as the sample's ``extra`` JSON."""
    out = {}
    for key, value in record.items():
        try:
            json.dumps(value)
            out[str(key)] = value
        except (TypeError, ValueError):
            out[str(key)] = str(value)
    return out
