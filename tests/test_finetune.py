"""`workbench finetune` and `--adapter`: LoRA through peft on the organism, the adapter in peft's own
format, a run with --adapter equal to a run of the merged model, bad inputs in one line, a killed
fine-tune that leaves nothing complete-looking."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_support import error_line, kill_at_line, workbench

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "<bos> <user> a zorvan person and a kelpish person were at the market . who stole the bread ? (a) zorvan (b) unknown (c) kelpish <eot> <assistant>"


def write_chat(path: Path, n: int = 24, seed: int = 11) -> Path:
    """``n`` one-round organism dialogues as chat records."""
    from workbench.organism.world import heldout_rng, sample_dialogue

    rows = [{"messages": sample_dialogue(heldout_rng(seed, i), n_rounds=1).messages()} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A LoRA fine-tune of the organism on 24 of its own dialogues: (adapter folder, record, data)."""
    from workbench.analysis.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("finetune")
    data = write_chat(root / "chat.jsonl")
    cfg = FinetuneConfig(data=data, out=root / "adapter", rank=4, epochs=3, lr=1e-2, batch_size=8, seed=0, device="cpu")
    return root / "adapter", finetune(cfg), data


def logits_of(hf, tokenizer, text: str = PROMPT):
    import torch

    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        return hf(ids).logits[0].float()


def test_lora_lowers_the_loss_on_its_data_and_changes_the_outputs(tuned, organism):
    from workbench.analysis.finetune import mean_loss, read_records, tokenize
    from workbench.engine.adapter import apply_adapter
    from workbench.engine.models import load_model

    adapter, record, data = tuned
    assert record["steps"] == 9 and record["data"]["kind"] == "chat" and record["data"]["n_examples"] == 24
    assert record["loss_after"] < record["loss_before"] - 0.02, record
    curve = json.loads((adapter / "loss.json").read_text())
    assert len(curve["loss"]) == 9 and curve["epoch"][-1] == 3 and (adapter / "loss.png").stat().st_size > 1000
    # the loss on the assistant turns only: the labels are the answers' tokens and <eot>
    examples, _ = tokenize(read_records(data), organism.tokenizer, 1024)
    trained = [organism.tokenizer.convert_ids_to_tokens(y) for y in examples[0].labels if y != -100]
    assert trained[-1] == "<eot>" and "the" in trained and "<user>" not in trained and "<assistant>" not in trained
    adapted = apply_adapter(load_model("organism", device="cpu"), adapter)
    assert mean_loss(adapted.hf, examples, organism.tokenizer.pad_token_id) == pytest.approx(record["loss_after"], rel=1e-4)
    assert mean_loss(organism.hf, examples, organism.tokenizer.pad_token_id) == pytest.approx(record["loss_before"], rel=1e-4)
    diff = (logits_of(adapted.hf, adapted.tokenizer) - logits_of(organism.hf, organism.tokenizer)).abs().max()
    assert diff > 0.05
    assert adapted.metadata()["adapter"]["sha256"] == record_sha(adapter)


def record_sha(adapter: Path) -> str:
    import hashlib

    return hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_the_adapter_loads_through_plain_peft_with_the_same_logits(tuned):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from workbench.engine.adapter import apply_adapter
    from workbench.engine.models import load_model
    from workbench.organism import organism_path

    adapter = tuned[0]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(organism_path(), dtype=torch.float32), adapter).eval()
    ours = apply_adapter(load_model("organism", device="cpu"), adapter)
    want = logits_of(plain, ours.tokenizer)
    assert (logits_of(ours.hf, ours.tokenizer) - want).abs().max() < 1e-4
    ids = torch.tensor([ours.tokenizer(PROMPT, add_special_tokens=False).input_ids])
    with torch.no_grad():  # the TransformerLens bridge shares the merged weights, under the base model's hook names
        assert (ours.bridge(ids)[0].float() - want).abs().max() < 1e-4


def test_a_run_with_the_adapter_equals_a_run_of_the_merged_model(tuned, tmp_path, capsys, monkeypatch):
    from workbench.store.reader import RunFile

    adapter, _, data = tuned
    merged = tmp_path / "merged"
    code, _, err = workbench(capsys, monkeypatch, "finetune", "--data", str(data), "--out", str(merged), "--rank", "4", "--epochs", "3",
                             "--lr", "1e-2", "--batch-size", "8", "--seed", "0", "--device", "cpu", "--merge")
    assert code == 0, err
    assert (merged / "model.safetensors").is_file() and (merged / "organism.json").is_file() and not (merged / "adapter_config.json").exists()
    common = ("run", "--limit", "4", "--rounds", "2", "--batch-size", "4", "--device", "cpu", "--no-fsync")
    code, summary, err = workbench(capsys, monkeypatch, *common, "--adapter", str(adapter), "--out", str(tmp_path / "a.h5"))
    assert code == 0, err
    assert f"adapter={adapter.resolve()}" in summary  # the summary names it
    code, _, err = workbench(capsys, monkeypatch, *common, "--model", str(merged), "--out", str(tmp_path / "m.h5"))
    assert code == 0, err
    code, _, err = workbench(capsys, monkeypatch, *common, "--out", str(tmp_path / "base.h5"))
    assert code == 0, err
    with RunFile(tmp_path / "a.h5") as a, RunFile(tmp_path / "m.h5") as m, RunFile(tmp_path / "base.h5") as b:
        assert json.loads(a.f.attrs["adapter"])["sha256"] == record_sha(adapter)
        assert json.loads(m.f.attrs["adapter"]) == {}
        for name in ("tokens/response_token_ids", "transcripts/token_ids"):
            assert [list(x) for x in np.ravel(a.array(name))] == [list(x) for x in np.ravel(m.array(name))]
        np.testing.assert_allclose(a.array("rounds/option_probs"), m.array("rounds/option_probs"), atol=1e-5)
        assert np.abs(a.array("rounds/option_probs") - b.array("rounds/option_probs")).max() > 1e-3  # the adapter matters
    # export recomputes the adapter run's activations with its recorded adapter: equal to the merged model's
    import h5py

    for name in ("a", "m"):
        code, _, err = workbench(capsys, monkeypatch, "export", str(tmp_path / f"{name}.h5"), "--hooks", "blocks.1.hook_resid_post",
                                 "--device", "cpu", "--out", str(tmp_path / f"{name}-cache.h5"))
        assert code == 0, err
    with h5py.File(tmp_path / "a-cache.h5") as ca, h5py.File(tmp_path / "m-cache.h5") as cm:
        key = "activations/blocks.1.hook_resid_post"
        np.testing.assert_allclose(ca[key][...], cm[key][...], atol=1e-4)
    # a probe fitted on the adapted model records the adapter
    code, _, err = workbench(capsys, monkeypatch, "probe", "fit", "--n", "120", "--layers", "1", "--device", "cpu", "--adapter", str(adapter),
                             "--out", str(tmp_path / "probe.h5"))
    assert code == 0, err
    with h5py.File(tmp_path / "probe.h5") as f:
        assert f.attrs["adapter_sha256"] == record_sha(adapter)
    # --resume refuses another adapter (and none), in one line
    code, _, err = workbench(capsys, monkeypatch, *common, "--out", str(tmp_path / "a.h5"), "--resume")
    assert code != 0
    error_line(err, "--resume", "no adapter")


