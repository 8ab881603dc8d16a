"""Ablations: a grid of variants over several seeds, run as ordinary runs, compared fairly.

``file.py`` reads an ablation file; ``plan.py`` expands and validates it into cells (variant x
seed, each a complete experiment spec) with the budgets ``budgets.py`` fixes; ``runner.py`` runs
them and keeps the manifest; ``report.py`` and ``stats.py`` turn the runs' metrics.jsonl into
results.csv, report.md and figures.

The experiment tools layer (beside testing, which it may not import). May import runs, train and
every layer below them; never the CLI.
"""

from .plan import AblationError, AblationFile, Cell, Plan, load_plan

__all__ = ["AblationError", "AblationFile", "Cell", "Plan", "load_plan"]
