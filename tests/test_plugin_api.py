"""The public plugin API (minigpt_core.plugin): plugins import only it, it is documented, and the
guide's examples (docs/plugins.md) run."""

import ast
import inspect
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import minigpt_core
import minigpt_core.plugin as api
from minigpt_core.base import registry as registry_module
from training_utils import PATIENCE_S

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
GUIDE = ROOT / "docs" / "plugins.md"
FIRST_PARTY = sorted(p.name for p in PLUGINS.iterdir() if (p / "__init__.py").is_file())
# Core packages a plugin must reach only through minigpt_core.plugin.
CORE = ("minigpt_core", "minigpt")


def _imported_modules(tree: ast.AST):
    """(line, dotted module) for every absolute import, and importlib.import_module("...") call."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "minigpt_core" and all(a.name == "plugin" for a in node.names):
                yield node.lineno, "minigpt_core.plugin"  # `from minigpt_core import plugin`
            else:
                yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and (
                    (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                    or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))):
            yield node.lineno, node.args[0].value


def plugin_import_violations(plugins_dir: Path = PLUGINS) -> list[str]:
    packages = sorted(p.name for p in plugins_dir.iterdir() if (p / "__init__.py").is_file())
    found = []
    for path in sorted(plugins_dir.rglob("*.py")):
        own = path.relative_to(plugins_dir).parts[0]
        for line, module in _imported_modules(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            top = module.split(".")[0]
            where = f"{path.relative_to(plugins_dir.parent)}:{line}"
            if top in CORE and module != "minigpt_core.plugin":
                found.append(f"{where}: {module} (plugins import the core only from minigpt_core.plugin)")
            elif top in packages and top != own:
                found.append(f"{where}: {module} (another first-party plugin: share code through the "
                             f"core instead)")
    return found


def test_first_party_plugins_import_only_the_public_api_and_not_each_other():
    assert FIRST_PARTY, "no first-party plugin packages found"
    assert plugin_import_violations() == []


def test_the_import_rule_catches_internal_core_and_sibling_imports(tmp_path):
    (tmp_path / "pa").mkdir()
    (tmp_path / "pb").mkdir()
    (tmp_path / "pa" / "__init__.py").write_text(
        "from minigpt_core import hookimpl\nimport minigpt_core.model.gpt\nfrom minigpt_core.plugin import Params\n"
        "from minigpt_core import plugin\nfrom . import layers\n")
    (tmp_path / "pb" / "__init__.py").write_text(
        "def f():\n    from pa import x\n    import importlib\n    importlib.import_module('minigpt_core.data')\n")
    found = plugin_import_violations(tmp_path)
    assert [f.split(": ")[1].split(" ")[0] for f in found] == [
        "minigpt_core", "minigpt_core.model.gpt", "pa", "minigpt_core.data"], found


def _own_docstring(obj) -> str | None:
    if inspect.isclass(obj):
        return obj.__dict__.get("__doc__")
    return getattr(obj, "__doc__", None)


def test_every_public_name_exists_is_documented_and_listed_in_the_module_docstring():
    assert len(api.__all__) == len(set(api.__all__))
    undocumented = []
    for name in api.__all__:
        assert hasattr(api, name), f"minigpt_core.plugin.__all__ names {name}, which it does not define"
        obj = getattr(api, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = _own_docstring(obj)
            if not (doc and doc.strip()):
                undocumented.append(name)
        # Constants (dicts, the hookimpl marker) are described in the module docstring; the
        # docstring lists every name so help(minigpt_core.plugin) is the reference.
        if not re.search(rf"\b{re.escape(name)}\b", api.__doc__):
            undocumented.append(f"{name} (not in the module docstring)")
    assert undocumented == []


def test_every_kind_has_a_documented_protocol_and_kinds_are_derived_from_them():
    assert list(api.KIND_PROTOCOLS) == list(api.KINDS)
    assert registry_module.KINDS is api.KINDS and minigpt_core.KINDS is api.KINDS
    for kind, protocol in api.KIND_PROTOCOLS.items():
        assert getattr(protocol, "_is_protocol", False) and typing.Protocol in protocol.__mro__, kind
        doc = protocol.__doc__
        assert doc.strip().splitlines()[0].rstrip(".") == api.KINDS[kind]
        assert f"``{kind}`` kind" in doc, f"{protocol.__name__} does not say which kind it is the contract of"
        ctx = {"tokenizer": "TokenizerContext", "dataset": "DataContext", "weights": "no context",
               "template": "no context"}.get(kind, "BuildContext")
        assert ctx in doc, f"{protocol.__name__} does not say that the factory gets a {ctx}"


def test_capabilities_are_documented_contracts_checked_by_existing_checks(registry):
    from minigpt_core.testing import CHECKS

    assert registry_module.CAPABILITIES is api.CAPABILITIES and minigpt_core.CAPABILITIES is api.CAPABILITIES
    assert list(api.CAPABILITIES) == list(api.CAPABILITY_CONTRACTS)
    for name, cap in api.CAPABILITY_CONTRACTS.items():
        assert cap.name == name and cap.summary == api.CAPABILITIES[name]
        assert cap.obliges and cap.relied_on_by and set(cap.kinds) <= set(api.KINDS), name
        for check in cap.checks:
            assert check in CHECKS, f"capability {name} names the unknown check {check!r}"
            assert CHECKS[check].kinds & set(cap.kinds), (name, check)
    # Every capability a registered component declares is a documented one, for its kind.
    for entry in registry.entries():
        for cap in entry.capabilities:
            assert cap in api.CAPABILITY_CONTRACTS, f"{entry.name} declares undocumented capability {cap!r}"
            assert entry.kind in api.CAPABILITY_CONTRACTS[cap].kinds, (entry.name, cap)


def test_first_party_tokenizers_and_datasets_follow_their_protocols(registry):
    tok = registry.get("tokenizer", "char").factory(api.TokenizerContext(training_text="abc"), None)
    assert isinstance(tok, api.TokenizerProtocol)
    source = registry.get("dataset", "python-docs").build(None)
    assert isinstance(source, api.DatasetProtocol) and isinstance(source, api.TextSource)
    assert not isinstance(object(), api.TokenizerProtocol)


def test_a_component_built_on_the_shared_layers_matches_the_book(registry):
    # The modules moved into the core are the ones the plugins register: same classes, same names.
    import minigpt_book
    import minigpt_modern
    import minigpt_torch

    assert minigpt_book.FeedForward is api.FeedForward and minigpt_book.TransformerBlock is api.TransformerBlock
    assert minigpt_torch.SDPAttention is api.SDPAttention
    assert issubclass(minigpt_modern.PostNormBlock, api.TransformerBlock)


def _python_blocks(text: str) -> list[tuple[int, str]]:
    blocks, lines, start = [], text.splitlines(), None
    for i, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start, body = i, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(body)))
            start = None
        elif start is not None:
            body.append(line)
    return blocks


def test_readme_points_to_the_guide():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Writing a plugin", 1)[1].split("\n## ", 1)[0]
    assert "docs/plugins.md" in section


@pytest.mark.slow
def test_the_guide_examples_run(tmp_path):
    """Every ```python block of docs/plugins.md, in order, as one script (so the guide cannot rot)."""
    blocks = _python_blocks(GUIDE.read_text(encoding="utf-8"))
    assert len(blocks) >= 8
    script = "\n\n".join(f"# --- docs/plugins.md line {line}\n{code}" for line, code in blocks)
    (tmp_path / "guide.py").write_text(script, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "MINIGPT_PLUGINS"}
    env.update(OMP_NUM_THREADS="1", MINIGPT_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(tmp_path / "guide.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=PATIENCE_S)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "hook exploded" in proc.stdout and "unavailable here" in proc.stdout


def test_the_core_imports_no_first_party_plugin_and_names_none_of_their_weights():
    """GPT-2 interop lives in the gpt2 plugin (the `weights` component gpt2.hf): the core neither
    imports a first-party plugin nor spells out a plugin's state-dict names or Hugging Face's."""
    core = sorted((ROOT / "minigpt_core").rglob("*.py"))
    imports = [f"{p.relative_to(ROOT)}:{line}: {module}" for p in core
               for line, module in _imported_modules(ast.parse(p.read_text(encoding="utf-8"), str(p)))
               if module.split(".")[0] in FIRST_PARTY]
    assert imports == []
    # Hugging Face GPT-2's tensor names, and the book block's state-dict keys the mapping needs.
    names = re.compile(r"\bln_[12f]\b|\bc_attn\b|\bc_proj\b|\bc_fc\b|\bwte\b|\bwpe\b|\blm_head\b|encoder\.json|"
                       r"vocab\.bpe|merges\.txt|\bnorm[12]\.(scale|shift)\b|\bff\.layers\.|trf_blocks\.\d|"
                       r"trf_blocks\.\{")
    named = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in core
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if names.search(line)]
    assert named == []
    assert ("weights", "gpt2.hf") in minigpt_core.load_registry()
