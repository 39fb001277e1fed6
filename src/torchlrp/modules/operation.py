"""Modules that explain the parameter-free operations of a model (sums, reductions, gates, activations, ...).

:func:`torchlrp.convert` puts one of these modules in place of each call of a function or method through which
relevance flows (``x + y``, ``x.mean((2, 3))``, ``F.silu(x)``, ``scale * x``, ...), registered inside the module
whose forward made the call (e.g. ``features.1.add``), so that composites (``by_name``/``by_type``) and traces
see them like layers. Outside an explanation each computes exactly the original call. While an explanation of
their model is active they take the composite's rule for parameter-free operations: ``Epsilon`` (the
proportional split, stabilized by its epsilon) or a gradient-type rule (then they compute the plain gradient).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor

from torchlrp.functional.operations import (bilinear_rule, identity_rule, layer_norm_rule, scale_rule, softmax_rule,
                                     weighted_sum_rule)
from torchlrp.functional.relevance import proportional
from torchlrp.core.rules import Rule
from torchlrp.core.kinds import ParameterFree
from torchlrp.core.state import ExplainState, current


@ParameterFree.register
class Operation:
    """Mixin of torchlrp's operation modules: finds the module's rule in the active explanation."""

    def operation_rule(self) -> Rule | None:
        """Return the rule this module explains by now, or None where it computes the plain operation.

        Returns
        -------
        Rule or None
            The rule of the active explanation of a model holding this module, unless it propagates a gradient.
        """
        state = current()
        rule = None if state is None else state.rules.get(self)
        return None if rule is None or rule.propagates_gradient else rule


class FunctionOperation(Operation, torch.nn.Module):
    """An operation module that applies a function given at construction (the call it replaces).

    Parameters
    ----------
    function : callable
        The function, called as ``function(input, *args, **kwargs)``.
    """

    def __init__(self, function: Callable[..., Tensor]) -> None:
        super().__init__()
        self.function = function

    def extra_repr(self) -> str:  # noqa: D102
        return getattr(self.function, "__name__", type(self.function).__name__)


class Proportional(FunctionOperation):
    """A parameter-free linear map (mean, sum, average pooling, interpolation): proportional relevance.

    ``R_x = x * J^T (R / stab(f(x)))``: each input gets relevance in proportion to its contribution.

    Parameters
    ----------
    function : callable
        The map, called as ``function(input, *args, **kwargs)`` (e.g. ``torch.mean``,
        ``torch.nn.functional.adaptive_avg_pool2d``).
    """

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Apply the map.

        Parameters
        ----------
        input : Tensor
            The input.
        *args, **kwargs
            The map's other arguments.

        Returns
        -------
        Tensor
            ``function(input, *args, **kwargs)``.
        """
        rule = self.operation_rule()
        if rule is None:
            return self.function(input, *args, **kwargs)
        return proportional(input, lambda tensor: self.function(tensor, *args, **kwargs), rule.epsilon)


class Scale(Operation, torch.nn.Module):
    """``signal * factor`` or ``signal / factor`` with the factor held constant: all relevance to the signal.

    The factor is a constant (a parameter: layer scale; a number) or a gate computed from the features by a
    sigmoid-like function (squeeze-excitation): relevance to the features with the gate held constant, as in the
    canonization of EfficientNet/MobileNet by Pahde et al.; the gate's branch receives none.

    Parameters
    ----------
    operation : callable
        ``torch.mul`` or ``torch.div``.
    signal_index : int
        Which argument of the call (0 or 1) is the signal.
    """

    def __init__(self, operation: Callable[[Any, Any], Tensor], signal_index: int) -> None:
        super().__init__()
        if signal_index not in (0, 1):
            raise ValueError(f"signal_index must be 0 or 1, got {signal_index!r}")
        self.operation = operation
        self.signal_index = signal_index

    def forward(self, left: Any, right: Any) -> Tensor:
        """Apply the product or quotient.

        Parameters
        ----------
        left, right : Tensor or number
            The operands, in the call's order.

        Returns
        -------
        Tensor
            ``operation(left, right)``.
        """
        rule = self.operation_rule()
        signal, factor = (left, right) if self.signal_index == 0 else (right, left)
        if rule is None or not isinstance(signal, Tensor):
            return self.operation(left, right)
        return scale_rule(signal, factor, self.operation, signal_first=self.signal_index == 0)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{getattr(self.operation, '__name__', self.operation)}, signal_index={self.signal_index}"


