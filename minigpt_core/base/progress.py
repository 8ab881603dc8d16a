"""Progress bars for the phases that take more than a few seconds (evaluations, checks, inspection).

The same bar the trainer draws (tqdm on stderr), shown only when stderr is a terminal: in a log
file or a pipe it would be a wall of carriage returns, and the phase's own lines say what it did.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar", "stderr_is_terminal"]


def stderr_is_terminal() -> bool:
    """stderr is a terminal, or a Jupyter kernel's stream (tqdm.auto draws a widget there)."""
    stream = sys.stderr
    if stream is not None and type(stream).__module__.startswith("ipykernel"):
        return True
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def progress_bar(total: int | None = None, *, desc: str | None = None, unit: str = "it", enabled: bool = True,
                 **options: Any):
    """A tqdm bar on stderr; a silent one (same methods, draws nothing) when ``enabled`` is false or
    stderr is not a terminal. It disappears when closed (``leave=False``) unless told otherwise."""
    from tqdm.auto import tqdm  # not at import: the base layer stays light

    kw: dict[str, Any] = dict(dynamic_ncols=True, mininterval=0.5, leave=False)
    kw.update(options)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not (enabled and stderr_is_terminal()),
                **kw)
