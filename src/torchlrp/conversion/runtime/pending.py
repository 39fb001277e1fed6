"""Values whose explanation waits for their uses, while a forward is explained at run time: statistics held where
they scale an activation, and element-wise calls of one activation that may be an activation written as a formula.

The traced engine sees a value's uses before it decides (``only_scales``, the element-wise regions it fuses); the
run-time engine decides as the uses come, with the same outcome: a statistic is held constant (a detached value)
until a use turns out not to scale an activation that does not come from it -- there its computed value is used,
explained by its entry (``compute``); the element-wise calls on one root are explained as they run and, where their
value is used by anything else, replaced by one activation of the root (the identity rule) if they power it or
multiply two of its values.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from torchlrp.conversion.fusion import NONLINEAR, PRODUCT_CALLS, is_elementwise
from torchlrp.conversion.runtime.calls import LiveCall, is_activation
from torchlrp.conversion.runtime.copies import updated_in_place
from torchlrp.conversion.runtime.tables import Held, Region, TensorTable
from torchlrp.functional.operations import identity_rule


class Pending:
    """The run-time engine's pending values (see the module docstring).

    Parameters
    ----------
    refuse : callable
        ``refuse(label)``: records a call that turned out to have no rule.

    Attributes
    ----------
    held : TensorTable
        Held values -> ``(Held, index)``: the computation to use where a use is not a scaling, and which tensor of
        its result this is (None: the result itself).
    regions, roots : TensorTable
        A region's members, and each root's current region.
    substitutes : TensorTable
        A written activation's output -> its one-activation replacement (made once).
    statistics : TensorTable
        Powers inside a region, undecided: how to explain them where they are not part of a written activation.
    """

    def __init__(self, refuse: Callable[[str], None]) -> None:
        self.refuse = refuse
        self.held: TensorTable[tuple[Held, int | None]] = TensorTable()
        self.regions: TensorTable[Region] = TensorTable()
        self.roots: TensorTable[Region] = TensorTable()
        self.substitutes: TensorTable[Tensor] = TensorTable()
        self.statistics: TensorTable[Callable[[], Any]] = TensorTable()

    def waits(self, value: Any) -> bool:
        """Whether ``value`` is held for now or a member of a written-activation region (its use decides)."""
        return isinstance(value, Tensor) and ((bool(self.held.items) and self.held.get(value) is not None) or (
            bool(self.regions.items) and self.regions.get(value) is not None))

    def join(self, call: LiveCall, region: Region, result: Any) -> None:
        """Record that ``result`` of ``call`` is a member of ``region``."""
        if not isinstance(result, Tensor) or not is_activation(result):
            return
        region.members += 1
        operands = sum(1 for a in call.args if a is region.root or self.regions.get(a) is region)
        region.nonlinear = region.nonlinear or call.target in NONLINEAR or (
            call.target in PRODUCT_CALLS and operands == 2)
        self.regions.put(result, region)

    def hold(self, call: LiveCall, compute: Callable[[], Any]) -> Any:
        """The call's value held constant, and how to explain it where it is used otherwise."""
        with torch.no_grad():
            if updated_in_place(call.function, call.original_args, call.original_kwargs) is not None:
                result = call.function(call.original_args[0].detach(), *call.original_args[1:],
                                       **call.original_kwargs)  # (in place on an activation: its values, held)
            else:
                result = call.run()
        self.pend(result, compute)
        return result

    def pend(self, result: Any, compute: Callable[[], Any]) -> None:
        """Mark ``result`` as held for now: where a use is not a scaling of an activation, ``compute()`` is used."""
        pending = Held(compute)
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        for index, output in enumerate(outputs):
            if isinstance(output, Tensor):
                self.held.put(output, (pending, None if output is result else index))

    def used(self, value: Any) -> Any:
        """``value`` as a use that is not a scaling sees it: a held statistic's explained value, a written
        activation's output as one activation."""
        found = self.held.get(value)
        if found is not None:
            pending, index = found
            live = pending.live()
            return live if index is None else live[index]
        region = self.regions.get(value)
        if region is not None:
            return self.close(region, value)
        return value

    def used_arguments(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def used(value: Any) -> Any:
            if isinstance(value, (list, tuple)):
                return type(value)(used(item) for item in value) if type(value) in (list, tuple) else value
            return self.used(value) if isinstance(value, Tensor) else value
        return tuple(used(a) for a in args), {key: used(value) for key, value in kwargs.items()}

    def region_joined(self, call: LiveCall, values: list[Tensor]) -> Region | None:
        """The written-activation region an element-wise call of one activation joins (or starts); ``values``:
        the call's tensors."""
        if not is_elementwise(call) or any(self.held.get(a) is not None for a in values):
            return None  # (a statistic held constant enters here: the region ends, as in a traced graph)
        active = [a for a in values if is_activation(a)]
        if not active:
            return None
        regions = {id(region): region for region in (self.regions.get(a) or self.roots.get(a) for a in active)
                   if region is not None}
        if len(regions) > 1:
            return None
        region = next(iter(regions.values()), None)
        if region is not None and region.closed and all(self.regions.get(a) is None for a in active):
            region = None  # the root's earlier region has ended: a new one
        if region is None:  # a new region of one root
            if any(a is not active[0] for a in active):
                return None
            region = Region(active[0])
            self.roots.put(active[0], region)
        if all(a is region.root or self.regions.get(a) is region for a in active):
            return region
        return None

    def close_regions(self, call: LiveCall, joined: Region | None, values: list[Tensor]) -> bool:
        """The region members a call uses without joining their region: their region ends there. Returns whether
        an argument of the call was replaced."""
        replaced = False
        if not self.regions.items:
            return replaced
        for value in values:
            region = self.regions.get(value)
            if region is not None and region is not joined:
                substitute = self.close(region, value)
                if substitute is not value:
                    call.args = tuple(substitute if a is value else a for a in call.args)
                    call.original_args = tuple(substitute if a is value else a for a in call.original_args)
                    replaced = True
        return replaced

    def close(self, region: Region, value: Tensor) -> Tensor:
        """``value`` of a region, used outside it: one activation of the root if the region is a written
        activation, else as computed (its calls' refusals stand)."""
        region.closed = True
        if not region.is_activation:
            for refusal in region.refusals:
                self.refuse(refusal)
            region.refusals.clear()
            compute = self.statistics.pop(value)
            if compute is not None:  # a power that is no written activation: a statistic, held where it scales
                held = value.detach()
                self.pend(held, compute)
                return held
            return value
        substitute = self.substitutes.get(value)
        if substitute is None:
            detached = value.detach()
            substitute = identity_rule(region.root, lambda _: detached)
            self.substitutes.put(value, substitute)
        return substitute


__all__ = ["Pending"]
