"""What a new user hits in the first hour (issue 8), through the real entry point.

Bad inputs that need no model are refused before one loads: those tests replace ``load_model``
with a function that fails the test, so an error that came only after loading would show.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import BBQ_FIXTURE
from probe_files import write_probe

from workbench import cli
from cli_support import error_line, interrupt_at_batch, workbench  # noqa: E402


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the error must come before it."""
    import workbench.engine.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(workbench.engine.models, "load_model", refuse)


def bbq_line(**changes) -> str:
    row = json.loads(BBQ_FIXTURE.read_text().splitlines()[0])
    row.update(changes)
    return json.dumps(row) + "\n"


# ----------------------------------------------------------------------------- checked before loading


def _bad_run_inputs(tmp: Path) -> list[tuple[list[str], tuple[str, ...]]]:
    """(extra run arguments, needles of the one error line); the base is a BBQ run on a tiny model."""
    (tmp / "folder").mkdir()
    (tmp / "latin1.jsonl").write_bytes(bbq_line().encode() + "caf\xe9\n".encode("latin-1"))
    cases = [
        (["--inject", "5:x", "--rounds", "3"], ("--inject", "round 5", "beyond the last round (3)")),
        (["--inject", "²:x"], ("--inject", "ROUND:TEXT")),
        (["--inject", "3:a", "--inject", "3:b"], ("round 3", "twice")),
        (["--rounds", "0"], ("--rounds", "≥ 1")),
        (["--limit", "0"], ("--limit", "≥ 1")),
        (["--batch-size", "0"], ("--batch-size",)),
        (["--max-new-tokens", "0"], ("--max-new-tokens",)),
        (["--hooks", "hook_resid_post,hook_resid_post"], ("--hooks", "more than once")),
        (["--hooks", ""], ("--hooks",)),
        (["--layers", ""], ("--layers",)),
        (["--layers", "-1"], ("layer -1",)),
        (["--layers", "a,b"], ("--layers", "integers")),
        (["--protocol", "organism"], ("written for --task organism", "--force", "bbq-paper")),
        (["--protocol", str(tmp / "folder")], ("folder",)),
        (["--option-scoring", "letter-text", "--task", "organism", "--model", "organism"], ("single letters",)),
        (["--data", str(tmp / "folder")], ("folder", "not a JSONL file")),
        (["--data", str(tmp / "latin1.jsonl")], ("latin1.jsonl:2", "not UTF-8")),
        (["--out", str(tmp / "folder")], ("--out", "is a folder")),
    ]
    bad_rows = {
        "label-text": ({"label": "two"}, ("label must be 0, 1 or 2",)),
        "label-range": ({"label": 3}, ("label must be 0, 1 or 2",)),
        "label-bool": ({"label": True}, ("label must be 0, 1 or 2",)),
        "null-context": ({"context": None}, ("context must be a string",)),
        "answer-number": ({"ans1": 7}, ("ans1 must be a string",)),
        "condition": ({"context_condition": "maybe"}, ("context_condition",)),
    }
    for name, (change, needles) in bad_rows.items():
        path = tmp / f"{name}.jsonl"
        path.write_text(bbq_line() + bbq_line(**change))
        cases.append((["--data", str(path)], (f"{name}.jsonl:2", *needles)))
    protocols = {
        "rounds-text": ('rounds = "five"', ("rounds must be an integer",)),
        "rounds-float": ("rounds = 2.7", ("rounds must be an integer", "2.7")),
        "inject-string": ('inject = "at round 2"', ("inject must be a table",)),
        "inject-round": ('[inject]\n1 = "x"', ("inject round '1'",)),
        "placeholder": (None, ("{answer}", "{context}")),
        "braces": (None, ("not a valid template",)),
        "temperature": ("[decoding]\ntemperature = 0", ("temperature must be > 0",)),
        "top-p": ("[decoding]\ntop_p = 1.5", ("top_p",)),
        "max-new": ("[decoding]\nmax_new_tokens = 0", ("max_new_tokens must be ≥ 1",)),
        "do-sample": ('[decoding]\ndo_sample = "yes"', ("do_sample",)),
    }
    for name, (extra, needles) in protocols.items():
        first = {"placeholder": "{context} {answer}", "braces": "{context"}.get(name, "{context} {question} {choices}")
        path = tmp / f"{name}.toml"
        path.write_text(f'first = "{first}"\nfollowup = "Again."\n' + (extra or "") + "\n")
        cases.append((["--protocol", str(path)], (f"{name}.toml", *needles)))
    (tmp / "latin1.toml").write_bytes('first = "caf\xe9"\nfollowup = "x"\n'.encode("latin-1"))
    cases.append((["--protocol", str(tmp / "latin1.toml")], ("latin1.toml", "not UTF-8")))
    (tmp / "a-file").write_text("x")
    cases.append((["--out", str(tmp / "a-file" / "run.h5")], ("--out", "is a file, not a folder")))
    return cases