class ScaledSum(Operation, torch.nn.Module):
    """``torch.addcmul(input, t1, t2, value=v)`` / ``torch.addcdiv(...)``: ``input + v * t1 * t2`` (``/ t2``) with
    the factors other than the activation held constant, then the proportional split of the sum (GRN's
    ``addcmul(bias, weight, x * n)``).

    Parameters
    ----------
    operation : callable
        ``torch.addcmul`` or ``torch.addcdiv``.
    value : float
        The call's ``value``.
    active_factor : int or None
        Which of ``t1`` (0) and ``t2`` (1) carries relevance (None: neither, the product is a constant).
    """

    def __init__(self, operation: Callable[..., Tensor], value: float, active_factor: int | None) -> None:
        super().__init__()
        self.operation, self.value, self.active_factor = operation, float(value), active_factor

    def forward(self, input: Any, tensor1: Tensor, tensor2: Tensor, value: Any = None) -> Tensor:
        """Compute ``operation(input, tensor1, tensor2, value=value)``.

        Parameters
        ----------
        input, tensor1, tensor2 : Tensor
            The call's operands.
        value : float, optional
            The call's ``value`` (the one given at construction).

        Returns
        -------
        Tensor
            The result.
        """
        rule = self.operation_rule()
        if rule is None:
            return self.operation(input, tensor1, tensor2, value=self.value)
        divide = self.operation is torch.addcdiv
        if self.active_factor is None:
            product = self.operation(torch.zeros_like(tensor1), tensor1, tensor2, value=self.value)
            return weighted_sum_rule([input], [1.0], product, rule.epsilon)
        signal, other = (tensor1, tensor2) if self.active_factor == 0 else (tensor2, tensor1)
        factor = self.value / other if divide else other * self.value
        product = scale_rule(signal, factor, torch.mul)
        if isinstance(input, Tensor) and input.requires_grad and not isinstance(input, torch.nn.Parameter):
            return weighted_sum_rule([input, product], [1.0, 1.0], None, rule.epsilon)
        return weighted_sum_rule([product], [1.0], input, rule.epsilon)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{self.operation.__name__}, value={self.value}, active_factor={self.active_factor}"


class ProductSum(Operation, torch.nn.Module):
    """``torch.addmm``/``torch.baddbmm(input, a, b, beta=, alpha=)`` of activations: ``beta * input + alpha * a @ b``
    (BLOOM's attention scores with ALiBi). The product takes AttnLRP's uniform rule (all to the activation where
    the other factor is a constant), ``alpha`` is a scale, and the sum splits relevance in proportion (a constant
    ``input`` absorbs its share, as a bias does).

    Parameters
    ----------
    product : callable
        ``torch.mm`` or ``torch.bmm``.
    shares : tuple of float
        The factors' shares of the product's relevance (``(0.5, 0.5)``: both activations).
    input_active : bool
        Whether ``input`` carries relevance.
    """

    def __init__(self, product: Callable[[Tensor, Tensor], Tensor], shares: tuple[float, float],
                 input_active: bool) -> None:
        super().__init__()
        self.product, self.shares, self.input_active = product, tuple(float(v) for v in shares), input_active

    def forward(self, input: Tensor, batch1: Tensor, batch2: Tensor, *, beta: float = 1.0,
                alpha: float = 1.0) -> Tensor:
        """Compute ``beta * input + alpha * product(batch1, batch2)``.

        Parameters
        ----------
        input, batch1, batch2 : Tensor
            The call's operands.
        beta, alpha : float
            The call's factors.

        Returns
        -------
        Tensor
            The result (as ``torch.addmm``/``torch.baddbmm`` computes it outside explanations).
        """
        rule = self.operation_rule()
        function = torch.addmm if self.product is torch.mm else torch.baddbmm
        if rule is None:
            return function(input, batch1, batch2, beta=beta, alpha=alpha)
        product = bilinear_rule(self.product, batch1, batch2, self.shares, rule.epsilon)
        if alpha != 1:
            product = scale_rule(product, alpha, torch.mul)
        scaled = input if beta == 1 else input * beta
        if self.input_active:
            return weighted_sum_rule([scaled, product], [1.0, 1.0], None, rule.epsilon)
        return weighted_sum_rule([product], [1.0], scaled, rule.epsilon)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{self.product.__name__}, shares={self.shares}, input_active={self.input_active}"


