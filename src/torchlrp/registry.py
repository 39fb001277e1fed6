"""The operation registry: how relevance passes through each operation of a traced model.

:func:`torchlrp.convert` traces a model with ``torch.fx`` and looks every call up here -- a function
(``torch.cat``, ``operator.add``, ``F.silu``), a tensor method (``"mean"``, ``"view"``) or a leaf module type
(``nn.MaxPool2d``, ``lrp.SiLU``). An :class:`OperationEntry` says

* which relevance rule applies (``rule``, the name the docs and the README's operation table use);
* how to explain the call: ``build`` makes an operation module (:mod:`torchlrp.modules.operation`) that replaces
  the call, or ``build`` is None and the call stays as it is, because its gradient already is the rule (index maps
  such as ``cat``/``view``/``permute``: relevance follows the index map; max pooling: winner takes all; dropout and
  stochastic depth in eval mode: identity);
* what the static analysis needs: whether the output is non-negative (``sign``), a gate (``gate``: a product with
  it scales a signal), sizes rather than tensors (``shape``) or carries no relevance (``constant``).

A new operation is one entry::

    registry = torchlrp.default_registry()
    registry.add_function(my_op, OperationEntry("identity"))   # relevance passes unchanged (its gradient)
    converted = torchlrp.convert(model, registry=registry)

The registry is built fresh by :func:`default_registry` (no process-wide state); ``convert`` uses a fresh one
unless given one.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import torch
import torch.nn.functional as F
import torchvision

from .modules.activation import ACTIVATION_TWINS, Hardsigmoid, IdentityRuleActivation, ReLU6, Sigmoid
from .modules.affine import ExplainableAffine
from .modules.affine_call import AFFINE_FUNCTIONS, AffineCall, bind_affine_call
from .modules.attention import MultiheadAttention, ScaledDotProductAttention, ShiftedWindowAttention
from .modules.recurrent import GRU, LSTM
from .modules.norm import NORM_TWINS, BatchNormCall, GroupNormCall
from .modules.pooling import MaxPool
from .modules.operation import (Activation, Bilinear, Einsum, LayerNormFunction, OutputSoftmax, ProductSum,
                                Proportional, Scale, ScaledSum, Softmax)
from .modules.rectifier import ReLU
from .modules.residual import Add
from .modules.rotation import CyclicPool, Rotate

Sign = Literal["none", "preserve", "nonnegative"]


class Unsupported(Exception):
    """Raised by an entry's ``build`` when this particular call cannot be explained; the message says why."""


class GraphView(Protocol):
    """What an entry's ``build`` may ask about the traced graph (provided by :func:`torchlrp.convert`)."""

    def is_activation(self, argument: Any) -> bool:
        """Whether ``argument`` is a node carrying relevance (derived from the model input)."""

    def is_gate(self, argument: Any) -> bool:
        """Whether ``argument`` is the output of a gate (sigmoid-like), possibly reshaped."""

    def is_attention(self, argument: Any) -> bool:
        """Whether ``argument`` is attention weights (a softmax inside the model), possibly reshaped."""

    def is_output(self, node: torch.fx.Node) -> bool:
        """Whether ``node`` is (part of) the model's output."""

    def owner_type(self, node: torch.fx.Node) -> type | None:
        """The class of the module whose forward made the call (None for the model's own forward)."""

    def submodule(self, target: str) -> torch.nn.Module:
        """The module a ``call_module`` node calls."""

    def take_padding(self, node: torch.fx.Node, argument: int, dims: int) -> tuple[tuple[int, ...], str] | None:
        """If argument ``argument`` of ``node`` is a constant-size padding used by this call only (``F.pad``, a
        padding module), bypass it and return ``(pad, mode)`` (``F.pad``'s order and mode), else None."""



Build = Callable[[torch.fx.Node, "GraphView"], "torch.nn.Module | None"]


