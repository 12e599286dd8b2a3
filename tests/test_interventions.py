"""Interventions inside the rounds (workbench.engine.interventions): α = 0 changes nothing, a carried
cache equals a full recompute under the same per-token schedule on every architecture family,
ablation and clamp do what they say at the hooked sites, and bad inputs are one line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import ARCHS, BBQ_FIXTURE

from workbench.engine.interventions import Ablate, Clamp, Steer, describe, parse_rounds, random_control
from workbench.engine.protocol import load_protocol
from workbench.engine.session import Session
from workbench.errors import WorkbenchError

ROUNDS = 3
HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


def setting(name, loaded, organism):
    """(model, task, protocol, samples): three rounds, rows of different lengths, cut-off answers."""
    if name == "organism":
        from workbench.organism.task import ORGANISM, load_organism_samples

        protocol = load_protocol("organism-inject")
        protocol = dataclasses.replace(protocol, rounds=ROUNDS, decoding=dataclasses.replace(protocol.decoding, max_new_tokens=5))
        return organism, ORGANISM, protocol, load_organism_samples(3, offset=7)
    from workbench.engine.tasks import BBQ, load_bbq

    protocol = load_protocol("bbq-paper")
    protocol = dataclasses.replace(protocol, rounds=ROUNDS, decoding=dataclasses.replace(protocol.decoding, max_new_tokens=4))
    return loaded(name), BBQ, protocol, load_bbq([BBQ_FIXTURE], limit=3)


def unit(d_model, seed=0):
    v = np.random.default_rng(seed).standard_normal(d_model)
    return v / np.linalg.norm(v)


def run(model, task, protocol, samples, interventions, reuse=True, overrides=None, hooks=HOOKS):
    """Every round stepped (``overrides``: round → that step's interventions); the session's result."""
    s = Session(model, task, protocol, samples, hooks=hooks, interventions=interventions, reuse_cache=reuse, strict=True)
    for t in range(1, protocol.rounds + 1):
        s.step(interventions=(overrides or {}).get(t))
    return s, s.result()


def test_alpha_zero_is_bit_identical(organism):
    model, task, protocol, samples = setting("organism", None, organism)
    _, base = run(model, task, protocol, samples, [])
    _, zero = run(model, task, protocol, samples, [Steer(unit(model.d_model), layers="all", alpha=0.0, hook="hook_resid_mid")])
    assert zero.response_ids == base.response_ids
    np.testing.assert_array_equal(zero.option_probs, base.option_probs)
    np.testing.assert_array_equal(zero.mean_token_entropy, base.mean_token_entropy)
    for h in base.activations:
        np.testing.assert_array_equal(zero.activations[h], base.activations[h])


@pytest.mark.parametrize("name", [*ARCHS, "organism"])
def test_a_carried_cache_equals_a_full_recompute_under_the_same_schedule(name, loaded, organism):
    """Steer (resid_mid, rounds 2-3, response tokens), ablate (resid_pre, prompt tokens), clamp
    (attention output, every token of round 1), steer (MLP output, rounds 1 and 3) and a one-round
    override: the same tokens, and
    activations and option probabilities within 1e-5, carried or recomputed — and not the
    unsteered run's."""
    model, task, protocol, samples = setting(name, loaded, organism)
    d = model.d_model
    top = model.n_layers - 1
    ivs = [Steer(unit(d, 1), layer=1, alpha=6.0, hook="hook_resid_mid", rounds=(2, 3), positions="response"),
           Ablate(np.stack([unit(d, 2), unit(d, 3)]), layer=top, hook="hook_resid_pre", positions="prompt"),
           Clamp(unit(d, 4), layer=0, value=3.0, hook="hook_attn_out", rounds=[1]),
           Steer(unit(d, 6), layer=top, alpha=2.0, hook="hook_mlp_out", rounds=[1, 3])]
    override = {2: [Steer(unit(d, 5), layers="all", alpha=-4.0, hook="hook_resid_post"), ivs[1]]}
    carried, a = run(model, task, protocol, samples, ivs, True, override)
    again, b = run(model, task, protocol, samples, ivs, False, override)
    assert all(r.reused_cache for r in carried.rounds[1:]) and not any(r.reused_cache for r in again.rounds)
    assert a.response_ids == b.response_ids and a.transcripts == b.transcripts
    for h in b.activations:
        scale = np.nanmax(np.abs(b.activations[h]))
        np.testing.assert_allclose(a.activations[h], b.activations[h], rtol=0, atol=1e-5 * scale, err_msg=h)
    np.testing.assert_allclose(a.option_probs, b.option_probs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(a.mean_token_entropy, b.mean_token_entropy, rtol=0, atol=1e-5)
    _, base = run(model, task, protocol, samples, [])
    assert not np.allclose(base.activations["hook_resid_post"], a.activations["hook_resid_post"], equal_nan=True, atol=1e-3)
    assert [len(x) for x in carried.schedule] == [3, 2, 3]  # round 1: ablate, clamp, mlp; round 2: the override; round 3: steer, ablate, mlp


@pytest.mark.parametrize("hook", ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"])
def test_ablation_removes_the_projection_and_clamp_sets_it(hook, organism):
    """Captured activations are after the intervention: ablated, their projection on d̂ is below
    1e-5 of their norm (last prompt token and response mean, every round); clamped, it is the value."""
    model, task, protocol, samples = setting("organism", None, organism)
    d = unit(model.d_model, 7)
    _, base = run(model, task, protocol, samples, [], hooks=(hook,))
    _, ablated = run(model, task, protocol, samples, [Ablate(3 * d, layer=2, hook=hook)], hooks=(hook,))
    acts = ablated.activations[hook][:, :, :, 2]  # [N, R, 2, d]
    proj = np.abs(acts @ d)
    assert (proj < 1e-5 * np.linalg.norm(acts, axis=-1)).all()
    assert (np.abs(base.activations[hook][:, :, :, 2] @ d) > 1e-3).any()  # it had a component to remove
    _, clamped = run(model, task, protocol, samples, [Clamp(d, layer=2, value=-2.5, hook=hook)], hooks=(hook,))
    np.testing.assert_allclose(clamped.activations[hook][:, :, :, 2] @ d, -2.5, atol=1e-4)


def test_positions_and_rounds_pick_the_tokens(organism):
    """A steer of round 2's prompt only changes nothing before round 2 and changes round 2's last
    prompt token; one of responses only leaves round 2's last prompt token as it was."""
    model, task, protocol, samples = setting("organism", None, organism)
    d = unit(model.d_model, 8)
    _, base = run(model, task, protocol, samples, [])
    _, prompt = run(model, task, protocol, samples, [Steer(d, layer=1, alpha=5.0, rounds=[2], positions="prompt")])
    _, response = run(model, task, protocol, samples, [Steer(d, layer=1, alpha=5.0, rounds=[2], positions="response")])
    b, p, r = (x.activations["hook_resid_post"][:, :, :, 1] for x in (base, prompt, response))  # [N, R, 2, d]
    np.testing.assert_array_equal(p[:, 0], b[:, 0])
    np.testing.assert_array_equal(r[:, 0], b[:, 0])
    np.testing.assert_allclose((p[:, 1, 0] - b[:, 1, 0]) @ d, 5.0, atol=1e-4)  # the last prompt token, steered at its layer
    np.testing.assert_array_equal(r[:, 1, 0], b[:, 1, 0])
    same = [i for i in range(len(samples)) if response.response_ids[i][1] == base.response_ids[i][1]]
    assert same  # layer 1's own value is shifted by exactly α·d̂ on every response token it feeds back
    np.testing.assert_allclose((r[same, 1, 1] - b[same, 1, 1]) @ d, 5.0, atol=1e-4)


def test_bad_inputs_are_one_line(organism, tmp_path):
    d = unit(organism.d_model)
    with pytest.raises(WorkbenchError, match="alpha must be a finite number"):
        Steer(d, layer=1, alpha=float("nan"))
    with pytest.raises(WorkbenchError, match="alpha must be a finite number"):
        Steer(d, layer=1, alpha="4")
    with pytest.raises(WorkbenchError, match="rounds must be"):
        Steer(d, layer=1, alpha=1.0, rounds=[0, 2])
    with pytest.raises(WorkbenchError, match="interventions act at"):
        Steer(d, layer=1, alpha=1.0, hook="hook_resid_side")
    with pytest.raises(WorkbenchError, match="positions must be"):
        Ablate(d, layer=1, positions="middle")
    with pytest.raises(WorkbenchError, match="norm 0"):
        Clamp(np.zeros(4), layer=1)
    with pytest.raises(WorkbenchError, match="linearly dependent"):
        Ablate(np.stack([d, 2 * d]), layer=1)
    with pytest.raises(WorkbenchError, match="one of layer=N or layers"):
        Steer(d, alpha=1.0)
    with pytest.raises(WorkbenchError, match="width 5, but the model's d_model is"):
        Session(organism, samples=1, interventions=[Steer(np.ones(5), layer=1, alpha=1.0)])
    with pytest.raises(WorkbenchError, match="layer 9 is out of range"):
        Session(organism, samples=1, interventions=[Steer(d, layer=9, alpha=1.0)])
    with pytest.raises(WorkbenchError, match="cannot be combined with a round_extras callback that runs the model"):
        Session(organism, samples=1, interventions=[Steer(d, layer=1, alpha=1.0)], round_extras=lambda *a: {})
    with pytest.raises(WorkbenchError, match="--steer-rounds"):
        parse_rounds("6-2")
    with pytest.raises(WorkbenchError, match="--steer-rounds"):
        parse_rounds("0-2")
    assert parse_rounds("2-4,6") == (2, 3, 4, 6)


def test_the_record_and_the_random_control(organism, tmp_path):
    """A saved session records every intervention that acted, with the rounds it acted in; the
    random control keeps the norm, draws the same direction for the same seed, another for another."""
    from workbench.store.reader import RunFile

    d = 3 * unit(organism.d_model)
    steer = Steer(d, layer=1, alpha=2.0, rounds=[2, 5], label="x")
    s = Session(organism, samples=2, interventions=[steer])
    for _ in range(3):
        s.step()
    path = s.save(tmp_path / "steered.h5")
    with RunFile(path) as f:
        import json

        raw = f.f.attrs["interventions"]
        record = json.loads(raw)
    assert record == [describe(steer, [2])]
    assert record[0]["kind"] == "steer" and record[0]["alpha"] == 2.0 and record[0]["norm"] == [pytest.approx(3.0)]
    c1, c2, c3 = random_control(steer, 1), random_control(steer, 1), random_control(steer, 2)
    assert np.array_equal(c1.direction, c2.direction) and not np.array_equal(c1.direction, c3.direction)
    assert np.linalg.norm(c1.direction) == pytest.approx(3.0, rel=1e-5) and c1.control_seed == 1
    assert describe(c1)["sha256"] != describe(steer)["sha256"]


# ------------------------------------------------------------------------------------------ the command line
RUN = ["run", "--limit", "4", "--rounds", "3", "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A probe file for the organism (4 layers, d_model 64): a random unit direction per layer."""
    from probe_files import write_probe

    rng = np.random.default_rng(11)
    dirs = rng.standard_normal((4, 64)).astype(np.float32)
    return write_probe(tmp_path_factory.mktemp("probe") / "fair.h5", n_layers=4, d_model=64,
                       directions=dirs / np.linalg.norm(dirs, axis=1, keepdims=True))


def test_run_steers_records_and_refuses_a_changed_resume(capsys, monkeypatch, tmp_path, probe):
    import json

    from cli_support import error_line, workbench

    from workbench.store.reader import RunFile

    out = tmp_path / "steered.h5"
    code, stdout, err = workbench(capsys, monkeypatch, *RUN, "--out", str(out), "--steer", f"{probe}@1=+4",
                                  "--ablate", f"{probe}@all", "--steer-rounds", "2-3", "--steer-positions", "response")
    assert code == 0, err
    assert "intervention: steer fair.h5@1 α=+4 at blocks.1.hook_resid_post, rounds 2-3, response tokens" in stdout
    with RunFile(out) as run:
        record = json.loads(run.f.attrs["interventions"])
    assert [r["kind"] for r in record] == ["steer"] + ["ablate"] * 4  # @all: each fitted layer its own direction
    assert [r["layers"] for r in record] == [[1], [0], [1], [2], [3]]
    assert len({r["sha256"] for r in record[1:]}) == 4 and all(r["rounds"] == [2, 3] for r in record)
    code, stdout, _ = workbench(capsys, monkeypatch, "info", str(out), "--json")
    assert code == 0 and json.loads(stdout)["interventions"] == record
    code, _, err = workbench(capsys, monkeypatch, *RUN, "--out", str(out), "--steer", f"{probe}@1=+5",
                             "--ablate", f"{probe}@all", "--steer-rounds", "2-3", "--steer-positions", "response", "--resume")
    assert code == 2 and error_line(err, "--resume", "other interventions")
    code, _, err = workbench(capsys, monkeypatch, *RUN, "--out", str(out), "--resume")
    assert code == 2 and error_line(err, "other interventions", "none now")
    # the random control: the same norms, seeded directions, recorded
    ctl = tmp_path / "control.h5"
    code, stdout, err = workbench(capsys, monkeypatch, *RUN, "--out", str(ctl), "--steer", f"{probe}@1=+4", "--control", "random",
                                  "--control-seed", "5")
    assert code == 0, err and "random control, seed 5" in stdout
    with RunFile(ctl) as run:
        (c,) = json.loads(run.f.attrs["interventions"])
    assert c["control_seed"] == 5 and c["norm"] == [pytest.approx(1.0)] and c["sha256"] != record[0]["sha256"]


@pytest.mark.parametrize("args, needles", [
    (["--steer", "{probe}@1=+4"], ()),  # placeholder replaced below for the width case
    (["--steer", "missing.h5@1=4"], ("direction file not found", "missing.h5")),
    (["--steer", "{probe}@1=four"], ("--steer", "not a number")),
    (["--steer", "{probe}@1=nan"], ("--steer", "not a finite number")),
    (["--steer", "{probe}@7=1"], ("no direction for layer 7",)),
    (["--steer", "{probe}@blocks.1.hook_q=1"], ("interventions act at",)),
    (["--steer", "{probe}@1=1", "--steer-rounds", "0-2"], ("--steer-rounds", "count from 1")),
    (["--steer", "{probe}@1=1", "--steer-rounds", "5"], ("rounds [5]", "3 rounds")),
    (["--steer", "{probe}@1=1", "--steer-positions", "middle"], ("--steer-positions",)),
    (["--clamp", "{probe}@1=p90"], ("contrast-set projections",)),
    (["--steer-rounds", "2-3"], ("needs --steer",)),
])
def test_bad_intervention_options_are_one_line_before_the_model_loads(args, needles, capsys, monkeypatch, tmp_path, probe):
    from cli_support import error_line, workbench

    import workbench.engine.models as models

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    if not needles:  # a probe of another width
        from probe_files import write_probe

        args = ["--steer", f"{write_probe(tmp_path / 'narrow.h5', n_layers=4, d_model=5)}@1=4"]
        needles = ("width 5", "d_model is 64")
    args = [a.replace("{probe}", str(probe)) for a in args]
    code, _, err = workbench(capsys, monkeypatch, *RUN, "--out", str(tmp_path / "x.h5"), *args)
    assert code == 2
    error_line(err, *needles)
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.slow
def test_a_steered_run_killed_and_resumed_is_identical(tmp_path, probe, capsys, monkeypatch):
    """SIGKILL a steered `workbench run` (a subprocess) after its first batch is written; --resume
    finishes it with the same interventions, bit for bit the uninterrupted steered run."""
    import signal
    import sys
    from pathlib import Path

    from cli_support import kill_at_line, workbench

    sys.path.insert(0, str(Path(__file__).parent / "fault"))
    import inject

    root = Path(__file__).resolve().parents[1]
    args = [*RUN, "--steer", f"{probe}@2=-3", "--steer-rounds", "2-3"]
    out = tmp_path / "killed.h5"
    proc = kill_at_line([sys.executable, "-m", "workbench", *args, "--out", str(out)], "batch done: 2/4", cwd=root)
    assert proc.returncode == -signal.SIGKILL
    code, _, err = workbench(capsys, monkeypatch, *args, "--out", str(out), "--resume")
    assert code == 0, err
    code, _, err = workbench(capsys, monkeypatch, *args, "--out", str(tmp_path / "whole.h5"))
    assert code == 0, err
    assert inject.differences(inject.datasets(tmp_path / "whole.h5"), inject.datasets(out)) == []


# ------------------------------------------------------------------------------------------ analyze --against
def test_implied_log_odds_recovers_the_mixture():
    from workbench.analysis.paired import implied_log_odds, settling_round

    rng = np.random.default_rng(0)
    fair, biased = rng.dirichlet(np.ones(3), 5), rng.dirichlet(np.ones(3), 5)
    lam = rng.uniform(-6, 6, (5, 4))
    s = 1 / (1 + np.exp(-lam))
    probs = s[..., None] * fair[:, None] + (1 - s[..., None]) * biased[:, None]
    probs[2, 3] = np.nan
    got, kl = implied_log_odds(probs, fair, biased)
    ok = np.isfinite(probs).all(-1)
    np.testing.assert_allclose(got[ok], lam[ok], atol=2e-3)
    assert (kl[ok] < 1e-6).all() and np.isnan(got[2, 3])
    # a distribution off the mixture's line: the fit is the closest point, with a positive KL
    off, kl_off = implied_log_odds(np.array([[[0.2, 0.6, 0.2]]]), np.array([[0.8, 0.1, 0.1]]), np.array([[0.1, 0.1, 0.8]]))
    assert abs(off[0, 0]) < 1e-2 and kl_off[0, 0] > 0.1
    np.testing.assert_array_equal(settling_round(np.array([[0, 0, 0], [0, 1, 1], [1, 0, 1], [2, 2, 1]])), [1, 2, 3, 3])


def test_analyze_against_pairs_the_samples(capsys, monkeypatch, tmp_path, probe):
    import json

    from cli_support import error_line, workbench

    from workbench.store.reader import RunFile

    base, steered, other = tmp_path / "base.h5", tmp_path / "steered.h5", tmp_path / "other.h5"
    for path, extra in ((base, []), (steered, ["--steer", f"{probe}@all=+6", "--steer-rounds", "2-3"]),
                        (other, ["--protocol", "organism-neutral"])):
        code, _, err = workbench(capsys, monkeypatch, *RUN, "--out", str(path), *extra)
        assert code == 0, err
    code, stdout, err = workbench(capsys, monkeypatch, "analyze", str(steered), "--against", str(base), "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["n_paired"] == 4 and r["interventions"]["base"] == [] and len(r["interventions"]["steered"]) == 4
    with RunFile(steered) as s, RunFile(base) as b:
        cs, cb = s.array("rounds/correct").astype(float), b.array("rounds/correct").astype(float)
        es, eb = s.array("rounds/option_entropy"), b.array("rounds/option_entropy")
        ps, pb = s.array("rounds/parsed_answer"), b.array("rounds/parsed_answer")
    np.testing.assert_allclose(r["metrics"]["accuracy"]["value"], (cs - cb).mean(0))
    np.testing.assert_allclose(r["metrics"]["option_entropy"]["value"], (es - eb).mean(0), rtol=1e-5, atol=1e-7)
    assert all(m["low"][0] == m["value"][0] == m["high"][0] == 0 for m in r["metrics"].values())  # round 1 not steered
    assert not np.allclose(r["metrics"]["option_entropy"]["value"][1:], 0)
    assert [f["answer_changed"] for f in r["flips"]] == (ps != pb).sum(0).tolist()
    il = r["implied_log_odds"]
    assert len(il["value"]) == 3 and il["value"][0] == 0 and len(il["kl_steered"]) == 3
    code, stdout, err = workbench(capsys, monkeypatch, "analyze", str(steered), "--against", str(base))
    assert code == 0 and "paired samples" in stdout and "implied λ" in stdout
    code, _, err = workbench(capsys, monkeypatch, "analyze", str(steered), "--against", str(other))
    assert code == 2 and error_line(err, "differ in protocol")


@pytest.mark.slow
def test_sweep_and_its_dose_response_report(capsys, monkeypatch, tmp_path, probe):
    import json

    from cli_support import error_line, workbench

    from workbench.store.reader import RunFile

    folder = tmp_path / "sweep"
    args = ["--steer", f"{probe}@2", "--alphas", "-6,6", "--limit", "3", "--rounds", "2", "--batch-size", "3",
            "--device", "cpu", "--out", str(folder)]
    code, stdout, err = workbench(capsys, monkeypatch, "sweep", *args)
    assert code == 0, err
    manifest = json.loads((folder / "sweep.json").read_text())
    assert [(r["alpha"], r["kind"]) for r in manifest["runs"]] == [(-6, "steer"), (-6, "control"), (0, "base"), (6, "steer"), (6, "control")]
    records = {}
    for r in manifest["runs"]:
        with RunFile(folder / r["file"]) as run:
            records[r["file"]] = json.loads(run.f.attrs.get("interventions", "[]"))
    assert records["alpha+0.h5"] == [] and records["alpha+6.h5"][0]["alpha"] == 6
    ctl, steer = records["control-alpha+6.h5"][0], records["alpha+6.h5"][0]
    assert ctl["control_seed"] == 0 and ctl["sha256"] == records["control-alpha-6.h5"][0]["sha256"] != steer["sha256"]
    code, stdout, err = workbench(capsys, monkeypatch, "report", str(folder))
    assert code == 0, err
    dr = json.loads((folder / "report" / "dose_response.json").read_text())
    acc = dr["curves"]["accuracy"]
    assert acc["steer"]["alpha"] == [-6, 0, 6] and acc["control"]["alpha"] == [-6, 0, 6]
    assert dr["targets"]["n_alphas"] == 3 and set(dr["targets"]["control_over_steer"]) <= {"-6", "+6"}
    assert (folder / "report" / "dose-implied-lambda.svg").exists() and (folder / "report" / "index.html").exists()
    code, stdout, err = workbench(capsys, monkeypatch, "sweep", *args, "--resume")  # every run complete: nothing recomputed
    assert code == 0 and err.count("already complete") == 5
    for bad, needle in ((["--alphas", "a,b"], "--alphas"), (["--steer", f"{probe}@2=3"], "without =VALUE"), (["--control", "maybe"], "--control")):
        code, _, err = workbench(capsys, monkeypatch, "sweep", *args, *bad)
        assert code == 2 and error_line(err, needle)
    code, _, err = workbench(capsys, monkeypatch, "report", str(tmp_path))
    assert code == 2 and error_line(err, "not a sweep folder")


def test_the_projection_before_the_intervention_is_kept(organism, tmp_path):
    """``intervention_projection_before`` ``[N, R, S, 2]``: the projection on d̂ before the steer, at
    the last prompt token and over the response, is the captured (after) one minus α; NaN in rounds
    it did not act in; written to a run file as rounds/intervention_projection_before."""
    from workbench.engine.session import PROJECTION_BEFORE
    from workbench.store.reader import RunFile

    model, task, protocol, samples = setting("organism", None, organism)
    d = unit(model.d_model, 9)
    steer, clamp = Steer(d, layer=1, alpha=3.0, rounds=[1, 3]), Clamp(d, layers=[2, 3], value=0.5)
    s, res = run(model, task, protocol, samples, [steer, clamp])
    before = res.round_fields[PROJECTION_BEFORE]  # [N, R, 3 (steer@1, clamp@2, clamp@3), 2]
    after = res.activations["hook_resid_post"] @ d  # [N, R, 2, L]
    assert before.shape == (len(samples), ROUNDS, 3, 2)
    np.testing.assert_allclose(before[:, [0, 2], 0], after[:, [0, 2]][..., 1] - 3.0, atol=1e-4)
    assert np.isnan(before[:, 1, 0]).all()  # round 2: the steer did not act
    np.testing.assert_allclose(after[:, :, :, 2:], 0.5, atol=1e-4)
    assert np.abs(before[:, :, 1:] - 0.5).max() > 0.1  # the clamp's "before" is the model's own value
    path = s.save(tmp_path / "before.h5")
    with RunFile(path) as f:
        np.testing.assert_array_equal(f.array(f"rounds/{PROJECTION_BEFORE}"), before)


def test_ablating_the_subspace_several_probes_span(capsys, monkeypatch, tmp_path, probe):
    """``--ablate A.h5,B.h5@all``: one Ablate per layer of the two files' directions; after it, the
    captured activations have no component along either."""
    import json

    from cli_support import workbench
    from probe_files import write_probe

    from probes.directions import from_spec
    from workbench.store.reader import RunFile

    rng = np.random.default_rng(12)
    dirs = rng.standard_normal((4, 64)).astype(np.float32)
    other = write_probe(tmp_path / "other.h5", n_layers=4, d_model=64, directions=dirs / np.linalg.norm(dirs, axis=1, keepdims=True))
    made = from_spec("ablate", f"{probe},{other}@all")
    assert [iv.layers for iv in made] == [(0,), (1,), (2,), (3,)] and all(iv.direction.shape == (2, 64) for iv in made)
    out = tmp_path / "subspace.h5"
    code, _, err = workbench(capsys, monkeypatch, *RUN, "--out", str(out), "--ablate", f"{probe},{other}@2")
    assert code == 0, err
    with RunFile(out) as run:
        (record,) = json.loads(run.f.attrs["interventions"])
        acts = run.array("activations/hook_resid_post")[:, :, :, 2]  # [N, R, 2, d]
    assert record["n_directions"] == 2 and record["label"] == "fair.h5+other.h5@2"
    from probes.directions import read_direction

    for path in (probe, other):
        d = read_direction(path).at(2)
        assert (np.abs(acts @ d) < 1e-5 * np.linalg.norm(acts, axis=-1)).all()


def test_clamp_from_the_command_line_and_a_percentile(capsys, monkeypatch, tmp_path, probe):
    """``--clamp FILE@L=VALUE`` sets the captured projection; ``=pNN`` takes the NN-th percentile of
    the probe file's ``contrast_projections`` at that layer when it has them."""
    import json
    import shutil

    import h5py
    from cli_support import workbench

    from probes.directions import from_spec, read_direction
    from workbench.store.reader import RunFile

    out = tmp_path / "clamped.h5"
    code, _, err = workbench(capsys, monkeypatch, *RUN, "--out", str(out), "--clamp", f"{probe}@1=0.5", "--steer-rounds", "2")
    assert code == 0, err
    d = read_direction(probe).at(1)
    with RunFile(out) as run:
        (record,) = json.loads(run.f.attrs["interventions"])
        proj = run.array("activations/hook_resid_post")[:, :, :, 1] @ d  # [N, R, 2]
    assert record["kind"] == "clamp" and record["value"] == 0.5 and record["rounds"] == [2]
    np.testing.assert_allclose(proj[:, 1], 0.5, atol=1e-4)
    assert np.abs(proj[:, 0] - 0.5).max() > 1e-2  # round 1 was not clamped
    with_projections = shutil.copy(probe, tmp_path / "with.h5")
    values = np.arange(40, dtype=np.float32).reshape(4, 10)
    with h5py.File(with_projections, "a") as f:
        f["contrast_projections"] = values
    (clamp,) = from_spec("clamp", f"{with_projections}@2=p50")
    assert clamp.value == pytest.approx(np.percentile(values[2], 50))


def test_sampled_answers_are_steered_as_the_rounds_own_answer(loaded, organism):
    """``--samples-per-round`` under an intervention: the sampled answers continue the round's cache
    with the round's interventions installed (the last prompt token a prompt position, every sampled
    token a response one). Drawn at a temperature that leaves no choice (1e-4; a random tiny Llama:
    no tied logits), every sample is the round's own steered answer, token for token, in every round,
    also where steering changed that answer; with α = 0 they are the unsteered run's samples exactly."""
    from workbench.engine.open_ended import OpenEnded, round_extras
    from workbench.engine.sampling import EquivalenceSpec

    model, task, protocol, samples = setting("llama", loaded, organism)
    protocol = dataclasses.replace(protocol, decoding=dataclasses.replace(protocol.decoding, do_sample=True, temperature=1e-4))
    d = unit(model.d_model)

    def steered(alpha):
        extras = round_extras(OpenEnded(None, 2, EquivalenceSpec("exact")), model, protocol.decoding, 0)
        ivs = [Steer(d, layer=1, alpha=alpha, rounds=range(2, ROUNDS + 1))] if alpha is not None else []
        s = Session(model, task, protocol, samples, interventions=ivs, round_extras=extras, seed=0, strict=True)
        for _ in range(ROUNDS):
            s.step()
        return s.result()

    plain, zero, big = steered(None), steered(0.0), steered(40.0)
    assert big.response_ids != plain.response_ids  # the steering changed some answers
    for res in (plain, big):
        ids = res.round_fields["sampled_token_ids"]  # [B, R, k, width], -1 after an answer
        for i, row in enumerate(res.response_ids):
            for t, answer in enumerate(row):
                for k in range(2):
                    got = [int(x) for x in ids[i, t, k] if x >= 0]
                    assert got == answer, (i, t, k)
    for key in ("sampled_response", "sampled_mean_log_likelihood", "sampled_token_ids"):
        np.testing.assert_array_equal(plain.round_fields[key], zero.round_fields[key])
