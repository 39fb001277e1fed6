"""The rules that split a layer's relevance in proportion to its contributions: epsilon, LRP-0, gamma, alpha-beta, z+."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from torchlrp.core.rules.base import Rule, Saved, absolute_value, check_number, positive_part
from torchlrp.functional.affine import AffineOp
from torchlrp.functional.kernels import kernels
from torchlrp.functional.rectified import RectifiedForm, Term


class Epsilon(Rule):
    """LRP-epsilon: ``R_x = x * W^T (R / stab(z))``.

    Parameters
    ----------
    epsilon : float
        Non-negative stabilizer added to ``z`` with ``z``'s sign (``+epsilon`` where ``z == 0``). ``0`` gives LRP-0;
        units with ``z == 0`` then pass no relevance (never ``NaN``).
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = check_number("epsilon", epsilon)

    def forward(self, op: AffineOp, input: Tensor) -> tuple[Tensor, Saved]:  # noqa: D102
        output = op(input, op.weight, op.bias)
        return output, (input, output)  # the output itself: often kept by the next operation too

    def backward(self, op: AffineOp, relevance: Tensor, saved: Saved, input_shape: torch.Size) -> Tensor:  # noqa: D102
        input, output = saved
        signal = kernels(op.fused).quotient(relevance, output, self.epsilon)
        return op.transpose(signal, input_shape, op.weight).mul_(input)

    def folds_rectifier(self, op: AffineOp) -> bool:  # noqa: D102
        return True

    def rectified_form(self, op: AffineOp, input: Tensor) -> RectifiedForm:
        """Where ``z > 0``: the layer's own map, and ``z`` itself as the denominator."""
        return RectifiedForm((Term("all", op.weight, op.bias, is_output=True),), self.epsilon)


class Zero(Epsilon):
    """LRP-0: ``R_x = x * W^T (R / z)``; units with ``z == 0`` pass no relevance."""

    def __init__(self) -> None:
        super().__init__(epsilon=0.0)

    def __repr__(self) -> str:
        return "Zero()"


class Gamma(Rule):
    """Generalized LRP-gamma (Andéol et al. 2021), equal to Montavon's gamma rule for non-negative inputs.

    Where ``z > 0`` the positive contributions ``x+ (W + gamma W+) + x- (W + gamma W-)`` (with bias
    ``b + gamma b+``) are favoured; where ``z < 0`` the negative ones ``x+ (W + gamma W-) + x- (W + gamma W+)``
    (with bias ``b + gamma b-``).

    Parameters
    ----------
    gamma : float
        Non-negative weight of the favoured parts.
    stabilizer : float
        Non-negative stabilizer of the denominators.
    """

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6) -> None:
        self.gamma = check_number("gamma", gamma)
        self.stabilizer = check_number("stabilizer", stabilizer)

    def forward(self, op: AffineOp, input: Tensor) -> tuple[Tensor, Saved]:  # noqa: D102
        output = op(input, op.weight, op.bias)
        return output, (input, output)  # denominators are rebuilt in the backward: the output is often kept anyway

    def _inverse(self, op: AffineOp, input: Tensor, output: Tensor) -> Tensor:
        """The signed inverse denominator (:func:`~torchlrp.functional.kernels.gamma_inverse`): one extra map."""
        weight, bias = op.weight, op.bias
        if op.input_nonnegative:
            # z + gamma p and (1 + gamma) z - gamma p with p = W+ x + b+ (linearity)
            positive = op(input, weight.clamp(min=0), positive_part(bias))
        else:
            # the favoured parts are z + gamma P (z > 0) and z + gamma N (z < 0) with P = W+ x+ + W- x- + b+
            # = (z + |W||x| + |b|) / 2 and N = (z - |W||x| - |b|) / 2: the same signed inverse
            positive = op(input.abs(), weight.abs(), absolute_value(bias)).add_(output).mul_(0.5)
        return kernels(op.fused).gamma_inverse(output, positive, self.gamma, self.stabilizer)

    def backward(self, op: AffineOp, relevance: Tensor, saved: Saved, input_shape: torch.Size) -> Tensor:  # noqa: D102
        input, output = saved
        inverse = self._inverse(op, input, output)
        if op.input_nonnegative:
            channels = op.channel_dim(relevance.dim())
            signal = kernels(op.fused).gamma_signal(relevance, inverse, self.gamma, channels)
            stacked = _stack_with_positive(op.weight, input, op)
            if stacked is not None:  # [W; W+]: one transposed map of the stacked signal
                return input * op.transpose(signal.flatten(channels, channels + 1), input_shape, stacked)
            transposed = op.transpose(signal.select(channels, 0), input_shape, op.weight)
            transposed += op.transpose(signal.select(channels, 1), input_shape, op.weight.clamp(min=0))
            return input * transposed
        # x+ (W + gamma W+)^T + x- (W + gamma W-)^T on z > 0 and the mirror on z < 0, with W+- = (W +- |W|) / 2:
        # (1 + gamma/2) x W^T (R v) + (gamma/2) |x| |W|^T (R |v|) -- two transposed maps
        transposed = op.transpose(relevance * inverse, input_shape, op.weight).mul_(input).mul_(1.0 + self.gamma / 2)
        magnitude = op.transpose(relevance * inverse.abs(), input_shape, op.weight.abs())
        return transposed.addcmul_(magnitude, input.abs(), value=self.gamma / 2)

    def _up(self, tensor: Tensor | None) -> Tensor | None:
        """``t + gamma t+`` (None for None)."""
        return None if tensor is None else torch.add(tensor, tensor.clamp(min=0), alpha=self.gamma)

    def folds_rectifier(self, op: AffineOp) -> bool:  # noqa: D102
        return True

    def rectified_form(self, op: AffineOp, input: Tensor) -> RectifiedForm:
        """Where ``z > 0``: ``W + gamma W+`` on ``x+`` (with ``b + gamma b+``) and ``W + gamma W-`` on ``x-``.

        On a non-negative input this is one map, ``W + gamma W+``: one transposed map in the backward instead of
        the two of ``[W; W+]``. On a mixed-sign input it is ``(1 + gamma/2) z + (gamma/2) (|W||x| + |b|)``: the
        output and one map of the magnitudes.
        """
        if op.input_nonnegative:
            return RectifiedForm((Term("all", self._up(op.weight), self._up(op.bias)),), self.stabilizer)
        return RectifiedForm((Term("all", op.weight, op.bias, 1.0 + self.gamma / 2, is_output=True),
                              Term("magnitude", op.weight.abs(), absolute_value(op.bias), self.gamma / 2)),
                             self.stabilizer)


