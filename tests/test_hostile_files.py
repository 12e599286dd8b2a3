"""Hostile files (issue 24, "Security"): a run, cache or probe file from a stranger never reads
outside itself, never writes through a symlink, never prints raw control characters.

Each hostile file is an ordinary file changed with h5py the way an attacker would: a dataset whose
bytes are HDF5 external storage pointing at a secret file, an external link, a virtual dataset
reading another file. Every reader (``info``, the TUI's reader, ``probe track``, ``export``,
``analyze``, ``probe show``, ``info cache.h5``) refuses it in one line naming the object, and the
secret never appears in what it prints.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_support import error_line, workbench
from probe_files import write_probe

from workbench.errors import WorkbenchError

SECRET = b"TOPSECRET-do-not-read-me\n"


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    from workbench import run_protocol

    path = tmp_path_factory.mktemp("clean") / "run.h5"
    run_protocol(model="organism", task="organism", limit=4, rounds=2, batch_size=4, out=path).close()
    return path


def _secret(folder: Path) -> Path:
    path = folder.parent / f"{folder.name}-secret.txt"  # outside the run's folder
    path.write_bytes(SECRET * 4)
    return path


def hostile_run(clean_run: Path, folder: Path, kind: str) -> tuple[Path, str]:
    """A copy of ``clean_run`` in ``folder`` made hostile by ``kind``; returns (path, the object named)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.h5"
    shutil.copy(clean_run, path)
    secret = _secret(folder)
    other = folder.parent / f"{folder.name}-other.h5"
    with h5py.File(other, "w") as o:
        o["x"] = np.array([SECRET] * 4)
    with h5py.File(path, "r+") as f:
        n = f["samples/context"].shape[0]
        if kind == "external-storage":
            del f["samples/context"]
            f.create_dataset("samples/context", shape=(n,), dtype="S8", external=[(str(secret), 0, 8 * n)])
            return path, "/samples/context"
        if kind == "external-link":
            del f["samples/context"]
            f["samples/context"] = h5py.ExternalLink(str(other), "x")
            return path, "/samples/context"
        if kind == "virtual":
            del f["samples/context"]
            layout = h5py.VirtualLayout(shape=(4,), dtype=f"S{len(SECRET)}")
            layout[:] = h5py.VirtualSource(str(other), "x", shape=(4,))
            f.create_virtual_dataset("samples/context", layout)
            return path, "/samples/context"
        if kind == "virtual-escaping-shards":  # relative, named like the shards folder, but leaving it
            (folder / "run.h5.shards").mkdir()
            del f["samples/context"]
            layout = h5py.VirtualLayout(shape=(4,), dtype=f"S{len(SECRET)}")
            layout[:] = h5py.VirtualSource(f"run.h5.shards/../../{other.name}", "x", shape=(4,))
            f.create_virtual_dataset("samples/context", layout)
            return path, "/samples/context"
    raise AssertionError(kind)


KINDS = ("external-storage", "external-link", "virtual", "virtual-escaping-shards")


@pytest.mark.parametrize("kind", KINDS)
def test_info_and_the_tui_reader_refuse_a_run_reading_another_file(capsys, monkeypatch, tmp_path, clean_run, kind):
    from tui.runsource import read_overview

    path, obj = hostile_run(clean_run, tmp_path / kind, kind)
    code, out, err = workbench(capsys, monkeypatch, "info", str(path))
    assert code != 0
    error_line(err, str(path), obj, "refused")
    assert "TOPSECRET" not in out + err
    with pytest.raises(WorkbenchError, match="refused") as e:
        read_overview(path)
    assert "TOPSECRET" not in str(e.value)


def test_every_command_refuses_a_hostile_run_before_reading(capsys, monkeypatch, tmp_path, clean_run):
    path, obj = hostile_run(clean_run, tmp_path / "h", "external-storage")
    probe = write_probe(tmp_path / "probe.h5")
    for args in (["probe", "track", str(path), str(probe)], ["export", str(path), "--out", str(tmp_path / "c.h5")],
                 ["analyze", str(path)], ["tui", str(path)]):
        code, out, err = workbench(capsys, monkeypatch, *args)
        assert code != 0, args
        error_line(err, obj, "refused")
        assert "TOPSECRET" not in out + err, args
    assert not (tmp_path / "c.h5").exists()


def test_a_clean_run_still_opens(capsys, monkeypatch, clean_run):
    code, out, err = workbench(capsys, monkeypatch, "info", str(clean_run))
    assert code == 0, err


def test_a_hostile_probe_file_and_cache_file_are_refused(capsys, monkeypatch, tmp_path):
    from workbench.cache.file import FORMAT as CACHE_FORMAT, load_activation_cache

    secret = _secret(tmp_path / "x")
    probe = write_probe(tmp_path / "probe.h5")
    with h5py.File(probe, "r+") as f:
        del f["thresholds"]
        f.create_dataset("thresholds", shape=(3,), dtype="f8", external=[(str(secret), 0, 24)])
    code, out, err = workbench(capsys, monkeypatch, "probe", "show", str(probe))
    assert code != 0
    error_line(err, "/thresholds", "refused")
    cache = tmp_path / "cache.h5"
    with h5py.File(cache, "w") as f:
        f.attrs["format"] = CACHE_FORMAT
        f["tokens/role"] = h5py.ExternalLink(str(tmp_path / "elsewhere.h5"), "x")
    code, out, err = workbench(capsys, monkeypatch, "info", str(cache))
    assert code != 0
    error_line(err, "/tokens/role", "external link", "refused")
    with pytest.raises(WorkbenchError, match="refused"):
        load_activation_cache(cache)


