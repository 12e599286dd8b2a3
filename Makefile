# The two quick-start commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first and pinned: here `pip install torch==2.13.0` takes the local CPU build; a bare `torch`
# requirement would pull the newest CUDA build (several GB). Override for your own machine, e.g.
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
DEMO   ?= artifacts/runs/demo.h5

.PHONY: setup demo test bench clean-runs system-tools

setup: $(VENV)/.installed system-tools

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# h5ls (hdf5-tools) for the file-format tests; installed when we may (root), else the test says why it skipped.
system-tools:
	@command -v h5ls >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq hdf5-tools >/dev/null) || \
	  echo "note: h5ls not installed (install hdf5-tools); its test will be skipped"; }

PROBE  ?= artifacts/probes/organism-fair.h5

# A self-correction run on the shipped organism, a concept probe fitted on every layer, its scores
# tracked through the run, and the per-round table (accuracy, uncertainty, concept score).
demo: setup
	$(BIN)/workbench run --model organism --task organism --protocol organism --limit 64 --out $(DEMO) --overwrite
	$(BIN)/workbench probe fit --model organism --contrast organism --method logreg --out $(PROBE)
	$(BIN)/workbench probe track $(DEMO) $(PROBE) --name fair
	$(BIN)/workbench info $(DEMO)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_run.py
	$(BIN)/python benchmarks/bench_store.py
	$(BIN)/python benchmarks/bench_probes.py

clean-runs:
	rm -rf artifacts/runs
