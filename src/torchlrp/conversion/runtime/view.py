"""The run-time engine's :class:`~torchlrp.operations.spec.CallView`: what an entry's build may ask about the
arguments of a live call, answered from the side tables the engine keeps while the forward runs."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from torchlrp.conversion.runtime.calls import LiveCall, is_activation
from torchlrp.conversion.runtime.tables import TensorTable
from torchlrp.operations.spec import Facts


class LiveView:
    """Answers an entry's questions about a live call (see :class:`~torchlrp.operations.spec.CallView`).

    Parameters
    ----------
    owner : callable
        ``owner()``: the dotted name and module whose forward makes the call now.
    parameter_names : callable
        ``parameter_names()``: the model's parameters and buffers by identity -> their names.

    Attributes
    ----------
    facts : TensorTable
        Gates and attention weights among the live activations.
    pads : TensorTable
        Padded activations: ``(input, pad, mode)`` of the ``F.pad`` call that made them.
    masks : TensorTable
        Masked scores: ``(scores, mask)`` of a sum of an activation and a constant tensor.
    asked_only_scales : bool
        Set when a ``constant_when`` asked :meth:`only_scales` (the value is then held only where it scales).
    """

    def __init__(self, owner: Callable[[], tuple[str, torch.nn.Module | None]],
                 parameter_names: Callable[[], dict[int, str]]) -> None:
        self.owner, self.parameter_names = owner, parameter_names
        self.facts: TensorTable[Facts] = TensorTable()
        self.pads: TensorTable[tuple[Tensor, tuple[int, ...], str]] = TensorTable()
        self.masks: TensorTable[tuple[Tensor, Tensor]] = TensorTable()
        self.asked_only_scales = False

    @staticmethod
    def is_activation(argument: Any) -> bool:  # noqa: D102
        return is_activation(argument)

    def is_gate(self, argument: Any) -> bool:  # noqa: D102
        facts = self.facts.get(argument)
        return facts is not None and facts.gate

    def is_attention(self, argument: Any) -> bool:  # noqa: D102
        facts = self.facts.get(argument)
        return facts is not None and facts.attention

    @staticmethod
    def is_constant_tensor(argument: Any) -> bool:  # noqa: D102
        return isinstance(argument, Tensor) and argument.dtype.is_floating_point and not is_activation(argument)

    def constant_name(self, argument: Any) -> str | None:  # noqa: D102
        base = argument._base if isinstance(argument, Tensor) and argument._base is not None else argument
        return self.parameter_names().get(id(base)) if isinstance(base, Tensor) else None

    def additive_constant(self, argument: Any) -> tuple[Tensor, Tensor] | None:  # noqa: D102
        return self.masks.get(argument)

    @staticmethod
    def is_output(call: LiveCall) -> bool:  # noqa: D102
        return False  # the future is not known at run time: a softmax is inside the model

    def only_scales(self, call: LiveCall) -> bool:  # noqa: D102
        self.asked_only_scales = True  # held for now; taken back where a use is not a scaling (the engine)
        return True

    def owner_type(self, call: LiveCall) -> type | None:  # noqa: D102
        module = self.owner()[1]
        return None if module is None else type(module)

    @staticmethod
    def submodule(target: str) -> torch.nn.Module:  # noqa: D102
        raise KeyError(f"a run-time call has no submodule {target!r}")

    def take_padding(self, call: LiveCall, argument: int, dims: int) -> tuple[tuple[int, ...], str] | None:  # noqa: D102
        arguments = list(call.args)
        found = self.pads.get(arguments[argument]) if len(arguments) > argument else None
        if found is None or len(found[1]) != 2 * dims:
            return None
        arguments[argument] = found[0]
        call.args = tuple(arguments)
        return found[1], found[2]


__all__ = ["LiveView"]