class Activation(FunctionOperation):
    """An element-wise activation called as a function (``F.silu(x)``, ``x.sigmoid()``): the identity rule.

    Parameters
    ----------
    function : callable
        The activation, called as ``function(input, *args, **kwargs)``.
    """

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Apply the activation.

        Parameters
        ----------
        input : Tensor
            The input.
        *args, **kwargs
            The activation's other arguments.

        Returns
        -------
        Tensor
            ``function(input, *args, **kwargs)``; while explaining, relevance passes it unchanged.
        """
        if self.operation_rule() is None:
            return self.function(input, *args, **kwargs)
        return identity_rule(input, lambda tensor: self.function(tensor, *args, **kwargs))


class LayerNormFunction(Operation, torch.nn.Module):
    """``torch.nn.functional.layer_norm`` called in a forward (e.g. torchvision's channels-last ``LayerNorm2d``).

    Explained as :class:`torchlrp.modules.LayerNorm` is: the standard deviation held constant (AttnLRP).
    """

    def forward(self, input: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None = None,
                bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
        """Apply the layer norm.

        Parameters
        ----------
        input, normalized_shape, weight, bias, eps
            As for :func:`torch.nn.functional.layer_norm`.

        Returns
        -------
        Tensor
            The normalized input.
        """
        rule = self.operation_rule()
        if rule is None:
            return torch.nn.functional.layer_norm(input, normalized_shape, weight, bias, eps)
        return layer_norm_rule(input, normalized_shape, weight, bias, eps, rule.epsilon)


class Softmax(Operation, torch.nn.Module):
    """A softmax inside the model (attention weights), explained by AttnLRP's rule ``R_x = x (R - s sum R)``.

    Under a composite with ``attention="cp"`` its output is a constant (CP-LRP): the products with it give all
    relevance to their other factor (see :class:`Bilinear`) and the logits receive none.

    Parameters
    ----------
    dim : int
        The dimension the softmax normalizes.
    dtype : torch.dtype, optional
        The call's ``dtype`` (LLaMA's eager attention computes it in float32): the input is cast first.
    constant : tuple of (Tensor, Tensor), optional
        ``(scores, mask)`` where the call's input is ``scores + mask`` with a constant ``mask`` (found by the
        run-time engine): the rule is applied to the scores with the mask as its constant, so that a mask of
        ``-inf`` (or the dtype's minimum) gives masked logits no relevance instead of NaN.
    """

    def __init__(self, dim: int, dtype: torch.dtype | None = None,
                 constant: tuple[Tensor, Tensor] | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.dtype = dtype
        self.constant = constant

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Apply the softmax.

        Parameters
        ----------
        input : Tensor
            The logits.
        *args, **kwargs
            The replaced call's other arguments (its ``dim``, already taken at construction).

        Returns
        -------
        Tensor
            ``softmax(input, dim)``.
        """
        rule = self.operation_rule()
        if rule is None:
            return torch.softmax(input, self.dim, dtype=self.dtype)
        if current().attention == "cp":  # CP-LRP: the weights are a constant of the product with the values
            return torch.softmax(input.detach(), self.dim, dtype=self.dtype)
        current().losses_allowed.add("AttnLRP's softmax rule (absorbs like a bias)")
        scores, constant = (input, None) if self.constant is None else self.constant
        if constant is not None:  # the sum's type, as the model computes it (float32 scores + a float64 mask)
            scores = scores.to(input.dtype)
        if self.dtype is not None:
            scores = scores.to(self.dtype)
        if constant is not None:  # a mask's -inf becomes the dtype's minimum: masked logits get no relevance
            constant = constant.to(scores.dtype).clamp(min=torch.finfo(scores.dtype).min)
        return softmax_rule(scores, self.dim, constant, rule.epsilon)

    def extra_repr(self) -> str:  # noqa: D102
        return f"dim={self.dim}"


class Bilinear(Operation, torch.nn.Module):
    """A product of two factors (``q @ k^T``, ``attn @ v``, ``a * b``), explained by AttnLRP's uniform rule.

    Each factor that is an activation takes its share of the epsilon-rule relevance computed with the other held
    constant: half each when both are activations; all of it when the other is a constant (a parameter).

    Parameters
    ----------
    operation : callable
        The product, bilinear in its two arguments (``torch.matmul``, ``torch.mul``, ``torch.bmm``).
    shares : tuple of float
        The two factors' shares, ``(0.5, 0.5)`` (uniform) or ``(1, 0)``/``(0, 1)`` (a constant factor).
    attention_factor : int or None
        Which factor (0 or 1) holds attention weights (a softmax inside the model), if one does: under a composite
        with ``attention="cp"`` (CP-LRP) that factor is a constant and the other takes all the relevance.
    """

    def __init__(self, operation: Callable[[Tensor, Tensor], Tensor], shares: tuple[float, float] = (0.5, 0.5),
                 attention_factor: int | None = None) -> None:
        super().__init__()
        if attention_factor not in (None, 0, 1):
            raise ValueError(f"attention_factor must be None, 0 or 1, got {attention_factor!r}")
        self.operation = operation
        self.shares = tuple(float(share) for share in shares)
        self.attention_factor = attention_factor

    def forward(self, left: Tensor, right: Tensor, *rest: Any, **keywords: Any) -> Tensor:
        """Apply the product.

        Parameters
        ----------
        left, right : Tensor
            The factors, in the call's order.
        *rest, **keywords
            The call's other arguments (``grouped_mm``'s offsets), passed to the product.

        Returns
        -------
        Tensor
            ``operation(left, right, *rest, **keywords)``.
        """
        rule = self.operation_rule()
        operation = self.operation if not (rest or keywords) else functools.partial(_with_rest, self.operation,
                                                                                      rest, keywords)
        if rule is None:
            return operation(left, right)
        shares = self.shares
        if self.attention_factor is not None and current().attention == "cp":
            shares = (0.0, 1.0) if self.attention_factor == 0 else (1.0, 0.0)
        return bilinear_rule(operation, left, right, shares, rule.epsilon)

    def extra_repr(self) -> str:  # noqa: D102
        extra = "" if self.attention_factor is None else f", attention_factor={self.attention_factor}"
        return f"{getattr(self.operation, '__name__', self.operation)}, shares={self.shares}{extra}"


def _with_rest(operation: Callable, rest: tuple, keywords: dict, left: Tensor, right: Tensor) -> Tensor:
    return operation(left, right, *rest, **keywords)


class Einsum(Bilinear):
    """A ``torch.einsum`` of two operands (``"bhid,bhjd->bhij"``), explained as :class:`Bilinear` products are.

    Parameters
    ----------
    equation : str
        The einsum equation.
    shares, attention_factor
        As for :class:`Bilinear`.
    """

    def __init__(self, equation: str, shares: tuple[float, float] = (0.5, 0.5),
                 attention_factor: int | None = None) -> None:
        super().__init__(functools.partial(torch.einsum, equation), shares, attention_factor)
        self.equation = equation

    def forward(self, equation: str, *operands: Tensor) -> Tensor:  # noqa: D417
        """Apply the einsum.

        Parameters
        ----------
        equation : str
            The call's equation (the one given at construction).
        *operands : Tensor
            The two operands (or one list of them).

        Returns
        -------
        Tensor
            ``torch.einsum(equation, left, right)``.
        """
        left, right = operands[0] if len(operands) == 1 else operands
        return super().forward(left, right)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{self.equation!r}, shares={self.shares}" + (
            "" if self.attention_factor is None else f", attention_factor={self.attention_factor}")


