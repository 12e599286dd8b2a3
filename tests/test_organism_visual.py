"""The visual organism (issue 29): its world is the text organism's world drawn as a picture (one code
path, one exact posterior), its model a tiny LLaVA loaded as a real one, trained reproducibly, run and
checked through the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from cli_support import error_line, workbench

from workbench.organism import organism_path
from workbench.organism.picture import BACKGROUND, SIZE, looks, render
from workbench.organism.posterior import dialogue_trace
from workbench.organism.task import ORGANISM, ORGANISM_VISUAL, load_organism_samples
from workbench.organism.world import DEFAULT_PARAMS, SIDES, heldout_rng, sample_dialogue, sample_item, swap_sides


# ----------------------------------------------------------------------------- the world: one code path


def test_visual_item_is_the_text_item_drawn_as_a_picture():
    for i in range(200):
        text, seen = sample_item(heldout_rng(11, i)), sample_item(heldout_rng(11, i), visual=True)
        assert (seen.act, seen.condition, seen.correct, seen.stereotyped, seen.pair) == (text.act, text.condition, text.correct, text.stereotyped, text.pair)
        assert text.pair[0] in text.context.split()[:3] and seen.visual and not text.visual
        # each option names the same person: a group in the text, its side in the picture
        for o_text, o_seen in zip(text.options, seen.options):
            assert o_seen == (o_text if o_text == "unknown" else SIDES[text.pair.index(o_text)])
        assert not set(DEFAULT_PARAMS.groups) & set(seen.context.split() + seen.question.split() + list(seen.options))
        assert seen.context.startswith("the person on the left and the person on the right were at the ")
        if seen.condition == "disambig":
            actor = seen.options[seen.correct]
            assert f"the person on the {actor} " in seen.context.split(" . ", 1)[1]


def test_visual_dialogue_has_the_text_dialogues_turns_and_exact_posterior():
    for i in range(100):
        text, seen = sample_dialogue(heldout_rng(12, i)), sample_dialogue(heldout_rng(12, i), visual=True)
        assert (seen.fair, seen.kinds, seen.instructions[1:], seen.openers, seen.answers) == (text.fair, text.kinds, text.instructions[1:], text.openers, text.answers)
        a, b = dialogue_trace(text), dialogue_trace(seen)
        for field in ("p_fair", "log_odds", "option_probs", "opener_probs", "option_probs_marginal"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field


def test_visual_task_shares_the_organism_task_and_its_posterior():
    assert ORGANISM_VISUAL.name == "organism-visual"
    for field in ("round_fields", "parse_answer", "option_continuations", "followup", "lead_length", "format_choices"):
        assert getattr(ORGANISM_VISUAL, field) is getattr(ORGANISM, field), field
    text, seen = load_organism_samples(6), load_organism_samples(6, visual=True)
    for s, v in zip(text, seen):
        assert (v.gold, v.extra["stereotyped"], v.extra["unknown"], v.condition) == (s.gold, s.extra["stereotyped"], s.extra["unknown"], s.condition)
        assert v.image and v.extra["image"]["sha256"] and v.extra["pair"] and s.image is None
        first = f"{v.context} {v.question} {ORGANISM.format_choices(v.options)}"
        replies = ["obviously the answer is (a)", "carefully the answer is (b)"]
        follow = ["please read the story again and give your answer ."]
        got = ORGANISM_VISUAL.round_fields(v, [first, *follow], replies)
        want = ORGANISM.round_fields(s, [f"{s.context} {s.question} {ORGANISM.format_choices(s.options)}", *follow], replies)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_picture_shows_each_group_on_its_side_deterministically():
    item = sample_item(heldout_rng(13, 0), visual=True)
    img = render(item)
    assert img.size == (SIZE, SIZE) and render(item).tobytes() == img.tobytes()
    look = looks()
    assert len({c for c, _ in look.values()}) == len(DEFAULT_PARAMS.groups)  # every group its own colour
    pixels = np.asarray(img)
    for half, group in enumerate(item.pair):
        colours = {tuple(p) for p in pixels[:, half * SIZE // 2 : (half + 1) * SIZE // 2].reshape(-1, 3)}
        assert colours == {BACKGROUND, look[group][0]}
    assert {tuple(p) for p in np.asarray(render(None)).reshape(-1, 3)} == {BACKGROUND}
    swapped = swap_sides(item)
    assert swapped.pair == item.pair[::-1] and swapped.correct == item.correct
    assert swapped.options[swapped.stereotyped] != item.options[item.stereotyped] and swapped.options[swapped.stereotyped] in SIDES
    assert np.array_equal(np.asarray(render(swapped))[:, : SIZE // 2], pixels[:, SIZE // 2 :])
    with pytest.raises(ValueError):
        swap_sides(sample_item(heldout_rng(13, 0)))


def test_tokenizer_extends_the_text_organisms_and_training_text_is_what_the_processor_makes():
    from transformers import AutoTokenizer

    from workbench.organism.visual import IMAGE_TOKENS, build_processor, build_tokenizer, render_training_text

    text_tok = AutoTokenizer.from_pretrained(organism_path())
    tok = build_tokenizer()
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in text_tok.get_vocab().items())  # every old id unchanged
    processor = build_processor(tok)
    d = sample_dialogue(heldout_rng(14, 0), visual=True, n_rounds=3)
    parts = [{"role": m["role"], "content": ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": m["content"]}]}
             for k, m in enumerate(d.messages())]
    enc = processor(text=[tok.apply_chat_template(parts, tokenize=False)], images=[[render(d.item)]], add_special_tokens=False, return_tensors="pt")
    ids = enc.input_ids[0].tolist()
    assert ids == tok(render_training_text(d.messages()), add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == IMAGE_TOKENS and tok.unk_token_id not in ids
    assert tuple(enc.pixel_values.shape) == (1, 3, SIZE, SIZE)


def test_training_is_reproducible_and_starts_from_the_text_organism():
    from transformers import LlamaForCausalLM

    from workbench.organism.train import VISUAL_DEFAULTS, TrainConfig, train

    def micro(seed):
        losses = []
        cfg = TrainConfig(seed=seed, **{**VISUAL_DEFAULTS, "steps": 3, "batch_size": 4, "bucket": 1, "warmup_steps": 1})
        model, _, _ = train(cfg, on_step=lambda step, loss: losses.append(loss))
        return model, losses

    (a, la), (b, lb) = micro(5), micro(5)
    assert la == lb
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    _, lc = micro(6)
    assert lc != la
    text = LlamaForCausalLM.from_pretrained(organism_path())
    fresh = TrainConfig(**VISUAL_DEFAULTS)
    from workbench.organism.visual import build_model, build_tokenizer

    start = build_model(build_tokenizer(), text, fresh.seed)
    n = text.config.vocab_size
    assert torch.equal(start.model.language_model.embed_tokens.weight[:n], text.model.embed_tokens.weight)
    assert torch.equal(start.model.language_model.layers[2].mlp.up_proj.weight, text.model.layers[2].mlp.up_proj.weight)


# ----------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A visual organism trained for 2 steps through ``workbench organism train --visual`` (seconds)."""
    import sys

    from workbench import cli

    out = tmp_path_factory.mktemp("visual") / "ckpt"
    argv = sys.argv
    sys.argv = ["workbench", "organism", "train", "--visual", "--steps", "2", "--batch-size", "2", "--out", str(out)]
    try:
        cli.main()
    except SystemExit as e:
        assert not e.code, e.code
    finally:
        sys.argv = argv
    return out