@dataclass(frozen=True)
class OperationEntry:
    """How relevance passes through one operation.

    Parameters
    ----------
    rule : str
        The relevance rule, as the docs name it (``"index map"``, ``"proportional"``, ``"identity"``, ...).
    build : callable or None
        ``build(node, graph_view)`` returns the module that replaces the call (it is called with the call's
        arguments) or None to keep it, or raises :class:`Unsupported`. None keeps every call: its gradient is
        the rule.
    sign : {"none", "preserve", "nonnegative"}
        Whether the output is non-negative: always, when every tensor input is, or not known.
    gate : bool
        The output is a gate (sigmoid-like, in ``[0, 1]``): a product with it scales a signal.
    shape : bool
        The call returns sizes or other non-tensor values (``x.size()``, ``x.shape``).
    constant : bool
        The output carries no relevance although computed from an activation (``zeros_like``, ``detach``).
    attention : bool
        The output is attention weights (a softmax inside the model): CP-LRP holds them constant.
    inplace : bool
        The call modifies its first argument (``x.add_(y)``, ``F.relu(x, inplace=True)`` is found from its
        keyword); ``convert`` rewrites it out of place if that argument is not used afterwards.
    folds : bool
        A per-channel affine map (an eval-mode batch norm) that ``convert`` folds into the linear/conv layer before
        it where that layer's output feeds it alone.
    constant_when : callable, optional
        ``constant_when(node, graph_view)``: this call is held constant (as with ``constant``) where it returns True
        (``x / x.amax(...)``: a normalizer), otherwise explained by ``build`` (``amax`` as a max pooling).
    """

    rule: str
    build: Build | None = None
    sign: Sign = "none"
    gate: bool = False
    shape: bool = False
    constant: bool = False
    attention: bool = False
    inplace: bool = False
    folds: bool = False
    constant_when: Callable[[torch.fx.Node, "GraphView"], bool] | None = None


class OperationRegistry:
    """Operations (functions, tensor methods, leaf module types) mapped to their :class:`OperationEntry`."""

    def __init__(self) -> None:
        self.functions: dict[Any, OperationEntry] = {}
        self.methods: dict[str, OperationEntry] = {}
        self.modules: dict[type, OperationEntry] = {}

    def add_function(self, function: Any, entry: OperationEntry) -> None:
        """Register a function (or any callable that ``torch.fx`` records as ``call_function``).

        Parameters
        ----------
        function : callable
            The function object, e.g. ``torch.cat`` or ``operator.add``.
        entry : OperationEntry
            How relevance passes through it.
        """
        self.functions[function] = entry

    def add_method(self, name: str, entry: OperationEntry) -> None:
        """Register a tensor method by name (``"mean"`` for ``x.mean(...)``).

        Parameters
        ----------
        name : str
            The method name.
        entry : OperationEntry
            How relevance passes through it.
        """
        self.methods[name] = entry

    def add_module(self, module_type: type, entry: OperationEntry) -> None:
        """Register a leaf module type (subclasses match unless registered themselves).

        Parameters
        ----------
        module_type : type
            A ``torch.nn.Module`` subclass; ``convert`` keeps its instances as leaves of the trace.
        entry : OperationEntry
            How relevance passes through it.
        """
        self.modules[module_type] = entry

    def for_module(self, module: torch.nn.Module) -> OperationEntry | None:
        """Return the entry of a module (by its type, then its base classes), or None.

        A subclass with a ``forward`` of its own (timm's ``Conv2dSame``, ``BatchNormAct2d``; a user's
        ``class MyConv(nn.Conv2d)``) does not take its base class's entry: it is explained through what its forward
        does.

        Parameters
        ----------
        module : torch.nn.Module
            A leaf module.

        Returns
        -------
        OperationEntry or None
            The entry.
        """
        forward = getattr(type(module), "forward", None)
        for cls in type(module).__mro__:
            if cls in self.modules:
                return self.modules[cls] if getattr(cls, "forward", None) is forward else None
        return None

    def lookup(self, node: torch.fx.Node, modules: dict[str, torch.nn.Module]) -> OperationEntry | None:
        """Return the entry of a traced call, or None if the operation is unknown.

        Parameters
        ----------
        node : torch.fx.Node
            A ``call_function``, ``call_method`` or ``call_module`` node.
        modules : dict
            The model's modules by dotted name.

        Returns
        -------
        OperationEntry or None
            The entry.
        """
        if node.op == "call_function":
            try:
                return self.functions.get(node.target)
            except TypeError:  # an unhashable callable
                return None
        if node.op == "call_method":
            return self.methods.get(node.target)
        if node.op == "call_module":
            return self.for_module(modules[node.target])
        return None