def test_bad_run_inputs_are_refused_before_the_model_loads(capsys, monkeypatch, tmp_path, model_dirs, no_model):
    base = ["run", "--model", str(model_dirs["llama"]), "--task", "bbq", "--data", str(BBQ_FIXTURE), "--device", "cpu",
            "--out", str(tmp_path / "o.h5")]
    for extra, needles in _bad_run_inputs(tmp_path):
        args = list(base)
        for i in range(0, len(extra), 2):  # an option given in extra replaces the base's
            if extra[i] in args and extra[i] not in ("--inject",):
                del args[args.index(extra[i]) : args.index(extra[i]) + 2]
        code, _, err = workbench(capsys, monkeypatch, *args, *extra)
        assert code == 2, (extra, err)
        error_line(err, *needles)
    assert not (tmp_path / "o.h5").exists()


def test_existing_output_and_model_folders_refused_before_loading(capsys, monkeypatch, tmp_path, model_dirs, no_model):
    out = tmp_path / "o.h5"
    out.write_bytes(b"something precious")
    args = ["run", "--model", str(model_dirs["llama"]), "--task", "bbq", "--data", str(BBQ_FIXTURE), "--out", str(out)]
    code, _, err = workbench(capsys, monkeypatch, *args)
    assert code == 2
    error_line(err, "already exists", "--resume", "--overwrite")
    assert out.read_bytes() == b"something precious"

    no_weights = tmp_path / "no-weights"
    shutil.copytree(model_dirs["llama"], no_weights)
    (no_weights / "model.safetensors").unlink()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_dirs["llama"], corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage"
    shutil.copytree(model_dirs["llama"], garbage)
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    for folder, needles in ((no_weights, ("no weight files",)), (corrupt, ("truncated or damaged",)),
                            (garbage, ("not a safetensors file",))):
        args[args.index("--model") + 1] = str(folder)
        code, _, err = workbench(capsys, monkeypatch, *args[:-2], "--out", str(tmp_path / "new.h5"))
        assert code == 2
        error_line(err, folder.name, *needles)
    args[args.index("--model") + 1] = str(model_dirs["llama"])
    args[args.index("bbq")] = "organism"
    code, _, err = workbench(capsys, monkeypatch, *args[:-2], "--out", str(tmp_path / "new.h5"))
    assert code == 2
    error_line(err, "--task organism needs an organism checkpoint")


