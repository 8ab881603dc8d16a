"""``minigpt new-plugin NAME``: write a ready-to-install plugin package with one working component.

The package is rendered from the templates in ``minigpt_core/templates/plugin`` with
:class:`string.Template`: pyproject.toml (the ``minigpt`` entry point), the component and its
registration, a conformance test, a tiny experiment file using the component, a README and a
GitHub Actions workflow.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
import string
from pathlib import Path

from ...base.errors import MinigptError
from ...base.loader import ENTRY_POINT_GROUP
from ..parser import arguments, command

__all__ = ["NewPluginError", "EXAMPLES", "create_plugin"]

TEMPLATES = Path(__file__).resolve().parents[2] / "templates" / "plugin"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class NewPluginError(MinigptError):
    """The plugin cannot be generated as asked (a bad name, an occupied directory, a kind without an example)."""


# kind -> (component name after the plugin's, other params its test also checks, the same as a TOML table)
EXAMPLES: dict[str, tuple[str, str, str]] = {
    "attention": ("causal_attention", '{"scale": 0.25}', "{ scale = 0.25 }"),
    "norm": ("rmsnorm", '{"eps": 1e-5, "init_gain": 0.5}', "{ eps = 1e-5 }"),
    "activation": ("swish", '{"beta": 1.5, "learnable": True}', "{ beta = 1.5, learnable = true }"),
    "feedforward": ("gated_ff", '{"expansion": 2.0, "bias": True}', "{ expansion = 2.0 }"),
    "positional": ("sinusoidal", '{"base": 500.0}', "{ base = 500.0 }"),
    "block": ("layerscale_block", '{"init_gain": 0.5}', "{ init_gain = 0.5 }"),
    "init": ("trunc_normal", '{"std": 0.05, "truncate": 3.0}', "{ std = 0.05 }"),
}


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name) or keyword.iskeyword(name):
        raise NewPluginError(
            f"'{name}' cannot name a plugin: the name becomes its Python package, its entry point and the "
            f"prefix of its components ('{name}.…'), so it must be a lowercase Python identifier of at most "
            f"40 characters starting with a letter (letters, digits, underscores), e.g. "
            f"'{re.sub(r'[^a-z0-9_]', '_', name.lower()).strip('_') or 'myplugin'}'."
        )
    import importlib.metadata as md

    if name in {ep.name for ep in md.entry_points(group=ENTRY_POINT_GROUP)}:
        raise NewPluginError(f"A minigpt plugin named '{name}' is already installed (`minigpt plugins` lists it); "
                             f"pick another name.")
    if importlib.util.find_spec(name) is not None:
        raise NewPluginError(f"A Python module named '{name}' is already importable here; a package of that name "
                             f"would shadow it (or be shadowed). Pick another name, e.g. '{name}_plugin'.")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def create_plugin(name: str, kind: str = "attention", directory: str | Path | None = None) -> Path:
    """Write the plugin package ``name`` with an example ``kind`` component into ``directory``; return it."""
    if kind not in EXAMPLES:
        raise NewPluginError(f"There is no example component of kind '{kind}'. Supported kinds: "
                             f"{', '.join(EXAMPLES)}.")
    _check_name(name)
    target = Path(directory if directory is not None else name)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise NewPluginError(f"{target} already exists and is not an empty directory; nothing was written. "
                             f"Pass --dir with a new (or empty) directory.")
    short, other_params, toml_params = EXAMPLES[kind]
    component_src = (TEMPLATES / "components" / f"{kind}.py.tmpl").read_text(encoding="utf-8")
    description = component_src.split('DESCRIPTION = "', 1)[1].split('"', 1)[0]
    values = dict(name=name, dist=name.replace("_", "-"), kind=kind, a_kind=f"{_article(kind)} {kind}",
                  component=f"{name}.{short}",
                  description=description, other_params=other_params, toml_params=toml_params)
    files = {
        "pyproject.toml": "pyproject.toml.tmpl",
        "README.md": "README.md.tmpl",
        "experiment.toml": "experiment.toml.tmpl",
        ".github/workflows/test.yml": "github/test.yml.tmpl",
        f"{name}/__init__.py": "__init__.py.tmpl",
        f"{name}/{kind}.py": f"components/{kind}.py.tmpl",
        f"tests/test_{name}.py": "test_plugin.py.tmpl",
    }
    rendered = {out: string.Template((TEMPLATES / src).read_text(encoding="utf-8")).substitute(values)
                for out, src in files.items()}  # render all before writing anything
    for out, text in rendered.items():
        path = target / out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target


def _args(p) -> None:
    p.add_argument("name", help="plugin name: its package, entry point and component prefix (e.g. myattn)")
    p.add_argument("--kind", default="attention", choices=list(EXAMPLES),
                   help="kind of the example component (default: attention)")
    p.add_argument("--dir", dest="directory", metavar="PATH", help="directory to create (default: ./NAME)")


@command("new-plugin", "write a new plugin package: pyproject entry point, an example component, tests, CI")
@arguments(_args)
def _new_plugin(args) -> int:
    target = create_plugin(args.name, args.kind, args.directory)
    component = f"{args.name}.{EXAMPLES[args.kind][0]}"
    print(f"wrote plugin '{args.name}' with the {args.kind} component '{component}' to {target}/")
    print(f"next:  cd {target} && pip install -e '.[test]' && pytest")
    # experiment.toml is in the package: the command works where the line above leaves the user
    print(f"       minigpt train experiment.toml        # a tiny GPT with {component}, 200 steps")
    return 0
