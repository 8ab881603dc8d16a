"""CLI commands beyond the core ones, one module each; importing a module registers its command(s)."""
from . import hf  # noqa: F401  import-hf, export-hf
from . import check  # noqa: F401  check
from . import train  # noqa: F401  train, sample, eval, prepare
from . import new_plugin  # noqa: F401  new-plugin
from . import ablate  # noqa: F401  ablate, report, plot
from . import inspection  # noqa: F401  attention (and eval --per-token's half)
from . import runs  # noqa: F401  runs, diff
from . import classify  # noqa: F401  classify
from . import quantize  # noqa: F401  quantize