def _keep(rule: str, sign: Sign = "preserve", **flags: Any) -> OperationEntry:
    return OperationEntry(rule, None, sign, **flags)


def _proportional(function: Callable) -> OperationEntry:
    return OperationEntry("proportional", lambda node, view: Proportional(function), "preserve")


def _activation(function: Callable, sign: Sign = "none", gate: bool = False) -> OperationEntry:
    return OperationEntry("identity", lambda node, view: Activation(function), sign, gate=gate)


_PRODUCTS = (operator.mul, torch.mul, torch.multiply, operator.truediv, torch.div, torch.true_divide, torch.divide,
             "mul", "div")
_ROOTS = (torch.rsqrt, torch.sqrt, "rsqrt", "sqrt")


def _uses_end_in(node: torch.fx.Node, targets: tuple) -> bool:
    """Whether every path from ``node`` through its users reaches a call of one of ``targets`` before the output or
    a module call."""
    frontier, seen = list(node.users), set()
    while frontier:
        user = frontier.pop()
        if user in seen or user.target in targets:
            continue
        seen.add(user)
        if user.op in ("output", "call_module", "placeholder"):
            return False
        frontier.extend(user.users)
    return True


def _statistic(square: bool) -> OperationEntry:
    """A norm's statistic of an activation, held constant (AttnLRP): ``rsqrt``/``sqrt`` whose every use scales an
    activation (``x * rsqrt(v)``, ``x / sqrt(v)``), and the square ``x ** 2`` whose every path ends in such a root."""
    def check(node: torch.fx.Node, view: GraphView) -> None:
        if square:
            exponent = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
            if exponent != 2:
                raise Unsupported(f"a power {exponent!r} of an activation (only a norm's square x ** 2 has a rule)")
            if not _uses_end_in(node, _ROOTS):
                raise Unsupported("a square of an activation that is not a norm's statistic (only "
                                  "x * rsqrt(mean(x ** 2) + eps) and the like have a rule)")
        elif any(user.target not in _PRODUCTS for user in node.users):
            raise Unsupported("a square root of an activation that does not scale an activation (only a norm's "
                              "x * rsqrt(v) or x / sqrt(v) has a rule)")
        return None
    return OperationEntry("held constant (a norm's statistic)", check, "none", constant=True)


def _rectifier(inplace: bool = False) -> OperationEntry:
    return OperationEntry("rectifier", lambda node, view: ReLU(), "nonnegative", inplace=inplace)


def _sum(signs: tuple[float, float], inplace: bool = False) -> OperationEntry:
    def build(node: torch.fx.Node, view: GraphView) -> torch.nn.Module:
        if node.kwargs or len(node.args) != 2:
            raise Unsupported("a sum with more than two operands or with alpha=")
        constants = [index for index, argument in enumerate(node.args) if not view.is_activation(argument)]
        return Add(signs=signs, constant_summands=constants)
    return OperationEntry("sum", build, "preserve", inplace=inplace)


def _scale(operation: Callable, inplace: bool = False) -> OperationEntry:
    def build(node: torch.fx.Node, view: GraphView) -> torch.nn.Module:
        if node.kwargs or len(node.args) != 2:
            raise Unsupported("a product or quotient with keyword arguments")
        left, right = node.args
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
    return OperationEntry("scale", build, "none", inplace=inplace)


def _softmax(function: Callable, log: bool = False) -> OperationEntry:
    def build(node: torch.fx.Node, view: GraphView) -> torch.nn.Module:
        if view.is_output(node):
            return OutputSoftmax(function)
        if log:
            raise Unsupported("a log-softmax inside the model (one that gives the output passes relevance to its "
                              "scores; a softmax inside it takes AttnLRP's rule)")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        other = {key: value for key, value in node.kwargs.items() if key != "dim"}
        if not isinstance(dim, int) or set(other) - {"_stacklevel", "dtype"} or other.get("dtype") is not None \
                or len(node.args) > 2:
            raise Unsupported("a softmax inside the model without an integer dim, or with other arguments")
        return Softmax(dim)
    return OperationEntry("AttnLRP softmax rule (identity at the output)", build, "nonnegative", attention=True)


