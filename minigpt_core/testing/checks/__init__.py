"""The conformance checks. Each takes a :class:`Subject` and raises CheckFailed (or CheckSkipped).

``registry`` holds the checks and the helpers they share; the other modules register checks by
kind of subject: a component as a module (``modules``, ``compiling``), inside a tiny GPT
(``models``), the components that are not modules (``formats``), adapters and templates
(``adapters``). Importing this package registers them all, in the order they run and are listed.
"""

from __future__ import annotations

# Importing them registers their checks, in this order (the order checks run and are listed).
from . import modules  # noqa: F401  (first: the declaration check, then the module checks)
from . import compiling  # noqa: F401
from . import models  # noqa: F401
from . import formats  # noqa: F401
from . import adapters  # noqa: F401
from .registry import CHECKS, REFERENCE_ATTENTION, REFERENCE_COMPONENTS, Check, applicable_checks, conformance_check

__all__ = ["Check", "CHECKS", "conformance_check", "applicable_checks", "REFERENCE_ATTENTION", "REFERENCE_COMPONENTS"]
