"""The architecture holds: no import circles among the project's modules (lazy imports count), imports
point down the layers of docs/ARCHITECTURE.md, no module imports another's private names, and no module
grows past the size a reader can hold in their head.

The graph is read from the source with ``ast`` (what ``../shared/tools/import_cycles.py`` does), so a
circle that only forms at call time fails here too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workbench", "probes", "tui")

# Lowest first: a module may import its own layer and every layer below it (docs/ARCHITECTURE.md).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", (r"workbench\.errors", r"workbench\.version", r"workbench\.json_values", r"workbench\.printable")),
    ("store", (r"workbench\.store(\..*)?",)),
    ("organism world", (r"workbench\.organism", r"workbench\.organism\.(world|posterior|tokenizer|picture)")),
    ("engine", (r"workbench\.engine(\..*)?", r"workbench\.organism\.task", r"workbench\.terminal")),
    ("probes", (r"probes(\..*)?",)),
    ("cache", (r"workbench\.cache(\..*)?",)),
    ("analysis", (r"workbench\.analysis(\..*)?", r"workbench\.organism\.(check|train|cli|debias|visual)")),
    ("tui", (r"tui(\..*)?",)),
    ("face", (r"workbench", r"workbench\.cli", r"workbench\.__main__", r"workbench\.data(\..*)?")),
]
MAX_LINES = 800


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> dict[str, set[str]]:
    """``{imported module: {names taken from it}}`` for every import of a project module, lazy ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, set[str]] = {}

    def add(target: str, what: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.setdefault(target, set()).add(what)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base, alias.name)
    return found


def graph() -> dict[str, dict[str, set[str]]]:
    modules = project_modules()
    return {name: imports(path, name, set(modules)) for name, path in modules.items()}


def circles(g: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(re.fullmatch(p, module) for p in patterns):
            return rank
    raise AssertionError(f"{module} is in no layer of docs/ARCHITECTURE.md: add it to LAYERS and the doc")


def test_there_are_no_import_circles():
    found = circles(graph())
    assert not found, "import circles: " + "; ".join(" ↔ ".join(c) for c in found)


def test_the_circle_check_finds_a_circle():
    g = {"a": {"b": {"x"}}, "b": {"c": {"y"}}, "c": {"a": {"z"}}, "d": {"a": {"w"}}}
    assert circles(g) == [["a", "b", "c"]]


def test_every_module_is_in_a_layer_and_imports_point_down():
    wrong = []
    for module, targets in graph().items():
        rank = layer_of(module)
        for target, names in targets.items():
            if layer_of(target) > rank:
                wrong.append(f"{module} ({LAYERS[rank][0]}) imports {target} ({LAYERS[layer_of(target)][0]}): {sorted(names)}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    private = [f"{module} takes {sorted(n for n in names if n.startswith('_') and not n.startswith('__'))} from {target}"
               for module, targets in graph().items() for target, names in targets.items()
               if any(n.startswith("_") and not n.startswith("__") for n in names)]
    assert not private, "\n".join(private)


def test_the_store_runs_no_model_code():
    """The run store imports neither torch nor TransformerLens (the TUI opens a run in a fraction of a second)."""
    heavy = []
    for name, path in project_modules().items():
        if name.startswith("workbench.store"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                heavy += [f"{name}: {m}" for m in mods if m.split(".")[0] in ("torch", "transformers", "transformer_lens", "textual")]
    assert not heavy, heavy


@pytest.mark.parametrize("name", sorted(project_modules()))
def test_no_module_is_too_long_to_hold_in_your_head(name):
    lines = project_modules()[name].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it by idea"


def test_the_shared_circle_tool_agrees_when_it_is_there():
    """CI has ``../shared/tools/import_cycles.py`` beside the clone: its verdict is this file's."""
    tool = ROOT.parent / "shared" / "tools" / "import_cycles.py"
    if not tool.exists():
        pytest.skip("../shared/tools/import_cycles.py is not beside this checkout")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(tool)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