def _product(operation: Callable) -> OperationEntry:
    def build(node: torch.fx.Node, view: GraphView) -> torch.nn.Module:
        if node.kwargs or len(node.args) != 2:
            raise Unsupported("a matrix product with keyword arguments")
        left, right = (view.is_activation(argument) for argument in node.args)
        attention = [index for index, argument in enumerate(node.args) if view.is_attention(argument)]
        return Bilinear(operation, (0.5, 0.5) if left and right else (1.0, 0.0) if left else (0.0, 1.0),
                        attention[0] if len(attention) == 1 and left and right else None)
    return OperationEntry("uniform rule (AttnLRP); epsilon with a constant factor", build, "none")


def _max_pool(function: Callable) -> OperationEntry:
    def build(node: torch.fx.Node, view: GraphView) -> torch.nn.Module | None:
        positional_indices = 2 if "adaptive" in function.__name__ else 6
        returns_indices = node.kwargs.get("return_indices", False) or (
            len(node.args) > positional_indices and node.args[positional_indices])
        return None if returns_indices else MaxPool(function)  # with indices: winner takes all only
    return OperationEntry("winner takes all, or proportional (composite's max_pooling)", build, "preserve")


def _einsum(node: torch.fx.Node, view: GraphView) -> torch.nn.Module:
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if node.kwargs or not isinstance(equation, str) or len(operands) != 2:
        raise Unsupported("an einsum of other than two operands (or with a non-constant equation)")
    left, right = (view.is_activation(operand) for operand in operands)
    attention = [index for index, operand in enumerate(operands) if view.is_attention(operand)]
    return Einsum(equation, (0.5, 0.5) if left and right else (1.0, 0.0) if left else (0.0, 1.0),
                  attention[0] if len(attention) == 1 and left and right else None)


def _affine_call(function: Callable) -> OperationEntry:
    """``F.linear``/``F.conv*``/``F.conv_transpose*``/``torch.addmm`` on a weight and bias made of parameters."""
    def build(node: torch.fx.Node, view: GraphView) -> torch.nn.Module:
        bound = bind_affine_call(function, node.args, node.kwargs)
        if function is torch.addmm and (node.kwargs or bound["beta"] != 1 or bound["alpha"] != 1):
            raise Unsupported("torch.addmm with keyword arguments, beta or alpha")
        if not view.is_activation(bound.get("input")):
            raise Unsupported("a linear map of a constant input with a weight computed from the input")
        if function is torch.addmm and view.is_activation(bound.get("weight")):
            return _product_sum(torch.mm, node, view)  # a product of activations plus a term, not a layer
        if view.is_activation(bound.get("weight")) or view.is_activation(bound["bias"]):
            raise Unsupported("a linear map or convolution whose weight or bias depends on the input (a dynamic "
                              "kernel)")
        _, dims, transposed, _ = AFFINE_FUNCTIONS[function]
        padding = None if transposed or dims == 0 else view.take_padding(node, 0, dims)
        if padding is None:
            return AffineCall(function, view.owner_type(node))
        return AffineCall(function, view.owner_type(node), *padding)
    return OperationEntry("layer rule (composite), as the layer twins", build, "none")


def _product_sum(product: Callable, node: torch.fx.Node, view: GraphView) -> torch.nn.Module:
    """``addmm``/``baddbmm(input, a, b, beta=, alpha=)`` with activation factors (BLOOM's ALiBi scores)."""
    names = ("input", "batch1", "batch2") if product is torch.bmm else ("input", "mat1", "mat2")
    bound = dict(zip(names, node.args), **node.kwargs)
    if set(bound) - {*names, "beta", "alpha"} or not all(isinstance(bound.get(k, 1.0), (int, float))
                                                          for k in ("beta", "alpha")):
        raise Unsupported(f"{product.__name__}-sum with other arguments or non-constant beta/alpha")
    active = (view.is_activation(bound.get(names[1])), view.is_activation(bound.get(names[2])))
    shares = (0.5, 0.5) if all(active) else (1.0, 0.0) if active[0] else (0.0, 1.0)
    return ProductSum(product, shares, view.is_activation(bound.get("input")))


