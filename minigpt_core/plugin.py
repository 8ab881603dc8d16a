"""The public API for writing minigpt plugins: everything a plugin imports comes from here.

A plugin is a module with a ``@hookimpl``-marked ``minigpt_register(registry)`` function that adds
components to the registrar it receives. See docs/plugins.md for the guide.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ._hookspecs import hookimpl
from ._plugins import PluginRegistrar as Registrar
from .model import BuildContext, KVCache, LayerKVCache, mark_residual_projection
from .registry import CAPABILITIES, KINDS

__all__ = [
    "hookimpl",
    "Registrar",
    "Params",
    "BuildContext",
    "KVCache",
    "LayerKVCache",
    "mark_residual_projection",
    "KINDS",
    "CAPABILITIES",
]


class Params(BaseModel):
    """Base class of a component's params: unknown (misspelt) fields are refused."""

    model_config = ConfigDict(extra="forbid")
