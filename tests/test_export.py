"""`workbench export` and the cache file: every token's activations, checked against the run file's
pooled activations, a separate plain Hugging Face forward, the bridge's own hooks, a SIGKILL, a
full disk, and the SAELens layout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from workbench import load_activation_cache, save_activation_cache
from workbench.cache.file import ROLES
from workbench.errors import WorkbenchError
from workbench.cache.writer import done_batches
from workbench.cache.export import export_run
from workbench.engine.run import RunConfig, run_protocol
from workbench.store.reader import RunFile
from cli_support import workbench  # noqa: E402

N_SAMPLES, ROUNDS = 10, 3
REPO = Path(__file__).resolve().parents[1]
WORKBENCH = str(Path(sys.executable).with_name("workbench"))


@pytest.fixture(scope="module")
def run_path(tmp_path_factory, organism) -> Path:
    path = tmp_path_factory.mktemp("export") / "run.h5"
    run_protocol(RunConfig(out=path, model="organism", task="organism", protocol="organism", rounds=ROUNDS,
                           limit=N_SAMPLES, batch_size=4, hooks=("hook_resid_post", "hook_attn_out")), model=organism).close()
    return path


@pytest.fixture(scope="module")
def full_export(tmp_path_factory, run_path, organism) -> Path:
    """Every token, residual hooks of every layer (the Hugging Face pass)."""
    out = tmp_path_factory.mktemp("cache") / "cache.h5"
    return export_run(run_path, out, ["blocks.*.hook_resid_post", "blocks.*.hook_attn_out"], model=organism, batch_size=4)


def read_all(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out


def run_arrays(run_path: Path) -> dict[str, np.ndarray]:
    with RunFile(run_path) as run:
        return {name: run.array(name) for name in ("transcripts/token_ids", "rounds/prompt_span", "rounds/response_span",
                                                  "tokens/response_token_ids", "activations/hook_resid_post",
                                                  "activations/hook_attn_out")}


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_then_load_gives_the_cache_back_bit_for_bit(dtype, organism, tmp_path):
    tok = organism.tokenizer
    tokens = torch.tensor([tok("the answer is fair")["input_ids"], tok("review your previous answer")["input_ids"][:4]])
    names = ("hook_resid_post", "attn.hook_z", "attn.hook_pattern", "mlp.hook_post", "ln_final.hook_normalized")
    with torch.no_grad():
        _, cache = organism.bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith(names))
    cache = type(cache)({k: v.to(dtype) for k, v in cache.items()}, organism.bridge)
    path = save_activation_cache(cache, tmp_path / "c.h5", tokens=tokens, model=organism)
    back = load_activation_cache(path)
    assert sorted(back.cache.keys()) == sorted(cache.keys()) and len(cache.keys()) == 4 * 4 + 1
    for name in cache.keys():
        a, b = cache[name], back.cache[name]
        assert a.dtype == b.dtype == dtype and a.shape == b.shape, name
        assert torch.equal(a.view(torch.int16 if dtype == torch.float16 else torch.int32),
                           b.view(torch.int16 if dtype == torch.float16 else torch.int32)), name
    assert torch.equal(back.token_ids, tokens)
    assert back.token_str[0] == [tok.decode([i]) for i in tokens[0].tolist()]
    assert back.cache["blocks.1.attn.hook_pattern"].shape == (2, 4, 4, 4)  # [batch, head, q, k] as TransformerLens has it


def test_token_strings_round_trip_exactly_and_schema_1_files_still_load(tmp_path):
    """Token strings are UTF-8 bytes + offsets (NUL and any character kept exactly); a schema 1
    file, whose strings were one variable-length string dataset, still loads."""
    strings = [["a", "\0", "", "é日本"], ["🙂", " the", "\n", "x\0y"]]
    cache = {"blocks.0.hook_resid_post": torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)}
    path = save_activation_cache(cache, tmp_path / "c.h5", token_str=strings)
    assert load_activation_cache(path).token_str == strings
    with h5py.File(path, "r+") as f:  # rewrite it as schema 1 wrote it
        t = f["tokens"]
        old = [s.replace("\0", "\u2400") for row in strings for s in row]
        del t["token_str_utf8"], t["token_str_offsets"]
        t.create_dataset("token_str", data=np.asarray(old, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.attrs["schema_version"] = 1
    back = load_activation_cache(path)
    assert back.token_str == [[s.replace("\0", "\u2400") for s in row] for row in strings]
    assert torch.equal(back.cache["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"])


def test_load_is_lazy_and_selects_tokens(full_export):
    back = load_activation_cache(full_export, hooks=["blocks.2.hook_resid_post"], rounds=[1], roles=["response"])
    assert dict.__getitem__(back.cache.cache_dict, "blocks.2.hook_resid_post") is None  # nothing read yet
    acts = back.cache["blocks.2.hook_resid_post"]
    assert acts.shape[:2] == back.token_ids.shape and acts.shape[2] == 64
    assert set(back.round[back.mask].tolist()) == {1} and set(back.role[back.mask].tolist()) == {ROLES.index("response")}
    assert (acts[~back.mask] == 0).all()
    with pytest.raises(WorkbenchError, match="no hook 'nope'"):
        load_activation_cache(full_export, hooks=["nope"])


# --------------------------------------------------------------------------- numbers


def test_exported_tokens_equal_the_run_files_pooled_activations(full_export, run_path):
    """At each round's last prompt token: the run's pooled value (1e-5 relative); over each response:
    the run's response mean. Token ids and labels follow the transcript and spans."""
    run = run_arrays(run_path)
    data = read_all(full_export)
    offsets = data["tokens/offsets"]
    assert len(offsets) == N_SAMPLES + 1
    for i in range(N_SAMPLES):
        lo, hi = offsets[i], offsets[i + 1]
        np.testing.assert_array_equal(data["tokens/token_id"][lo:hi], run["transcripts/token_ids"][i])
        np.testing.assert_array_equal(data["tokens/position"][lo:hi], np.arange(hi - lo))
        for hook in ("hook_resid_post", "hook_attn_out"):
            pooled = run[f"activations/{hook}"][i]  # [R, 2, L, d]
            for layer in range(4):
                acts = data[f"activations/blocks.{layer}.{hook}"][lo:hi]
                for t in range(ROUNDS):
                    ps, pe = run["rounds/prompt_span"][i, t]
                    rs, re_ = run["rounds/response_span"][i, t]
                    scale = np.abs(pooled[t, 0, layer]).max()
                    np.testing.assert_allclose(acts[pe - 1], pooled[t, 0, layer], rtol=1e-5, atol=1e-5 * scale)
                    np.testing.assert_allclose(acts[rs:re_].mean(0), pooled[t, 1, layer], rtol=1e-5, atol=1e-5 * scale)
                    roles = data["tokens/role"][lo:hi]
                    assert (roles[ps:pe] == ROLES.index("prompt")).all() and (roles[rs:re_] == ROLES.index("response")).all()
                    assert (data["tokens/round"][lo:hi][ps:re_] == t).all()
                    np.testing.assert_array_equal(data["tokens/token_id"][lo:hi][rs:re_], run["tokens/response_token_ids"][i, t])