class AlphaBeta(Rule):
    """LRP-alpha-beta: ``R_x = alpha * R_pos - beta * R_neg`` over positive and negative contributions.

    Positive contributions are ``x+ W+ + x- W-`` plus ``b+``, negative ones ``x+ W- + x- W+`` plus ``b-``; each group
    shares its output relevance in proportion to its members.

    Parameters
    ----------
    alpha : float
        Weight of the positive contributions, at least 1.
    beta : float, optional
        Weight of the negative contributions; ``alpha - 1`` when omitted (the seeds' ``("alphabeta", alpha)``), so
        that ``alpha - beta == 1`` (conservation).
    stabilizer : float
        Non-negative stabilizer of the denominators.
    ignore_bias : bool
        If True the bias takes no part in the denominators (as in TorchLRP).

    Raises
    ------
    ValueError
        If ``alpha`` or ``beta`` is negative or ``alpha - beta != 1``.
    """

    def __init__(self, alpha: float = 2.0, beta: float | None = None, stabilizer: float = 1e-6,
                 ignore_bias: bool = False) -> None:
        self.alpha = check_number("alpha", alpha, minimum=1.0 if beta is None else 0.0)
        self.beta = check_number("beta", self.alpha - 1.0 if beta is None else beta)
        if not math.isclose(self.alpha - self.beta, 1.0, rel_tol=0, abs_tol=1e-12):
            raise ValueError(f"AlphaBeta needs alpha - beta == 1, got alpha={alpha!r}, beta={beta!r}")
        self.stabilizer = check_number("stabilizer", stabilizer)
        self.ignore_bias = bool(ignore_bias)

    def forward(self, op: AffineOp, input: Tensor) -> tuple[Tensor, Saved]:  # noqa: D102
        output = op(input, op.weight, op.bias)
        return output, (input, output)  # denominators are rebuilt in the backward: the output is often kept anyway

    def _coefficients(self, op: AffineOp, input: Tensor, output: Tensor) -> tuple[Tensor, ...]:
        """The stabilized inverse denominators the backward applies (one extra map)."""
        weight, bias = op.weight, op.bias
        reciprocal = kernels(op.fused).reciprocal
        if op.input_nonnegative:
            positive = op(input, weight.clamp(min=0), None if self.ignore_bias else positive_part(bias))
            inv_pos = reciprocal(positive, self.stabilizer, self.alpha)
            if self.beta == 0:
                return (inv_pos,)
            negative = output - positive
            if self.ignore_bias and bias is not None:
                negative -= view_bias(bias, output, op)
            inv_neg = reciprocal(negative, self.stabilizer, self.beta)
            return (inv_pos.add_(inv_neg), inv_neg)
        # Mixed signs: with W+- = (W +- |W|) / 2 the positive contributions are P = (Wx + |W||x|) / 2 + b+ and the
        # negative ones N = (Wx - |W||x|) / 2 + b-: one extra map (of the magnitudes) instead of four.
        magnitude = op(input.abs(), weight.abs(), None if self.ignore_bias else absolute_value(bias))
        linear = output - view_bias(bias, output, op) if self.ignore_bias and bias is not None else output
        part_reciprocal = kernels(op.fused).part_reciprocal
        inv_pos = part_reciprocal(linear, magnitude, 1.0, self.stabilizer, self.alpha / 2)
        if self.beta == 0:
            return (inv_pos,)
        inv_neg = part_reciprocal(linear, magnitude, -1.0, self.stabilizer, self.beta / 2)
        return (inv_pos - inv_neg, inv_pos.add_(inv_neg))

    def backward(self, op: AffineOp, relevance: Tensor, saved: Saved, input_shape: torch.Size) -> Tensor:  # noqa: D102
        input, output = saved
        coefficients = self._coefficients(op, input, output)
        if op.input_nonnegative:
            weight_pos = op.weight.clamp(min=0)  # modified weights are built here, not kept from the forward
            if self.beta == 0:
                inv_pos, = coefficients
                return input * op.transpose(relevance * inv_pos, input_shape, weight_pos)
            # alpha W+^T s_pos - beta W-^T s_neg = W+^T (s_pos + s_neg) - W^T s_neg  (W- = W - W+)
            coefficient_pos, inv_neg = coefficients
            transposed = op.transpose(relevance * coefficient_pos, input_shape, weight_pos)
            transposed -= op.transpose(relevance * inv_neg, input_shape, op.weight)
            return input * transposed
        # x+ (W+^T s+ - W-^T s-) + x- (W-^T s+ - W+^T s-) = (x W^T (s+ - s-) + |x| |W|^T (s+ + s-)) / 2, the halves
        # kept in the coefficients: two transposed maps (one where beta == 0, for W and |W| stacked) instead of four
        if self.beta == 0:
            coefficient, = coefficients
            signal = relevance * coefficient
            transposed, magnitude = op.transpose_each(signal, input_shape, [op.weight, op.weight.abs()])
        else:
            coefficient_difference, coefficient_sum = coefficients
            transposed = op.transpose(relevance * coefficient_difference, input_shape, op.weight)
            magnitude = op.transpose(relevance * coefficient_sum, input_shape, op.weight.abs())
        return transposed.mul_(input).addcmul_(magnitude, input.abs())

    def folds_rectifier(self, op: AffineOp) -> bool:
        """True for ``beta == 0`` (z+); with ``beta > 0`` the negative contributions need their own denominator."""
        return self.beta == 0

    def rectified_form(self, op: AffineOp, input: Tensor) -> RectifiedForm:
        """With ``beta == 0``, where ``z > 0``: ``W+`` on ``x+`` (with ``b+`` unless ignored) and ``W-`` on ``x-``.

        On a mixed-sign input that is ``(z + |W||x| + |b|) / 2`` (``(z - b + |W||x|) / 2`` with the bias ignored): the
        output and one map of the magnitudes.
        """
        if self.beta != 0:
            raise NotImplementedError("AlphaBeta with beta > 0 cannot fold a following ReLU")
        if op.input_nonnegative:
            bias = None if self.ignore_bias else positive_part(op.bias)
            return RectifiedForm((Term("all", op.weight.clamp(min=0), bias),), self.stabilizer)
        bias = absolute_value(op.bias) if not self.ignore_bias else None if op.bias is None else -op.bias
        return RectifiedForm((Term("all", op.weight, op.bias, 0.5, is_output=True),
                              Term("magnitude", op.weight.abs(), bias, 0.5)), self.stabilizer)


