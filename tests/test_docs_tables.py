"""The docs' operation table is the registry's: ``docs/operations.md`` equals what ``tools/operation_table.py``
writes from ``torchlrp.default_registry()``."""
import importlib.util
from pathlib import Path

import torchlrp as lrp

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("operation_table", ROOT / "tools" / "operation_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_the_docs_operation_table_is_the_registry():
    assert (ROOT / "docs" / "operations.md").read_text() == _tool().table(), \
        "docs/operations.md is out of date: run python tools/operation_table.py"


def test_every_registered_call_is_in_the_table():
    from torchlrp.operations.registry import call_label

    page = (ROOT / "docs" / "operations.md").read_text()
    registry = lrp.default_registry()
    for table in (registry.functions, registry.methods, registry.modules):
        for key in table:
            assert call_label(key) in page, call_label(key)


def test_a_users_entry_shows_in_the_table(tmp_path):
    """The control: the table follows the registry it is made from."""
    registry = lrp.default_registry()
    registry.add(lrp.OperationEntry("identity (a user's entry)"), "my_method")
    rows = list(registry.rows())
    assert ("Tensor.my_method", "gradient", "identity (a user's entry)") in rows
