"""Ablations: a grid of variants over several seeds, run as ordinary runs, compared fairly.

``plan.py`` reads and validates an ablation file into cells (variant x seed, each a complete
experiment spec with its budget), ``runner.py`` runs them and keeps the manifest, ``report.py``
and ``stats.py`` turn the runs' metrics.jsonl into results.csv, report.md and figures.
"""

from .plan import AblationError, AblationFile, Cell, Plan, load_plan

__all__ = ["AblationError", "AblationFile", "Cell", "Plan", "load_plan"]
