# `make test` and `make run` do all the set-up on a fresh machine: a virtualenv in .venv,
# torch (an already-installed compatible one is reused), minigpt and its plugins.
PYTHON ?= python3
VENV ?= .venv
# Used only when no compatible torch is found; on PyPI this is the default build for the platform.
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
TORCH_OK := import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(not (2, 3) <= v < (2, 15))

.PHONY: install install-run test test-fast test-stress run clean

# `make install`: everything, tests included (the dev extra). `make run` needs only minigpt itself:
# `install-run` leaves out the test tools (transformers, selenium, PEFT, torchao, datasets, ...).
install: $(VENV)/.installed

install-run: $(VENV)/.installed-run

# The venv and torch, shared by both.
$(VENV)/.torch:
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "$(TORCH_OK)" 2>/dev/null; then \
	    echo "minigpt: reusing the torch installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(BIN)/python -c "$(TORCH_OK)" 2>/dev/null || $(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	@touch $@

$(VENV)/.installed-run: pyproject.toml | $(VENV)/.torch
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(VENV)/.installed: pyproject.toml | $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@ $(VENV)/.installed-run

# Two workers or more (pytest-xdist), each file on one worker (its module fixtures built once),
# one torch thread each: tiny models do not scale past one thread, and the workers share the cores.
TEST_CMD = OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15

# lint-imports first: an import that breaks the layers (docs/architecture.md) fails the build.
test: install
	$(BIN)/lint-imports
	$(TEST_CMD)

# The suite under load, as a busy CI machine runs it: STRESS_RUNS full runs of `make test`'s command
# while two busy loops keep both cores busy (killed however it ends), then one summary line per run.
# Full logs stay in a temporary folder, named at the end; the exit status is 1 if any run failed.
STRESS_RUNS ?= 3
test-stress: install
	@logs=$$(mktemp -d); loads=""; \
	trap 'kill $$loads 2>/dev/null' EXIT; trap 'exit 130' INT TERM; \
	for i in 1 2; do $(BIN)/python -c "while True: pass" & loads="$$loads $$!"; done; \
	failed=0; \
	for run in $$(seq 1 $(STRESS_RUNS)); do \
	  echo "== test-stress: run $$run of $(STRESS_RUNS), two busy loops running (pids$$loads)"; \
	  { $(TEST_CMD); echo $$? > $$logs/run-$$run.rc; } 2>&1 | tee $$logs/run-$$run.log; \
	  [ "$$(cat $$logs/run-$$run.rc)" = 0 ] || failed=1; \
	done; \
	echo "== test-stress summary ($(STRESS_RUNS) runs under load; logs in $$logs)"; \
	for run in $$(seq 1 $(STRESS_RUNS)); do \
	  echo "run $$run: exit $$(cat $$logs/run-$$run.rc): $$(grep -E '(passed|failed|error)' $$logs/run-$$run.log | tail -n 1)"; \
	done; \
	exit $$failed

# Everything but the tests marked slow (whole ablations, several ranks, killed runs, compilation, installs):
# the loop while editing. `make test` runs them all.
test-fast: install
	$(BIN)/lint-imports
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow"

run: install-run
	$(BIN)/minigpt train experiments/quickstart.toml

clean:
	rm -rf $(VENV) runs wandb *.egg-info
