"""The house's floors, read from the source (issue 27): no import cycle, no import upward.

Every `import` and `from ... import` in loramux/ (also those inside functions: a lazy import is
still a dependency) is read with ast; `from loramux import demo` counts as an import of the module
loramux.demo. A package may import only itself and packages on lower floors:

    config, sampling_params, lora_request, workload, vllm_args < core < executor < engine
        (and the package root) < bench < demo < server, sim < ray < cli

and no module may reach the scheduler's or the KV manager's insides from above the engine.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "loramux"
FLOOR: dict[str, float] = {
    "config": 0,
    "sampling_params": 0,
    "lora_request": 0,
    "workload": 0,  # S-LoRA's traffic generator, drawn by the bench and the simulator
    "vllm_args": 0,  # vLLM's argument names: the table `serve` and `LLM(...)` both read
    "core": 1,
    "executor": 2,
    "engine": 3,
    "loramux": 3.5,  # the package root re-exports the engine's public names (LLM, SamplingParams)
    "bench": 4,
    "demo": 5,
    "server": 6,
    "sim": 6,
    "ray": 7,
    "cli": 8,
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the loramux modules it imports."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                edges[name] |= {a.name for a in node.names if a.name.split(".")[0] == "loramux"}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] != "loramux":
                    continue
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{node.module}.{a.name}"
                    edges[name].add(sub if sub in mods else node.module)
    return edges


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "loramux"


def test_every_package_has_a_floor():
    assert {_package(m) for m in _modules()} <= set(FLOOR), {_package(m) for m in _modules()} - set(FLOOR)


def test_no_import_goes_up_a_floor():
    mods = _modules()
    upward = sorted(
        f"{a} -> {b}"
        for a, bs in _imports(mods).items()
        for b in bs
        if _package(a) != _package(b) and FLOOR[_package(b)] >= FLOOR[_package(a)]
    )
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges = _imports(_modules())
    done: set[str] = set()
    path: list[str] = []

    def visit(m: str) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(m) :], m]))
        if m in done:
            return
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if n != m:
                visit(n)
        path.pop()
        done.add(m)

    for m in sorted(edges):
        visit(m)


def test_nothing_above_the_engine_reaches_into_the_scheduler_or_the_kv_manager():
    seam = re.compile(r"\.scheduler\.|\bscheduler\.(adapters|kv|counters|policy)\b")
    found = []
    for name, f in _modules().items():
        if _package(name) in ("core", "engine"):
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if seam.search(line) and "loramux.core.scheduler" not in line:
                found.append(f"{f.relative_to(ROOT.parent)}:{i}: {line.strip()}")
    sched = (ROOT / "core" / "scheduler.py").read_text()
    found += [f"core/scheduler.py: {m.group(0)}" for m in re.finditer(r"\bkv\.(cache|pool)\b", sched)]
    found += [f"core/scheduler.py: {m.group(0)}" for m in re.finditer(r"policy\.groups\b", sched)]
    assert not found, "\n".join(found)