def _norm_call(module: Callable[[], torch.nn.Module], names: tuple[str, ...]) -> Build:
    """A functional norm whose statistics, weight and bias are constants (parameters, buffers)."""
    def build(node: torch.fx.Node, view: GraphView) -> torch.nn.Module:
        bound = dict(zip(names, node.args), **node.kwargs)
        if any(view.is_activation(bound.get(name)) for name in names[1:]):
            raise Unsupported("a normalization whose statistics, weight or bias depend on the input")
        if bound.get("training", False):
            raise Unsupported("a batch norm in training mode (explanations are of the eval-mode model)")
        if "running_mean" in names and bound.get("running_mean") is None:
            raise Unsupported("a batch norm without running statistics")
        return module()
    return build


#: ``F.batch_norm``'s arguments in order
BATCH_NORM_ARGUMENTS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _softmax_module(node: torch.fx.Node, view: GraphView) -> torch.nn.Module | None:
    """A ``Softmax`` module: passes relevance to the scores at the output, AttnLRP's rule inside the model."""
    if view.is_output(node):
        return None
    module = view.submodule(node.target)
    if isinstance(module, torch.nn.LogSoftmax) or not isinstance(module.dim, int):
        raise Unsupported("a LogSoftmax module, or a Softmax module without an integer dim, inside the model (one "
                          "that gives the output passes relevance unchanged to the scores before it)")
    return Softmax(module.dim)


#: the statistics that may scale an activation (held constant): a use that ends elsewhere has no rule
STATISTIC_METHODS = ("var", "std", "norm")
STATISTIC_FUNCTIONS = (torch.var, torch.std, torch.norm, torch.linalg.vector_norm, torch.linalg.norm)
#: maxima: a max pooling (winner takes all) where they are data, held constant where they only normalize
EXTREMUM_METHODS = ("amax", "amin", "max", "min")
EXTREMUM_FUNCTIONS = (torch.amax, torch.amin, torch.max, torch.min)
_SCALING = (*_PRODUCTS, torch.addcmul, torch.addcdiv, "addcmul", "addcdiv")


def only_scales(node: torch.fx.Node) -> bool:
    """Whether every use of ``node`` ends, through constant arithmetic, in a product or quotient (a normalizer)."""
    return _uses_end_in(node, _SCALING)


def _held_statistic(node: torch.fx.Node, view: GraphView) -> None:
    """A statistic of an activation (``x.norm(dim=1)``, ``x.var(...)``) held constant: allowed where every use of it
    ends, through constant arithmetic, in a product or quotient with an activation."""
    if not only_scales(node):
        raise Unsupported("a statistic of an activation (norm, var, std) that does not scale an activation (only "
                          "normalizations such as x / x.norm(dim, keepdim=True) have a rule)")


def _addc(operation: Callable) -> OperationEntry:
    """``torch.addcmul``/``addcdiv(input, t1, t2, value=v)``: the product with its constant factor held
    constant, then the sum with ``input``."""
    def build(node: torch.fx.Node, view: GraphView) -> torch.nn.Module:
        input, first, second = (list(node.args) + [None] * 3)[:3]
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 1)
        if set(node.kwargs) - {"value"} or not isinstance(value, (int, float)) or second is None:
            raise Unsupported(f"{operation.__name__} with a non-constant value or other keywords")
        if view.is_activation(first) and view.is_activation(second):
            raise Unsupported(f"{operation.__name__} of two activations")
        if view.is_activation(second) and operation is torch.addcdiv:
            raise Unsupported("torch.addcdiv dividing by an activation")
        return ScaledSum(operation, float(value), 0 if view.is_activation(first) else 1 if view.is_activation(
            second) else None)
    return OperationEntry("scale (constant factor), then sum", build, "none")


