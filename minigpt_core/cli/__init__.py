"""The top layer, the command line: ``minigpt`` and its subcommands.

``parser`` holds the command table every command module adds to; ``commands`` the subcommands;
``app`` builds the argument parser and runs one. May import every other layer.
"""
