# The two quick-start commands: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first and pinned: here `pip install torch==2.13.0` takes the local CPU build; a bare `torch`
# requirement would pull the newest CUDA build (several GB). Override for your own machine, e.g.
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
DEMO   ?= artifacts/runs/demo.h5
DEMO_WORLD ?= artifacts/runs/demo-world.h5
DEMO_VISUAL ?= artifacts/runs/demo-visual.h5

.PHONY: setup demo test test-quick bench clean-runs system-tools

setup: $(VENV)/.installed system-tools

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev,data]"
	touch $@

# System tools the tests drive: h5ls (hdf5-tools) for the file-format tests, tmux for the TUI's terminal
# test, chromium for headless screenshots. Installed when we may (root + apt-get), else the tests that
# need them say why they skipped.
SYSTEM_TOOLS := h5ls:hdf5-tools tmux:tmux chromium:chromium
system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing system tools:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) || echo "note: could not install$$missing; their tests will be skipped"; \
	  else echo "note: not installed:$$missing (no root/apt-get); their tests will be skipped"; fi; \
	fi

PROBE  ?= artifacts/probes/organism-fair.h5
PROBE_VISUAL ?= artifacts/probes/organism-visual-fair.h5

# A self-correction run on the shipped organism (moral follow-ups, `organism`), a concept probe
# fitted on every layer, its scores tracked through the run, the per-round table (accuracy,
# uncertainty, concept score); then the same items under `organism-world` (follow-ups drawn per
# sample from the world), the only protocol where the exact posterior varies within a round, so
# that the probe's within-round and per-change Spearman ρ can be measured (the README's figures);
# a report overlaying both; then the visual organism (a tiny LLaVA that must read a picture to
# know who is who): its picture controls, and the same probe check on its own `organism-world` run;
# then the TUI on the first run when stdout is a terminal (else the command that opens it).
demo: setup
	$(BIN)/workbench run --model organism --task organism --protocol organism --limit 64 --out $(DEMO) --overwrite
	$(BIN)/workbench run --model organism --task organism --protocol organism-world --limit 64 --out $(DEMO_WORLD) --overwrite
	$(BIN)/workbench probe fit --model organism --contrast organism --method ridge --out $(PROBE) --overwrite
	$(BIN)/workbench probe track $(DEMO) $(PROBE) --name fair
	$(BIN)/workbench probe track $(DEMO_WORLD) $(PROBE) --name fair
	$(BIN)/workbench analyze $(DEMO)
	$(BIN)/workbench analyze $(DEMO_WORLD)
	$(BIN)/workbench report $(DEMO) $(DEMO_WORLD) --out artifacts/runs/reports/demo
	$(BIN)/workbench info $(DEMO)
	$(BIN)/workbench organism check --visual --n 200 --items 20
	$(BIN)/workbench run --model organism-visual --task organism-visual --protocol organism-world --limit 64 --out $(DEMO_VISUAL) --overwrite
	$(BIN)/workbench probe fit --model organism-visual --contrast organism --method ridge --out $(PROBE_VISUAL) --overwrite
	$(BIN)/workbench probe track $(DEMO_VISUAL) $(PROBE_VISUAL) --name fair
	$(BIN)/workbench analyze $(DEMO_VISUAL)
	@if [ -t 1 ]; then $(BIN)/workbench tui $(DEMO); \
	else echo "open the run in the terminal UI:  $(BIN)/workbench tui $(DEMO)   (? lists the keys)"; fi

test: setup
	$(BIN)/python -m pytest -q

# The suite without the tests marked slow (whole runs killed and resumed in subprocesses): a minute or two.
test-quick: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/bench_run.py
	$(BIN)/python benchmarks/bench_store.py
	$(BIN)/python benchmarks/bench_probes.py
	$(BIN)/python benchmarks/bench_startup.py
	$(BIN)/python benchmarks/bench_session.py
	$(BIN)/python benchmarks/bench_export.py
	$(BIN)/python benchmarks/bench_tui.py
	$(BIN)/python benchmarks/bench_gpu.py   # the 1B grid on a GPU; on the CPU a tiny config (under a minute)
	$(BIN)/python benchmarks/bench_merge.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_decode_step.py --padding --breakdown   # what a leaner decode pass could still give
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_peers.py   # nnsight columns need the bench extra (pip install -e ".[bench]" with the torch pin)

clean-runs:
	rm -rf artifacts/runs