#: tensor methods that only move, copy or select entries: relevance follows the index map (their gradient)
INDEX_METHODS = (
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "swapaxes",
    "swapdims", "movedim", "moveaxis", "t", "contiguous", "squeeze", "unsqueeze", "expand", "expand_as", "repeat",
    "chunk", "split", "tensor_split", "unbind", "narrow", "select", "flip", "roll", "clone", "to", "float",
    "double", "half", "bfloat16", "type", "type_as", "__getitem__",
)
INDEX_FUNCTIONS = (
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.t,
    torch.squeeze, torch.unsqueeze, torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack,
    torch.vstack, torch.chunk, torch.split, torch.tensor_split, torch.unbind, torch.narrow, torch.select,
    torch.flip, torch.roll, torch.rot90, torch.clone, operator.getitem, F.pad, F.channel_shuffle, torch.channel_shuffle,
    F.pixel_shuffle, F.pixel_unshuffle,
)
SHAPE_METHODS = ("size", "dim", "numel", "ndimension", "nelement", "stride", "element_size", "is_contiguous")
CONSTANT_METHODS = ("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "detach")
CONSTANT_FUNCTIONS = (torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like,
                      torch.randn_like, torch.detach)


#: every padding module of torch (zero, constant, reflection, replication, circular; 1-3 d)
PADDING_MODULES = tuple(cls for cls in vars(torch.nn.modules.padding).values()
                        if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__name__.endswith(
                            ("Pad1d", "Pad2d", "Pad3d")) and not cls.__name__.startswith("_"))


def default_registry() -> OperationRegistry:
    """Return a new registry holding every operation torchlrp explains.

    Returns
    -------
    OperationRegistry
        A fresh registry (modify it freely and pass it to :func:`torchlrp.convert`).
    """
    registry = OperationRegistry()
    add_function, add_method, add_module = registry.add_function, registry.add_method, registry.add_module

    for name in INDEX_METHODS:
        add_method(name, _keep("index map"))
    for function in INDEX_FUNCTIONS:
        add_function(function, _keep("index map"))
    for name in SHAPE_METHODS:
        add_method(name, _keep("sizes", "none", shape=True))
    add_function(builtins.getattr, _keep("sizes", "none", shape=True))
    add_function(builtins.len, _keep("sizes", "none", shape=True))
    for name in CONSTANT_METHODS:
        add_method(name, _keep("no relevance", "none", constant=True))
    for function in CONSTANT_FUNCTIONS:
        add_function(function, _keep("no relevance", "none", constant=True))

    # pooling and reductions
    for function in (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                     F.adaptive_max_pool3d):
        add_function(function, _max_pool(function))
    for function in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                     F.adaptive_avg_pool3d, torch.mean, torch.sum):
        add_function(function, _proportional(function))
    add_function(F.interpolate, OperationEntry("proportional", lambda node, view: Proportional(F.interpolate)))
    add_method("mean", _proportional(torch.Tensor.mean))
    add_method("sum", _proportional(torch.Tensor.sum))

    # identity in eval mode
    for function in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                     torchvision.ops.stochastic_depth):
        add_function(function, _keep("identity"))

    # sums and products
    for function, signs in ((operator.add, (1.0, 1.0)), (torch.add, (1.0, 1.0)), (operator.sub, (1.0, -1.0)),
                            (torch.sub, (1.0, -1.0)), (torch.subtract, (1.0, -1.0))):
        add_function(function, _sum(signs))
    add_function(operator.iadd, _sum((1.0, 1.0), inplace=True))
    add_function(operator.isub, _sum((1.0, -1.0), inplace=True))
    add_method("add", _sum((1.0, 1.0)))
    add_method("sub", _sum((1.0, -1.0)))
    add_method("add_", _sum((1.0, 1.0), inplace=True))
    add_method("sub_", _sum((1.0, -1.0), inplace=True))
    for function in (operator.mul, torch.mul, torch.multiply):
        add_function(function, _scale(torch.mul))
    for function in (operator.truediv, torch.div, torch.true_divide, torch.divide):
        add_function(function, _scale(torch.div))
    add_function(operator.imul, _scale(torch.mul, inplace=True))
    add_function(operator.itruediv, _scale(torch.div, inplace=True))
    add_method("mul", _scale(torch.mul))
    add_method("div", _scale(torch.div))
    add_method("mul_", _scale(torch.mul, inplace=True))
    add_method("div_", _scale(torch.div, inplace=True))

    # element-wise activations: the ReLU passes relevance where active (its gradient); the others unchanged
    for function in (F.relu, torch.relu):
        add_function(function, _rectifier())
    for function in (F.relu_, torch.relu_):
        add_function(function, _rectifier(inplace=True))
    add_method("relu", _rectifier())
    add_method("relu_", _rectifier(inplace=True))
    for function in (F.relu6, F.hardtanh):
        add_function(function, _activation(function, "nonnegative" if function is F.relu6 else "none"))
    for function in (F.silu, F.gelu, F.hardswish, F.elu, F.celu, F.selu, F.leaky_relu, F.softplus, F.mish,
                     F.tanh, torch.tanh, torch.clamp, torch.clip):
        add_function(function, _activation(function))
    for name in ("clamp", "clip"):  # activation clipping (Gemma 4's ViT): an element-wise activation
        add_method(name, _activation(getattr(torch.Tensor, name)))
    for function in (F.sigmoid, torch.sigmoid, F.hardsigmoid):
        add_function(function, _activation(function, "nonnegative", gate=True))
    add_method("sigmoid", _activation(torch.sigmoid, "nonnegative", gate=True))
    add_method("tanh", _activation(torch.tanh))
    for function in (operator.neg, torch.neg):  # -x: relevance passes unchanged (its gradient would flip its sign)
        add_function(function, _activation(torch.neg))
    add_method("neg", _activation(torch.neg))

    # normalization and the output softmax
    add_function(F.layer_norm, OperationEntry("layer norm", lambda node, view: LayerNormFunction()))
    add_function(F.batch_norm, OperationEntry(
        "folded into the layer before it, else affine (per channel)",
        _norm_call(BatchNormCall, BATCH_NORM_ARGUMENTS), "none", folds=True))
    add_function(F.group_norm, OperationEntry("layer norm (per group)", _norm_call(
        GroupNormCall, ("input", "num_groups", "weight", "bias", "eps")), "none"))

    # linear maps and convolutions called as functions on parameters (timm, GPT-2's Conv1D)
    for function in AFFINE_FUNCTIONS:
        add_function(function, _affine_call(function))
    add_function(torch.baddbmm, OperationEntry("uniform rule (AttnLRP) on the product, then the sum",
                                               lambda node, view: _product_sum(torch.bmm, node, view)))
    add_method("baddbmm", OperationEntry("uniform rule (AttnLRP) on the product, then the sum",
                                         lambda node, view: _product_sum(torch.bmm, node, view)))
    for function in (torch.rsqrt, torch.sqrt):
        add_function(function, _statistic(square=False))
    for name in ("rsqrt", "sqrt"):
        add_method(name, _statistic(square=False))
    for function in (torch.pow, operator.pow):
        add_function(function, _statistic(square=True))
    add_method("pow", _statistic(square=True))
    if hasattr(F, "rms_norm"):  # torch >= 2.4
        add_function(F.rms_norm, OperationEntry("rms norm (rms held constant: identity)",
                                                lambda node, view: Activation(F.rms_norm)))
    for function in (F.softmax, torch.softmax):
        add_function(function, _softmax(function))
    for function in (F.log_softmax, torch.log_softmax):
        add_function(function, _softmax(function, log=True))
    add_method("softmax", _softmax(torch.Tensor.softmax))
    add_method("log_softmax", _softmax(torch.Tensor.log_softmax, log=True))

    # products of two activations (attention), matrix products with a constant
    for function in (operator.matmul, torch.matmul, torch.bmm):
        add_function(function, _product(torch.matmul if function is operator.matmul else function))
    add_method("matmul", _product(torch.matmul))
    add_function(torch.einsum, OperationEntry("uniform rule (AttnLRP); epsilon with a constant factor", _einsum))
    swin = torchvision.models.swin_transformer
    add_function(swin.shifted_window_attention, OperationEntry(
        "attention: AttnLRP (or CP-LRP), bias and mask constant", lambda node, view: ShiftedWindowAttention(
            swin.shifted_window_attention)))
    add_function(swin._patch_merging_pad, _keep("index map"))
    add_function(F.scaled_dot_product_attention,
                 OperationEntry("attention: AttnLRP (or CP-LRP)", lambda node, view: ScaledDotProductAttention()))
    add_method("bmm", _product(torch.bmm))

    # leaf modules
    add_module(ExplainableAffine, _keep("layer rule (composite)", "none"))
    add_module(ReLU, _keep("rectifier", "nonnegative"))
    add_module(torch.nn.ReLU, _keep("rectifier", "nonnegative"))
    for twin in ACTIVATION_TWINS.values():
        sign: Sign = "nonnegative" if twin in (ReLU6, Sigmoid, Hardsigmoid) else "none"
        add_module(twin, _keep("identity", sign, gate=twin in (Sigmoid, Hardsigmoid)))
    for twin in NORM_TWINS.values():
        rule = ("affine (per channel)" if issubclass(twin, torch.nn.modules.batchnorm._BatchNorm)
                else "rms norm (rms held constant: identity)" if issubclass(twin, IdentityRuleActivation)
                else "layer norm")
        add_module(twin, _keep(rule, "none"))
    for module_type in (torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.MaxPool3d, torch.nn.AdaptiveMaxPool1d,
                        torch.nn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool3d):
        add_module(module_type, _keep("winner takes all, or proportional (composite's max_pooling)", "preserve"))
    for module_type in (torch.nn.AvgPool1d, torch.nn.AvgPool2d, torch.nn.AvgPool3d, torch.nn.AdaptiveAvgPool1d,
                        torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d):
        add_module(module_type, _keep("proportional"))
    add_module(torch.nn.Upsample, _keep("proportional", "none"))
    for module_type in (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                        torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout, torch.nn.Identity, torch.nn.Flatten,
                        torch.nn.Unflatten, torch.nn.ChannelShuffle, torch.nn.PixelShuffle, torch.nn.PixelUnshuffle):
        add_module(module_type, _keep("identity" if "Dropout" in module_type.__name__ else "index map"))
    add_module(Add, _keep("sum"))
    add_module(Activation, _keep("identity (an activation written as a formula of its input)"))
    add_module(torch.nn.Embedding, _keep("lookup: explained from its output (inputs_embeds)", "none"))
    add_module(MultiheadAttention, _keep("attention: AttnLRP (or CP-LRP), projections by the layer rule", "none"))
    add_module(LSTM, _keep("LSTM: gates constant, cell sum proportional, candidate by the layer rule", "none"))
    add_module(GRU, _keep("GRU: gates constant, sums proportional, candidate by the layer rule", "none"))
    add_module(Rotate, _keep("index map (rotations)"))
    add_module(CyclicPool, _keep("proportional (mean, rms), winner takes all (max)"))
    for module_type in (torch.nn.Softmax, torch.nn.LogSoftmax):
        add_module(module_type, OperationEntry("identity at the output; AttnLRP softmax rule inside the model",
                                               _softmax_module, "nonnegative", attention=True))
    for module_type in PADDING_MODULES:
        add_module(module_type, _keep("index map (padded values absorb; copies summed)", "none"))
    add_module(torch.nn.Unfold, _keep("index map (copies summed)"))
    for name in STATISTIC_METHODS:
        add_method(name, OperationEntry("held constant (a normalizer)", _held_statistic, "none", constant=True))
    for function in STATISTIC_FUNCTIONS:
        add_function(function, OperationEntry("held constant (a normalizer)", _held_statistic, "none",
                                              constant=True))
    extremum = OperationEntry("winner takes all (a max pooling); held constant where it only normalizes",
                              None, "preserve", constant_when=lambda node, view: only_scales(node))
    for name in EXTREMUM_METHODS:
        add_method(name, extremum)
    for function in EXTREMUM_FUNCTIONS:
        add_function(function, extremum)
    gate_choice = OperationEntry("a router's choice (mixture of experts): values held constant, a gate", None,
                                 "none", constant_when=lambda node, view: True)
    add_function(torch.topk, gate_choice)
    add_method("topk", gate_choice)
    add_function(F.normalize, _activation(F.normalize))
    add_method("unfold", _keep("index map (copies summed)"))  # x.unfold(dim, size, step): overlapping windows
    add_function(torch.repeat_interleave, _keep("index map"))
    add_method("repeat_interleave", _keep("index map"))
    add_function(F.unfold, _keep("index map (copies summed)"))
    add_function(F.fold, _proportional(F.fold))
    for operation in (torch.addcmul, torch.addcdiv):
        add_function(operation, _addc(operation))
        add_method(operation.__name__, _addc(operation))
    return registry


__all__ = ["GraphView", "OperationEntry", "OperationRegistry", "Unsupported", "default_registry"]