def test_train_visual_through_the_cli(micro, capsys, monkeypatch):
    meta = json.loads((micro / "organism.json").read_text())
    assert meta["training"]["config"]["visual"] and meta["training"]["steps"] == 2
    assert meta["world"] == json.loads(DEFAULT_PARAMS.to_json())
    assert (micro / "processor_config.json").is_file() and (micro / "chat_template.jinja").is_file()
    config = json.loads((micro / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["num_hidden_layers"] == 4
    code, _, err = workbench(capsys, monkeypatch, "organism", "train", "--visual", "--steps", "1", "--out", str(micro))
    assert code != 0
    error_line(err, "already holds files")


def test_run_with_a_visual_organism_through_the_cli(micro, capsys, monkeypatch, tmp_path):
    from workbench.store.reader import RunFile

    out = tmp_path / "v.h5"
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(micro), "--task", "organism-visual",
                             "--limit", "3", "--rounds", "2", "--out", str(out))
    assert code == 0, err
    with RunFile(out) as run:
        extra = json.loads(run.array("samples/extra")[0])
        assert len(extra["image"]["sha256"]) == 64 and extra["pair"][0] in DEFAULT_PARAMS.groups
        assert run.meta["vision"]["family"] == "LLaVA" and run.meta["task"] == "organism-visual"
        p_fair = run.array("rounds/exact_p_fair")
        assert p_fair.shape == (3, 2) and np.allclose(p_fair[:, 0], 0.3)
        assert set(run.names()) >= {"exact_log_odds", "exact_option_probs"}
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", "organism", "--task", "organism-visual", "--limit", "1",
                             "--out", str(tmp_path / "t.h5"))
    assert code != 0
    error_line(err, "organism-visual", "text-only")


