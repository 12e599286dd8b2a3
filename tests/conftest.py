"""Shared fixtures: tiny chat models of three architectures, built once per session and loaded by path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Tiny models run fastest on one thread, and the CLI subprocesses the tests start inherit it: on a
# 2-core machine two OpenMP threads per process only contend.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_model  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
BBQ_FIXTURE = FIXTURES / "bbq_fixture.jsonl"
SHARED_BBQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbq"
ARCHS = ("llama", "gpt2", "qwen2")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """arch → folder of a saved tiny random chat model (config, safetensors, tokenizer with template)."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def loaded(model_dirs):
    """arch → LoadedModel (float32, CPU), loaded once per session the way the CLI loads it."""
    from workbench.engine.models import load_model

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_model(str(model_dirs[arch]), device="cpu", dtype="float32")
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def organism():
    """The shipped organism (float32, CPU), loaded once per session the way the CLI loads it."""
    from workbench.engine.models import load_model

    return load_model("organism", device="cpu")
