"""The package's floor plan holds: no import circle, stages that do not import each other (compare aside), the
shared floor importing no stage, and no module or function too long to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sdnb"
STAGES = ("caption", "vae", "sd", "compare", "demo")
# who may import which stage: compare reads vae's comparison; the `python -m sdnb.tiny` alias runs the demo's build
MAY_IMPORT = {"compare": {"vae", "sd"}, "tiny": {"demo"}}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 300, 50


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every sdnb module `name` imports, at module level or inside functions (explicit imports only)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sdnb"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "sdnb":
                continue
            for alias in node.names:  # `from sdnb import metrics` imports the module sdnb.metrics
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


def stage_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_circle():
    graph = {name: imports_of(name) for name in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_stages_do_not_import_each_other_and_the_floor_imports_no_stage():
    bad = []
    for name in MODULES:
        own = stage_of(name)
        for target in imports_of(name):
            other = stage_of(target)
            if other in STAGES and other != own and other not in MAY_IMPORT.get(own, set()):
                bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(bad)


def test_every_stage_is_a_subpackage_with_its_config():
    for stage in STAGES[:-1]:
        assert (ROOT / stage / "__init__.py").is_file() and (ROOT / stage / "config.py").is_file(), stage


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_are_short(name):
    source = MODULES[name].read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{name}: {source.count(chr(10))} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{name}: functions over {MAX_FUNCTION_LINES} lines: {long}"