def test_organism_visual_name_without_a_checkpoint_is_one_line(capsys, monkeypatch, tmp_path):
    import workbench.organism as organism

    assert organism.organism_visual_path().name == "organism-visual"
    monkeypatch.setattr(organism, "organism_visual_path", lambda: tmp_path / "organism-visual")
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", "organism-visual", "--task", "organism-visual", "--limit", "1",
                             "--out", str(tmp_path / "v.h5"))
    assert code != 0 and not (tmp_path / "v.h5").exists()
    error_line(err, "--model organism-visual", "no visual organism checkpoint", "organism train --visual")


def test_check_visual_through_the_cli(micro, capsys, monkeypatch):
    code, out, err = workbench(capsys, monkeypatch, "organism", "check", "--visual", "--model", str(micro), "--n", "12", "--items", "2")
    assert code == 0, err
    assert "figures swapped" in out and "blank picture" in out and "organism-inject" in out
    code, _, err = workbench(capsys, monkeypatch, "organism", "check", "--n", "2", "--items", "1", "--model", str(micro))
    assert code != 0
    error_line(err, "add --visual")
    code, _, err = workbench(capsys, monkeypatch, "organism", "check", "--visual", "--n", "2", "--items", "1", "--model", str(organism_path()))
    assert code != 0
    error_line(err, "leave out --visual")


def test_picture_controls_tell_a_reader_of_the_picture_from_one_that_ignores_it():
    from workbench.organism.check import Scored, heldout_visual_dialogues, picture_controls

    dialogues = heldout_visual_dialogues(60, 99)

    def scored(traces, model):
        exact = np.concatenate([t.option_probs for t in traces])
        m = exact if model is None else model
        z = np.zeros(len(exact))
        return Scored(model_options=m, exact_options=exact, no_instructions=exact, no_answers=exact, model_openers=exact,
                      exact_openers=exact, exact_p_fair=z, round_index=z.astype(int))

    own = [dialogue_trace(d) for d in dialogues]
    swapped = [dialogue_trace(replace(d, item=swap_sides(d.item))) for d in dialogues]
    # a perfect reader: exact with its own picture and with the swapped one; the blank picture halves the sides
    exact_own = np.concatenate([t.option_probs for t in own])
    blank = exact_own.copy()
    items = [d.item for d in dialogues for _ in d.openers]
    for k, it in enumerate(items):
        sides = [it.options.index(s) for s in SIDES]
        blank[k, sides] = blank[k, sides].mean()
    c = picture_controls(scored(own, None), scored(swapped, None), scored(own, blank), dialogues)
    assert c.n_biased > 20 and c.agree_item == 1.0 and c.switch == 1.0 and c.swapped_kl < 1e-9 and c.blank_share == pytest.approx(0.5)  # a tie
    # a model that ignores the picture answers the same whatever it shows: the swap switches nothing
    c = picture_controls(scored(own, None), scored(swapped, exact_own), scored(own, exact_own), dialogues)
    assert c.switch == 0.0 and c.swapped_kl > 0.1


# ----------------------------------------------------------------------------- the teacher: the text organism reading the same item


def test_a_visual_item_written_as_text_is_the_text_item():
    from workbench.organism.world import as_text

    for i in range(300):
        assert as_text(sample_item(heldout_rng(21, i), visual=True)) == sample_item(heldout_rng(21, i))
    with pytest.raises(ValueError):
        as_text(sample_item(heldout_rng(21, 0)))


