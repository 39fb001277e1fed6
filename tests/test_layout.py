"""The package's layout: folders as layers, imports flowing one way, no cycles, small modules (measured from the
code's own imports by ``tools/imports.py``, deferred and ``TYPE_CHECKING`` imports included)."""
import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"
#: each top-level part of the package -> its layer; a module imports only from its own layer or the ones below
LAYERS = {"version": 0, "functional": 0, "core": 1, "modules": 2, "operations": 3, "conversion": 4,
          "explanation": 5, "analysis": 6, "data": 6, "viz": 6, "cli": 7, "__main__": 7, "": 7}


def _tool():
    spec = importlib.util.spec_from_file_location("imports_tool", ROOT / "tools" / "imports.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture(scope="module")
def graph():
    return _tool().graph(SOURCE, "torchlrp")


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def test_no_import_cycle(graph):
    edges, _ = graph
    assert _tool().cycles(edges) == []


def test_no_module_over_600_lines_and_few_at_the_root(graph):
    _, lines = graph
    assert {name: count for name, count in lines.items() if count > 600} == {}
    root = [path for path in (SOURCE / "torchlrp").glob("*.py")]
    assert len(root) <= 12, sorted(p.name for p in root)


def test_imports_flow_one_way(graph):
    edges, _ = graph
    upward = sorted((source, target) for source, targets in edges.items() for target in targets
                    if target != "torchlrp" and _layer(target) > _layer(source))
    assert upward == []


def test_every_module_belongs_to_a_layer(graph):
    _, lines = graph
    assert {name for name in lines if name.count(".") and name.split(".")[1] not in LAYERS} == set()


def test_no_private_name_is_imported_across_modules():
    found = []
    for path in (SOURCE / "torchlrp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchlrp"):
                found += [f"{path.relative_to(SOURCE)}: {alias.name}" for alias in node.names
                          if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert found == []


def test_the_layout_tool_counts_a_cycle(tmp_path):
    """The control: the tool finds a cycle where there is one (a deferred import counts)."""
    package = tmp_path / "toy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from toy.b import f\n")
    (package / "b.py").write_text("def f():\n    from toy.a import g\n")
    edges, lines = _tool().graph(tmp_path, "toy")
    assert _tool().cycles(edges) == [["toy.a", "toy.b"]]
    assert lines["toy.a"] == 1
