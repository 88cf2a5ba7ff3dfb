"""The package's imports point down: no circle, and no module imports one from a layer above it (imports inside
functions count: they hide a circle at run time, they do not remove it from the design). docs/architecture.md
draws the same layers."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "mcvqa"

LAYERS = [
    ["errors"],
    ["io", "compat", "plotting"],
    ["config"],
    ["runtime"],
    ["images", "prompts", "synth", "kernels", "fp8"],
    ["data"],
    ["families"],
    ["features"],
    ["model"],
    ["scoring"],
    ["engine", "outputs", "evaluate"],
    ["ensemble", "checkpoint"],
    ["tta"],
    ["predict", "train"],
    ["tune", "report", "serve", "tiny"],
    ["demo"],
    ["cli"],
    ["__main__"],
]
"""Bottom to top. A package (families, tta, tiny) is one room: its modules may import each other, without a circle."""


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every module's imports of other mcvqa modules, wherever in the file they are."""
    modules = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mcvqa":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "mcvqa"}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _room(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_every_module_imports() -> None:
    """Each module imports (in this process, after the others): an import-time circle would fail here."""
    import importlib

    for name in sorted(import_graph()):
        if name != "mcvqa.__main__":
            importlib.import_module(name)


def test_no_import_circle() -> None:
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_every_import_points_down() -> None:
    level = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}
    graph = import_graph()
    rooms = {_room(m) for m in graph} - {""}
    assert rooms == set(level), f"rooms not placed in LAYERS (or gone): {sorted(rooms ^ set(level))}"
    upward = [(m, d) for m, deps in graph.items() if _room(m) for d in deps
              if _room(d) and _room(d) != _room(m) and level[_room(d)] >= level[_room(m)]]
    assert not upward, "imports that point up or sideways: " + ", ".join(f"{m} -> {d}" for m, d in sorted(upward))


def test_the_graph_sees_imports_inside_functions() -> None:
    """The check itself: an import inside a function is an edge (the circle issue 27 found hid there)."""
    graph = import_graph()
    assert "mcvqa.tta" in graph["mcvqa.predict"]  # predict imports tta inside _score, not at the top


def test_every_mutation_row_still_names_code_in_its_file() -> None:
    """docs/testing.md lists hand-made bugs as red and reached; a row whose code has since moved can no longer be made
    (tools/mutate.py reports PATTERN NOT FOUND), so its claim would go stale unseen. Every row's pattern is still in
    its file, the file with the bug made still compiles, its tests' files exist, and its last recorded result (docs/mutation_results.json) is red and reached."""
    import json

    root = SRC.parent.parent
    rows = json.loads((root / "docs" / "mutations.json").read_text(encoding="utf-8"))
    results = {r["name"]: r for r in json.loads((root / "docs" / "mutation_results.json").read_text(encoding="utf-8"))}
    stale = [r["name"] for r in rows if r["old"] not in (root / r["file"]).read_text(encoding="utf-8")]
    assert not stale, f"mutation rows whose code moved (update their old/new in docs/mutations.json and re-run them): {stale}"
    # A bug that does not even compile turns its tests red for the wrong reason (every import of the file fails).
    broken = []
    for r in rows:
        if r["file"].endswith(".py"):
            try:
                compile((root / r["file"]).read_text(encoding="utf-8").replace(r["old"], r["new"], 1), r["file"], "exec")
            except SyntaxError:
                broken.append(r["name"])
    assert not broken, f"mutation rows whose bug is a syntax error, not the bug they name: {broken}"
    missing_tests = [t for r in rows for t in r["tests"] if not (root / t.split("::")[0]).exists()]
    assert not missing_tests, missing_tests
    unproven = [r["name"] for r in rows if not (results.get(r["name"], {}).get("red") and results[r["name"]].get("reached"))]
    assert not unproven, f"rows without a red and reached result: {unproven}"
