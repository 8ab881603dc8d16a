"""The base layer: what every other layer may use.

Errors, the component registry and the plugin loader that fills it, the hook specification, the
component contracts (protocols and capabilities), TOML, atomic disk writes, device and
process-group helpers. Imports nothing else from minigpt_core.
"""
