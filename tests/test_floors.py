"""The floors of the house (docs/architecture.md): a module imports only from its own floor or the floors below,
the packages import each other in one direction only, and no module imports another module's `_private` names.
Read from the source with `ast` (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "gliograde"

# floor of each module: the longest matching prefix decides (a package's entry covers its modules)
FLOORS = {
    # 0: foundations
    "gliograde": 0, "gliograde.errors": 0, "gliograde.files": 0, "gliograde.config": 0, "gliograde.runtime": 0,
    "gliograde.provenance": 0, "gliograde.templates": 0,
    # 1: data and networks know nothing of training, evaluation or inference
    "gliograde.data": 1, "gliograde.networks": 1,
    # 2: the evaluation maths, the run records (runs, checkpoints)
    "gliograde.evaluation.metrics": 2, "gliograde.evaluation.stats": 2, "gliograde.evaluation.calibration": 2,
    "gliograde.evaluation.plots": 2, "gliograde.evaluation.site_baseline": 2, "gliograde.evaluation.scoring": 2,
    "gliograde.runs": 2, "gliograde.checkpoints": 2,
    # the reports of a results folder, from the run records and the maths (cv writes them when its folds finish)
    "gliograde.evaluation.summary": 2, "gliograde.evaluation.report": 2, "gliograde.evaluation.compare": 2,
    # 3: training
    "gliograde.training": 3,
    # 4: the tools that read runs: evaluation tools, inference, export
    "gliograde.evaluation": 4, "gliograde.inference": 4, "gliograde.export": 4,
    # 5: the command line and the tools around it
    "gliograde.cli": 5, "gliograde.__main__": 5, "gliograde.demo": 5, "gliograde.bench": 5, "gliograde.doctor": 5,
    "gliograde.gpucheck": 5,
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    best = max((k for k in FLOORS if module == k or module.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"{module} has no floor: add it to FLOORS in tests/test_floors.py and docs/architecture.md"
    return FLOORS[best]


def imports() -> list[tuple[str, str, list[str], int]]:
    """(importing module, imported module, names, line) for every gliograde import in src/."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        me = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gliograde":
                found.append((me, node.module, [a.name for a in node.names], node.lineno))
            elif isinstance(node, ast.Import):
                found += [(me, a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "gliograde"]
    return found


def test_no_module_imports_from_a_floor_above_its_own():
    climbs = []
    for me, target, names, line in imports():
        for name in names or [""]:
            full = f"{target}.{name}" if name and f"{target}.{name}" in {module_name(p) for p in SRC.rglob("*.py")} \
                else target  # fmt: skip
            if floor(full) > floor(me):
                climbs.append(f"{me}:{line} imports {full} (floor {floor(full)} > {floor(me)})")
    assert not climbs, "imports that climb a floor:\n" + "\n".join(climbs)


def test_no_modules_import_each_other_in_a_circle():
    """No circle of modules (a package may span floors: evaluation's maths sit below training, its tools above)."""
    known = {module_name(p) for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for me, target, names, _ in imports():
        subs = {f"{target}.{n}" for n in names} & known
        graph.setdefault(me, set()).update((subs or {target}) - {me})
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # a package's __init__ importing its own modules is not a circle of meaning
    circles = [c for c in circles if not any(c.startswith(f"{pkg} -> {pkg}.") for pkg in known)]
    assert not circles, "modules that import each other in a circle:\n" + "\n".join(circles)


def test_no_module_imports_another_modules_private_names():
    private = [f"{me}:{line} imports {target}.{n}" for me, target, names, line in imports() for n in names
               if n.startswith("_") and not n.startswith("__")]  # fmt: skip
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_no_module_reaches_into_another_modules_private_names():
    """`from gliograde.evaluation import stats` then `stats._helper(...)` is the same reach as importing `_helper`."""
    known = {module_name(p) for p in SRC.rglob("*.py")}
    reaches = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        modules = {}  # local name -> the gliograde module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gliograde":
                for a in node.names:
                    if f"{node.module}.{a.name}" in known:
                        modules[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in known and a.asname:
                        modules[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                reaches.append(f"{module_name(path)}:{node.lineno} uses {modules[node.value.id]}.{node.attr}")
    assert not reaches, "private names reached through a module:\n" + "\n".join(reaches)
