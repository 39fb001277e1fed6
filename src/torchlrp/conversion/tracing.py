"""Tracing a model with ``torch.fx`` for conversion: the tracer, padding calls, values held constant."""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from torchlrp.conversion.errors import is_allowed
from torchlrp.operations.default import PADDING_MODULES
from torchlrp.operations.registry import OperationRegistry


class LeafTracer(torch.fx.Tracer):
    """Keeps as leaves the registered module types and the modules allowed to pass their gradient."""

    def __init__(self, registry: OperationRegistry, allowed: set[str]) -> None:
        super().__init__()
        self.registry, self.allowed = registry, allowed

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:  # noqa: D102
        if self.registry.for_module(module) is not None or is_allowed(qualified_name, self.allowed):
            return True
        return super().is_leaf_module(module, qualified_name)


def held_constant(value: Any) -> Any:
    """``value`` detached: a tensor, or each tensor of what ``x.max(dim)`` returns (a normalizer held constant).

    Parameters
    ----------
    value : Tensor or tuple
        The call's result.

    Returns
    -------
    Tensor or tuple
        The same structure, its tensors detached.
    """
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        parts = [held_constant(part) for part in value]
        return type(value)(parts) if type(value) is not tuple else tuple(parts)
    return value


#: padding module class name prefix -> F.pad's mode
PAD_MODES = {"Zero": "constant", "Constant": "constant", "Reflection": "reflect", "Replication": "replicate",
              "Circular": "circular"}


def padding_of(node: Node, modules: dict[str, torch.nn.Module]) -> tuple[tuple[int, ...], str] | None:
    """``(pad, mode)`` of a padding call with constant sizes (``F.pad`` with zeros or a copying mode, a padding
    module), in ``F.pad``'s order; None for anything else."""
    if node.op == "call_module":
        module = modules[node.target]
        if not isinstance(module, PADDING_MODULES) or not node.args:
            return None
        mode = next(mode for prefix, mode in PAD_MODES.items() if type(module).__name__.startswith(prefix))
        if mode == "constant" and getattr(module, "value", 0.0) != 0.0:
            return None
        return tuple(module.padding), mode
    if node.op != "call_function" or node.target is not torch.nn.functional.pad:
        return None
    names = ("input", "pad", "mode", "value")
    bound = dict(zip(names, node.args), **node.kwargs)
    pad, mode, value = bound.get("pad"), bound.get("mode", "constant"), bound.get("value", None)
    if not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad):
        return None
    if mode not in ("constant", "reflect", "replicate", "circular") or (mode == "constant" and value not in (None, 0,
                                                                                                           0.0)):
        return None
    return tuple(pad), mode


__all__ = ["LeafTracer", "PAD_MODES", "held_constant", "padding_of"]
