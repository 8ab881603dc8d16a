"""User-facing errors.

Everything a user can cause (a bad experiment file, a missing plugin, a corrupt
checkpoint) raises a subclass of :class:`MinigptError`. The CLI prints its
message as one paragraph and exits non-zero without a traceback; anything else
is a bug in minigpt or a plugin and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "MinigptError",
    "FinetuneError",
    "SpecError",
    "UnknownComponentError",
    "DuplicateComponentError",
    "PluginLoadWarning",
    "CheckpointError",
    "ComponentBuildError",
    "InsufficientMemoryError",
    "PluginLoadError",
]


class MinigptError(Exception):
    """An error the user can fix; its message says what was wrong and how to fix it."""


class SpecError(MinigptError):
    """An experiment spec failed validation. ``problems`` holds (path, reason) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        if len(problems) == 1:
            path, reason = problems[0]
            msg = f"Invalid experiment spec{where}: {path}: {reason}"
        else:
            lines = "; ".join(f"{path}: {reason}" for path, reason in problems)
            msg = f"Invalid experiment spec{where} ({len(problems)} problems): {lines}"
        super().__init__(msg)


class UnknownComponentError(MinigptError):
    """A spec or a call named a component that no loaded plugin registers."""


class DuplicateComponentError(MinigptError):
    """Two plugins registered the same component name."""


class CheckpointError(MinigptError):
    """A checkpoint is missing, truncated, corrupt or incompatible."""


class PretrainedError(MinigptError):
    """Weights cannot move between minigpt and another library's layout (incompatible model, no hub access)."""


class ComponentBuildError(MinigptError):
    """A component's factory raised while the model was built; the message names the component and plugin."""


class InsufficientMemoryError(MinigptError):
    """The model (and its training state) would not fit in the memory this machine has."""


class PluginLoadError(MinigptError):
    """A plugin asked for by name or path (--plugin, MINIGPT_PLUGIN_PATH, a spec's ``plugins``) cannot be loaded."""


class PluginLoadWarning(UserWarning):
    """A plugin failed to import or its registration hook raised; the others still load."""


class FinetuneError(MinigptError):
    """A ``[finetune]`` setting that does not fit the model (a pattern matching nothing, a tied head, ...)."""
