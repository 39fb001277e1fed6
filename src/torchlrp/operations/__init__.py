"""The operation table both engines read: entries (:mod:`~torchlrp.operations.spec`), the registry, the builds
that explain one call, and the default table."""
from torchlrp.operations.default import default_registry
from torchlrp.operations.registry import OperationRegistry
from torchlrp.operations.spec import CallView, Facts, OperationEntry, RuleKind, Unsupported, derive_facts

__all__ = ["CallView", "Facts", "OperationEntry", "OperationRegistry", "RuleKind", "Unsupported", "default_registry",
           "derive_facts"]
