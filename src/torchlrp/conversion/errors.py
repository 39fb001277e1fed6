"""The error a conversion or a run-time explanation raises for what has no relevance rule."""
from __future__ import annotations

import fnmatch
from typing import Iterable


class ConversionError(ValueError):
    """A model holds modules or operations whose relevance torchlrp does not know how to propagate.

    Attributes
    ----------
    unsupported : list of tuple of str
        ``(dotted path or fx node name, type or operation)`` for each offending place.
    """

    def __init__(self, unsupported: list[tuple[str, str]]) -> None:
        self.unsupported = unsupported
        lines = "\n".join(f"  {path}: {kind}" for path, kind in unsupported)
        super().__init__(
            f"cannot propagate relevance through {len(unsupported)} part(s) of the model:\n{lines}\n"
            f"Supported: the operations of torchlrp.default_registry() (linear/conv layers, sums, concatenations, "
            f"index maps, pooling, means, gates, element-wise activations, normalizations; see the README's "
            f"operation table). To let a part pass relevance by its plain gradient, name it: "
            f"convert(model, allow_gradient=['path', 'glob.*']); to add an operation, register it: "
            f"convert(model, registry=...)")


def is_allowed(path: str, allowed: Iterable[str]) -> bool:
    """Whether ``allow_gradient``'s patterns ``allowed`` name the module path ``path``."""
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in allowed)


__all__ = ["ConversionError", "is_allowed"]
