"""``python -m minigpt`` (and ``torchrun -m minigpt``) runs the minigpt CLI; the library is minigpt_core."""
