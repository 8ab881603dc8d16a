"""The core's layering: a light `import minigpt_core`, and no import cycles (lint-imports checks the layers)."""

import json
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]

# What `import minigpt_core` must not pull in: the training stack, tasks and heavy optional libraries.
HEAVY = ["minigpt_core.train", "minigpt_core.tasks", "minigpt_core.finetune", "minigpt_core.assembly",
         "minigpt_core.checkpoints", "minigpt_core.cli", "minigpt_core.ablation", "minigpt_core.inspection",
         "matplotlib", "scipy", "peft", "torchao", "wandb", "transformers"]


def test_importing_minigpt_core_loads_the_registry_spec_and_plugin_api_only():
    code = ("import json, sys, minigpt_core; "
            "print(json.dumps(sorted(m for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert {"minigpt_core.base.registry", "minigpt_core.spec", "minigpt_core.plugin"} <= loaded
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == [], heavy


def test_minigpt_core_has_no_import_cycles_counting_imports_inside_functions():
    graph = grimp.build_graph("minigpt_core")  # every import statement, in functions too
    modules = sorted(graph.modules)
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for m in modules:
        if m not in index:
            visit(m)
    assert cycles == []
