"""Operations explained at run time, for models ``torch.fx`` cannot trace (Hugging Face transformers, models with
data-dependent control flow).

:func:`torchlrp.convert` rewrites a traceable model's operations into operation modules once. A model it cannot
trace keeps its Python forward; its layers still become torchlrp twins, and while it is explained,
:class:`RunTimeOperations` -- a :class:`torch.overrides.TorchFunctionMode` -- sees every torch call of that forward
and gives the calls on activations (tensors that carry relevance) the rules the operation registry gives them in a
traced graph:

* ``a + b``, ``a - b`` of two activations: the proportional split; with a constant (a position embedding, a mask):
  the constant takes its proportional share;
* ``a * c``, ``a / c`` with ``c`` a constant: relevance to ``a`` unchanged; ``a * b`` of two activations, ``a @ b``,
  ``bmm``, two-operand ``einsum``: AttnLRP's uniform rule (the epsilon rule when one factor is a constant);
* ``softmax`` on an activation: AttnLRP's rule (CP-LRP: a constant), ``scaled_dot_product_attention``: through its
  math (:func:`~torchlrp.functional.attention.attention_rule`);
* ``gelu``, ``silu``, ``tanh``, ``erf``-based activations and the negation ``-x`` (rotary embeddings'
  ``rotate_half``): the identity rule; ``sum``/``mean``: the proportional split;
  ``layer_norm``: the standard deviation held constant; ``rms_norm``: the root mean square held constant (identity);
* the statistics of hand-written norms -- ``rsqrt``, ``sqrt`` and the square ``x.pow(2)`` / ``x ** 2`` of an
  activation -- are held constant (AttnLRP), so LLaMA's ``x * torch.rsqrt(x.pow(2).mean(-1) + eps)`` passes
  relevance to ``x`` unchanged and ``(x - mean) / torch.sqrt(var + eps)`` is explained as a layer norm;
* index maps (``view``, ``transpose``, ``cat``, indexing, ...), ``relu``, max pooling, dropout: their gradient.

Any other call that makes an activation passes relevance by its gradient and is reported in a warning after the
forward (never silently). Calls inside torchlrp's own layers and rules run without the mode (they are under
``torch.no_grad`` inside autograd Functions, or made by the handlers).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .functional.attention import attention_rule
from .functional.operations import (bilinear_rule, identity_rule, layer_norm_rule, scale_rule, softmax_rule,
                                    weighted_sum_rule)
from .functional.relevance import proportional
from .registry import INDEX_FUNCTIONS, INDEX_METHODS, SHAPE_METHODS
from .state import ExplainState

Handler = Callable[["RunTimeOperations", tuple, dict], Any]

#: calls on activations whose gradient is their rule (besides the registry's index maps)
GRADIENT_FUNCTIONS = (
    F.relu, torch.relu, F.relu6, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.embedding,
    F.pad, torch.where, torch.masked_fill,
)
GRADIENT_METHODS = ("relu", "masked_fill", "__getitem__", "__get__", "requires_grad_", "type_as", "float", "half",
                    "bfloat16", "double", "to", "cpu", "cuda", "contiguous", "clone", "detach")


def _is_activation(value: Any) -> bool:
    return isinstance(value, Tensor) and value.requires_grad and not isinstance(value, torch.nn.Parameter)


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


class RunTimeOperations(TorchFunctionMode):
    """Explain the torch calls of a forward as they happen (see the module docstring).

    Parameters
    ----------
    state : ExplainState
        The active explanation: its attention mode (AttnLRP or CP-LRP) and its ``fused`` setting.
    epsilon : float
        Stabilizer of the proportional splits and products (the composite's choice for parameter-free
        operations).
    """

    def __init__(self, state: ExplainState, epsilon: float) -> None:
        super().__init__()
        self.state = state
        self.epsilon = epsilon
        self.gradient_only: dict[str, int] = {}
        self.masked: dict[int, tuple[weakref.ref, Tensor, Tensor]] = {}  # scores + constant, by the sum's id
        self.handlers = _handlers()

    def __torch_function__(self, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        handler = self.handlers.get(func)
        if handler is not None:
            result = handler(self, args, kwargs)
            if result is not NotImplemented:
                return result
        result = func(*args, **kwargs)
        if handler is None and _is_activation(result) and not _passes_gradient(func):
            self.gradient_only[_name(func)] = self.gradient_only.get(_name(func), 0) + 1
        return result

    def report(self) -> None:
        """Warn about the calls on activations that passed relevance by their gradient, if there were any."""
        if self.gradient_only:
            listed = ", ".join(f"{name} (x{count})" for name, count in self.gradient_only.items())
            warnings.warn(f"torchlrp explained this model's forward at run time (torch.fx cannot trace it); these "
                          f"calls on activations have no relevance rule and passed relevance by their gradient: "
                          f"{listed}", stacklevel=3)


def _passes_gradient(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    is_method = isinstance(func, type(torch.Tensor.add)) or "TensorBase" in repr(func) or "getset" in repr(func)
    if is_method and name in (*INDEX_METHODS, *SHAPE_METHODS, *GRADIENT_METHODS):
        return True
    return func in INDEX_FUNCTIONS or func in GRADIENT_FUNCTIONS


def _sum(signs: tuple[float, float]) -> Handler:
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        if len(args) != 2 or kwargs:
            return NotImplemented  # alpha=, out=: the plain call
        left, right = args
        if _is_activation(left) and _is_activation(right):
            return weighted_sum_rule([left, right], signs, epsilon=mode.epsilon)
        if _is_activation(left):  # activation +/- constant
            constant = right * signs[1] if isinstance(right, Tensor) else signs[1] * right
            result = weighted_sum_rule([left], [signs[0]], constant=constant, epsilon=mode.epsilon)
            if signs[0] == 1.0 and isinstance(constant, Tensor):  # maybe scores + mask before a softmax
                key, table = id(result), mode.masked
                table[key] = (weakref.ref(result, lambda _: table.pop(key, None)), left, constant)
            return result
        if _is_activation(right):  # constant +/- activation
            return weighted_sum_rule([right], [signs[1]], constant=left, epsilon=mode.epsilon)
        return NotImplemented
    return handle


def _product(function: Callable[[Tensor, Tensor], Tensor], elementwise: bool) -> Handler:
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        if len(args) != 2 or kwargs:
            return NotImplemented
        left, right = args
        left_active, right_active = _is_activation(left), _is_activation(right)
        if left_active and right_active:  # CP-LRP's attention weights are constants: they never reach this line
            return bilinear_rule(function, left, right, (0.5, 0.5), mode.epsilon)
        if elementwise:
            if left_active:
                return scale_rule(left, right, function)
            return scale_rule(right, left, function, signal_first=False) if right_active else NotImplemented
        if not isinstance(left, Tensor) or not isinstance(right, Tensor):
            return NotImplemented
        return bilinear_rule(function, left, right, (1.0, 0.0) if left_active else (0.0, 1.0), mode.epsilon)
    return handle


def _quotient(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
    if len(args) != 2 or kwargs or not _is_activation(args[0]) or _is_activation(args[1]):
        return NotImplemented  # a quotient of two activations has no rule here: the plain call
    return scale_rule(args[0], args[1], torch.div)


def _softmax(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
    input = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    dtype = kwargs.get("dtype", args[2] if len(args) > 2 else None)
    if not _is_activation(input) or not isinstance(dim, int) or set(kwargs) - {"dim", "dtype", "_stacklevel"}:
        return NotImplemented
    scores, constant = input, None
    masked = mode.masked.get(id(input))
    if masked is not None and masked[0]() is input:  # softmax(scores + mask): the mask is the rule's constant
        _, scores, constant = masked
    if dtype is not None:  # softmax(x, dim, dtype=torch.float32) (LLaMA's eager attention): the cast, then the rule
        input, scores = input.to(dtype), scores.to(dtype)
    if constant is not None:  # a mask's -inf becomes the dtype's minimum: masked logits get zero relevance, not NaN
        constant = constant.to(scores.dtype).clamp(min=torch.finfo(scores.dtype).min)
    if mode.state.attention == "cp":  # CP-LRP: the weights are a constant of the product with the values
        return torch.softmax(input.detach(), dim)
    return softmax_rule(scores, dim, constant, mode.epsilon)


def _attention(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args), **kwargs)
    if bound.get("dropout_p", 0.0):
        return NotImplemented
    if bound.get("enable_gqa", False):  # grouped-query attention: each key/value head serves a group of query heads
        groups = bound["query"].shape[-3] // bound["key"].shape[-3]
        bound["key"] = bound["key"].repeat_interleave(groups, dim=-3)
        bound["value"] = bound["value"].repeat_interleave(groups, dim=-3)
    output, _ = attention_rule(bound["query"], bound["key"], bound["value"], bound.get("attn_mask"),
                               bool(bound.get("is_causal", False)), bound.get("scale"), mode.state.attention,
                               mode.epsilon, need_weights=False)
    return output


def _identity(function: Callable) -> Handler:
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        if not args or not _is_activation(args[0]):
            return NotImplemented
        return identity_rule(args[0], lambda tensor: function(tensor, *args[1:], **kwargs))
    return handle


def _reduction(function: Callable) -> Handler:
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        if not args or not _is_activation(args[0]) or kwargs.get("dtype") is not None:
            return NotImplemented
        return proportional(args[0], lambda tensor: function(tensor, *args[1:], **kwargs), mode.epsilon)
    return handle


def _layer_norm(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = dict(zip(names, args), **kwargs)
    if not _is_activation(bound["input"]):
        return NotImplemented
    return layer_norm_rule(bound["input"], bound["normalized_shape"], bound.get("weight"), bound.get("bias"),
                           bound.get("eps", 1e-5), mode.epsilon)


def _held_constant(function: Callable, exponent: float | None = None) -> Handler:
    """A normalizer's statistic of an activation, computed as a constant (no relevance flows into it)."""
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        if not args or not _is_activation(args[0]):
            return NotImplemented
        if exponent is not None and (len(args) < 2 or not isinstance(args[1], (int, float)) or args[1] != exponent):
            return NotImplemented  # x ** 3, x ** tensor: not a norm's square
        return function(args[0].detach(), *args[1:], **kwargs)
    return handle


