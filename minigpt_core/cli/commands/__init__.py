"""CLI commands beyond the core ones, one module each; importing a module registers its command(s)."""
from . import hf
from . import check
from . import train
from . import new_plugin
from . import ablate
from . import inspection
from . import runs
from . import classify
from . import quantize
