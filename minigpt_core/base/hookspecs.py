"""The hooks a minigpt plugin can implement.

A plugin is any module (or object) exposed through the ``minigpt`` entry-point
group that implements these hooks with the :data:`hookimpl` marker::

    # pyproject.toml of a third-party package
    [project.entry-points.minigpt]
    myattn = "my_package.minigpt_plugin"

    # my_package/minigpt_plugin.py
    from minigpt_core.plugin import hookimpl

    @hookimpl
    def minigpt_register(registry):
        registry.add("attention", "myattn.linear", make_linear_attention,
                     params=LinearAttentionParams, description="...",
                     capabilities={"causal"})
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "minigpt"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class MinigptHookSpecs:
    @hookspec
    def minigpt_register(self, registry):  # pragma: no cover - specification only
        """Register components with ``registry.add(kind, name, factory, ...)``.

        ``registry`` is a view of the shared component registry that stamps each
        entry with this plugin's name and distribution.
        """
