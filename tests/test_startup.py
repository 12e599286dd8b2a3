"""Commands that run no model import neither torch nor transformers (issue 8: start-up).

Each command runs in a fresh interpreter through :func:`workbench.cli.main`; the modules it left
in ``sys.modules`` are written to a file and checked. Timings are in benchmarks/bench_startup.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "transformer_lens", "sklearn", "textual")

PROBE = """
import json, sys
sys.argv = ["workbench", *json.loads(sys.argv[1])]
from workbench.cli import main
try:
    main()
except SystemExit as e:
    code = e.code
with open(OUT, "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""


def imported_by(args: list[str], tmp_path: Path) -> tuple[int, set[str]]:
    out = tmp_path / "modules.json"
    script = f"OUT = {str(out)!r}\n" + PROBE
    subprocess.run([sys.executable, "-c", script, json.dumps(args)], check=True, capture_output=True, timeout=120)
    result = json.loads(out.read_text())
    return result["code"], set(result["modules"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real organism run file and a probe file, made in this (torch-importing) process."""
    from probe_files import write_probe

    from workbench import run_protocol

    root = tmp_path_factory.mktemp("startup")
    run_protocol(model="organism", task="organism", limit=4, rounds=3, out=root / "run.h5").close()
    write_probe(root / "probe.h5")
    return root


@pytest.mark.parametrize("args", [
    ["--help"], ["run", "--help"], ["protocol", "show", "bbq-paper"], ["info", "{run}"], ["info", "{run}", "--json"],
    ["probe", "show", "{probe}"], ["organism", "sample", "--n", "1"],
])
def test_commands_that_run_no_model_import_no_torch(args, files, tmp_path):
    args = [a.format(run=files / "run.h5", probe=files / "probe.h5") for a in args]
    code, modules = imported_by(args, tmp_path)
    assert code == 0
    heavy = sorted(m for m in HEAVY if m in modules)
    assert not heavy, f"workbench {' '.join(args)} imported {heavy}"


@pytest.mark.slow
def test_the_check_can_fail(tmp_path):
    """A command that runs the model does import torch: the probe above sees imports."""
    code, modules = imported_by(["run", "--limit", "1", "--rounds", "1", "--out", str(tmp_path / "r.h5")], tmp_path)
    assert code == 0 and "torch" in modules and "transformers" in modules