def test_bad_inputs_are_one_line_before_training(tuned, tmp_path, capsys, monkeypatch, model_dirs):
    adapter, _, data = tuned
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "the answer is a"}\n{"body": "no text here"}\n', encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    out = str(tmp_path / "out")
    cases = [
        (("--data", str(text)), (f"{text}:2", "'text'")),
        (("--data", str(text), "--text-field", "body"), (f"{text}:1", "'body'")),
        (("--data", str(empty)), ("no records",)),
        (("--data", str(data), "--method", "dora"), ("--method", "dora")),
        (("--data", str(data), "--rank", "0"), ("--rank",)),
        (("--data", str(tmp_path / "missing.jsonl")), ("not found",)),
    ]
    for args, needles in cases:
        code, _, err = workbench(capsys, monkeypatch, "finetune", "--out", out, "--device", "cpu", *args)
        assert code != 0 and not (tmp_path / "out").exists(), (args, err)
        error_line(err, *needles)
    # an adapter for another model: before the model loads (finetune.json names its base's shape) …
    llama = model_dirs["llama"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello world"}\n', encoding="utf-8")
    run = ("run", "--task", "prompts", "--data", str(prompts), "--limit", "1", "--device", "cpu")
    code, _, err = workbench(capsys, monkeypatch, *run, "--model", str(llama), "--adapter", str(adapter), "--out", str(tmp_path / "x.h5"))
    assert code != 0 and not (tmp_path / "x.h5").exists()
    error_line(err, "--adapter", "another model", "num_hidden_layers 4")
    # … and, without that record, after it loads: a module it lacks, or another width
    bare = tmp_path / "bare"
    shutil.copytree(adapter, bare)
    (bare / "finetune.json").unlink()
    code, _, err = workbench(capsys, monkeypatch, *run, "--model", str(llama), "--adapter", str(bare), "--out", str(tmp_path / "x.h5"))
    error_line(err, "another model", "layers.3")
    from workbench.analysis.finetune import FinetuneConfig, finetune

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("the answer is a", "hello world", "the answer is b")))
    small = tmp_path / "small"
    finetune(FinetuneConfig(data=corpus, out=small, model=str(llama), rank=2, epochs=1, batch_size=3, device="cpu"))
    (small / "finetune.json").unlink()
    code, _, err = workbench(capsys, monkeypatch, "run", "--limit", "2", "--device", "cpu", "--adapter", str(small), "--out", str(tmp_path / "y.h5"))
    error_line(err, "another width", "v_proj")
    code, _, err = workbench(capsys, monkeypatch, "run", "--limit", "2", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "y.h5"))
    error_line(err, "--adapter", "no such folder")
    for command in (("tui", "--live"), ("probe", "fit")):
        code, _, err = workbench(capsys, monkeypatch, *command, "--adapter", str(llama), "--out" if command[0] == "probe" else "--device",
                                 str(tmp_path / "p.h5") if command[0] == "probe" else "cpu")
        assert code != 0
        error_line(err, "--adapter", "a model folder, not an adapter")


@pytest.mark.slow
def test_a_killed_finetune_leaves_no_adapter_that_looks_complete(tmp_path):
    from peft import PeftModel  # noqa: F401

    data = write_chat(tmp_path / "chat.jsonl", n=16)
    out = tmp_path / "adapter"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "workbench", "finetune", "--data", str(data), "--out", str(out), "--epochs", "500",
           "--batch-size", "4", "--device", "cpu"]
    kill_at_line(cmd, "step ", env=env)  # a plain line at every tenth of the steps: training has started
    assert not out.exists()
    assert all(p.name.startswith(".adapter.partial-") for p in tmp_path.iterdir() if p.name.startswith(".adapter"))
    # a later fine-tune to the same folder completes, and clears what the killed one left
    done = subprocess.run([*cmd[:-6], "--epochs", "1", "--batch-size", "16", "--device", "cpu"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "adapter_config.json").is_file() and not list(tmp_path.glob(".adapter.partial-*"))
