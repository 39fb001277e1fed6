"""A live call as the operation table sees it: the run-time engine's counterpart of a ``torch.fx`` node, and the
tests on live values (which tensors carry relevance) that the engine shares."""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor

#: marks a tensor computed from parameters and constants only (a weight expression, sigmoid(gating_param)): it
#: requires grad but carries no relevance
PARAMETER_EXPRESSION = "_torchlrp_parameter_expression"

#: a tensor's dunder method -> the operator a traced graph records for it, and whether its operands are swapped
DUNDERS = {
    "__add__": (operator.add, False), "__radd__": (operator.add, True), "__sub__": (operator.sub, False),
    "__rsub__": (operator.sub, True), "__mul__": (operator.mul, False), "__rmul__": (operator.mul, True),
    "__truediv__": (operator.truediv, False), "__rtruediv__": (operator.truediv, True),
    "__matmul__": (operator.matmul, False), "__rmatmul__": (operator.matmul, True), "__neg__": (operator.neg, False),
    "__pow__": (operator.pow, False), "__rpow__": (operator.pow, True), "__getitem__": (operator.getitem, False),
    "__iadd__": (operator.iadd, False), "__isub__": (operator.isub, False), "__imul__": (operator.imul, False),
    "__itruediv__": (operator.itruediv, False), "__setitem__": (operator.setitem, False),
}


class LiveCall:
    """One torch call of a forward explained at run time, in the form of a traced call.

    Parameters
    ----------
    function : callable
        What torch's function mode received (``torch.add``, ``Tensor.add``, ``Tensor.__radd__``).
    args : tuple
        Its positional arguments.
    kwargs : dict
        Its keyword arguments.

    Attributes
    ----------
    op : str
        ``"call_function"`` or ``"call_method"``, as ``torch.fx`` would record the call.
    target : callable or str
        The function (a dunder becomes its ``operator`` function, operands in order) or the method's name.
    args, kwargs
        The arguments in ``target``'s order (a build may replace them: a padding taken into a convolution).
    function, original_args, original_kwargs
        The call as it was made (what running it plainly runs).
    """

    def __init__(self, function: Any, args: tuple, kwargs: dict) -> None:
        self.function, self.original_args, self.original_kwargs = function, args, kwargs
        self.args, self.kwargs = args, kwargs
        short = getattr(function, "__name__", "")
        if short in DUNDERS and getattr(torch.Tensor, short, None) is function:
            self.op, (self.target, swapped) = "call_function", DUNDERS[short]
            if swapped and len(args) == 2:
                self.args = (args[1], args[0])
        elif short and is_method(function):
            self.op, self.target = "call_method", short
        else:
            self.op, self.target = "call_function", function

    @property
    def name(self) -> str:
        """The call's name as a user writes it."""
        return call_name(self.function)

    def run(self) -> Any:
        """Make the call as it was made (its gradient is then its rule)."""
        return self.function(*self.original_args, **self.original_kwargs)


def is_method(function: Any) -> bool:
    """Whether ``function`` is a method of ``torch.Tensor`` (``Tensor.add``, not ``torch.add``)."""
    name = getattr(function, "__name__", "")
    return (bool(name) and getattr(torch.Tensor, name, None) is function) or isinstance(
        function, type(torch.Tensor.add)) or "TensorBase" in repr(function)


def call_name(function: Any) -> str:
    """A call's name as a user writes it: ``torch.cumsum``, ``Tensor.cumsum``, ``F.gelu``'s qualified name."""
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None) or repr(function)
    for internal, public in (("_VariableFunctionsClass.", "torch."), ("TensorBase.", "Tensor."),
                             ("_TensorBase.", "Tensor.")):
        if name.startswith(internal):
            return public + name[len(internal):]
    return name


def is_parameter(tensor: Tensor) -> bool:
    """``isinstance(tensor, nn.Parameter)`` without the metaclass's Python-level instance check (it runs for every
    torch call of an explained forward)."""
    return issubclass(type(tensor), torch.nn.Parameter) or getattr(tensor, "_is_param", False)


def is_activation(value: Any) -> bool:
    """Whether ``value`` is a tensor that carries relevance: it requires grad and is neither a parameter nor made
    from parameters and constants only."""
    return (isinstance(value, Tensor) and value.requires_grad and not is_parameter(value)
            and not getattr(value, PARAMETER_EXPRESSION, False))


def tensors_of(args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors among a call's arguments (inside lists and tuples too)."""
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(item for item in value if isinstance(item, Tensor))
    return found


def mark_parameter_expressions(result: Any, args: tuple, kwargs: dict) -> None:
    """Mark the tensors a call computed from parameters and constants only (no activation among its inputs)."""
    if any(is_activation(a) for a in tensors_of(args, kwargs)):
        return
    for tensor in (result if isinstance(result, (tuple, list)) else (result,)):
        if isinstance(tensor, Tensor) and tensor.requires_grad and not is_parameter(tensor):
            setattr(tensor, PARAMETER_EXPRESSION, True)


__all__ = ["DUNDERS", "LiveCall", "PARAMETER_EXPRESSION", "call_name", "is_activation", "is_method", "is_parameter",
           "mark_parameter_expressions", "tensors_of"]