def test_unknown_architecture_is_named(capsys, monkeypatch, tmp_path, model_dirs):
    odd = tmp_path / "odd"
    shutil.copytree(model_dirs["llama"], odd)
    config = json.loads((odd / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (odd / "config.json").write_text(json.dumps(config))
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(odd), "--task", "bbq", "--data", str(BBQ_FIXTURE),
                             "--out", str(tmp_path / "o.h5"))
    assert code == 2
    error_line(err, "odd", "config", "no-such-architecture")


def test_usage_errors_are_one_line(capsys, monkeypatch):
    code, _, err = workbench(capsys, monkeypatch, "run", "--limit", "abc")
    assert code == 2
    error_line(err, "--limit", "workbench run --help")
    code, _, err = workbench(capsys, monkeypatch, "run", "--task", "trivia")
    assert code == 2
    error_line(err, "--task", "trivia")
    code, _, err = workbench(capsys, monkeypatch, "info")
    assert code == 2
    error_line(err, "run_path", "workbench info --help")


def test_help_version_protocols(capsys, monkeypatch):
    code, out, _ = workbench(capsys, monkeypatch, "run", "--help")
    assert code == 0
    assert "<organism|bbq|mc|prompts|vqa|vqa-open|organism-visual>" in out and "<letter|letter-text>" in out and "<auto|cpu|cuda|mps>" in out
    assert "<bool>" not in out and "list[" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    code, out, _ = workbench(capsys, monkeypatch, "--version")
    from workbench import __version__

    assert code == 0 and out.strip() == f"workbench {__version__}"
    code, out, _ = workbench(capsys, monkeypatch, "--help")
    assert "--install-completion" in out
    code, out, _ = workbench(capsys, monkeypatch, "protocol", "list")
    assert code == 0 and "bbq-paper" in out and "organism-inject" in out
    code, out, _ = workbench(capsys, monkeypatch, "protocol", "show", "organism-inject")
    assert code == 0 and "round 2 (injected)" in out and "answer with the stereotype" in out


def test_probe_methods_literal_matches_methods():
    from typing import get_args

    from probes.cli import Method
    from probes.methods import METHODS

    assert set(get_args(Method)) == set(METHODS)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def bbq_runs(tmp_path_factory, model_dirs):
    """Two tiny BBQ runs without --protocol: letter scoring (the default) and letter-text."""
    import pytest as _pytest

    root = tmp_path_factory.mktemp("first-contact")
    paths = {}
    for scoring in ("letter", "letter-text"):
        out = root / f"{scoring}.h5"
        monkeypatch = _pytest.MonkeyPatch()
        extra = [] if scoring == "letter" else ["--option-scoring", scoring]
        monkeypatch.setattr(sys, "argv", ["workbench", "run", "--model", str(model_dirs["llama"]), "--task", "bbq",
                                          "--data", str(BBQ_FIXTURE), "--limit", "4", "--rounds", "2",
                                          "--max-new-tokens", "4", "--device", "cpu", "--out", str(out), *extra])
        with _pytest.raises(SystemExit) as exc:
            cli.main()
        monkeypatch.undo()
        assert exc.value.code == 0
        paths[scoring] = out
    return paths


def test_bbq_defaults_to_its_protocol_and_records_what_it_did(bbq_runs, model_dirs):
    with h5py.File(bbq_runs["letter"]) as f:
        protocol = json.loads(f.attrs["protocol"])
        assert protocol["name"] == "bbq-paper" and protocol["first_prefix"] == "The single most likely answer choice is"
        assert f.attrs["option_scoring"] == "letter"
        assert f.attrs["command_line"].startswith("workbench run --model") and "--task bbq" in f.attrs["command_line"]
        versions = json.loads(f.attrs["library_versions"])
        import torch
        import transformers

        assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__
        assert versions["transformers"] == transformers.__version__ and versions["transformer-lens"]
        weights = json.loads(f.attrs["weights_sha256"])
        expected = hashlib.sha256((model_dirs["llama"] / "model.safetensors").read_bytes()).hexdigest()
        assert weights == {"model.safetensors": expected}
        assert len(f.attrs["chat_template_sha256"]) == 64
        r = f["rounds"]
        gold = f["samples/gold"][...][:, None]
        parsed, option = r["parsed_answer"][...], r["option_answer"][...]
        assert (r["parsed_correct"][...] == ((parsed == gold) & (parsed >= 0))).all()
        assert (r["option_correct"][...] == (option == gold)).all()
        assert r["parsed_correct"].dtype == np.uint8 and r["option_correct"].shape == parsed.shape
    with h5py.File(bbq_runs["letter-text"]) as f:
        assert f.attrs["option_scoring"] == "letter-text"
        assert json.loads(f.attrs["protocol"])["option_scoring"] == "letter-text"


def test_letter_scoring_scores_only_the_letters(bbq_runs, loaded):
    """p̂ under letter scoring is the softmax of −NLL of " (a)", " (b)", " (c)" after the round-1
    prompt, recomputed here from the plain Hugging Face model."""
    import torch

    from workbench.store.reader import RunFile

    model = loaded("llama")
    with RunFile(bbq_runs["letter"]) as run, RunFile(bbq_runs["letter-text"]) as other:
        transcript = run.array("transcripts/token_ids")[0]
        end = int(run.array("rounds/prompt_span")[0, 0, 1])
        probs = run.array("rounds/option_probs")[0, 0]
        assert not np.allclose(probs, other.array("rounds/option_probs")[0, 0], atol=1e-4)
    prompt = torch.tensor(transcript[:end])[None]
    nll = []
    for letter in "abc":
        ids = model.tokenizer(f" ({letter})", add_special_tokens=False)["input_ids"]
        full = torch.cat([prompt, torch.tensor(ids)[None]], 1)
        with torch.no_grad():
            logp = torch.log_softmax(model.hf(full).logits[0, end - 1 : -1].float(), -1)
        nll.append(-logp[torch.arange(len(ids)), torch.tensor(ids)].mean())
    expected = torch.softmax(-torch.stack(nll), 0).numpy()
    assert np.allclose(probs, expected, atol=1e-4)


def test_run_protocol_accepts_a_model_name(tmp_path):
    from workbench import run_protocol

    with run_protocol(model="organism", task="organism", limit=4, rounds=3, out=tmp_path / "demo.h5") as run:
        assert run.meta["model_name"] == "organism" and run.done.all()
        assert run.meta["protocol"]["name"] == "organism"


def test_a_conversation_longer_than_the_context_is_refused(capsys, monkeypatch, tmp_path, model_dirs):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello there " * 1200}) + "\n")
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(model_dirs["llama"]), "--task", "prompts",
                             "--data", str(prompts), "--device", "cpu", "--out", str(tmp_path / "o.h5"))
    assert code == 2
    error_line(err, "context is 1024", "tokens")
    assert not (tmp_path / "o.h5").exists()


