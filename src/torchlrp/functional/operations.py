"""Relevance rules of the parameter-free operations a model applies between its layers.

Each Function computes the operation in its forward and, in its backward, turns the relevance of the output into
that of the inputs (the gradient reaching the output *is* the output relevance):

* :class:`IdentityRelevance` -- element-wise activations (SiLU, GELU, Hardswish, ...): relevance passes unchanged,
  ``R_x = R_y`` (the identity rule of zennit and AttnLRP).
* :class:`ScaleRelevance` -- ``x * g`` or ``x / g`` where ``g`` is a constant (layer scale) or a gate computed from
  the features (squeeze-excitation): ``g`` is held constant, so the map is linear in ``x`` and the whole relevance
  goes to ``x`` (summed over the dimensions along which ``x`` was broadcast); the gate receives none.
* :class:`WeightedSumRelevance` -- ``z = sum_i s_i x_i + c`` with signs ``s_i`` (``+``/``-``), broadcasting and a
  constant ``c``: ``R_i = s_i x_i R / stab(z)`` (each summand in proportion to its contribution, ``c`` absorbing
  its share like a bias).
* :class:`ChannelAffineRelevance` -- an eval-mode batch norm that does not follow a linear/conv layer, the
  per-channel affine map ``y = a x + b`` it is: the epsilon rule ``R_x = a x R / stab(y)``.
* :class:`SoftmaxRelevance` -- a softmax inside the model (attention weights): AttnLRP's rule
  ``R_x = x (R - s sum_j R_j)`` (Achtibat et al. 2024), the first-order Taylor expansion at ``x``; what the logits'
  shift-invariance leaves out is absorbed.
* :class:`BilinearRelevance` -- a product of two activations (``q @ k^T``, ``attn @ v``, ``a * b``): AttnLRP's
  uniform rule, each factor taking half of the epsilon-rule relevance it would get with the other held constant,
  ``R_a = 1/2 a * J_a^T (R / stab(y))`` and likewise for ``b`` (conserving with ``y`` exactly bilinear); with a
  constant factor the other takes all of it (the epsilon rule of a linear map).
* :class:`NormalizationRelevance` -- LayerNorm/GroupNorm with the division by the standard deviation held constant
  (AttnLRP): ``y = w (x - mean x) / s + b`` is then linear in ``x``; the epsilon rule on the affine part and LRP-0
  on the centring give ``R_x = (x / s) (u - mean u)`` with ``u = w R / stab(y)`` (means over each normalized group).

Nothing in a backward synchronizes with the host.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from torchlrp.functional.autocast import autocast_enabled
from torchlrp.functional.kernels import kernels
from torchlrp.functional.stabilize import mul_stabilized_ratio_


def _sum_to(tensor: Tensor, shape: torch.Size) -> Tensor:
    """``tensor`` summed over the dimensions along which a tensor of ``shape`` was broadcast."""
    return tensor if tensor.shape == shape else tensor.sum_to_size(shape)


def add_logit_constant(logits: Tensor, constant: Tensor) -> Tensor:
    """Return ``logits + constant``; a constant with one more leading dimension (Swin: a mask per window of each
    image, ``(1, windows, ...)``) is added to the logits viewed as ``(images, windows, ...)``.

    Parameters
    ----------
    logits : Tensor
        Attention scores ``(..., L, S)``.
    constant : Tensor
        Broadcastable to ``logits``, or with one more leading dimension (see above).

    Returns
    -------
    Tensor
        A new tensor of the logits' shape.
    """
    if constant.dim() == logits.dim() + 1:
        return (logits.view(-1, constant.shape[1], *logits.shape[1:]) + constant).view(logits.shape)
    return logits + constant


class IdentityRelevance(torch.autograd.Function):
    """Forward: ``function(input)``. Backward: the output relevance, unchanged.

    Nothing is needed for the backward. Where the input is an output that the layer or operation making it keeps
    anyway (``grad_fn.keeps_output``, e.g. :class:`~torchlrp.functional.relevance.AffineRelevance`) and no autocast is
    active, the node keeps that same tensor (no memory) and offers ``recompute_output``: a layer explained after
    this activation then keeps the activation's input instead of its own and recomputes the activation in the
    backward, so that the pair costs one activation-sized tensor instead of two.
    """

    @staticmethod
    def forward(ctx, input: Tensor, function: Callable[[Tensor], Tensor]) -> Tensor:  # noqa: D102
        output = function(input)
        if getattr(input.grad_fn, "keeps_output", False) and not autocast_enabled(input):
            ctx.save_for_backward(input)
            ctx.recompute_output = function
        return output.view_as(output) if output is input else output

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return relevance, None


class ScaleRelevance(torch.autograd.Function):
    """Forward: ``operation(signal, factor)`` (a product or quotient). Backward: all relevance to ``signal``."""

    @staticmethod
    def forward(ctx, signal: Tensor, factor: Tensor, operation: Callable[[Tensor, Tensor], Tensor],
                signal_first: bool) -> Tensor:  # noqa: D102
        ctx.signal_shape = signal.shape
        return operation(signal, factor) if signal_first else operation(factor, signal)

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: D102
        return _sum_to(relevance, ctx.signal_shape), None, None, None


class WeightedSumRelevance(torch.autograd.Function):
    """Forward: ``sum_i signs[i] * inputs[i] + constant`` (broadcasting). Backward: the proportional split."""

    @staticmethod
    def forward(ctx, epsilon: float, signs: tuple[float, ...], constant: Tensor | float | None,
                *inputs: Tensor) -> Tensor:  # noqa: D102
        total = inputs[0] if signs[0] == 1 else -inputs[0]
        for sign, summand in zip(signs[1:], inputs[1:]):
            total = torch.add(total, summand, alpha=sign)
        if constant is not None:
            total = total + constant
        ctx.signs, ctx.epsilon = signs, epsilon
        ctx.keeps_output = True  # the sum itself, not a stabilized copy (see AffineRelevance)
        ctx.save_for_backward(total, *inputs)
        return total

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        total, *inputs = ctx.saved_tensors
        ratio = kernels(False).quotient(relevance, total, ctx.epsilon)
        shares = [_sum_to(ratio * summand if sign == 1 else (ratio * summand).mul_(sign), summand.shape)
                  for sign, summand in zip(ctx.signs, inputs)]
        return (None, None, None, *shares)


class ChannelAffineRelevance(torch.autograd.Function):
    """Forward: an eval-mode batch norm. Backward: the epsilon rule on its per-channel affine map."""

    @staticmethod
    def forward(ctx, input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                bias: Tensor | None, eps: float, epsilon: float) -> Tensor:  # noqa: D102
        output = F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
        scale = (running_var + eps).rsqrt()
        shift = -running_mean * scale
        if weight is not None:
            shift = shift * weight
        if bias is not None:
            shift = shift + bias
        shape = (-1,) + (1,) * (input.dim() - 2)
        ctx.keeps_output = True
        ctx.save_for_backward(output, shift.view(shape).to(output.dtype))
        ctx.epsilon = epsilon
        return output

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        output, shift = ctx.saved_tensors
        signal = kernels(False).quotient(relevance, output, ctx.epsilon)
        return signal.mul_(output - shift), None, None, None, None, None, None


class SoftmaxRelevance(torch.autograd.Function):
    """Forward: ``softmax(x + c, dim)`` with ``c`` an optional additive constant (a mask, a relative position bias).
    Backward: AttnLRP's ``R_z = z (R - s sum_dim R)`` for the logits ``z = x + c``, of which ``x`` takes its
    proportional share ``x / stab(z)`` (the constant absorbs the rest, as a bias does).

    Where ``x`` is the output of a :class:`BilinearRelevance` (``q @ k^T``), the node keeps only ``s`` (and the
    constant) and recomputes ``x`` in the backward from the product's factors, which that node keeps anyway, then
    hands it to the product's backward: the attention scores (``heads x L x L`` per sample) are not kept from forward
    to backward, as for the gradient, and are computed once in the backward.
    """

    @staticmethod
    def forward(ctx, input: Tensor, dim: int, constant: Tensor | None, epsilon: float) -> Tensor:  # noqa: D102
        logits = input if constant is None else add_logit_constant(input, constant)
        output = torch.softmax(logits, dim)
        ctx.dim, ctx.epsilon, ctx.keeps_output = dim, epsilon, True
        producer = input.grad_fn
        ctx.producer = producer if getattr(producer, "recompute_product", None) is not None else None
        kept = (output,) if ctx.producer is not None else (output, input)
        ctx.save_for_backward(*kept, *(() if constant is None else (constant,)))
        ctx.has_constant = constant is not None
        return output

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: D102
        saved = list(ctx.saved_tensors)
        constant = saved.pop() if ctx.has_constant else None
        if ctx.producer is not None:
            (output,) = saved
            input = ctx.producer.recompute_product(*ctx.producer.saved_tensors)
            ctx.producer.recomputed = input  # the product's own backward needs it next: computed once
        else:
            output, input = saved
        result = torch.addcmul(relevance, output, relevance.sum(ctx.dim, keepdim=True), value=-1)
        if constant is None:
            return result.mul_(input), None, None, None
        logits = add_logit_constant(input, constant)  # R_z = z * core; the scores' share: core * x * z / stab(z)
        return mul_stabilized_ratio_(result.mul_(input), logits, ctx.epsilon, out=logits), None, None, None


def _times(tensor: Tensor, factor: float) -> Tensor:
    """``tensor`` multiplied in place by ``factor`` (no pass for 1)."""
    return tensor if factor == 1.0 else tensor.mul_(factor)


class BilinearRelevance(torch.autograd.Function):
    """Forward: ``function(a, b)``, bilinear. Backward: ``R_a = w_a a * J_a^T s``, ``R_b = w_b b * J_b^T s`` with
    ``s = R / stab(function(a, b))``; the product is recomputed in the backward (its vector-Jacobian products are
    the function's own backward), so only the two factors are kept, as for the gradient."""

    @staticmethod
    def forward(ctx, function: Callable[[Tensor, Tensor], Tensor], shares: tuple[float, float], epsilon: float,
                scale: float | Tensor | None, left: Tensor, right: Tensor) -> Tensor:  # noqa: D102
        ctx.function, ctx.shares, ctx.epsilon, ctx.scale = function, shares, epsilon, scale
        ctx.recomputed = None
        ctx.recompute_product = function if scale is None else (lambda a, b: function(a, b).mul_(scale))
        # a batched matrix product without broadcasting: its transposes are written out in the backward
        ctx.matmul = (function is torch.matmul and left.dim() >= 2 and right.dim() >= 2
                      and left.shape[:-2] == right.shape[:-2])
        # an element-wise product of one shape (a gated MLP): x * J^T s is z * s for each factor
        ctx.elementwise = function is torch.mul and scale is None and left.shape == right.shape
        ctx.save_for_backward(left, right)
        return ctx.recompute_product(left, right)

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        left, right = ctx.saved_tensors
        left_share, right_share = ctx.shares
        if ctx.elementwise:  # R_a = w_a * z * R / stab(z), R_b = w_b * z * R / stab(z): no vector-Jacobian product
            product = left * right
            ratio = kernels(False).quotient(relevance, product, ctx.epsilon).mul_(product)
            return (None, None, None, None, ratio * left_share if left_share else None,
                    ratio.mul_(right_share) if right_share else None)
        if ctx.matmul:
            product = ctx.recomputed if ctx.recomputed is not None else ctx.recompute_product(left, right)
            ctx.recomputed = None
            signal = kernels(False).quotient(relevance, product, ctx.epsilon)
            # the scale's own Jacobian, and one share when both factors take the same (AttnLRP's 0.5 / 0.5): one
            # pass over the product instead of one over each factor
            common = left_share if left_share == right_share else 1.0
            factor = common if ctx.scale is None else ctx.scale * common
            if not (isinstance(factor, float) and factor == 1.0):
                signal.mul_(factor)
            if common not in (0.0, 1.0):
                left_share, right_share = left_share / common, right_share / common
            left_vjp = torch.matmul(signal, right.transpose(-2, -1)) if left_share else None
            right_vjp = torch.matmul(left.transpose(-2, -1), signal) if right_share else None
        else:
            with torch.enable_grad():
                left_leaf, right_leaf = left.detach().requires_grad_(), right.detach().requires_grad_()
                product = ctx.recompute_product(left_leaf, right_leaf)
                signal = kernels(False).quotient(relevance, product.detach(), ctx.epsilon)
                left_vjp, right_vjp = torch.autograd.grad(product, (left_leaf, right_leaf), signal)
        return (None, None, None, None, _times(left_vjp.mul_(left), left_share) if left_share else None,
                _times(right_vjp.mul_(right), right_share) if right_share else None)


class NormalizationRelevance(torch.autograd.Function):
    """Forward: a layer or group norm given by ``normalize``. Backward: the rule with the std held constant.

    ``normalize(x)`` returns the output and the inverse standard deviations (as ``torch.native_layer_norm``: one
    pass); ``groups(t)`` views a tensor of the input's shape as ``(..., group_size)``: the normalization takes its
    mean and standard deviation over the last dimension of that view.
    """

    @staticmethod
    def forward(ctx, input: Tensor, normalize: Callable[[Tensor], tuple[Tensor, Tensor]],
                groups: Callable[[Tensor], Tensor], weight: Tensor | None, epsilon: float) -> Tensor:  # noqa: D102
        output, inverse_std = normalize(input)
        ctx.groups, ctx.epsilon, ctx.keeps_output = groups, epsilon, True
        ctx.save_for_backward(input, output, groups(inverse_std), weight)
        return output

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        input, output, inverse_std, weight = ctx.saved_tensors
        share = kernels(False).quotient(relevance, output, ctx.epsilon)  # a new tensor: updated in place below
        if weight is not None:
            share.mul_(weight)
        grouped = ctx.groups(share)
        centred = grouped.sub_(grouped.mean(-1, keepdim=True))
        result = centred.mul_(ctx.groups(input)).mul_(inverse_std)
        return result.reshape(input.shape), None, None, None, None


class SquareShareRelevance(torch.autograd.Function):
    """Forward: the root mean square over dimension 0. Backward: ``R_k = x_k^2 R / stab(sum_j x_j^2)``."""

    @staticmethod
    def forward(ctx, input: Tensor, epsilon: float) -> Tensor:  # noqa: D102
        total = input.square().sum(0)
        ctx.epsilon = epsilon
        ctx.save_for_backward(input, total)
        return (total / input.shape[0]).sqrt()

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        input, total = ctx.saved_tensors
        return input.square() * kernels(False).quotient(relevance, total, ctx.epsilon), None


def root_mean_square_rule(input: Tensor, epsilon: float = 1e-6) -> Tensor:
    """Root mean square over dimension 0; each entry gets relevance in proportion to its square.

    Parameters
    ----------
    input : Tensor
        Shape ``(K, ...)``: the ``K`` terms pooled.
    epsilon : float
        Stabilizer of the sum of squares.

    Returns
    -------
    Tensor
        ``sqrt(mean_k x_k^2)``, shape ``input.shape[1:]``; its backward gives ``R_k = x_k^2 R / stab(sum_j x_j^2)``
        (conserving).
    """
    return SquareShareRelevance.apply(input, epsilon)


def identity_rule(input: Tensor, function: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply an element-wise ``function`` whose relevance passes unchanged (the identity rule).

    Parameters
    ----------
    input : Tensor
        The input.
    function : callable
        The element-wise function (e.g. ``torch.nn.functional.silu``).

    Returns
    -------
    Tensor
        ``function(input)``; its backward returns the output relevance as the input relevance.
    """
    return IdentityRelevance.apply(input, function)


def scale_rule(signal: Tensor, factor: Tensor, operation: Callable[[Tensor, Tensor], Tensor] = torch.mul,
               signal_first: bool = True) -> Tensor:
    """Multiply (or divide) ``signal`` by a constant or gate ``factor`` that receives no relevance.

    Parameters
    ----------
    signal : Tensor
        The features being scaled.
    factor : Tensor
        The scale: a parameter (layer scale) or a gate computed from the features (squeeze-excitation).
    operation : callable
        ``torch.mul`` (default) or ``torch.div``.
    signal_first : bool
        Whether ``signal`` is the first operand of ``operation``.

    Returns
    -------
    Tensor
        The result; its backward gives ``signal`` the whole relevance (summed over broadcast dimensions). The
        factor is detached: its branch (a gate's pooling and layers) takes no part in the backward.
    """
    if isinstance(factor, Tensor):
        factor = factor.detach()
    return ScaleRelevance.apply(signal, factor, operation, signal_first)


def weighted_sum_rule(inputs: Sequence[Tensor], signs: Sequence[float], constant: Tensor | float | None = None,
                      epsilon: float = 1e-6) -> Tensor:
    """Sum ``signs[i] * inputs[i]`` plus a constant, splitting relevance in proportion to each term.

    Parameters
    ----------
    inputs : sequence of Tensor
        The summands (broadcastable to one shape).
    signs : sequence of float
        ``1.0`` or ``-1.0`` per summand.
    constant : Tensor, float or None
        A term that takes its share of relevance without passing it on (like a bias).
    epsilon : float
        Stabilizer of the denominator.

    Returns
    -------
    Tensor
        The sum.
    """
    return WeightedSumRelevance.apply(epsilon, tuple(float(s) for s in signs), constant, *inputs)


__all__ = [
    "BilinearRelevance", "ChannelAffineRelevance", "IdentityRelevance", "NormalizationRelevance", "ScaleRelevance",
    "SoftmaxRelevance", "WeightedSumRelevance", "identity_rule", "scale_rule", "weighted_sum_rule",
]


def softmax_rule(input: Tensor, dim: int, constant: Tensor | None = None, epsilon: float = 1e-6) -> Tensor:
    """A softmax inside a model (attention weights), explained by AttnLRP's softmax rule.

    Parameters
    ----------
    input : Tensor
        The logits (the attention scores).
    dim : int
        The dimension the softmax normalizes.
    constant : Tensor, optional
        An additive constant of the logits (a mask, a relative position bias), broadcastable to ``input`` (or, with
        one more leading dimension, to ``input`` viewed as ``(-1, constant.shape[1], *input.shape[1:])``): the
        softmax is of ``input + constant``, and the constant takes its proportional share of the logits' relevance.
    epsilon : float
        Stabilizer of that share's denominator.

    Returns
    -------
    Tensor
        ``softmax(input + constant, dim)``; its backward gives ``R_z = z (R - s sum_dim R)`` for ``z = input +
        constant`` and ``input`` the share ``input / stab(z)`` of it.
    """
    return SoftmaxRelevance.apply(input, dim, constant, epsilon)


def bilinear_rule(function: Callable[[Tensor, Tensor], Tensor], left: Tensor, right: Tensor,
                  shares: tuple[float, float] = (0.5, 0.5), epsilon: float = 1e-6,
                  scale: float | Tensor | None = None) -> Tensor:
    """A product of two tensors (``matmul``, ``bmm``, element-wise ``mul``), explained by AttnLRP's uniform rule.

    Parameters
    ----------
    function : callable
        The product, bilinear in its two arguments (``torch.matmul``, ``torch.mul``, ...).
    left, right : Tensor
        The factors.
    shares : tuple of float
        Weights of the two factors' epsilon-rule relevance: ``(0.5, 0.5)`` is the uniform rule; ``(1, 0)`` gives
        everything to ``left`` (``right`` a constant, e.g. a weight).
    epsilon : float
        Stabilizer of the output.
    scale : float or Tensor, optional
        A constant factor of the product (attention's ``1 / sqrt(d)``, Swin V2's per-head logit scale,
        broadcastable to the output), applied without an extra tensor for the backward.

    Returns
    -------
    Tensor
        ``function(left, right)`` (times ``scale``).
    """
    return BilinearRelevance.apply(function, tuple(shares), epsilon, scale, left, right)


def layer_norm_rule(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None,
                    eps: float, epsilon: float) -> Tensor:
    """``torch.nn.functional.layer_norm`` explained with the standard deviation held constant (AttnLRP).

    Parameters
    ----------
    input, normalized_shape, weight, bias, eps
        As for :func:`torch.nn.functional.layer_norm`.
    epsilon : float
        Stabilizer of the rule's denominator.

    Returns
    -------
    Tensor
        The layer norm's output (see :class:`NormalizationRelevance` for its backward).
    """
    normalized_shape = tuple(normalized_shape)
    dims = len(normalized_shape)

    def normalize(tensor: Tensor) -> tuple[Tensor, Tensor]:
        output, _, inverse_std = torch.native_layer_norm(tensor, normalized_shape, weight, bias, eps)
        return output, inverse_std

    def groups(tensor: Tensor) -> Tensor:
        return tensor if dims == 1 else tensor.flatten(-dims)

    return NormalizationRelevance.apply(input, normalize, groups, weight, epsilon)


def group_norm_rule(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
                    epsilon: float) -> Tensor:
    """``torch.nn.functional.group_norm`` explained with the standard deviation held constant (AttnLRP).

    Parameters
    ----------
    input, num_groups, weight, bias, eps
        As for :func:`torch.nn.functional.group_norm` (input ``(N, C, ...)``).
    epsilon : float
        Stabilizer of the rule's denominator.

    Returns
    -------
    Tensor
        The group norm's output (see :class:`NormalizationRelevance` for its backward).
    """
    batch = input.shape[0]
    channel_weight = None if weight is None else weight.view(-1, *([1] * (input.dim() - 2)))

    def normalize(tensor: Tensor) -> tuple[Tensor, Tensor]:
        output, _, inverse_std = torch.native_group_norm(tensor.contiguous(), weight, bias, batch, tensor.shape[1],
                                                          math.prod(tensor.shape[2:]), num_groups, eps)
        return output, inverse_std

    def groups(tensor: Tensor) -> Tensor:
        return tensor.reshape(batch, num_groups, -1)

    return NormalizationRelevance.apply(input, normalize, groups, channel_weight, epsilon)


__all__ += ["bilinear_rule", "group_norm_rule", "layer_norm_rule", "root_mean_square_rule", "softmax_rule"]
