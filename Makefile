# `make test` and `make run` do all the set-up on a fresh machine: a virtualenv in .venv,
# torch (an already-installed compatible one is reused), minigpt and its plugins.
PYTHON ?= python3
VENV ?= .venv
# Used only when no compatible torch is found; on PyPI this is the default build for the platform.
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
TORCH_OK := import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(not (2, 3) <= v < (2, 15))

.PHONY: install test test-fast run clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "$(TORCH_OK)" 2>/dev/null; then \
	    echo "minigpt: reusing the torch installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(BIN)/python -c "$(TORCH_OK)" 2>/dev/null || $(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

# Two workers or more (pytest-xdist), each file on one worker (its module fixtures built once),
# one torch thread each: tiny models do not scale past one thread, and the workers share the cores.
# lint-imports first: an import that breaks the layers (docs/architecture.md) fails the build.
test: install
	$(BIN)/lint-imports
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15

test-fast: install
	$(BIN)/lint-imports
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow"

run: install
	$(BIN)/minigpt train experiments/quickstart.toml

clean:
	rm -rf $(VENV) runs wandb *.egg-info
