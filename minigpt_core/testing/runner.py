"""Running the conformance checks: as a report (``run_checks``) or as pytest parameters."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from ..base.loader import get_registry
from ..base.registry import KINDS, ComponentEntry, ComponentRegistry
from .checks import CHECKS, Check, applicable_checks
from .subject import CheckFailed, CheckSkipped, ConformanceError, Subject

__all__ = ["CheckResult", "check_component", "run_checks", "select_entries", "parametrize_component_checks"]

STATUSES = ("pass", "fail", "xfail", "xpass", "skip")


@dataclass(frozen=True)
class CheckResult:
    kind: str
    component: str
    check: str
    status: str  # one of STATUSES; "xpass": declared as an expected failure but passed (a failure)
    message: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status not in ("fail", "xpass")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one CPU thread: with more, OpenMP's hand-offs dominate (and on a
    busy machine a waiting thread can stall every op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(check: Check, subject: Subject) -> CheckResult:
    entry = subject.entry
    expected = entry.expected_failures.get(check.name)
    start = time.perf_counter()
    try:
        with one_thread():
            check.fn(subject)
    except CheckSkipped as exc:
        status, message = "skip", str(exc)
    except Exception as exc:  # noqa: BLE001 - a crashing component is a failing one
        message = str(exc) if isinstance(exc, CheckFailed) else \
            f"{subject.label}: raised {type(exc).__name__}: {exc}"
        status, message = ("xfail", f"{expected} ({message})") if expected else ("fail", message)
    else:
        status = "xpass" if expected else "pass"
        message = (f"{subject.label} declares '{check.name}' as an expected failure ({expected}) but passes "
                   f"it; remove it from expected_failures") if expected else ""
    return CheckResult(entry.kind, entry.name, check.name, status, message, time.perf_counter() - start)


def _validate_check_names(names: Iterable[str] | None) -> list[str] | None:
    if names is None:
        return None
    names = list(names)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ConformanceError(f"Unknown conformance check(s) {', '.join(unknown)}. Checks are: {', '.join(CHECKS)}.")
    return names


def check_component(entry: ComponentEntry, *, registry: ComponentRegistry | None = None,
                    params: Mapping[str, Any] | None = None, checks: Iterable[str] | None = None,
                    device: str | torch.device = "cpu",
                    on_check: Callable[[ComponentEntry, str, CheckResult | None], None] | None = None
                    ) -> list[CheckResult]:
    """Run every check that applies to one entry (with ``params`` instead of its defaults).

    ``on_check(entry, check, None)`` is called before each check and ``on_check(entry, check, result)``
    after it (a progress bar)."""
    subject = Subject(entry, registry or get_registry(), dict(params or {}), torch.device(device))
    results = []
    for check in applicable_checks(entry, _validate_check_names(checks)):
        if on_check is not None:
            on_check(entry, check.name, None)
        results.append(_run(check, subject))
        if on_check is not None:
            on_check(entry, check.name, results[-1])
    return results


def select_entries(registry: ComponentRegistry, pattern: str = "*",
                   kinds: Iterable[str] | None = None) -> list[ComponentEntry]:
    kinds = list(kinds) if kinds else list(KINDS)
    return [e for kind in kinds for e in registry.entries(kind, pattern)]


def run_checks(registry: ComponentRegistry | None = None, pattern: str = "*", *,
               kinds: Iterable[str] | None = None, checks: Iterable[str] | None = None,
               device: str | torch.device = "cpu", params: Mapping[str, Any] | None = None,
               on_component: Callable[[ComponentEntry, list[CheckResult]], None] | None = None,
               on_check: Callable[[ComponentEntry, str, CheckResult | None], None] | None = None) -> list[CheckResult]:
    """Check every registered component whose name matches ``pattern``; return all results.

    ``params`` replace the defaults of every matched component (so match one component, or
    components sharing those params); ``on_component`` is called after each component (the
    CLI prints its row there), ``on_check`` before and after each check (see check_component).
    """
    registry = registry or get_registry()
    results: list[CheckResult] = []
    for entry in select_entries(registry, pattern, kinds):
        found = check_component(entry, registry=registry, params=params, checks=checks, device=device,
                                on_check=on_check)
        results += found
        if on_component is not None:
            on_component(entry, found)
    return results


class BoundCheck:
    """What a parametrized test receives as ``check``: call it with the entry."""

    def __init__(self, check: Check, registry: ComponentRegistry, device: str | torch.device):
        self.check = check
        self.registry = registry
        self.device = torch.device(device)

    def __call__(self, entry: ComponentEntry, params: Mapping[str, Any] | None = None) -> None:
        import pytest

        try:
            with one_thread():
                self.check.fn(Subject(entry, self.registry, dict(params or {}), self.device))
        except CheckSkipped as exc:
            pytest.skip(str(exc))

    def __repr__(self) -> str:
        return self.check.name


def parametrize_component_checks(registry: ComponentRegistry | None = None, pattern: str = "*", *,
                                 kinds: Iterable[str] | None = None, checks: Iterable[str] | None = None,
                                 device: str | torch.device = "cpu"):
    """``pytest.mark.parametrize("entry, check", ...)`` over every (component, applicable check).

    Use it like scikit-learn's ``parametrize_with_checks``::

        @parametrize_component_checks()
        def test_conformance(entry, check):
            check(entry)

    Declared expected failures become strict xfails (an unexpected pass fails the test).
    """
    import pytest

    registry = registry or get_registry()
    names = _validate_check_names(checks)
    cases = []
    for entry in select_entries(registry, pattern, kinds):
        for check in applicable_checks(entry, names):
            reason = entry.expected_failures.get(check.name)
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            cases.append(pytest.param(entry, BoundCheck(check, registry, device), marks=marks,
                                      id=f"{entry.kind}:{entry.name}:{check.name}"))
    return pytest.mark.parametrize(("entry", "check"), cases)
