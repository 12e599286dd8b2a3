"""Vision-language models (LLaVA, LLaVA-NeXT, Gemma3) on tiny random models built here with their processors:
the image in round 1's prefill only and the cache carried after it, against a full recompute with
the image and against Hugging Face's own hidden states; the image position; the checks that refuse
bad inputs in one line before a model loads; TransformerLens never installing torchvision."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_support import error_line, kill_at_line, workbench
from tiny_models import build_model, build_vlm, write_images

from workbench.engine.capture import hook_sites
from workbench.engine.protocol import load_protocol
from workbench.engine.session import Session
from workbench.engine.tasks import VQA, load_vqa
from workbench.errors import WorkbenchError

FAMILIES = ("llava", "gemma3", "llava_next")
ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What colour is the square?", "Which colour fills the middle of the picture, would you say?", "Colour?"]


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm")
    return {arch: build_vlm(arch, root / arch) for arch in FAMILIES}


@pytest.fixture(scope="module")
def vlm(vlm_dirs):
    from workbench.engine.models import load_model

    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load_model(str(vlm_dirs[arch]), device="cpu", dtype="float32")
        return cache[arch]

    return get


def write_items(folder: Path, n: int = 3, open_ended: bool = False) -> Path:
    """``folder/items.jsonl`` with ``n`` questions about the pictures in ``folder/imgs/`` (relative paths)."""
    write_images(folder / "imgs", n)
    lines = []
    for i in range(n):
        row = {"image": f"imgs/{i:03d}.png", "question": QUESTIONS[i % 3], "id": f"q{i}"}
        if not open_ended:
            row.update(options=["red", "green", "blue"], label=i % 3)
        lines.append(json.dumps(row))
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "items.jsonl"


def protocol(rounds=3, max_new_tokens=4, name="vqa-moral"):
    p = load_protocol(name)
    return dataclasses.replace(p, rounds=rounds, decoding=dataclasses.replace(p.decoding, max_new_tokens=max_new_tokens))


def session(model, samples, reuse=True, rounds=3, max_new_tokens=4):
    s = Session(model, VQA, protocol(rounds, max_new_tokens), samples, reuse_cache=reuse, strict=True,
                sites=hook_sites(model, ["hook_resid_post"], list(range(model.n_layers))))
    for _ in range(rounds):
        s.step()
    return s


@pytest.mark.parametrize("arch", FAMILIES)
def test_carried_rounds_equal_a_full_recompute_with_the_image(arch, vlm, tmp_path):
    """Three rounds, three rows whose questions differ in length: with the cache carried (no pixel
    values after round 1) the same greedy tokens, and option probabilities and activations within
    1e-4 of re-running each round's whole conversation with the image; the vision tower runs once
    per batch, not once per round."""
    model = vlm(arch)
    items = write_items(tmp_path)
    if arch == "llava_next":  # any resolution: a wide picture gets other tiles, so rows differ in image tokens
        from PIL import Image

        Image.new("RGB", (60, 30), (200, 40, 40)).save(tmp_path / "imgs" / "001.png")
    samples = load_vqa(items)
    calls = []
    tower = model.hf.model.vision_tower
    handle = tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        kept = session(model, samples, reuse=True)
        n_kept = len(calls)
        again = session(model, samples, reuse=False)
    finally:
        handle.remove()
    assert n_kept == 1 and len(calls) - n_kept == 3  # once for the batch; re-running: once per round
    assert [r.reused_cache for r in kept.rounds] == [False, True, True]
    # round 1's processor call pads its batch; later rounds' texts must not come back padded
    pad = model.tokenizer.pad_token_id
    assert all(pad not in row for s in (kept, again) for row in s.transcripts)
    if arch == "llava_next":
        counts = [sum(t == model.image_token_id for t in row) for row in kept.transcripts]
        assert counts[0] != counts[1]
    a, b = kept.result(), again.result()
    assert a.response_ids == b.response_ids
    assert any(len(set(map(tuple, row))) > 1 or row[0] for row in a.response_ids)  # not all empty
    np.testing.assert_allclose(a.option_probs, b.option_probs, atol=1e-4)
    scale = np.abs(b.activations["hook_resid_post"]).max()
    np.testing.assert_allclose(a.activations["hook_resid_post"], b.activations["hook_resid_post"], atol=1e-4 * scale)
    np.testing.assert_allclose(a.round_fields["image_hook_resid_post"], b.round_fields["image_hook_resid_post"], atol=1e-4 * scale)


@pytest.mark.parametrize("arch", FAMILIES)
def test_capture_equals_hugging_face_hidden_states(arch, vlm, tmp_path):
    """One conversation of three rounds: the captured residuals equal a plain cache-free Hugging Face
    forward over the final transcript with the image (``output_hidden_states``; the last layer before
    the final norm, as for text) at the last prompt token and over each response; the image position
    pools exactly the image tokens; and each greedy response is the forward's argmax (Gemma3's
    sliding-window layers, here narrower than the conversation, included)."""
    model = vlm(arch)
    sample = load_vqa(write_items(tmp_path, 1))
    s = session(model, sample, rounds=3, max_new_tokens=5)
    res = s.result()
    ids = torch.tensor([res.transcripts[0]])
    from PIL import Image

    enc = model.processor.image_processor([Image.open(sample[0].image).convert("RGB")], return_tensors="pt")
    image_tok = ids == model.image_token_id
    assert int(image_tok.sum()) == (24 if arch == "llava_next" else 4)  # 4 patches; LLaVA-NeXT: a base view and 2 × 2 tiles
    kwargs = {k: v for k, v in enc.items() if k in ("pixel_values", "image_sizes")}
    if arch == "gemma3":
        kwargs["token_type_ids"] = image_tok.long()
        assert ids.shape[1] > model.hf.config.text_config.sliding_window
    last_layer = []
    layers = model.hf.model.language_model.layers
    h = layers[-1].register_forward_hook(lambda m, i, o: last_layer.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            out = model.hf(input_ids=ids, output_hidden_states=True, use_cache=False, **kwargs)
    finally:
        h.remove()
    hidden = torch.stack([*out.hidden_states[1:-1], last_layer[0]], 2)[0].numpy()  # [pos, L, d]
    acts = res.activations["hook_resid_post"][0]  # [R, 2, L, d]
    scale = np.abs(hidden).max()
    for t in range(3):
        p0, p1 = res.prompt_spans[0, t]
        r0, r1 = res.response_spans[0, t]
        np.testing.assert_allclose(acts[t, 0], hidden[p1 - 1], atol=1e-4 * scale, err_msg=f"round {t + 1} last prompt")
        if r1 > r0:
            np.testing.assert_allclose(acts[t, 1], hidden[r0:r1].mean(0), atol=1e-4 * scale, err_msg=f"round {t + 1} response")
            argmax = out.logits[0, r0 - 1 : r1 - 1].argmax(-1).tolist()
            assert argmax == res.response_ids[0][t], f"round {t + 1}"
        np.testing.assert_allclose(res.round_fields["image_hook_resid_post"][0, t], hidden[image_tok[0].numpy()].mean(0),
                                   atol=1e-4 * scale)


def test_the_image_goes_in_the_first_user_turn_through_the_processor(vlm, tmp_path):
    """Round 1's tokens are the processor's for the chat template's first turn with the image
    (``[{"type": "image"}, {"type": "text", ...}]``), the image tokens expanded; later rounds are text."""
    model = vlm("llava")
    sample = load_vqa(write_items(tmp_path, 1))
    s = session(model, sample, rounds=2, max_new_tokens=3)
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.rounds[0].instructions[0]}]}]
    text = model.processor.apply_chat_template(messages, add_generation_prompt=True)
    want = model.processor(text=[text], images=[[Image.open(sample[0].image).convert("RGB")]], add_special_tokens=False)["input_ids"][0]
    got = s.transcripts[0][: len(want)]
    assert list(want) == got
    start, stop = s.rounds[1].prompt_spans[0]
    assert model.image_token_id not in s.transcripts[0][start:stop]


def test_samples_keep_their_image_path_hash_and_thumbnail(tmp_path):
    samples = load_vqa(write_items(tmp_path, 2))
    record = samples[1].extra["image"]
    png = (tmp_path / "imgs" / "001.png").read_bytes()
    assert record["given"] == "imgs/001.png" and Path(record["path"]) == tmp_path / "imgs" / "001.png"
    assert record["sha256"] == hashlib.sha256(png).hexdigest()
    from PIL import Image

    thumb = Image.open(io.BytesIO(base64.b64decode(record["thumbnail_png"])))
    assert thumb.format == "PNG" and max(thumb.size) <= 48 and (record["width"], record["height"]) == (40, 40)
    assert samples[1].image == str(tmp_path / "imgs" / "001.png") and samples[1].options == ("red", "green", "blue")


@pytest.mark.parametrize("damage", ["missing", "not-an-image", "truncated", "folder"])
def test_a_bad_image_is_one_line_before_the_model_loads(damage, tmp_path, capsys, monkeypatch, vlm_dirs):
    items = write_items(tmp_path, 2)
    bad = tmp_path / "imgs" / "001.png"
    if damage == "missing":
        bad.unlink()
    elif damage == "not-an-image":
        bad.write_text("hello, not a picture\n")
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        bad.unlink()
        bad.mkdir()
    import workbench.engine.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before the data was checked"))
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(vlm_dirs["llava"]), "--task", "vqa",
                             "--data", str(items), "--out", str(tmp_path / "run.h5"))
    assert code != 0
    error_line(err, "items.jsonl:2", "001.png")
    assert not (tmp_path / "run.h5").exists()


def test_a_text_only_model_is_refused_for_vqa(tmp_path, capsys, monkeypatch):
    text_model = build_model("llama", tmp_path / "llama")
    items = write_items(tmp_path, 1)
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(text_model), "--task", "vqa",
                             "--data", str(items), "--out", str(tmp_path / "run.h5"))
    assert code != 0
    error_line(err, "--task vqa", "text-only", "LLaVA (llava), LLaVA-NeXT (llava_next), Gemma3 (gemma3)")


def test_a_text_only_loaded_model_is_refused_by_a_session(loaded, tmp_path):
    with pytest.raises(WorkbenchError, match="text-only"):
        Session(loaded("llama"), VQA, protocol(), load_vqa(write_items(tmp_path, 1)))


def test_an_unsupported_vision_family_is_refused_in_one_line(vlm_dirs, tmp_path, capsys, monkeypatch):
    import shutil

    folder = tmp_path / "paligemma"
    shutil.copytree(vlm_dirs["gemma3"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "paligemma"
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(folder), "--task", "vqa",
                             "--data", str(write_items(tmp_path, 1)), "--out", str(tmp_path / "run.h5"))
    assert code != 0
    error_line(err, "PaliGemma", "supported: LLaVA (llava), LLaVA-NeXT (llava_next), Gemma3 (gemma3)")


def test_transformer_lens_never_installs_torchvision(monkeypatch):
    """TransformerLens's own fallback (``_ensure_torchvision``: ``pip install torchvision`` when a
    processor fails to load during a boot) runs no installer inside :func:`no_package_installs`,
    and is itself again afterwards."""
    from transformer_lens.model_bridge.sources.transformers import helpers

    from workbench.engine.models import no_package_installs

    ran = []
    monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: ran.append(a))
    original = helpers._ensure_torchvision

    class Bridge:
        processor = None

    class Cfg:
        is_multimodal = True
        is_audio_model = False

    with no_package_installs():
        assert os.environ["PIP_NO_INDEX"] == "1"
        for flag, _ in helpers._MODALITY_PROCESSOR_LOADERS:
            setattr(Cfg, flag, True)
        helpers.load_modality_processor(Bridge(), Cfg(), "/nonexistent/model/folder", False, None)
    assert ran == [] and Bridge.processor is None
    assert helpers._ensure_torchvision is original
    with pytest.raises(ImportError):
        import torchvision  # noqa: F401  (and it must stay so: it would replace the pinned torch)


def test_vqa_run_through_the_command_line(vlm_dirs, tmp_path, capsys, monkeypatch):
    """``workbench run --task vqa``: the image position beside the two text ones, and each sample's
    image record in the run file; ``--task vqa-open`` with a scorer."""
    from workbench.store.reader import RunFile

    items = write_items(tmp_path, 2)
    out = tmp_path / "vqa.h5"
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(vlm_dirs["llava"]), "--task", "vqa", "--data", str(items),
                             "--rounds", "2", "--max-new-tokens", "3", "--out", str(out))
    assert code == 0, err
    with RunFile(out) as run:
        assert run.f["rounds/image_hook_resid_post"].shape == (2, 2, 3, 64)
        extra = json.loads(run.array("samples/extra")[1])
        assert extra["image"]["given"] == "imgs/001.png" and len(extra["image"]["sha256"]) == 64
        assert run.meta["vision"]["family"] == "LLaVA" and run.meta["task"] == "vqa"
    code, _, err = workbench(capsys, monkeypatch, "report", str(out), "--out", str(tmp_path / "report"))
    assert code == 0, err
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and extra["image"]["thumbnail_png"] in page and "q1 r1" in page
    (tmp_path / "scorer_mod.py").write_text("def score(texts):\n    return [float(len(t)) for t in texts]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    open_items = write_items(tmp_path / "open", 2, open_ended=True)
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(vlm_dirs["gemma3"]), "--task", "vqa-open",
                             "--data", str(open_items), "--rounds", "2", "--max-new-tokens", "3",
                             "--scorer", "python:scorer_mod:score", "--out", str(tmp_path / "open.h5"))
    assert code == 0, err
    with RunFile(tmp_path / "open.h5") as run:
        responses = run.array("rounds/response")
        np.testing.assert_array_equal(run.array("rounds/score"), [[len(r) for r in row] for row in responses])


def test_export_image_rows_equal_a_plain_forward(vlm, tmp_path, capsys, monkeypatch):
    """``workbench export --roles image,prompt,response`` of a VLM run: the image tokens labelled
    ``image``, and their rows (like every exported row) equal a plain Hugging Face forward over the
    transcript with the picture; a changed picture is one line."""
    import h5py
    from PIL import Image

    from workbench.cache.file import ROLES
    from workbench.engine.run import run_protocol

    model = vlm("llava")
    items = write_items(tmp_path, 2)
    run = tmp_path / "vqa.h5"
    run_protocol(model=model, out=str(run), task="vqa", data=(str(items),), rounds=2, max_new_tokens=3, batch_size=2)
    monkeypatch.setattr("workbench.engine.models.load_model", lambda *a, **k: model)
    cache = tmp_path / "cache.h5"
    code, _, err = workbench(capsys, monkeypatch, "export", str(run), "--hooks", "blocks.*.hook_resid_post",
                             "--roles", "image,prompt,response", "--out", str(cache))
    assert code == 0, err
    with h5py.File(cache, "r") as f:
        role, position = f["tokens/role"][...], f["tokens/position"][...]
        offsets = f["tokens/offsets"][...]
        acts = f["activations/blocks.1.hook_resid_post"][...]
    with RunFileOpen(run) as r:
        transcripts = r.array("transcripts/token_ids")
    for i in range(2):
        rows = slice(offsets[i], offsets[i + 1])
        ids = torch.tensor([list(transcripts[i])])
        image_at = np.flatnonzero(ids[0].numpy() == model.image_token_id)
        assert sorted(position[rows][role[rows] == ROLES.index("image")]) == list(image_at)
        picture = Image.open(tmp_path / "imgs" / f"{i:03d}.png").convert("RGB")
        pixels = model.processor.image_processor([picture], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hidden = model.hf(input_ids=ids, pixel_values=pixels, output_hidden_states=True).hidden_states[2][0].numpy()
        np.testing.assert_allclose(acts[rows], hidden[position[rows]], atol=1e-4 * np.abs(hidden).max())
    write_images(tmp_path / "other", 3)
    (tmp_path / "other" / "001.png").replace(tmp_path / "imgs" / "000.png")  # another picture under the run's name
    code, _, err = workbench(capsys, monkeypatch, "export", str(run), "--hooks", "blocks.*.hook_resid_post",
                             "--out", str(tmp_path / "again.h5"))
    assert code != 0
    error_line(err, "000.png", "changed since the run")


def RunFileOpen(path):
    from workbench.store.reader import RunFile

    return RunFile(path)


@pytest.mark.slow
def test_resume_after_sigkill_is_identical(vlm, vlm_dirs, tmp_path):
    """A VLM run killed (SIGKILL) after its first batch and continued with ``--resume`` equals an
    uninterrupted run, every array and activation bit for bit (the image tokens of the batches
    still to run enter their round 1 again)."""
    import h5py

    from workbench.engine.run import run_protocol

    items = write_items(tmp_path, 3)
    args = ["--model", str(vlm_dirs["gemma3"]), "--task", "vqa", "--data", str(items), "--rounds", "2",
            "--max-new-tokens", "3", "--batch-size", "1", "--device", "cpu"]
    reference = tmp_path / "reference.h5"
    run_protocol(model=vlm("gemma3"), out=str(reference), task="vqa", data=(str(items),), rounds=2, max_new_tokens=3, batch_size=1)
    out = tmp_path / "killed.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = kill_at_line([sys.executable, "-m", "workbench", "run", *args, "--out", str(out)], "batch done: 1/", cwd=ROOT, env=env)
    assert proc.returncode == -signal.SIGKILL and not out.exists()  # killed before the last batch: no run file yet
    done = subprocess.run([sys.executable, "-m", "workbench", "run", *args, "--out", str(out), "--resume"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr

    def arrays(path):
        found = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: found.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
        return found

    a, b = arrays(out), arrays(reference)
    assert set(a) == set(b) and "rounds/image_hook_resid_post" in a
    for name in a:
        if a[name].dtype == object:  # strings, or ragged rows of numbers
            assert all(np.array_equal(x, y) for x, y in zip(a[name].reshape(-1), b[name].reshape(-1))), name
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_vision_hooks_are_listed_and_exported_per_patch(vlm, tmp_path, capsys, monkeypatch):
    """``--list-hooks`` names the vision tower's and projector's hooks; exporting one writes one row
    per image patch equal to Hugging Face's vision tower; mixing them with language hooks, or hooks
    with other patch counts, is one line."""
    import h5py
    from PIL import Image

    from workbench.engine.run import run_protocol

    model = vlm("llava")
    items = write_items(tmp_path, 3)
    run = tmp_path / "vqa.h5"
    run_protocol(model=model, out=str(run), task="vqa", data=(str(items),), rounds=1, max_new_tokens=2, batch_size=3)
    monkeypatch.setattr("workbench.engine.models.load_model", lambda *a, **k: model)
    code, out, err = workbench(capsys, monkeypatch, "export", str(run), "--list-hooks")
    assert code == 0, err
    listed = dict(line.split("  ", 1) for line in out.splitlines())
    assert listed["vision_encoder.encoder_layers.1.hook_resid_post"].startswith("[32]")
    assert "vision_projector.hook_out" in listed and "blocks.0.hook_resid_post" in listed
    cache = tmp_path / "vision.h5"
    code, _, err = workbench(capsys, monkeypatch, "export", str(run), "--hooks", "vision_encoder.encoder_layers.*.hook_resid_post",
                             "--roles", "image", "--batch-size", "2", "--out", str(cache))
    assert code == 0, err
    pictures = [Image.open(tmp_path / "imgs" / f"{i:03d}.png").convert("RGB") for i in range(3)]
    pixels = model.processor.image_processor(pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model.hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    with h5py.File(cache, "r") as f:
        assert list(f["tokens/position"][:6]) == [0, 1, 2, 3, 4, 0] and set(f["tokens/role"][...]) == {4}
        for layer in (0, 1):
            got = f[f"activations/vision_encoder.encoder_layers.{layer}.hook_resid_post"][...]
            np.testing.assert_allclose(got, hidden[layer + 1].reshape(-1, 32).numpy(), atol=1e-5)
    for hooks, needle in (("vision_projector.hook_out,blocks.0.hook_resid_post", "export them separately"),
                          ("vision_projector.hook_out,vision_encoder.hook_vision_embed", "rows per image")):
        code, _, err = workbench(capsys, monkeypatch, "export", str(run), "--hooks", hooks, "--roles", "image",
                                 "--out", str(tmp_path / "no.h5"))
        assert code != 0
        error_line(err, needle)


def test_probe_fit_on_contrast_lines_with_pictures(vlm, tmp_path, capsys, monkeypatch):
    """``workbench probe fit`` on pairs that carry a picture: each text is one user message with
    the picture before it, and its activation is Hugging Face's hidden state at its last token
    with the picture; a text-only model given such lines is refused in one line."""
    import h5py
    from PIL import Image

    from probes.activations import text_activations
    from probes.contrast import load_contrast

    model = vlm("llava")
    write_images(tmp_path / "imgs", 4)
    lines = [{"image": f"imgs/{i:03d}.png", "positive": f"the fair answer {i}", "negative": f"the biased answer {i}"} for i in range(4)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    data = load_contrast(str(pairs), model.tokenizer, paired=True, fmt="chat", processor=model.processor)
    assert data.images[0] == data.images[1] == str(tmp_path / "imgs" / "000.png")
    assert sum(t == model.image_token_id for t in data.token_ids[2]) == 4
    acts = text_activations(model, data.token_ids, "hook_resid_post", [0, 1], "last", batch_size=3, images=data.images)
    for i in (0, 5):
        picture = Image.open(data.images[i]).convert("RGB")
        pixels = model.processor.image_processor([picture], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hidden = model.hf(input_ids=torch.tensor([data.token_ids[i]]), pixel_values=pixels, output_hidden_states=True).hidden_states
        np.testing.assert_allclose(acts[:, i].numpy(), torch.stack([hidden[1][0, -1], hidden[2][0, -1]]).numpy(), atol=1e-5)
    monkeypatch.setattr("probes.cli.load_model_showing_steps", lambda *a, **k: model)
    out = tmp_path / "probe.h5"
    code, _, err = workbench(capsys, monkeypatch, "probe", "fit", "--contrast", str(pairs), "--format", "chat",
                             "--model", "llava", "--test-fraction", "0.5", "--out", str(out))
    assert code == 0, err
    with h5py.File(out, "r") as f:
        assert f["directions"].shape == (3, 64)
    with pytest.raises(WorkbenchError, match="text-only"):
        load_contrast(str(pairs), model.tokenizer, paired=True, fmt="chat", processor=None)


def test_a_session_from_python_with_a_picture(vlm, tmp_path):
    """``Session(model, task="vqa", samples=[Sample(..., image="cat.png")])``: the task's own protocol,
    the picture checked and recorded, ``save`` keeps its record; a missing picture is one line."""
    from workbench.engine.task import Sample
    from workbench.store.reader import RunFile

    (picture,) = write_images(tmp_path, 1)
    sample = Sample(index=0, id="cat", context="", question="What colour is it?", options=("red", "blue"), gold=0,
                    image=str(picture))
    s = Session(vlm("llava"), task="vqa", samples=[sample])
    assert s.protocol.name == "vqa-moral"
    s.step()
    s.save(tmp_path / "live.h5")
    with RunFile(tmp_path / "live.h5") as run:
        record = json.loads(run.array("samples/extra")[0])["image"]
        assert record["sha256"] == hashlib.sha256(picture.read_bytes()).hexdigest()
        assert run.array("rounds/image_hook_resid_post").shape == (1, 1, 3, 64)
    with pytest.raises(WorkbenchError, match="image not found"):
        Session(vlm("llava"), task="vqa", samples=[dataclasses.replace(sample, image=str(tmp_path / "gone.png"))])


def test_a_picture_over_the_pixel_limit_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    import workbench.engine.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 40 * 40 - 1)  # the test pictures are 40 × 40
    with pytest.raises(WorkbenchError, match=r"items.jsonl:1: .*000.png is 40×40 pixels, over the"):
        load_vqa(write_items(tmp_path, 1))


def test_vqa_opens_only_the_pictures_of_the_samples_it_keeps(tmp_path):
    """--offset/--limit: a picture before the offset or after the last kept sample is never opened
    (gone here), the file is read no further, and the kept samples are those of the whole file."""
    items = write_items(tmp_path, 3)
    whole = load_vqa(items)
    lines = items.read_text().splitlines()
    items.write_text("\n".join(lines + ["{not json"]) + "\n")
    (tmp_path / "imgs" / "000.png").unlink()
    (tmp_path / "imgs" / "002.png").unlink()
    kept = load_vqa(items, offset=1, limit=1)
    assert [(s.index, s.id, s.image, s.extra["image"]) for s in kept] == [(1, "q1", whole[1].image, whole[1].extra["image"])]
    with pytest.raises(WorkbenchError, match=r"items.jsonl:3: .*002.png"):
        load_vqa(items, offset=1, limit=2)
    with pytest.raises(WorkbenchError, match=r"items.jsonl:1: .*000.png"):
        load_vqa(items)


@pytest.mark.parametrize("data, needle", [((), "needs one --data"), (("a.jsonl", "b.jsonl"), "needs one --data"),
                                          (("missing.jsonl",), "data file not found")])
def test_vqa_data_is_checked_in_one_line(data, needle, tmp_path, capsys, monkeypatch, vlm_dirs):
    args = [x for d in data for x in ("--data", str(tmp_path / d))]
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(vlm_dirs["llava"]), "--task", "vqa", *args,
                             "--out", str(tmp_path / "run.h5"))
    assert code != 0
    error_line(err, needle)
