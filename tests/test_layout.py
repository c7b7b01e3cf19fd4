"""The package's shape: no import cycles between raypipe's modules (counting the imports inside
functions too), and MLflow reached only through the modules whose job it is."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "raypipe"


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != name and not (name.startswith(t + ".") or t == "raypipe"):
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def test_there_is_no_import_cycle_in_raypipe():
    graph = _graph()
    assert "raypipe.registration" in graph and "raypipe.tasks.multi_label" in graph
    assert _cycles(graph) == []


def test_the_cycle_detector_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_only_tracking_registry_and_pyfunc_talk_to_mlflow():
    talkers = {p.name for p in PKG.rglob("*.py")
               if any(isinstance(n, (ast.Import, ast.ImportFrom)) and
                      any((a.name if isinstance(n, ast.Import) else (n.module or "")).split(".")[0] == "mlflow"
                          for a in n.names)
                      for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))))}
    assert talkers <= {"tracking.py", "registry.py", "pyfunc.py"}, talkers
