"""Draw docs/architecture.png: the layers of minigpt_core and the imports between them, from the code.

The layers are read from the layers contract in pyproject.toml (what lint-imports enforces), the
imports from grimp's graph of the package (import-linter's own, imports inside functions included).
Run from the repository root: ``python docs/make_architecture_graph.py``.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt_core.base import toml  # noqa: E402
from minigpt_core.viz._mpl import pyplot  # noqa: E402


def layers() -> list[list[str]]:
    """Top to bottom; each layer a list of its sibling packages/modules."""
    config = toml.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contract = next(c for c in config["tool"]["importlinter"]["contracts"]
                    if c["type"] == "layers" and "minigpt_core.base" in c["layers"])
    return [[m.strip() for m in layer.replace("|", ":").split(":")] for layer in contract["layers"]]


def main(out: Path = ROOT / "docs" / "architecture.png") -> Path:
    stack = layers()
    owner = {}
    for i, layer in enumerate(stack):
        for m in layer:
            owner[m] = i
    graph = grimp.build_graph("minigpt_core")

    def layer_of(module: str) -> int | None:
        parts = module.split(".")
        for k in range(len(parts), 0, -1):
            if ".".join(parts[:k]) in owner:
                return owner[".".join(parts[:k])]
        return None

    sizes = Counter()
    edges = Counter()
    for m in graph.modules:
        a = layer_of(m)
        if a is None:
            continue
        sizes[a] += 1
        for t in graph.find_modules_directly_imported_by(m):
            b = layer_of(t)
            if b is not None and b != a:
                edges[(a, b)] += 1
    plt = pyplot()
    n = len(stack)
    fig, ax = plt.subplots(figsize=(9, 0.62 * n + 1))
    for i, layer in enumerate(stack):
        y = n - 1 - i
        names = "  ".join(m.replace("minigpt_core.", "") for m in layer)
        ax.add_patch(plt.Rectangle((0, y + 0.12), 5.2, 0.76, facecolor="#e8eef7", edgecolor="#335"))
        count = f"{sizes[i]} module{'' if sizes[i] == 1 else 's'}"
        ax.text(2.6, y + 0.5, f"{names}   ({count})", ha="center", va="center", fontsize=9)
    for (a, b), count in sorted(edges.items()):
        ya, yb = n - 1 - a + 0.12, n - 1 - b + 0.88
        x = 5.35 + 0.22 * (a % 8) + 0.035 * b
        ax.annotate("", xy=(x, yb), xytext=(x, ya),
                    arrowprops=dict(arrowstyle="->", lw=0.4 + 0.12 * min(count, 15), color="#557", alpha=0.7))
    ax.set_xlim(-0.1, 7.5)
    ax.set_ylim(-0.1, n + 0.1)
    ax.axis("off")
    ax.set_title("minigpt_core: layers top to bottom; arrows are imports (all point down)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    upward = [(stack[a], stack[b]) for (a, b) in edges if b < a]
    if upward:
        raise SystemExit(f"upward imports (lint-imports should have failed): {upward}")
    return out


if __name__ == "__main__":
    print(main())