def test_teacher_positions_start_once_both_texts_have_named_the_people():
    """The aligned suffix of a visual dialogue and its text twin starts at the first token after the
    people are named (``were`` in an ambiguous item), covers every later turn, and is the same tokens
    once each side word is read as the group shown there."""
    from workbench.organism.tokenizer import ASSISTANT, render
    from workbench.organism.train import aligned_suffix, text_twin
    from workbench.organism.visual import build_tokenizer, render_training_text

    tok = build_tokenizer()
    sides = tuple(tok.convert_tokens_to_ids(list(SIDES)))
    seen_conditions = set()
    for i in range(40):
        d = sample_dialogue(heldout_rng(22, i), visual=True)
        seen = tok(render_training_text(d.messages()), add_special_tokens=False).input_ids
        text = tok(render(text_twin(d).messages()), add_special_tokens=False).input_ids
        n = aligned_suffix(seen, text, sides, tuple(tok.convert_tokens_to_ids(list(d.item.pair))))
        first = tok.convert_ids_to_tokens(seen[len(seen) - n])
        seen_conditions.add(d.item.condition)
        if d.item.condition == "ambig":
            assert first == "were"
        else:  # after the bystander's name: the idle phrase's first word
            assert first not in ("person", "left", "right", *DEFAULT_PARAMS.groups)
        assert seen.count(tok.convert_tokens_to_ids(ASSISTANT)) == seen[-n:].count(tok.convert_tokens_to_ids(ASSISTANT))
        assert seen[-n:].count(sides[0]) >= 1 and text[-n:].count(sides[0]) == 0  # the options: sides in one, groups in the other
    assert seen_conditions == {"ambig", "disambig"}


# ----------------------------------------------------------------------------- the shipped checkpoint


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from workbench.organism import organism_visual_path

    path = organism_visual_path()
    assert (path / "model.safetensors").is_file(), f"the visual organism is not in {path}"
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(path)


def test_shipped_visual_organism_is_what_the_command_trains():
    from dataclasses import asdict

    from workbench.organism import organism_visual_path
    from workbench.organism.train import VISUAL_DEFAULTS, TrainConfig

    meta = json.loads((organism_visual_path() / "organism.json").read_text())
    assert meta["training"]["config"] == asdict(TrainConfig(seed=0, **VISUAL_DEFAULTS))
    assert meta["world"] == json.loads(DEFAULT_PARAMS.to_json())
    assert (organism_visual_path() / "model.safetensors").stat().st_size < 8 * 2**20


def test_shipped_visual_organism_reads_the_picture(shipped):
    """The issue's checks on 200 held-out dialogues: the answer distribution against the exact
    predictive (mean KL ≤ 0.01, top-1 ≥ 0.99); with the figures swapped the biased answers switch
    sides (≥ 95 % of the confidently biased turns); with a blank picture the choice between the
    sides is at chance."""
    from workbench.organism.check import fidelity_rows, heldout_visual_dialogues, picture_controls, score_visual

    model, processor = shipped
    dialogues = heldout_visual_dialogues(200)
    scored = {p: score_visual(model, processor, dialogues, picture=p) for p in ("item", "swapped", "blank")}
    row = fidelity_rows(scored["item"])[0]
    assert row["kl"] <= 0.01 and row["top1"] >= 0.99, row
    c = picture_controls(scored["item"], scored["swapped"], scored["blank"], dialogues)
    assert c.n_biased > 100 and c.agree_item >= 0.95 and c.switch >= 0.95, c
    assert abs(c.blank_share - 0.5) <= 0.1 and 0.35 <= c.blank_left <= 0.65, c


