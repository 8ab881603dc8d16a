import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/book_reference.py

# The suite runs on 2 cores next to other work; at most two intra-op threads keep timings stable,
# and one per pytest-xdist worker (`make test`), since the workers already share the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def registry():
    """A registry freshly loaded from the installed entry points (no shared state between tests)."""
    from minigpt_core import load_registry

    return load_registry()


@pytest.fixture
def minigpt_cli():
    """Run the installed `minigpt` console script in a subprocess, as a user would."""
    import subprocess

    exe = Path(sys.executable).with_name("minigpt")

    def run(*args, env=None, cwd=ROOT):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                              timeout=300)

    return run


@pytest.fixture
def isolated_plugins():
    """A fresh process-wide registry and MINIGPT_PLUGIN_PATH for the test, restored after it.

    In-process CLI calls load local plugins into the process-wide registry and name them in
    MINIGPT_PLUGIN_PATH (for worker processes); monkeypatch would not undo a variable it did not set.
    """
    from minigpt_core.base.loader import PLUGIN_PATH_ENV_VAR, reset_registry

    saved = os.environ.pop(PLUGIN_PATH_ENV_VAR, None)
    reset_registry()
    yield
    reset_registry()
    os.environ.pop(PLUGIN_PATH_ENV_VAR, None)
    if saved is not None:
        os.environ[PLUGIN_PATH_ENV_VAR] = saved