@pytest.mark.parametrize("path", ["hf", "bridge"])
def test_resid_post_equals_a_plain_hugging_face_forward(path, run_path, organism, tmp_path):
    """blocks.{i}.hook_resid_post == output_hidden_states[i + 1] for i < L − 1; the last layer's is
    before the final norm: HF's last hidden state is norm(it). ``bridge``: attn.hook_z chosen too,
    so the whole batch goes through the TransformerBridge."""
    hooks = ["blocks.*.hook_resid_post"] + (["blocks.0.attn.hook_z"] if path == "bridge" else [])
    out = export_run(run_path, tmp_path / "c.h5", hooks, model=organism, batch_size=3, rows=[1, 4, 7])
    data = read_all(out)
    transcripts = run_arrays(run_path)["transcripts/token_ids"]
    offsets = data["tokens/offsets"]
    for k, row in enumerate([1, 4, 7]):
        with torch.no_grad():
            hs = organism.hf(input_ids=torch.from_numpy(np.asarray(transcripts[row], dtype=np.int64))[None], output_hidden_states=True).hidden_states
        lo, hi = offsets[k], offsets[k + 1]
        for i in range(3):
            np.testing.assert_allclose(data[f"activations/blocks.{i}.hook_resid_post"][lo:hi], hs[i + 1][0].numpy(), rtol=1e-5, atol=1e-5)
        last = torch.from_numpy(data["activations/blocks.3.hook_resid_post"][lo:hi])
        with torch.no_grad():
            normed = organism.hf.model.norm(last)
        np.testing.assert_allclose(normed.numpy(), hs[4][0].numpy(), rtol=1e-5, atol=1e-5)
        assert not np.allclose(last.numpy(), hs[4][0].numpy(), atol=1e-3)


