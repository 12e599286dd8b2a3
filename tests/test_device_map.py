"""A model placed over several devices (Hugging Face/accelerate ``device_map``, ``max_memory``):
options checked before anything loads, the bridge booted over the placed weights, capture and
generation equal to the same model on one device, and the placement recorded in the run file.

CPU only: the "devices" are the CPU and accelerate's disk offload (weights on ``meta``, read back
from an offload folder module by module as each one runs)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import BBQ_FIXTURE

from workbench.errors import WorkbenchError
from workbench.engine.models import check_placement, load_model, parse_device_map, parse_max_memory
from workbench.engine.protocol import load_protocol
from workbench.engine.session import Session
from workbench.engine.tasks import load_bbq

SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("parse, text, message", [
    (parse_device_map, "everywhere", "--device-map must be auto, balanced"),
    (parse_device_map, "{not json", "not valid JSON"),
    (parse_device_map, "[1, 2]", "an object of module name → device"),
    (parse_device_map, '{"model.layers.0": "gpu7"}', "is not a device"),
    (parse_device_map, '{"model.layers.0": -1}', "is not a device"),
    (parse_max_memory, "0:70GiB", "DEVICE=SIZE pairs"),
    (parse_max_memory, "gpu0=70GiB", "is not a device"),
    (parse_max_memory, "0=seventy", "is not a size"),
    (parse_max_memory, "cpu=1GiB,cpu=2GiB", "names cpu twice"),
])
def test_bad_placement_options_are_one_line(parse, text, message):
    with pytest.raises(WorkbenchError, match=message):
        parse(text)


def test_placement_options_are_parsed_and_checked_together(tmp_path):
    assert check_placement("auto", "sequential", "0=70GiB, 1=70gib,cpu=200GiB") == (
        "sequential", {0: "70GiB", 1: "70GiB", "cpu": "200GiB"})
    assert check_placement("auto", None, None) == (None, None)
    (tmp_path / "map.json").write_text(json.dumps(SPLIT))
    assert check_placement("auto", str(tmp_path / "map.json"), None) == (SPLIT, None)
    with pytest.raises(WorkbenchError, match="--max-memory needs --device-map"):
        check_placement("auto", None, "cpu=1GiB")
    with pytest.raises(WorkbenchError, match="give one"):
        check_placement("cuda", "auto", None)


def test_the_run_command_refuses_bad_placement_before_loading_a_model(tmp_path):
    from workbench.engine.run import RunConfig, validate_config

    with pytest.raises(WorkbenchError, match="--max-memory needs --device-map"):
        validate_config(RunConfig(out=tmp_path / "r.h5", model=str(tmp_path / "no-such-model"), max_memory="cpu=1GiB"))


@pytest.fixture(scope="module")
def split_llama(model_dirs):
    return load_model(str(model_dirs["llama"]), device="cpu", dtype="float32"), load_model(
        str(model_dirs["llama"]), dtype="float32", device_map=SPLIT)


def test_a_model_split_over_cpu_and_disk_offload_captures_what_one_device_captures(split_llama):
    import torch

    whole, split = split_llama
    assert split.placement["placed"] == SPLIT and split.device == "cpu"
    assert split.hf.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded: read back as it runs
    assert split.bridge.cfg.n_layers == whole.bridge.cfg.n_layers  # the bridge booted over the placed weights
    protocol = load_protocol("bbq-paper", rounds=3)
    protocol = dataclasses.replace(protocol, decoding=dataclasses.replace(protocol.decoding, max_new_tokens=6))
    samples = load_bbq([BBQ_FIXTURE], limit=3)
    runs = []
    for model in (whole, split):
        s = Session(model, "bbq", protocol, samples, hooks=["hook_resid_post", "hook_resid_mid"])
        for _ in range(protocol.rounds):
            s.step()
        runs.append(s.result())
    a, b = runs
    assert a.response_ids == b.response_ids
    for hook in a.activations:
        assert not np.isnan(a.activations[hook][:, :, 0]).any()
        np.testing.assert_allclose(b.activations[hook], a.activations[hook], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.option_probs, a.option_probs, rtol=1e-5)
    np.testing.assert_allclose(b.mean_token_entropy, a.mean_token_entropy, rtol=1e-5)
    assert next(whole.hf.parameters()).device == torch.device("cpu")  # loading the split one moved nothing of the other


def test_the_run_file_records_the_placement(tmp_path, split_llama, model_dirs):
    from workbench.engine.run import RunConfig, run_protocol

    whole, split = split_llama
    cfg = RunConfig(out=tmp_path / "split.h5", model=str(model_dirs["llama"]), task="bbq", data=(str(BBQ_FIXTURE),),
                    limit=2, rounds=2, max_new_tokens=3, batch_size=2)
    with run_protocol(cfg, model=split) as run:
        assert run.meta["device_map"]["placed"] == SPLIT and run.meta["device_map"]["requested"] == SPLIT
    with run_protocol(dataclasses.replace(cfg, out=tmp_path / "whole.h5"), model=whole) as run:
        assert run.meta["device_map"] == {}
