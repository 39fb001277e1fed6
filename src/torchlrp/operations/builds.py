"""The entries' builds: how one call of an operation is explained, from its arguments and what the view knows.

Each function here makes an :class:`~torchlrp.operations.spec.OperationEntry` or its ``build``. A build receives
the call (``op``, ``target``, ``args``, ``kwargs``: a ``torch.fx.Node`` in a traced graph, a live call at run time)
and a :class:`~torchlrp.operations.spec.CallView`, and returns the operation module that explains the call, None to
keep the call (its gradient is its rule), or raises :class:`~torchlrp.operations.spec.Unsupported`. Both engines
call the same build; the traced engine puts the module into the graph, the run-time engine runs it on the spot.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from torchlrp.modules.affine_call import AFFINE_FUNCTIONS, AffineCall, bind_affine_call
from torchlrp.modules.indexing import Concatenation, IndexAdd
from torchlrp.modules.operation import (Activation, Bilinear, Einsum, OutputSoftmax, ProductSum, Proportional, Scale,
                                        ScaledSum, Softmax)
from torchlrp.modules.pooling import MaxPool
from torchlrp.modules.rectifier import ReLU
from torchlrp.modules.residual import Add
from torchlrp.operations.spec import Build, CallView, OperationEntry, RuleKind, Sign, Unsupported

#: ``F.batch_norm``'s arguments in order
BATCH_NORM_ARGUMENTS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def keep(rule: str, kind: RuleKind, sign: Sign = "preserve", **flags: Any) -> OperationEntry:
    """An entry whose calls keep their gradient as their rule (index maps, dropout, max pooling with indices)."""
    return OperationEntry(rule, None, sign, kind=kind, **flags)


def proportional(function: Callable) -> OperationEntry:
    """A linear map without parameters (mean, sum, average pooling, interpolation): the proportional split."""
    return OperationEntry("proportional", lambda call, view: Proportional(function), "preserve",
                          kind=RuleKind.PROPORTIONAL)


def activation(function: Callable, sign: Sign = "none", gate: bool = False) -> OperationEntry:
    """An element-wise activation called as a function: the identity rule."""
    return OperationEntry("identity", lambda call, view: Activation(function), sign, gate=gate,
                          kind=RuleKind.IDENTITY)


def rectifier(inplace: bool = False) -> OperationEntry:
    """``relu``: relevance where the unit is active (its gradient, through torchlrp's ReLU)."""
    return OperationEntry("rectifier", lambda call, view: ReLU(), "nonnegative", inplace=inplace,
                          kind=RuleKind.RECTIFIER)


def held_where_it_scales(rule: str, build: Build | None, sign: Sign = "none") -> OperationEntry:
    """A statistic of an activation (a norm, a maximum, a square, a root), held constant where every use of it
    scales an activation (a normalizer, ``x / x.norm(...)``, ``x * rsqrt(mean(x ** 2))``); elsewhere ``build``
    explains it (None: by its gradient, a maximum's winner takes all)."""
    return OperationEntry(rule, build, sign, kind=RuleKind.HELD_CONSTANT,
                          constant_when=lambda call, view: view.only_scales(call))


def refused(reason: str) -> Build:
    """A build that refuses every call it is asked for, with ``reason``."""
    def build(call: Any, view: CallView) -> None:
        raise Unsupported(reason)
    return build


def power(call: Any, view: CallView) -> None:
    """``x ** p`` of an activation that is not held constant (not a norm's statistic): no rule."""
    exponent = 2 if "square" in str(call.target) else call.args[1] if len(call.args) > 1 else call.kwargs.get(
        "exponent")
    raise Unsupported(f"a power {exponent!r} of an activation that does not scale an activation (only a norm's "
                      f"statistic, x * rsqrt(mean(x ** 2) + eps), or an activation written as a formula has a rule)")


def summation(signs: tuple[float, float], inplace: bool = False) -> OperationEntry:
    """``a + b``, ``a - b``: the proportional split; a constant summand takes its share (reported)."""
    def build(call: Any, view: CallView) -> torch.nn.Module:
        if call.kwargs or len(call.args) != 2:
            raise Unsupported("a sum with more than two operands or with alpha=")
        constants = [index for index, argument in enumerate(call.args) if not view.is_activation(argument)]
        return Add(signs=signs, constant_summands=constants)
    return OperationEntry("sum", build, "preserve", inplace=inplace, kind=RuleKind.SUM)


def scaling(operation: Callable, inplace: bool = False) -> OperationEntry:
    """``a * b``, ``a / b``: a product with a constant or a gate passes all relevance to the signal; a product of
    two activations takes AttnLRP's uniform rule; a quotient's divisor is a normalizer, held constant."""
    def build(call: Any, view: CallView) -> torch.nn.Module:
        if call.kwargs or len(call.args) != 2:
            raise Unsupported("a product or quotient with keyword arguments")
        left, right = call.args
        active = [view.is_activation(left), view.is_activation(right)]
        if active == [True, False]:
            return Scale(operation, 0)
        if active == [False, True] and operation is torch.mul:
            return Scale(operation, 1)
        if active == [True, True]:
            gates = [view.is_gate(left), view.is_gate(right)]
            if gates == [False, True]:
                return Scale(operation, 0)
            if gates == [True, False] and operation is torch.mul:
                return Scale(operation, 1)
            if operation is torch.mul:  # AttnLRP's uniform rule (a gated linear unit; attention weights * values)
                attention = [index for index, argument in enumerate((left, right)) if view.is_attention(argument)]
                return Bilinear(torch.mul, attention_factor=attention[0] if len(attention) == 1 else None)
            return Scale(operation, 0)  # a quotient of activations: the divisor is a normalizer, held constant
        raise Unsupported("a division by an activation")
    return OperationEntry("scale", build, "none", inplace=inplace, kind=RuleKind.SCALE)


def softmax(function: Callable, log: bool = False) -> OperationEntry:
    """A softmax: the identity at the model's output, AttnLRP's rule inside it (CP-LRP: a constant)."""
    def build(call: Any, view: CallView) -> torch.nn.Module:
        if view.is_output(call):
            return OutputSoftmax(function)
        if log:
            raise Unsupported("a log-softmax inside the model (one that gives the output passes relevance to its "
                              "scores; a softmax inside it takes AttnLRP's rule)")
        dim = call.kwargs.get("dim", call.args[1] if len(call.args) > 1 else None)
        dtype = call.kwargs.get("dtype", call.args[2] if len(call.args) > 2 else None)
        other = set(call.kwargs) - {"dim", "dtype", "_stacklevel"}
        if not isinstance(dim, int) or other or len(call.args) > 3:
            raise Unsupported("a softmax inside the model without an integer dim, or with other arguments")
        return Softmax(dim, dtype, view.additive_constant(call.args[0]))
    return OperationEntry("AttnLRP softmax rule (identity at the output)", build, "nonnegative", attention=True,
                          gate=not log, kind=RuleKind.SOFTMAX)


def softmax_module(call: Any, view: CallView) -> torch.nn.Module | None:
    """A ``Softmax`` module: passes relevance to the scores at the output, AttnLRP's rule inside the model."""
    if view.is_output(call):
        return None
    module = view.submodule(call.target)
    if isinstance(module, torch.nn.LogSoftmax) or not isinstance(module.dim, int):
        raise Unsupported("a LogSoftmax module, or a Softmax module without an integer dim, inside the model (one "
                          "that gives the output passes relevance unchanged to the scores before it)")
    return Softmax(module.dim)


def _shares(left: bool, right: bool) -> tuple[float, float]:
    return (0.5, 0.5) if left and right else (1.0, 0.0) if left else (0.0, 1.0)


def _attention_factor(view: CallView, operands: tuple, left: bool, right: bool) -> int | None:
    attention = [index for index, operand in enumerate(operands) if view.is_attention(operand)]
    return attention[0] if len(attention) == 1 and left and right else None


def product(operation: Callable) -> OperationEntry:
    """A matrix product: AttnLRP's uniform rule of two activations; the epsilon rule with a constant factor."""
    def build(call: Any, view: CallView) -> torch.nn.Module:
        if call.kwargs or len(call.args) != 2:
            raise Unsupported("a matrix product with keyword arguments")
        left, right = (view.is_activation(argument) for argument in call.args)
        return Bilinear(operation, _shares(left, right), _attention_factor(view, tuple(call.args), left, right))
    return OperationEntry("uniform rule (AttnLRP); epsilon with a constant factor", build, "none",
                          kind=RuleKind.BILINEAR)


def grouped_product(function: Callable) -> OperationEntry:
    """``grouped_mm(input, weight, offs=...)`` (each group of rows times its expert's weight): a product."""
    def build(call: Any, view: CallView) -> torch.nn.Module:
        if len(call.args) < 2:
            raise Unsupported(f"{getattr(function, '__name__', function)} without two operands")
        left, right = (view.is_activation(argument) for argument in call.args[:2])
        return Bilinear(function, _shares(left, right))
    return OperationEntry("uniform rule (AttnLRP); epsilon with a constant factor (expert weights)", build,
                          "none", kind=RuleKind.BILINEAR)


def max_pooling(function: Callable) -> OperationEntry:
    """``F.max_pool*``: the composite's max-pooling choice; with indices returned, winner takes all only."""
    def build(call: Any, view: CallView) -> torch.nn.Module | None:
        positional_indices = 2 if "adaptive" in function.__name__ else 6
        returns_indices = call.kwargs.get("return_indices", False) or (
            len(call.args) > positional_indices and call.args[positional_indices])
        return None if returns_indices else MaxPool(function)
    return OperationEntry("winner takes all, or proportional (composite's max_pooling)", build, "preserve",
                          kind=RuleKind.GRADIENT)


def einsum(call: Any, view: CallView) -> torch.nn.Module:
    """A two-operand ``torch.einsum``: as a product (:func:`product`)."""
    equation, *operands = call.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if call.kwargs or not isinstance(equation, str) or len(operands) != 2:
        raise Unsupported("an einsum of other than two operands (or with a non-constant equation)")
    left, right = (view.is_activation(operand) for operand in operands)
    return Einsum(equation, _shares(left, right), _attention_factor(view, tuple(operands), left, right))


def affine_call(function: Callable) -> OperationEntry:
    """``F.linear``/``F.conv*``/``F.conv_transpose*``/``torch.addmm`` on a weight and bias made of parameters: the
    composite's layer rule (an :class:`~torchlrp.modules.affine_call.AffineCall`)."""
    def build(call: Any, view: CallView) -> torch.nn.Module:
        bound = bind_affine_call(function, call.args, call.kwargs)
        if function is torch.addmm and view.is_activation(bound.get("weight")):
            return _product_sum(torch.mm, call, view)  # a product of activations plus a term, not a layer
        if function is torch.addmm and (call.kwargs or bound["beta"] != 1 or bound["alpha"] != 1):
            raise Unsupported("torch.addmm with keyword arguments, beta or alpha")
        if not view.is_activation(bound.get("input")):
            raise Unsupported("a linear map of a constant input with a weight computed from the input")
        if view.is_activation(bound.get("weight")) or view.is_activation(bound["bias"]):
            raise Unsupported("a linear map or convolution whose weight or bias depends on the input (a dynamic "
                              "kernel)")
        _, dims, transposed, _ = AFFINE_FUNCTIONS[function]
        padding = None if transposed or dims == 0 else view.take_padding(call, 0, dims)
        if padding is None:
            return AffineCall(function, view.owner_type(call))
        return AffineCall(function, view.owner_type(call), *padding)
    return OperationEntry("layer rule (composite), as the layer twins", build, "none", kind=RuleKind.AFFINE)


def product_sum(product: Callable) -> Build:
    """``baddbmm(input, a, b, beta=, alpha=)`` with activation factors (BLOOM's ALiBi scores)."""
    return lambda call, view: _product_sum(product, call, view)


def _product_sum(product: Callable, call: Any, view: CallView) -> torch.nn.Module:
    names = ("input", "batch1", "batch2") if product is torch.bmm else ("input", "mat1", "mat2")
    bound = dict(zip(names, call.args), **call.kwargs)
    if set(bound) - {*names, "beta", "alpha"} or not all(isinstance(bound.get(k, 1.0), (int, float))
                                                          for k in ("beta", "alpha")):
        raise Unsupported(f"{product.__name__}-sum with other arguments or non-constant beta/alpha")
    active = (view.is_activation(bound.get(names[1])), view.is_activation(bound.get(names[2])))
    if not any(active):
        raise Unsupported(f"{product.__name__}-sum whose factors are constants")
    return ProductSum(product, _shares(*active), view.is_activation(bound.get("input")))


def norm_call(module: Callable[[], torch.nn.Module], names: tuple[str, ...]) -> Build:
    """A functional norm whose statistics, weight and bias are constants (parameters, buffers)."""
    def build(call: Any, view: CallView) -> torch.nn.Module:
        bound = dict(zip(names, call.args), **call.kwargs)
        if any(view.is_activation(bound.get(name)) for name in names[1:]):
            raise Unsupported("a normalization whose statistics, weight or bias depend on the input")
        if bound.get("training", False):
            raise Unsupported("a batch norm in training mode (explanations are of the eval-mode model)")
        if "running_mean" in names and bound.get("running_mean") is None:
            raise Unsupported("a batch norm without running statistics")
        return module()
    return build


def scaled_sum(operation: Callable) -> OperationEntry:
    """``torch.addcmul``/``addcdiv(input, t1, t2, value=v)``: the product with its constant factor held constant,
    then the sum with ``input``."""
    def build(call: Any, view: CallView) -> torch.nn.Module:
        input, first, second = (list(call.args) + [None] * 3)[:3]
        value = call.kwargs.get("value", call.args[3] if len(call.args) > 3 else 1)
        if set(call.kwargs) - {"value"} or not isinstance(value, (int, float)) or second is None:
            raise Unsupported(f"{operation.__name__} with a non-constant value or other keywords")
        if view.is_activation(first) and view.is_activation(second):
            raise Unsupported(f"{operation.__name__} of two activations")
        if view.is_activation(second) and operation is torch.addcdiv:
            raise Unsupported("torch.addcdiv dividing by an activation")
        return ScaledSum(operation, float(value), 0 if view.is_activation(first) else 1 if view.is_activation(
            second) else None)
    return OperationEntry("scale (constant factor), then sum", build, "none", kind=RuleKind.SUM)


def index_sum(inplace: bool = False) -> OperationEntry:
    """``x.index_add(dim, index, source)`` (a mixture of experts gathering its experts' outputs): each row's
    relevance split in proportion to ``x`` and the sources added to it."""
    def build(call: Any, view: CallView) -> torch.nn.Module:
        bound = dict(zip(("input", "dim", "index", "source"), call.args), **call.kwargs)
        if set(bound) - {"input", "dim", "index", "source", "alpha"} or not view.is_activation(bound.get("source")):
            raise Unsupported("index_add with other arguments, or of a constant source")
        return IndexAdd(view.is_activation(bound.get("input")))
    return OperationEntry("sum (each row's summands, proportionally)", build, "none", inplace=inplace,
                          kind=RuleKind.SUM)


def concatenation(function: Callable) -> OperationEntry:
    """``torch.cat``: an index map; constants among activations (a class token, registers) take their share
    (reported, ``explain(return_absorbed=True)``)."""
    def build(call: Any, view: CallView) -> torch.nn.Module | None:
        parts = call.args[0] if call.args else call.kwargs.get("tensors")
        if not isinstance(parts, (list, tuple)):
            return None
        constants = [index for index, part in enumerate(parts) if view.is_constant_tensor(part)]
        names = tuple(view.constant_name(parts[index]) or "" for index in constants)
        return Concatenation(function, constants, names=names) if constants else None
    return OperationEntry("index map (constants among the parts absorb)", build, kind=RuleKind.INDEX_MAP)


def statistic(call: Any, view: CallView) -> None:
    """A statistic of an activation (``x.norm(dim=1)``, ``x.var(...)``) that is not held constant: no rule."""
    raise Unsupported("a statistic of an activation (norm, var, std, a root) that does not scale an activation "
                      "(only normalizations such as x / x.norm(dim, keepdim=True) have a rule)")


__all__ = ["BATCH_NORM_ARGUMENTS", "activation", "affine_call", "concatenation", "einsum", "grouped_product",
           "held_where_it_scales", "index_sum", "keep", "max_pooling", "norm_call", "power", "product",
           "product_sum", "proportional", "rectifier", "refused", "scaled_sum", "scaling", "softmax",
           "softmax_module", "statistic", "summation"]
