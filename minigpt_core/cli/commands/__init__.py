"""CLI commands beyond the core ones, one module each; importing a module registers its command(s).

cli.parser's COMMAND_MODULES names each command's module; cli.app imports only the module of the
command that runs (all of them for an unknown one), so a command pays only for what it imports.
"""