def test_attention_patterns_and_hook_z_equal_the_bridges_own_hooks(run_path, organism, tmp_path):
    out = export_run(run_path, tmp_path / "c.h5", ["blocks.1.attn.hook_pattern", "blocks.2.attn.hook_z"], model=organism,
                     rows=[0, 3], roles=("response",), batch_size=2)
    data = read_all(out)
    transcripts = run_arrays(run_path)["transcripts/token_ids"]
    key_length = max(len(transcripts[0]), len(transcripts[3]))
    assert data["activations/blocks.1.attn.hook_pattern"].shape[1:] == (4, key_length)
    offsets = data["tokens/offsets"]
    for k, row in enumerate([0, 3]):
        tokens = torch.from_numpy(np.asarray(transcripts[row], dtype=np.int64))[None]
        with torch.no_grad():
            _, cache = organism.bridge.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_pattern", "blocks.2.attn.hook_z"])
        pos = data["tokens/position"][offsets[k] : offsets[k + 1]]
        n = len(transcripts[row])
        pattern = data["activations/blocks.1.attn.hook_pattern"][offsets[k] : offsets[k + 1]]
        np.testing.assert_allclose(pattern[..., :n], cache["blocks.1.attn.hook_pattern"][0].transpose(0, 1)[pos].numpy(), rtol=1e-5, atol=1e-6)
        assert (pattern[..., n:] == 0).all()
        np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(data["activations/blocks.2.attn.hook_z"][offsets[k] : offsets[k + 1]],
                                   cache["blocks.2.attn.hook_z"][0][pos].numpy(), rtol=1e-5, atol=1e-6)


