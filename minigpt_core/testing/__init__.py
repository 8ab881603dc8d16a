"""Conformance checks that every registered component must pass, first-party or third-party.

From pytest, in the style of scikit-learn's ``parametrize_with_checks``::

    from minigpt_core.testing import parametrize_component_checks

    @parametrize_component_checks(pattern="myplugin.*")
    def test_conformance(entry, check):
        check(entry)

From Python, ``run_checks(pattern="torch.*")`` returns one :class:`CheckResult` per
(component, check); from the shell, ``minigpt check 'torch.*'`` prints them as a table.
A new check registered with :func:`conformance_check` reaches every component it applies to.

The experiment tools layer, beside ablation (which it may not import). May import runs, train and every layer below.
"""

from __future__ import annotations

from .checks import CHECKS, REFERENCE_ATTENTION, Check, applicable_checks, conformance_check
from .runner import CheckResult, check_component, parametrize_component_checks, run_checks, select_entries
from .subject import TINY_MODEL, CheckFailed, CheckSkipped, ConformanceError, Subject

__all__ = [
    "CHECKS",
    "REFERENCE_ATTENTION",
    "TINY_MODEL",
    "Check",
    "CheckFailed",
    "CheckSkipped",
    "CheckResult",
    "ConformanceError",
    "Subject",
    "applicable_checks",
    "check_component",
    "conformance_check",
    "parametrize_component_checks",
    "run_checks",
    "select_entries",
]