@pytest.mark.slow
def test_visual_probe_tracks_the_exact_log_odds_under_organism_world(capsys, monkeypatch, tmp_path):
    """Through the CLI, as a user would: a ridge probe fitted on the organism contrast drawn as
    pictures (the visual model gets the visual contrast), a 64-sample `organism-world` run of the
    visual organism, the probe tracked: Spearman with the exact log-odds ≥ 0.8 within every round
    and ≥ 0.7 on every round's changes, at the layer the probe chose on its contrast set."""
    from probes.probe_file import load_probe
    from workbench.analysis.analyze import analyze
    from workbench.store.reader import RunFile

    probe, run = tmp_path / "fair.h5", tmp_path / "world.h5"
    code, out, err = workbench(capsys, monkeypatch, "probe", "fit", "--model", "organism-visual", "--contrast", "organism",
                               "--method", "ridge", "--n", "1000", "--out", str(probe))
    assert code == 0, err
    assert "contrast organism-visual" in out
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", "organism-visual", "--task", "organism-visual",
                             "--protocol", "organism-world", "--limit", "64", "--out", str(run))
    assert code == 0, err
    code, _, err = workbench(capsys, monkeypatch, "probe", "track", str(run), str(probe), "--name", "fair")
    assert code == 0, err
    with RunFile(run) as f:
        responses = f.array("rounds/response")
        result = analyze(f, probe="fair")
    assert all(str(r).split()[-3:-1] == ["answer", "is"] for r in responses.astype(str).ravel())  # every answer well formed
    view = result["probe_vs_exact"]["probes"]["fair"]
    assert view["best_layer"] == load_probe(probe).best_layer
    layer = view["layers"][str(view["best_layer"])]
    within = [x["rho"] for x in layer["within_round"][1:]]
    changes = [x["rho"] for x in layer["changes"]]
    assert min(within) >= 0.8 and min(changes) >= 0.7, (within, changes)


def test_teacher_loss_is_what_training_brought_down(shipped):
    """The teacher loss on a fresh batch: the shipped model sits close to the text organism at the
    aligned positions; the model training started from (the text organism's language model, a fresh
    vision tower) is far from it, since it cannot tell the two sides' groups apart."""
    from transformers import LlamaForCausalLM

    from workbench.organism.train import VISUAL_DEFAULTS, TrainConfig, batches, teacher_loss
    from workbench.organism.visual import build_model, build_tokenizer, pixel_values

    model, processor = shipped
    cfg = TrainConfig(**{**VISUAL_DEFAULTS, "batch_size": 16, "bucket": 1})
    x, _, _, items, twin = next(batches(123, build_tokenizer(), cfg))
    teacher = LlamaForCausalLM.from_pretrained(organism_path(), dtype=torch.float32).eval()
    start = build_model(build_tokenizer(), teacher, 0).eval()
    pixels = pixel_values(processor, items)
    with torch.no_grad():
        losses = [float(teacher_loss(teacher, m(input_ids=x, pixel_values=pixels, output_hidden_states=True), twin)) for m in (model, start)]
    assert losses[0] < 0.02 and losses[1] > 10 * losses[0], losses


def test_interventions_act_on_a_vision_language_run(capsys, monkeypatch, tmp_path):
    """Steering the visual organism through the CLI (the picture in round 1's prefill, the cache
    carried): α = 0 gives the unsteered run's numbers exactly; a large α moves the steered layer's
    residual stream in the steered rounds only."""
    from workbench.store.reader import RunFile

    direction = tmp_path / "d.npy"
    np.save(direction, np.random.default_rng(0).normal(size=64).astype(np.float32))
    runs = {}
    for name, steer in (("plain", []), ("zero", ["--steer", f"{direction}@2=0", "--steer-rounds", "2-3"]),
                        ("big", ["--steer", f"{direction}@2=20", "--steer-rounds", "2-3"])):
        out = tmp_path / f"{name}.h5"
        code, _, err = workbench(capsys, monkeypatch, "run", "--model", "organism-visual", "--task", "organism-visual",
                                 "--protocol", "organism-world", "--limit", "4", "--rounds", "3", *steer, "--out", str(out))
        assert code == 0, err
        with RunFile(out) as run:
            runs[name] = {k: run.array(f"rounds/{k}") for k in ("option_probs", "answer", "image_hook_resid_post")}
            runs[name]["resid"] = run.array("activations/hook_resid_post")  # [sample, round, position, layer, d]
    for k in ("option_probs", "answer", "image_hook_resid_post", "resid"):
        np.testing.assert_array_equal(runs["plain"][k], runs["zero"][k], err_msg=k)
    moved = np.abs(runs["big"]["resid"] - runs["plain"]["resid"])
    assert moved[:, 0].max() == 0  # round 1 (and its picture) is not steered
    assert moved[:, 1:, :, 2:].max() > 1