def test_a_hook_and_its_legacy_alias_are_exported_once_under_the_canonical_name(run_path, organism, full_export, tmp_path):
    """TransformerLens 4 names blocks.0.hook_out's hook point blocks.0.hook_resid_post too: a glob
    matching both stores it once, as blocks.0.hook_out, and loading the alias reads that dataset."""
    out = export_run(run_path, tmp_path / "c.h5", ["blocks.0.hook_resid_post", "blocks.0.hook_*"], model=organism, batch_size=4)
    with h5py.File(out, "r") as f:
        names = list(f["activations"])
        assert json.loads(f.attrs["hook_aliases"]) == {"blocks.0.hook_resid_post": "blocks.0.hook_out",
                                                       "blocks.0.hook_resid_pre": "blocks.0.hook_in"}
        assert "blocks.0.hook_out" in names and "blocks.0.hook_in" in names
        assert "blocks.0.hook_resid_post" not in names and "blocks.0.hook_resid_pre" not in names
        assert "blocks.0.hook_attn_out" in names  # an alias whose canonical hook (attn.hook_out) was not chosen stays
    back = load_activation_cache(out, hooks=["blocks.0.hook_resid_post"])
    want = load_activation_cache(full_export, hooks=["blocks.0.hook_resid_post"])
    np.testing.assert_allclose(back.cache["blocks.0.hook_resid_post"].numpy(), want.cache["blocks.0.hook_resid_post"].numpy(),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_model_exports_float32_and_says_so(run_path, tmp_path):
    from workbench.engine.models import load_model

    bf16 = load_model("organism", device="cpu", dtype="bfloat16")
    out = export_run(run_path, tmp_path / "c.h5", ["blocks.0.hook_resid_post"], model=bf16, rows=[2])
    with h5py.File(out, "r") as f:
        assert f["activations/blocks.0.hook_resid_post"].dtype == np.float32
        assert f.attrs["model_dtype"] == "bfloat16" and f.attrs["activation_dtype"] == "float32"
        assert "bfloat16" in f.attrs["dtype_note"] and "exactly" in f.attrs["dtype_note"]
        values = f["activations/blocks.0.hook_resid_post"][...]
    assert np.array_equal(torch.from_numpy(values).to(torch.bfloat16).float().numpy(), values)  # bf16 values, exactly


# --------------------------------------------------------------------------- crash safety


# `workbench export` (its CLI entry), SIGKILLed the moment its first batch's write returned: the
# moment is the program's own, never timed, so a loaded machine kills it at the same place
KILLED_AFTER_FIRST_BATCH = """
import os, signal, sys
from workbench.cache import writer
from workbench.cli import entry

real = writer.PartialCache.write

def write(self, k, arrays):
    real(self, k, arrays)
    os.kill(os.getpid(), signal.SIGKILL)

writer.PartialCache.write = write
sys.argv = ["workbench", *sys.argv[1:]]
entry()
"""


@pytest.mark.slow
def test_sigkill_then_resume_is_identical_to_an_uninterrupted_export(run_path, full_export, organism, tmp_path):
    out = tmp_path / "killed.h5"
    parts = out.with_name(out.name + ".parts")
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_FIRST_BATCH, "export", str(run_path), "--hooks", "blocks.*.hook_resid_post",
                           "--hooks", "blocks.*.hook_attn_out", "--out", str(out), "--batch-size", "4", "--device", "cpu"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    assert done_batches(parts) == {0}
    with pytest.raises(WorkbenchError, match="unfinished export"):  # the file being written never looks complete
        load_activation_cache(parts / "cache.h5")
    with pytest.raises(WorkbenchError, match="--resume"):
        export_run(run_path, out, ["blocks.*.hook_resid_post", "blocks.*.hook_attn_out"], model=organism, batch_size=4)
    export_run(run_path, out, ["blocks.*.hook_resid_post", "blocks.*.hook_attn_out"], model=organism, batch_size=4, resume=True)
    assert not parts.exists()
    a, b = read_all(full_export), read_all(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


class Stop(Exception):
    pass


def _stop_after(total_batches: int, seen: list) -> object:
    """An ``on_batch`` that records the call and stops the export after its last batch is written."""
    def on_batch(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == total_batches + 1:
            raise Stop
    return on_batch


def test_rows_are_written_into_place_and_the_metadata_never_again(run_path, full_export, organism, tmp_path):
    """Between creating the file and its last batch, only the allocated activation bytes change:
    every other byte (HDF5 metadata, token labels) is as created, and the rows equal the export's."""
    from workbench.cache.writer import _slots_of

    out = tmp_path / "c.h5"
    parts = out.with_name(out.name + ".parts")
    seen: list = []
    snapshot: list = []
    stop = _stop_after(3, seen)

    def on_batch(done: int, total: int) -> None:
        if not seen:
            snapshot.append(np.fromfile(parts / "cache.h5", dtype=np.uint8))
        stop(done, total)

    with pytest.raises(Stop):
        export_run(run_path, out, ["blocks.*.hook_resid_post", "blocks.*.hook_attn_out"], model=organism, batch_size=4,
                   on_batch=on_batch)
    after = np.fromfile(parts / "cache.h5", dtype=np.uint8)
    before = snapshot[0]
    assert len(after) == len(before)
    in_slots = np.zeros(len(after), dtype=bool)
    for slot in _slots_of(parts / "cache.h5"):
        for lo, hi, offset in slot.extents(0, slot.shape[0]):
            in_slots[offset : offset + (hi - lo) * slot.row_bytes] = True
    assert in_slots.sum() == 8 * len(read_all(full_export)["tokens/token_id"]) * 64 * 4  # 8 hooks, float32 × d_model
    np.testing.assert_array_equal(after[~in_slots], before[~in_slots])
    assert (before[in_slots] == 0).all() and (after[in_slots] != 0).any()
    assert done_batches(parts) == {0, 1, 2}  # the interrupted export committed what it had written
    export_run(run_path, out, ["blocks.*.hook_resid_post", "blocks.*.hook_attn_out"], model=organism, batch_size=4, resume=True)
    a, b = read_all(full_export), read_all(out)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_a_kill_during_the_finish_is_repaired_from_the_raw_rows(run_path, full_export, organism, tmp_path):
    """The finish renames cache.h5 to finishing.h5 and writes its status: a kill there may leave
    its metadata damaged. --resume rebuilds the file from the raw rows, identical, with no forward."""
    out = tmp_path / "c.h5"
    parts = out.with_name(out.name + ".parts")
    with pytest.raises(Stop):
        export_run(run_path, out, ["blocks.*.hook_resid_post", "blocks.*.hook_attn_out"], model=organism, batch_size=4,
                   on_batch=_stop_after(3, []))
    from workbench.cache.writer import _layout_text, _slots_of

    # the state a finish leaves when killed while writing the status: layout.json, then the rename
    (parts / "layout.json").write_text(_layout_text(_slots_of(parts / "cache.h5")))
    os.replace(parts / "cache.h5", parts / "finishing.h5")
    with open(parts / "finishing.h5", "r+b") as fh:  # a torn metadata write: the superblock is gone
        fh.write(b"\0" * 512)
    with pytest.raises(OSError):
        h5py.File(parts / "finishing.h5", "r")
    calls: list = []
    export_run(run_path, out, ["blocks.*.hook_resid_post", "blocks.*.hook_attn_out"], model=organism, batch_size=4,
               resume=True, on_batch=lambda done, total: calls.append((done, total)))
    assert len(calls) == 1 and calls[0][0] == calls[0][1]  # every batch was kept: nothing recomputed
    a, b = read_all(full_export), read_all(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


HOOKS = ["blocks.*.hook_resid_post", "blocks.*.hook_attn_out"]


def assert_same_export(expected: Path, got: Path) -> None:
    """Every dataset equal bit for bit, and every root attribute but the creation time."""
    a, b = read_all(expected), read_all(got)
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    with h5py.File(expected, "r") as fa, h5py.File(got, "r") as fb:
        attrs_a, attrs_b = dict(fa.attrs), dict(fb.attrs)
    for attrs in (attrs_a, attrs_b):
        attrs.pop("created")
    assert attrs_a.keys() == attrs_b.keys() and all(np.array_equal(attrs_a[k], attrs_b[k]) for k in attrs_a)


def _markers(parts: Path) -> list[str]:
    return sorted(p.name for p in parts.glob("done-*"))


def test_after_a_restart_the_provisional_markers_are_ignored_and_their_batches_recomputed(run_path, full_export, organism, tmp_path):
    """Done markers written without fsync carry the boot id: after the machine restarts (here: the
    names rewritten to another boot id, the manifest left unreadable as an unsynced write can be)
    nothing of them is trusted; --resume computes every batch again, to the same file."""
    from workbench.store.durability import boot_id

    out = tmp_path / "c.h5"
    parts = out.with_name(out.name + ".parts")
    with pytest.raises(Stop):
        export_run(run_path, out, HOOKS, model=organism, batch_size=4, on_batch=_stop_after(2, []))
    boot = boot_id()
    assert _markers(parts) == [f"done-000000-000001.{boot}", f"done-000001-000002.{boot}"]  # one after each batch
    assert done_batches(parts) == {0, 1}
    other = "f" * 32
    for marker in parts.glob("done-*"):
        marker.rename(parts / marker.name.replace(boot, other))
    (parts / "manifest.json").write_bytes(b"\0" * 64)
    assert done_batches(parts) == set()
    calls: list = []
    export_run(run_path, out, HOOKS, model=organism, batch_size=4, resume=True, on_batch=lambda done, total: calls.append(done))
    assert calls[0] == 0 and len(calls) == 1 + 3  # nothing was kept: all three batches computed again
    assert_same_export(full_export, out)


class FsyncCount:
    """``os.fsync`` that counts its calls and then does the real fsync."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = os.fsync

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.real(fd)


def test_the_default_export_never_fsyncs(run_path, organism, full_export, tmp_path, monkeypatch):
    fsync = FsyncCount()
    monkeypatch.setattr(os, "fsync", fsync)
    out = export_run(run_path, tmp_path / "c.h5", HOOKS, model=organism, batch_size=4)
    assert fsync.calls == 0
    assert_same_export(full_export, out)


def test_fsync_mode_commits_durably_and_gives_the_same_file(run_path, full_export, organism, tmp_path, monkeypatch):
    """--fsync: durable done names (no boot id), the file fsynced before each; resuming a default
    export with --fsync first makes the batches it kept durable. Both give the same file."""
    out = tmp_path / "c.h5"
    parts = out.with_name(out.name + ".parts")
    seen: list = []

    def on_batch(done: int, total: int) -> None:
        seen.append((done, _markers(parts)))

    fsync = FsyncCount()
    monkeypatch.setattr(os, "fsync", fsync)
    export_run(run_path, out, HOOKS, model=organism, batch_size=4, fsync=True, on_batch=on_batch)
    assert seen[1][1] == ["done-000000-000001"] and fsync.calls >= 4  # the first batch commits at once
    assert all("." not in name for _, names in seen for name in names)
    assert_same_export(full_export, out)

    resumed = tmp_path / "resumed.h5"
    parts = resumed.with_name(resumed.name + ".parts")
    with pytest.raises(Stop):
        export_run(run_path, resumed, HOOKS, model=organism, batch_size=4, on_batch=_stop_after(1, []))
    assert all("." in name for name in _markers(parts))
    seen.clear()
    export_run(run_path, resumed, HOOKS, model=organism, batch_size=4, fsync=True, resume=True, on_batch=on_batch)
    assert seen[0][0] > 0 and seen[0][1] == ["done-000000-000001"]  # the kept batch, made durable before the rest
    assert_same_export(full_export, resumed)


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


FULL_DISK_SCRIPT = """
import subprocess, sys
from workbench.errors import WorkbenchError
from workbench.cache.writer import done_batches
import workbench.cache.size as size
from workbench.cache.export import export_run
size.free_bytes = lambda path: None  # the free space unknown at the size check: the disk fills while the export writes
run, disk, out = sys.argv[1:4]
hooks = ["blocks.*.hook_resid_post", "blocks.*.hook_attn_out"]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=180k", "tmpfs", disk], check=True)
try:
    export_run(run, out, hooks, batch_size=4, device="cpu")
    print("no error")
except WorkbenchError as e:
    print("error:", e)
subprocess.run(["mount", "-o", "remount,size=8m", disk], check=True)
export_run(run, out, hooks, batch_size=4, device="cpu", resume=True)
subprocess.run(["cp", out, sys.argv[4]], check=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs unshare (a private tmpfs to fill up)")
def test_a_full_disk_is_one_line_and_the_export_resumes(run_path, full_export, tmp_path):
    """A real full disk: a 180 KiB tmpfs fits a few parts of the 1.2 MiB export; the error is one
    line, the parts stay, and after growing the disk --resume finishes, equal to the plain export."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", FULL_DISK_SCRIPT, str(run_path), str(disk),
                           str(disk / "cache.h5"), str(tmp_path / "resumed.h5")],
                          cwd=REPO, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: disk full writing"), done.stdout
    assert "batches are kept in" in lines[0] and "--resume" in lines[0]
    a, b = read_all(full_export), read_all(tmp_path / "resumed.h5")
    for name in a:
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.slow
def test_a_file_size_limit_is_one_line_and_the_export_resumes(run_path, full_export, tmp_path):
    """``ulimit -f`` (RLIMIT_FSIZE) below the cache file's size: the write fails with EFBIG, which
    is one line naming the limit (no traceback, no crash at exit), and without the limit --resume
    finishes, equal to the plain export."""
    import resource

    out = tmp_path / "cache.h5"
    limit = full_export.stat().st_size // 4
    args = [WORKBENCH, "export", str(run_path), "--hooks", "blocks.*.hook_resid_post,blocks.*.hook_attn_out",
            "--out", str(out), "--device", "cpu", "--batch-size", "4"]
    limited = subprocess.run(args, cwd=REPO, timeout=300, capture_output=True, text=True,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    lines = [line for line in limited.stderr.strip().splitlines() if line.strip() and not line.startswith("exporting about")]
    assert limited.returncode == 2 and len(lines) == 1 and "Traceback" not in limited.stderr, limited.stderr[-3000:]
    assert lines[0].startswith("error: writing") and "File too large" in lines[0] and "ulimit -f" in lines[0], lines[0]
    assert "batches are kept in" in lines[0] and "--resume" in lines[0] and not out.exists()
    resumed = subprocess.run([*args, "--resume"], cwd=REPO, timeout=300, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_all(full_export), read_all(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


# --------------------------------------------------------------------------- refusals and the command line


def test_unknown_hook_is_one_line_with_the_nearest_names_first(capsys, monkeypatch, run_path, tmp_path):
    code, _, err = workbench(capsys, monkeypatch, "export", str(run_path), "--hooks", "blocks.2.hook_resid_pots",
                             "--out", str(tmp_path / "c.h5"), "--device", "cpu")
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "unknown hook 'blocks.2.hook_resid_pots'" in lines[0]
    assert lines[0].split("nearest: ")[1].startswith("blocks.2.hook_resid_post"), lines[0]
    assert not (tmp_path / "c.h5").exists()


def test_a_run_of_another_model_is_refused(run_path, organism, tmp_path):
    other = tmp_path / "other.h5"
    shutil.copy(run_path, other)
    with h5py.File(other, "r+") as f:
        f.attrs["model_name"] = "Qwen/Qwen2.5-0.5B-Instruct"
        f.attrs["model_path"] = "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(WorkbenchError, match="was made with model 'Qwen/Qwen2.5-0.5B-Instruct'"):
        export_run(other, tmp_path / "c.h5", ["blocks.0.hook_resid_post"], model=organism)


def test_selection_rounds_roles_samples(run_path, organism, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sel.h5"
    code, _, err = workbench(capsys, monkeypatch, "export", str(run_path), "--hooks", "blocks.1.hook_resid_post",
                             "--rounds", "1,3", "--roles", "response", "--samples", "2:5", "--dtype", "float16",
                             "--out", str(out), "--device", "cpu")
    assert code == 0, err
    data = read_all(out)
    run = run_arrays(run_path)
    assert data["samples/sample"].tolist() == [2, 3, 4]
    assert data["activations/blocks.1.hook_resid_post"].dtype == np.float16
    for k, row in enumerate([2, 3, 4]):
        lo, hi = data["tokens/offsets"][k : k + 2]
        want = np.concatenate([run["tokens/response_token_ids"][row, 0], run["tokens/response_token_ids"][row, 2]])
        np.testing.assert_array_equal(data["tokens/token_id"][lo:hi], want)
        assert set(data["tokens/round"][lo:hi].tolist()) <= {0, 2}
    code, text, err = workbench(capsys, monkeypatch, "info", str(out))
    assert code == 0 and "blocks.1.hook_resid_post" in text and "float16" in text and "response" in text, (text, err)
    assert "tokens=" in text and f"{len(data['tokens/token_id'])}" in text


@pytest.mark.skipif(shutil.which("h5ls") is None, reason="h5ls not installed (make setup installs hdf5-tools as root)")
def test_h5ls_lists_the_cache_file(full_export):
    listing = subprocess.run(["h5ls", "-r", str(full_export)], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    for name in ("/tokens/offsets", "/tokens/token_str_utf8", "/tokens/token_str_offsets", "/tokens/role", "/activations/blocks.3.hook_resid_post"):
        assert name in listing.stdout, listing.stdout


# --------------------------------------------------------------------------- SAELens layout


def test_saelens_export_matches_the_documented_schema(run_path, organism, full_export, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = export_run(run_path, tmp_path / "acts", ["blocks.2.hook_resid_post", "blocks.1.attn.hook_z"], model=organism,
                     format="saelens", context_size=32, batch_size=4)
    ds = datasets.load_from_disk(str(out))
    feats = ds.features
    assert isinstance(feats["blocks.2.hook_resid_post"], datasets.Array2D)
    assert feats["blocks.2.hook_resid_post"].shape == (32, 64) and feats["blocks.2.hook_resid_post"].dtype == "float32"
    assert feats["blocks.1.attn.hook_z"].shape == (32, 4 * 16)  # heads flattened into d_in, as SAELens does
    assert feats["token_ids"].length == 32 and feats["token_ids"].feature.dtype == "int32"
    cache = read_all(full_export)
    n = len(ds)
    assert n == len(cache["tokens/token_id"]) // 32
    ds.set_format("numpy")
    rows = ds[:]
    np.testing.assert_array_equal(rows["token_ids"].reshape(-1), cache["tokens/token_id"][: n * 32])
    # attn.hook_z sends these batches through the bridge, whose eager attention rounds unlike the HF pass
    np.testing.assert_allclose(rows["blocks.2.hook_resid_post"].reshape(-1, 64), cache["activations/blocks.2.hook_resid_post"][: n * 32],
                               rtol=1e-5, atol=1e-5)
    meta = json.loads(ds.info.description)
    assert meta["format"] == "self-correction-workbench-saelens" and meta["dropped_tokens"] == len(cache["tokens/token_id"]) - n * 32