def _stack_with_positive(weight: Tensor, input: Tensor, op: AffineOp) -> Tensor | None:
    """Return ``[W; W+]`` stacked on the output channels, or None where two transposed maps are cheaper.

    Stacking lets a backward apply ``W^T s + W+^T s+`` as one transposed map (no sum pass over the input) but costs
    a copy of the weight: it is done when the weight is not larger than the input, and only for ``groups == 1``
    (grouped convolutions order their output channels by group).
    """
    if op.groups != 1 or op.transposed or weight.numel() > input.numel():
        return None
    stacked = weight.new_empty((2 * weight.shape[0], *weight.shape[1:]))
    stacked[:weight.shape[0]].copy_(weight)
    torch.clamp(weight, min=0, out=stacked[weight.shape[0]:])
    return stacked


def view_bias(bias: Tensor, output: Tensor, op: AffineOp) -> Tensor:
    """Reshape a bias to broadcast against a layer output (channels on dim 1 for convolutions)."""
    if op.spatial_dims == 0:
        return bias
    return bias.view(-1, *([1] * op.spatial_dims))


class ZPlus(AlphaBeta):
    """LRP-z+ (= ``AlphaBeta(alpha=1, beta=0)``): only positive contributions share the relevance.

    Parameters
    ----------
    stabilizer : float
        Non-negative stabilizer of the denominator.
    ignore_bias : bool
        If True the bias takes no part in the denominator.
    """

    def __init__(self, stabilizer: float = 1e-6, ignore_bias: bool = False) -> None:
        super().__init__(alpha=1.0, beta=0.0, stabilizer=stabilizer, ignore_bias=ignore_bias)

    def __repr__(self) -> str:
        return f"ZPlus(stabilizer={self.stabilizer!r}, ignore_bias={self.ignore_bias!r})"