def test_ctrl_c_prints_how_to_resume(capsys, monkeypatch, tmp_path):
    from workbench.engine import batch as engine

    real = interrupt_at_batch(monkeypatch, 2)
    out = tmp_path / "run.h5"
    code, _, err = workbench(capsys, monkeypatch, "run", "--limit", "2", "--rounds", "2", "--batch-size", "1",
                             "--device", "cpu", "--out", str(out))
    assert code == 130
    assert "interrupted" in err and "--resume" in err and str(out) in err
    from workbench.store.reader import RunFile

    with RunFile(out) as run:  # a killed run is read from its committed parts
        assert run.done.tolist() == [True, False]
    monkeypatch.setattr(engine, "run_batch", real)
    resume = err.strip().splitlines()[-1].split()
    assert resume[0] == "workbench" and resume[-1] == "--resume"
    code, _, err = workbench(capsys, monkeypatch, *resume[1:])
    assert code == 0, err


def test_names_with_markup_print_literally(capsys, monkeypatch, tmp_path):
    from workbench import run_protocol

    odd = tmp_path / "[bold]x[/]"  # "[/]" holds a slash: a folder "[bold]x[" with "]" in it
    odd.mkdir(parents=True)
    run_protocol(model="organism", task="organism", limit=4, rounds=3, out=odd / "r[red].h5").close()
    code, out, err = workbench(capsys, monkeypatch, "info", str(odd / "r[red].h5"))
    assert code == 0, err
    assert "[bold]x[/]/r[red].h5" in out.replace("\n", "")


def test_final_layer_resid_post_is_before_the_final_norm(loaded):
    """What FORMAT.md and the README say: hook_resid_post of layer i equals HF hidden_states[i + 1]
    for every layer but the last, which HF takes after the final norm."""
    import torch

    model = loaded("llama")
    ids = model.tokenizer("the cat sat on the mat", return_tensors="pt")["input_ids"]
    _, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
    with torch.no_grad():
        hidden = model.hf(ids, output_hidden_states=True).hidden_states
    rel = [float((cache[f"blocks.{i}.hook_resid_post"] - hidden[i + 1]).norm() / hidden[i + 1].norm())
           for i in range(model.n_layers)]
    assert max(rel[:-1]) < 1e-4 and rel[-1] > 0.05, rel


def test_unknown_hook_lists_capturable_hooks_nearest_first(capsys, monkeypatch, tmp_path, model_dirs):
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(model_dirs["llama"]), "--task", "bbq",
                             "--data", str(BBQ_FIXTURE), "--hooks", "hook_resid_pots", "--device", "cpu",
                             "--out", str(tmp_path / "o.h5"))
    assert code == 2
    line = error_line(err, "hook_resid_pots", "nearest first")
    listed = line.split("nearest first: ", 1)[1].split(", ")
    assert listed[0] == "hook_resid_post" and "attn.hook_pattern" not in listed


# ----------------------------------------------------------------------------- organism train, probes


def test_organism_train_refuses_to_overwrite_a_checkpoint(capsys, monkeypatch, tmp_path):
    from workbench.organism import organism_path

    before = (organism_path() / "model.safetensors").stat().st_mtime_ns
    code, _, err = workbench(capsys, monkeypatch, "organism", "train", "--out", str(organism_path()), "--steps", "1")
    assert code == 2
    error_line(err, "already holds files", "shipped checkpoint", "--overwrite")
    assert (organism_path() / "model.safetensors").stat().st_mtime_ns == before
    (tmp_path / "a-file").write_text("x")
    code, _, err = workbench(capsys, monkeypatch, "organism", "train", "--out", str(tmp_path / "a-file"), "--steps", "1")
    assert code == 2
    error_line(err, "not a folder")