def test_a_running_runs_parts_cannot_read_outside_the_folder(tmp_path, clean_run):
    """The in-memory view of a running run reads its own ``activations.h5`` by external storage;
    a header with external storage, or ``activations.h5`` a symlink to another file, is refused."""
    from workbench.store.format import ACTIVATIONS, HEADER, LAYOUT
    from workbench.store.reader import RunFile

    parts = tmp_path / "run.h5.parts"
    parts.mkdir()
    secret = _secret(tmp_path / "p")
    with h5py.File(clean_run, "r") as src, h5py.File(parts / HEADER, "w") as h:
        for key, value in src.attrs.items():
            h.attrs[key] = value
        src.copy(src["samples"], h, "samples")
        del h["samples/context"]
        h.create_dataset("samples/context", shape=(4,), dtype="S8", external=[(str(secret), 0, 32)])
    (parts / LAYOUT).write_text("[]")
    (parts / ACTIVATIONS).symlink_to(secret)
    with pytest.raises(WorkbenchError, match="refused") as e:
        RunFile(tmp_path / "run.h5")
    assert "/samples/context" in str(e.value)
    with h5py.File(parts / HEADER, "r+") as h:  # the header made clean: the symlinked activations are refused
        del h["samples/context"]
        h["samples/context"] = np.array([b"c"] * 4)
    with pytest.raises(WorkbenchError, match="symlink"):
        RunFile(tmp_path / "run.h5")


