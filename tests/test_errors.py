"""DESIGN §7: each bad input gets one clear line naming what and where, exit status 2, no traceback,
and nothing already written is lost."""

from __future__ import annotations

from pathlib import Path

import h5py
from conftest import BBQ_FIXTURE

from cli_support import error_line, workbench  # noqa: E402


def bbq_run(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model_dir), "--task", "bbq", "--data", str(BBQ_FIXTURE), "--protocol", "bbq-paper",
            "--rounds", "2", "--max-new-tokens", "4", "--device", "cpu", "--out", str(out), *extra]


def test_missing_data_file(capsys, monkeypatch, tmp_path, model_dirs):
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(model_dirs["llama"]), "--task", "bbq",
                          "--data", str(tmp_path / "nope.jsonl"), "--protocol", "bbq-paper", "--out", str(tmp_path / "o.h5"))
    assert code == 2
    error_line(err, "nope.jsonl", "not found")
    assert not (tmp_path / "o.h5").exists()


def test_malformed_jsonl_line_names_file_and_line(capsys, monkeypatch, tmp_path, model_dirs):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BBQ_FIXTURE.read_text().splitlines()[0] + "\n{not json\n")
    code, _, err = workbench(capsys, monkeypatch, *bbq_run(model_dirs["llama"], tmp_path / "o.h5")[:6], str(bad),
                          "--out", str(tmp_path / "o.h5"))
    assert code == 2
    error_line(err, "bad.jsonl:2", "malformed JSON")


def test_not_a_bbq_line(capsys, monkeypatch, tmp_path, model_dirs):
    bad = tmp_path / "other.jsonl"
    bad.write_text('{"prompt": "hello"}\n')
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(model_dirs["llama"]), "--task", "bbq", "--data", str(bad),
                          "--out", str(tmp_path / "o.h5"))
    assert code == 2
    error_line(err, "other.jsonl:1", "missing")


def test_unknown_model_folder_and_hub_name(capsys, monkeypatch, tmp_path):
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(tmp_path / "no-model"), "--task", "bbq",
                          "--data", str(BBQ_FIXTURE), "--out", str(tmp_path / "o.h5"))
    assert code == 2
    error_line(err, "no-model", "no such folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", "no-such-org/no-such-model", "--task", "bbq",
                          "--data", str(BBQ_FIXTURE), "--out", str(tmp_path / "o.h5"))
    assert code == 2
    error_line(err, "no-such-org/no-such-model")


def test_layer_out_of_range_and_unknown_hook(capsys, monkeypatch, tmp_path, model_dirs):
    code, _, err = workbench(capsys, monkeypatch, *bbq_run(model_dirs["llama"], tmp_path / "o.h5", "--layers", "0,9"))
    assert code == 2
    error_line(err, "layer 9", "0..2")
    code, _, err = workbench(capsys, monkeypatch, *bbq_run(model_dirs["llama"], tmp_path / "o.h5", "--hooks", "hook_resid_sideways"))
    assert code == 2
    error_line(err, "hook_resid_sideways", "hook_resid_post")
    code, _, err = workbench(capsys, monkeypatch, *bbq_run(model_dirs["llama"], tmp_path / "o.h5", "--hooks", "attn.hook_pattern"))
    assert code == 2
    error_line(err, "attn.hook_pattern", "inside a module", "hook_resid_mid")
    assert not (tmp_path / "o.h5").exists()


def test_unknown_protocol_and_bad_inject(capsys, monkeypatch, tmp_path, model_dirs):
    args = bbq_run(model_dirs["llama"], tmp_path / "o.h5")
    args[args.index("bbq-paper")] = "bbq-imaginary"
    code, _, err = workbench(capsys, monkeypatch, *args)
    assert code == 2
    error_line(err, "bbq-imaginary", "bbq-paper")
    code, _, err = workbench(capsys, monkeypatch, *bbq_run(model_dirs["llama"], tmp_path / "o.h5", "--inject", "1:too early"))
    assert code == 2
    error_line(err, "--inject")


def test_truncated_and_foreign_hdf5(capsys, monkeypatch, tmp_path, model_dirs):
    run = tmp_path / "run.h5"
    code, _, _ = workbench(capsys, monkeypatch, *bbq_run(model_dirs["llama"], run, "--limit", "2"))
    assert code in (0, None)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(run.read_bytes()[:2000])
    code, _, err = workbench(capsys, monkeypatch, "info", str(truncated))
    assert code == 2
    error_line(err, "truncated.h5", "not a readable HDF5 file")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = [1, 2, 3]
    code, _, err = workbench(capsys, monkeypatch, "info", str(foreign))
    assert code == 2
    error_line(err, "foreign.h5", "not a workbench run file")
    code, _, err = workbench(capsys, monkeypatch, "info", str(tmp_path / "missing.h5"))
    assert code == 2
    error_line(err, "missing.h5", "not found")


def test_existing_output_is_never_clobbered(capsys, monkeypatch, tmp_path, model_dirs):
    run = tmp_path / "run.h5"
    code, _, _ = workbench(capsys, monkeypatch, *bbq_run(model_dirs["llama"], run, "--limit", "2"))
    before = run.read_bytes()
    code, _, err = workbench(capsys, monkeypatch, *bbq_run(model_dirs["llama"], run, "--limit", "2"))
    assert code == 2
    error_line(err, "already exists", "--resume")
    code, _, err = workbench(capsys, monkeypatch, *bbq_run(model_dirs["llama"], run, "--limit", "2", "--layers", "5", "--resume"))
    assert code == 2
    assert run.read_bytes() == before
