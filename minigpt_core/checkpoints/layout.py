"""Where a run keeps its checkpoints, and which of them are complete: file names and listing only.

No torch here: `minigpt runs` and `diff` read runs through this module (minigpt_core.runs), and
checkpoints.state (saving, loading, resuming) builds on it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..base.errors import CheckpointError
from ..base.reading import SPEC_LIMIT, read_text_bounded

__all__ = ["CHECKPOINTS_DIR", "TRAINER_FILE", "WEIGHTS_FILE", "SPEC_FILE", "META_FILE", "list_checkpoints", "read_record"]

CHECKPOINTS_DIR = "checkpoints"
TRAINER_FILE = "trainer.json"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "spec.toml"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OLD_DIR = re.compile(r"^\.(step_\d+)\.old$")  # a step saved again, while the new copy moves in


def read_record(path: Path) -> str:
    """A checkpoint's small text file (meta.json, spec.toml, trainer.json), bounded: a device or a huge
    file in its place is a CheckpointError, never a read without end."""
    return read_text_bounded(path, "checkpoint file", SPEC_LIMIT, CheckpointError,
                             hint="Use another checkpoint of the run.")


# -- finding -------------------------------------------------------------------------------
def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = {}
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name) or _OLD_DIR.match(child.name)
        if m and not child.is_symlink() and _complete(child):
            step = int(m.group(1).removeprefix("step_") if m.re is _OLD_DIR else m.group(1))
            if step not in found or child.name.startswith("step_"):
                found[step] = child
    return sorted(found.items())


def _complete(directory: Path) -> bool:
    """trainer.json and every file it holds a hash for exist (the hashes are checked on load)."""
    try:
        hashes = json.loads(read_record(directory / TRAINER_FILE))["sha256"]
        return all((directory / name).is_file() for name in hashes)
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return False