# --------------------------------------------------------------------------- symlinks
@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every refusal here comes before one loads."""
    import workbench.engine.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)


def test_run_never_writes_through_a_symlinked_lock_or_parts_folder(capsys, monkeypatch, tmp_path, no_model):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.tmp").write_text("keep")
    (elsewhere / "keep.new").write_text("keep")
    run = tmp_path / "out" / "run.h5"
    run.parent.mkdir()
    base = ["run", "--model", "organism", "--task", "organism", "--limit", "2", "--rounds", "2", "--out", str(run)]
    for link, target, extra in (("run.h5.lock", victim, []), ("run.h5.parts", elsewhere, []),
                                ("run.h5.parts.new", elsewhere, ["--overwrite"]), ("run.h5.lock", tmp_path / "dangling", [])):
        (run.parent / link).symlink_to(target)
        code, _, err = workbench(capsys, monkeypatch, *base, *extra)
        assert code != 0, link
        error_line(err, link, "symlink")
        (run.parent / link).unlink()
    assert victim.read_text() == "precious\n" and not (tmp_path / "dangling").exists()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.new", "keep.tmp"]


def test_the_lock_itself_never_opens_a_symlink(tmp_path):
    from workbench.store.lock import RunLock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "run.h5.lock").symlink_to(victim)
    with pytest.raises(WorkbenchError, match="symlink"):
        RunLock.acquire(tmp_path / "run.h5")
    assert victim.read_text() == "precious\n"
    (tmp_path / "run.h5.lock").unlink()
    (tmp_path / "run.h5.parts").mkdir()  # a real parts folder with a symlink among its files
    (tmp_path / "run.h5.parts" / "built.json").symlink_to(victim)
    with pytest.raises(WorkbenchError, match="built.json"):
        RunLock.acquire(tmp_path / "run.h5")
    assert victim.read_text() == "precious\n"


def test_probe_track_and_export_refuse_symlinks_where_they_write(capsys, monkeypatch, tmp_path, clean_run, no_model):
    run = tmp_path / "run.h5"
    shutil.copy(clean_run, run)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "run.h5.lock").symlink_to(victim)
    code, _, err = workbench(capsys, monkeypatch, "probe", "track", str(run), str(write_probe(tmp_path / "p.h5", n_layers=4, d_model=64)))
    assert code != 0
    error_line(err, "run.h5.lock", "symlink")
    (tmp_path / "run.h5.lock").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.tmp").write_text("keep")
    (tmp_path / "c.h5.parts").symlink_to(elsewhere)
    code, _, err = workbench(capsys, monkeypatch, "export", str(run), "--hooks", "blocks.0.hook_resid_post",
                             "--out", str(tmp_path / "c.h5"), "--overwrite")
    assert code != 0
    error_line(err, "c.h5.parts", "symlink")
    assert victim.read_text() == "precious\n" and [p.name for p in elsewhere.iterdir()] == ["keep.tmp"]


def test_probe_fit_never_replaces_another_file_or_writes_through_a_symlink(capsys, monkeypatch, tmp_path, clean_run, no_model):
    run = tmp_path / "run.h5"
    shutil.copy(clean_run, run)
    before = run.read_bytes()
    base = ["probe", "fit", "--model", "organism", "--contrast", "organism", "--device", "cpu"]
    code, _, err = workbench(capsys, monkeypatch, *base, "--out", str(run))
    assert code != 0
    error_line(err, str(run), "--overwrite")
    code, _, err = workbench(capsys, monkeypatch, *base, "--out", str(run), "--overwrite")
    assert code != 0
    error_line(err, str(run), "not a probe file")
    (tmp_path / "p.h5").symlink_to(run)
    code, _, err = workbench(capsys, monkeypatch, *base, "--out", str(tmp_path / "p.h5"), "--overwrite")
    assert code != 0
    error_line(err, "p.h5", "symlink")
    assert run.read_bytes() == before


# --------------------------------------------------------------------------- control characters
HOSTILE_TEXT = "evil\x1b[2J\x1b]0;pwned\x07\u202e\x9b31m"


def _assert_no_control(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text and "\x9b" not in text, repr(text)


def test_control_characters_from_a_file_are_shown_never_obeyed(capsys, monkeypatch, tmp_path, clean_run):
    from workbench.cache.file import FORMAT as CACHE_FORMAT

    run = tmp_path / "run.h5"
    shutil.copy(clean_run, run)
    with h5py.File(run, "r+") as f:
        f.attrs["model_name"] = HOSTILE_TEXT
        f.attrs["protocol"] = HOSTILE_TEXT
        f.attrs["task"] = HOSTILE_TEXT
        f[f"rounds/mean_{HOSTILE_TEXT.replace('/', '')}"] = np.zeros((4, 2))
    for args in (["info", str(run)], ["analyze", str(run)], ["info", str(run), "--json"]):
        code, out, err = workbench(capsys, monkeypatch, *args)
        assert code == 0, err
        _assert_no_control(out + err)
        if "--json" not in args:
            assert "evil␛[2J" in out, out
    probe = write_probe(tmp_path / "probe.h5", model_name=HOSTILE_TEXT, method=HOSTILE_TEXT)
    code, out, err = workbench(capsys, monkeypatch, "probe", "show", str(probe))
    assert code == 0, err
    _assert_no_control(out + err)
    cache = tmp_path / "cache.h5"
    with h5py.File(cache, "w") as f:
        f.attrs.update({"format": CACHE_FORMAT, "schema_version": 1, "model_name": HOSTILE_TEXT, "hooks": "[]"})
        f["tokens/role"] = np.zeros(3, dtype=np.int8)
        f.create_group("activations")
    code, out, err = workbench(capsys, monkeypatch, "info", str(cache))
    assert code == 0, err
    _assert_no_control(out + err)
    bad = tmp_path / f"x{HOSTILE_TEXT.replace('/', '')}.h5"  # the error line names the path: escaped too
    bad.write_bytes(b"not hdf5")
    code, out, err = workbench(capsys, monkeypatch, "info", str(bad))
    assert code != 0
    _assert_no_control(out + err)


def test_the_tui_shows_text_from_a_hostile_file_literally(tmp_path):
    """Sample ids and categories, the model name, the protocol, a probe's name, an instruction and
    a response holding ESC sequences: the screen shows ␛, never the raw ESC a terminal obeys."""
    import asyncio

    from tui_support import build_run, wait_until

    from tui.app import WorkbenchApp
    from tui.screens.browse import SampleScreen

    run = build_run(tmp_path / "run.h5", n_samples=4, n_rounds=2)
    with h5py.File(run, "r+") as f:
        f["samples/id"][0] = "evil\x1b[2J-0"
        f["samples/category"][0] = "cat\x1b]0;pwned\x07"
        f.attrs["model_name"] = HOSTILE_TEXT
        f.move("probes/fair", "probes/p\x1b[31m")
        f["rounds/response"][0, 0] = "the answer\x1b[2J is (a)"

    async def main() -> str:
        app = WorkbenchApp(run_path=run)
        async with app.run_test(size=(120, 32)) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, SampleScreen) and app.screen.sample is not None, what="first sample")
            await pilot.pause()
            screen = app.export_screenshot()
            assert app.failures == []
            return screen

    screen = asyncio.run(main())
    assert "\x1b" not in screen and "\x07" not in screen
    assert "␛[2J" in screen


def test_report_and_analyze_on_a_probe_named_with_control_and_mathtext_characters(capsys, monkeypatch, tmp_path):
    from tui_support import build_run

    run = build_run(tmp_path / "run.h5", n_samples=6, n_rounds=3)
    hostile = "a$\\frac{b$\x1b[2J"
    with h5py.File(run, "r+") as f:
        f.move("probes/fair", f"probes/{hostile}")
    code, out, err = workbench(capsys, monkeypatch, "report", str(run), "--out", str(tmp_path / "report"))
    assert code == 0, err
    _assert_no_control(out + err)
    code, out, err = workbench(capsys, monkeypatch, "analyze", str(run))
    assert code == 0, err
    _assert_no_control(out + err)
    assert "a$\\frac{b$␛[2J" in out