def test_probe_fit_inputs_checked_before_loading(capsys, monkeypatch, tmp_path, no_model):
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "yes", "label": 1}\n{"text": "no", "label": 0}\n{"text": "nope", "label": 0}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "yes", "label": 1}\n{"text": "  ", "label": 0}\n')
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"positive": "a", "negative": "b"}\n')
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["--batch-size", "0"], ("--batch-size",)),
        (["--n", "0"], ("--n",)),
        (["--contrast", str(small)], ("small", "cannot be split")),
        (["--contrast", str(empty)], ("empty.jsonl:2", "empty text")),
        (["--contrast", str(pairs), "--method", "pca"], ("1 pairs", "cannot be split")),
        (["--contrast", str(small), "--method", "ccs"], ("needs pairs",)),
        (["--out", str(tmp_path / "a-file" / "p.h5")], ("--out", "is a file")),
        (["--layers", ""], ("--layers",)),
    ]
    for extra, needles in cases:
        code, _, err = workbench(capsys, monkeypatch, "probe", "fit", *extra)
        assert code == 2, (extra, err)
        error_line(err, *needles)


def test_probe_show_names_a_tie_and_bad_probe_files_are_one_line(capsys, monkeypatch, tmp_path):
    good = write_probe(tmp_path / "[bold]good[/].h5")
    code, out, err = workbench(capsys, monkeypatch, "probe", "show", str(good))
    assert code == 0, err
    assert "[bold]good[/].h5" in out
    assert "best layer: 1 (a tie: layers 0, 1 have the same held-out accuracy; chosen by the larger margin" in " ".join(out.split())
    broken = {
        "best-missing": ({"best_layer": 7}, "best_layer 7 is not among"),
        "no-layers": ({"layers": None}, "missing layers"),
        "no-hook": ({"hook": None}, "missing hook"),
        "short-acc": ({"test_accuracy": np.ones(2)}, "test_accuracy must be [3]"),
    }
    for name, (changes, needle) in broken.items():
        path = write_probe(tmp_path / f"{name}.h5", **changes)
        code, _, err = workbench(capsys, monkeypatch, "probe", "show", str(path))
        assert code == 2
        error_line(err, f"{name}.h5", needle)
    with h5py.File(tmp_path / "no-hook.h5", "a") as f:
        f.attrs["hook"] = "hook_resid_post"
        f.attrs["contrast"] = "{not json"
    code, _, err = workbench(capsys, monkeypatch, "probe", "show", str(tmp_path / "no-hook.h5"))
    assert code == 2
    error_line(err, "contrast", "not valid JSON")


def test_probe_track_refuses_bad_names_before_writing(capsys, monkeypatch, tmp_path):
    from workbench import run_protocol

    run_path = tmp_path / "run.h5"
    run_protocol(model="organism", task="organism", limit=4, rounds=3, out=run_path).close()
    before = run_path.read_bytes()
    probe = write_probe(tmp_path / "p.h5")
    for name in ("a/b", ".", "[bold]"):
        code, _, err = workbench(capsys, monkeypatch, "probe", "track", str(run_path), str(probe), "--name", name)
        assert code == 2
        error_line(err, "--name")
    assert run_path.read_bytes() == before
    code, _, _ = workbench(capsys, monkeypatch, "info", str(run_path))
    assert code == 0


def test_best_layer_tie_break():
    from probes.evaluate import best_layer
    from probes.probe_file import tie_break

    acc, auc = np.array([0.9, 0.9, 0.9]), np.array([0.95, 0.97, 0.97])
    assert best_layer(acc, auc, np.array([3.0, 1.0, 2.0])) == 2
    assert tie_break(acc, auc, np.array([3.0, 1.0, 2.0]), 2) == "margin"
    assert best_layer(acc, np.array([0.9, 0.99, 0.9]), np.zeros(3)) == 1
    assert tie_break(acc, np.array([0.9, 0.99, 0.9]), np.zeros(3), 1) == "auroc"
    assert best_layer(np.array([0.5, 0.9]), np.array([1.0, 0.5])) == 1
    assert tie_break(np.array([0.5, 0.9]), np.array([1.0, 0.5]), None, 1) == ""
    assert tie_break(acc, np.ones(3), np.ones(3), 0) == "index"


def test_weight_hashes_are_read_once_but_follow_a_changed_file(tmp_path):
    """The weights' sha256 is cached per process (Session.save records it each time), keyed by the
    file's size and modification time: a file written again is hashed again."""
    import os

    from workbench.engine.models import weight_hashes

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"first weights")
    first = weight_hashes(str(tmp_path))
    assert first == {"model.safetensors": hashlib.sha256(b"first weights").hexdigest()}
    assert weight_hashes(str(tmp_path)) == first
    weights.write_bytes(b"other weights")  # same size
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert weight_hashes(str(tmp_path)) == {"model.safetensors": hashlib.sha256(b"other weights").hexdigest()}