def _einsum(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
    equation, *operands = args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if kwargs or not isinstance(equation, str) or len(operands) != 2:
        return NotImplemented
    return _product(lambda left, right: torch.einsum(equation, left, right), False)(mode, tuple(operands), {})


def _handlers() -> dict[Any, Handler]:
    """The run-time rules, by torch function (built per explanation; no process-wide state)."""
    handlers: dict[Any, Handler] = {}
    for function in (torch.Tensor.add, torch.add, torch.Tensor.__add__, torch.Tensor.__radd__):
        handlers[function] = _sum((1.0, 1.0))
    for function in (torch.Tensor.sub, torch.sub, torch.Tensor.__sub__):
        handlers[function] = _sum((1.0, -1.0))
    for function in (torch.Tensor.mul, torch.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__):
        handlers[function] = _product(torch.mul, True)
    for function in (torch.Tensor.div, torch.div, torch.Tensor.__truediv__):
        handlers[function] = _quotient
    for function in (torch.Tensor.matmul, torch.matmul, torch.Tensor.__matmul__):
        handlers[function] = _product(torch.matmul, False)
    for function in (torch.Tensor.bmm, torch.bmm):
        handlers[function] = _product(torch.bmm, False)
    handlers[torch.einsum] = _einsum
    for function in (torch.Tensor.softmax, torch.softmax, F.softmax):
        handlers[function] = _softmax
    handlers[F.scaled_dot_product_attention] = _attention
    for function in (F.gelu, F.silu, F.mish, F.elu, F.celu, F.selu, F.softplus, F.leaky_relu, F.hardswish, torch.tanh,
                     torch.Tensor.tanh, F.tanh, torch.erf, torch.neg, torch.Tensor.neg, torch.Tensor.__neg__):
        handlers[function] = _identity(function)
    for function in (torch.Tensor.sum, torch.sum, torch.Tensor.mean, torch.mean):
        handlers[function] = _reduction(function)
    handlers[F.layer_norm] = _layer_norm
    if hasattr(F, "rms_norm"):
        handlers[F.rms_norm] = _identity(F.rms_norm)  # the root mean square held constant: relevance unchanged
    for function in (torch.rsqrt, torch.Tensor.rsqrt, torch.sqrt, torch.Tensor.sqrt):
        handlers[function] = _held_constant(function)
    for function in (torch.pow, torch.Tensor.pow, torch.Tensor.__pow__):
        handlers[function] = _held_constant(function, 2)
    return handlers