def output_softmax_rule(state: ExplainState, scores: Tensor, softmax: Callable[[Tensor], Tensor]) -> Tensor:
    """The softmax that gives a model's output, while explaining: its output, relevance passed unchanged to the
    scores, which are recorded as the explanation's ``output_scores`` (``start="logit"`` starts there).

    Parameters
    ----------
    state : ExplainState
        The active explanation.
    scores : Tensor
        The softmax's input.
    softmax : callable
        The softmax (or log-softmax) with its arguments bound.

    Returns
    -------
    Tensor
        ``softmax(scores)``.
    """
    state.output_scores = scores.detach()
    return identity_rule(scores, softmax)


class OutputSoftmax(FunctionOperation):
    """A softmax (or log-softmax) that produces the model's output: relevance passes it unchanged while explaining.

    The score before it is explained, as for a final ``Softmax`` module of a ``Sequential``; the output stays the
    softmax's.

    Parameters
    ----------
    function : callable
        The softmax, called as ``function(input, *args, **kwargs)``.
    """

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Apply the softmax, or (while explaining) return the scores unchanged.

        Parameters
        ----------
        input : Tensor
            The scores.
        *args, **kwargs
            The softmax's other arguments.

        Returns
        -------
        Tensor
            ``function(input, *args, **kwargs)``; while explaining, its backward passes relevance unchanged to
            ``input`` (recorded as the explanation's ``output_scores``).
        """
        state = current()
        if state is None or self not in state.rules:
            return self.function(input, *args, **kwargs)
        return output_softmax_rule(state, input, lambda scores: self.function(scores, *args, **kwargs))
