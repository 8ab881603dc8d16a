import os
import sys
from pathlib import Path

import pytest

# The suite must not depend on the caller's environment: WANDB_MODE=offline would override a spec's
# `disabled` mode, MINIGPT_PLUGINS= would unload every plugin, a thread count would change timings,
# torchrun's variables would make a test a distributed rank. Each test sets what it needs.
# OMP_NUM_THREADS stays: `make test` sets it for every worker.
CALLER_PREFIXES = ("WANDB_", "MINIGPT_")
CALLER_VARIABLES = ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "NUMEXPR_MAX_THREADS", "BLIS_NUM_THREADS", "GOTO_NUM_THREADS", "TORCH_NUM_THREADS",
                    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def caller_variables() -> list[str]:
    return [k for k in os.environ if k.startswith(CALLER_PREFIXES) or k in CALLER_VARIABLES]


# Cleared as this file loads, before torch and the test modules import (a registry or a thread pool
# made while collecting would keep what they saw), and again by the session fixture below.
for _name in caller_variables():
    del os.environ[_name]

import torch  # noqa: E402  (after the environment is clean)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/book_reference.py


@pytest.fixture(scope="session", autouse=True)
def _environment_independent_of_the_caller():
    """No WANDB_*, MINIGPT_* or thread variables from the caller for the session; subprocesses started
    with os.environ inherit the clean environment too."""
    with pytest.MonkeyPatch.context() as mp:
        for name in caller_variables():
            mp.delenv(name)
        # `minigpt train`'s busy-machine note reads this instead of the load average, so that what a
        # test prints does not depend on what else runs on the machine (test_busy_machine.py sets its own).
        mp.setenv("MINIGPT_TEST_LOADAVG", "0")
        yield

# The suite runs on 2 cores next to other work; at most two intra-op threads keep timings stable,
# and one per pytest-xdist worker (`make test`), since the workers already share the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))



@pytest.fixture(autouse=True)
def _python_handles_ctrl_c():
    """Each test starts with Python's own SIGINT handler. The CLI run in-process ignores Ctrl-C once it
    has reported one (as the console script does while it exits), and every process a later test
    started would inherit that: a `minigpt train` it meant to interrupt then ran to the end."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def registry():
    """A registry freshly loaded from the installed entry points (no shared state between tests)."""
    from minigpt_core import load_registry

    return load_registry()


@pytest.fixture
def minigpt_cli():
    """Run the installed `minigpt` console script in a subprocess, as a user would."""
    import subprocess

    from training_utils import PATIENCE_S

    exe = Path(sys.executable).with_name("minigpt")

    def run(*args, env=None, cwd=ROOT):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                              timeout=PATIENCE_S)

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



# pytest-xdist's --dist loadfile hands out whole files in collection order, the next one to whichever
# worker is nearly done. The longest files go first (as measured with --durations), so that none of them
# starts last while the other worker idles. Order only: within a file, and among the rest, it is unchanged.
LONG_FILES_FIRST = ("test_ablate_resume.py", "test_ablate.py", "test_ablate_runner.py", "test_generate_fast.py",
                    "test_zoo.py", "test_hf_parity.py", "test_plugin_kit.py", "test_compile.py", "test_fsdp_meta.py",
                    "test_resume.py", "test_distributed.py", "test_integrity.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort
