"""Fuzzing the readers (issue 8): arbitrary bytes and structurally mutated valid files give either a
result or a :class:`WorkbenchError`, never another exception.

Readers: JSONL data (BBQ, prompts), contrast files, TOML protocols, probe files, and run files
(through the public ``RunFile`` API and what ``workbench info`` computes from it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import BBQ_FIXTURE
from probe_files import write_probe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.errors import WorkbenchError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
BBQ_LINES = BBQ_FIXTURE.read_text().splitlines()
PROTOCOL = (Path(__file__).parents[1] / "workbench/data/protocols/bbq-paper.toml").read_text()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def accepts_or_refuses(read, path: Path):
    """Call ``read(path)``: its result, or None when it raised WorkbenchError (anything else fails)."""
    try:
        return read(path)
    except WorkbenchError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))
        return None


def _readers():
    from probes.contrast import read_contrast_file
    from workbench.engine.tasks import load_bbq, load_prompts

    return {
        "bbq": lambda p: load_bbq([p]),
        "prompts": lambda p: load_prompts(p),
        "contrast": read_contrast_file,
    }


@FUZZ
@given(data=st.binary(max_size=300))
def test_jsonl_readers_on_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    for read in _readers().values():
        accepts_or_refuses(read, path)


@FUZZ
@given(line=st.integers(0, len(BBQ_LINES) - 1), key=st.sampled_from(
    ["example_id", "context", "question", "ans0", "ans1", "ans2", "label", "context_condition", "category", "prompt",
     "text", "positive", "negative"]), value=json_values, drop=st.booleans())
def test_jsonl_readers_on_mutated_lines(tmp_path, line, key, value, drop):
    rows = [json.loads(x) for x in BBQ_LINES]
    row = rows[line]
    if drop:
        row.pop(key, None)
    else:
        row[key] = value
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for read in _readers().values():
        samples = accepts_or_refuses(read, path)
        if read is _readers()["bbq"] and samples:
            assert all(isinstance(s.context, str) and s.gold in (0, 1, 2) for s in samples)


@FUZZ
@given(data=st.binary(max_size=300))
def test_protocol_reader_on_arbitrary_bytes(tmp_path, data):
    from workbench.engine.protocol import load_protocol

    path = tmp_path / "p.toml"
    path.write_bytes(data)
    accepts_or_refuses(load_protocol, path)


toml_values = st.one_of(
    st.integers(-3, 40).map(str), st.floats(-2, 3, allow_nan=False).map(repr), st.booleans().map(lambda b: str(b).lower()),
    st.text(alphabet="abc{}() x", max_size=12).map(json.dumps), st.just("[1, 2]"), st.just("{ 2 = \"x\" }"),
    st.just('{ 9 = "x" }'), st.just('{ decoding = 1 }'),
)


@FUZZ
@given(key=st.sampled_from(["name", "task", "rounds", "first", "followup", "first_prefix", "followup_prefix", "inject",
                            "decoding", "description", "option_scoring", "colour"]),
       value=toml_values, rounds=st.none() | st.integers(-1, 8),
       inject=st.dictionaries(st.integers(0, 9), st.text(alphabet="ab ", max_size=3), max_size=2))
def test_protocol_reader_on_mutated_files(tmp_path, key, value, rounds, inject):
    from workbench.engine.protocol import load_protocol

    head, _, tail = PROTOCOL.partition("[decoding]")
    lines = [x for x in head.splitlines() if not x.startswith(f"{key} =")]
    text = f"{key} = {value}\n" + "\n".join(lines) + "\n[decoding]" + tail
    path = tmp_path / "p.toml"
    path.write_text(text)
    protocol = accepts_or_refuses(lambda p: load_protocol(str(p), rounds, inject), path)
    if protocol is not None:
        assert protocol.rounds >= 1 and all(2 <= r <= protocol.rounds for r in protocol.inject)
        assert protocol.decoding.max_new_tokens >= 1 and isinstance(protocol.first, str)


h5_values = st.one_of(st.integers(-3, 9), st.floats(allow_nan=True), st.text(st.characters(blacklist_characters="\0"), max_size=10), st.just("{bad json"),
                      st.just("[1, 2, 3]"), st.just(b"\xff\xfe"), st.lists(st.integers(0, 3), min_size=0, max_size=3))


def _mutate(f: h5py.File, target: str, value, action: str) -> None:
    """Replace, delete or retype the attribute or dataset ``target`` of an open HDF5 file."""
    if target in f.attrs:
        if action == "delete":
            del f.attrs[target]
        else:
            f.attrs[target] = np.asarray(value) if isinstance(value, list) and value else value if not isinstance(value, list) else 0
    elif target in f:
        del f[target]
        if action != "delete":
            f[target] = np.asarray(value if not isinstance(value, (str, bytes)) else [1.5], dtype=None)


@FUZZ
@given(target=st.sampled_from(["best_layer", "d_model", "hook", "position", "contrast", "format", "layers", "directions",
                               "test_accuracy", "test_auroc", "thresholds"]),
       value=h5_values, action=st.sampled_from(["delete", "replace"]))
def test_probe_reader_on_mutated_files(tmp_path, target, value, action):
    from probes.cli import _show
    from probes.probe_file import load_probe

    path = write_probe(tmp_path / "p.h5")
    with h5py.File(path, "a") as f:
        _mutate(f, target, value, action)
    probe = accepts_or_refuses(load_probe, path)
    if probe is not None:
        _show(probe)  # what `probe show` prints must work on whatever load_probe accepted


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    from workbench import run_protocol

    path = tmp_path_factory.mktemp("fuzz") / "run.h5"
    run_protocol(model="organism", task="organism", limit=4, rounds=3, out=path).close()
    return path


def _info(path: Path):
    """What ``workbench info`` computes: the run file opened and summarised."""
    from workbench.analysis.summary import summary
    from workbench.store.reader import RunFile

    with RunFile(path) as run:
        return summary(run)


@FUZZ
@given(cut=st.integers(0, 40_000), flips=st.lists(st.tuples(st.integers(0, 40_000), st.integers(1, 255)), max_size=4))
def test_run_reader_on_damaged_bytes(tmp_path, run_file, cut, flips):
    data = bytearray(run_file.read_bytes())
    for at, xor in flips:
        data[at % len(data)] ^= xor
    path = tmp_path / "damaged.h5"
    path.write_bytes(bytes(data[: len(data) - cut % len(data)] if cut else data))
    accepts_or_refuses(_info, path)


@FUZZ
@given(target=st.sampled_from(["n_rounds", "n_samples", "n_options", "status", "protocol", "format", "progress/done",
                               "progress", "rounds/correct", "rounds/parsed_answer", "rounds/option_entropy",
                               "rounds/chosen_confidence", "samples/gold"]),
       value=h5_values, action=st.sampled_from(["delete", "replace"]))
def test_run_reader_on_mutated_files(tmp_path, run_file, target, value, action):
    path = tmp_path / "mutated.h5"
    shutil.copy(run_file, path)
    with h5py.File(path, "a") as f:
        _mutate(f, target, value, action)
    accepts_or_refuses(_info, path)
