"""LRP rules for linear and convolutional layers.

A rule is a small, immutable object holding its parameters. Its :meth:`Rule.forward` computes the layer's output
together with what the backward needs (kept from the forward instead of recomputed), and :meth:`Rule.backward`
turns the output relevance into the input relevance. Both receive an :class:`~torchlrp.functional.AffineOp`, which
applies the layer's map and its transpose with every convolution hyperparameter, so the rules are written once for
``Linear`` and ``Conv1d/2d/3d``.

Notation below: ``x`` the layer input, ``W``/``b`` its parameters, ``z = Wx + b``, ``R`` the output relevance,
``W+ = max(W, 0)``, ``W- = min(W, 0)``, ``x+``/``x-`` likewise, ``stab(d) = d + eps * sign(d)`` with ``sign(0)=1``.
The formulas are those of Bach et al. (2015), Montavon et al. (2019) and, for the generalized gamma rule,
Andéol et al. (2021); parameters have the meanings zennit gives them.
"""
from __future__ import annotations

import abc
import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from .functional.affine import AffineOp
from .functional.kernels import kernels
from .functional.rectified import RectifiedForm, Term

Saved = tuple[Tensor, ...]


def _check_number(name: str, value: Any, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def _positive(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.clamp(min=0)


def _absolute(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.abs()


class Rule(abc.ABC):
    """Base class of all rules for affine layers.

    Subclasses implement :meth:`forward` and :meth:`backward`. ``propagates_gradient`` tells the engine whether
    the rule propagates a (modified) gradient rather than relevance; parameter-free mixing layers (average pooling,
    residual sums) then pass the plain gradient instead of splitting proportionally. ``needs_pattern`` marks the
    rules that need a layer pattern (:mod:`torchlrp.patterns`).

    Rules that can take in a ReLU directly following their layer answer True to :meth:`folds_rectifier` and give
    their form on the units the ReLU lets through by :meth:`rectified_form`; the engine then explains layer and
    ReLU together (:mod:`torchlrp.functional.rectified`), keeping less from the forward.
    """

    propagates_gradient: bool = False
    needs_pattern: bool = False

    @abc.abstractmethod
    def forward(self, op: AffineOp, input: Tensor) -> tuple[Tensor, Saved]:
        """Compute the layer output and the tensors the backward needs.

        Parameters
        ----------
        op : AffineOp
            The layer's map.
        input : Tensor
            The layer input.

        Returns
        -------
        tuple
            ``(output, saved)``: the unmodified layer output and a tuple of tensors for :meth:`backward`.
        """

    @abc.abstractmethod
    def backward(self, op: AffineOp, relevance: Tensor, saved: Saved, input_shape: torch.Size) -> Tensor:
        """Compute the input relevance.

        Parameters
        ----------
        op : AffineOp
            The layer's map.
        relevance : Tensor
            Relevance of the layer output.
        saved : tuple of Tensor
            What :meth:`forward` returned to save.
        input_shape : torch.Size
            Shape of the layer input.

        Returns
        -------
        Tensor
            Relevance of the layer input.
        """

    def folds_rectifier(self, op: AffineOp) -> bool:
        """Whether a ReLU directly following the layer can be explained together with it.

        Parameters
        ----------
        op : AffineOp
            The layer's map.

        Returns
        -------
        bool
            False by default; True where :meth:`rectified_form` is implemented for ``op``.
        """
        return False

    def forward_rectified(self, op: AffineOp, input: Tensor) -> Tensor:
        """Return ``relu(z)`` for a layer whose following ReLU is folded into it (see :meth:`folds_rectifier`).

        Parameters
        ----------
        op : AffineOp
            The layer's map.
        input : Tensor
            The layer input.

        Returns
        -------
        Tensor
            The rectified output; the engine keeps it and the input for the backward, nothing else.
        """
        return op(input, op.weight, op.bias).relu_()

    def rectified_form(self, op: AffineOp, input: Tensor) -> RectifiedForm:
        """Return the rule's form on the units a following ReLU lets through (``z > 0``); called in the backward.

        Parameters
        ----------
        op : AffineOp
            The layer's map.
        input : Tensor
            The layer input.

        Returns
        -------
        RectifiedForm
            The modified map and stabilizer (see :mod:`torchlrp.functional.rectified`).

        Raises
        ------
        NotImplementedError
            For a rule whose :meth:`folds_rectifier` is False.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot fold a following ReLU")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class Epsilon(Rule):
    """LRP-epsilon: ``R_x = x * W^T (R / stab(z))``.

    Parameters
    ----------
    epsilon : float
        Non-negative stabilizer added to ``z`` with ``z``'s sign (``+epsilon`` where ``z == 0``). ``0`` gives LRP-0;
        units with ``z == 0`` then pass no relevance (never ``NaN``).
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = _check_number("epsilon", epsilon)

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
        self.gamma = _check_number("gamma", gamma)
        self.stabilizer = _check_number("stabilizer", stabilizer)

    def forward(self, op: AffineOp, input: Tensor) -> tuple[Tensor, Saved]:  # noqa: D102
        output = op(input, op.weight, op.bias)
        return output, (input, output)  # denominators are rebuilt in the backward: the output is often kept anyway

    def _inverse(self, op: AffineOp, input: Tensor, output: Tensor) -> Tensor:
        """The signed inverse denominator (:func:`~torchlrp.functional.kernels.gamma_inverse`): one extra map."""
        weight, bias = op.weight, op.bias
        if op.input_nonnegative:
            # z + gamma p and (1 + gamma) z - gamma p with p = W+ x + b+ (linearity)
            positive = op(input, weight.clamp(min=0), _positive(bias))
        else:
            # the favoured parts are z + gamma P (z > 0) and z + gamma N (z < 0) with P = W+ x+ + W- x- + b+
            # = (z + |W||x| + |b|) / 2 and N = (z - |W||x| - |b|) / 2: the same signed inverse
            positive = op(input.abs(), weight.abs(), _absolute(bias)).add_(output).mul_(0.5)
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
                              Term("magnitude", op.weight.abs(), _absolute(op.bias), self.gamma / 2)),
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
        self.alpha = _check_number("alpha", alpha, minimum=1.0 if beta is None else 0.0)
        self.beta = _check_number("beta", self.alpha - 1.0 if beta is None else beta)
        if not math.isclose(self.alpha - self.beta, 1.0, rel_tol=0, abs_tol=1e-12):
            raise ValueError(f"AlphaBeta needs alpha - beta == 1, got alpha={alpha!r}, beta={beta!r}")
        self.stabilizer = _check_number("stabilizer", stabilizer)
        self.ignore_bias = bool(ignore_bias)

    def forward(self, op: AffineOp, input: Tensor) -> tuple[Tensor, Saved]:  # noqa: D102
        output = op(input, op.weight, op.bias)
        return output, (input, output)  # denominators are rebuilt in the backward: the output is often kept anyway

    def _coefficients(self, op: AffineOp, input: Tensor, output: Tensor) -> tuple[Tensor, ...]:
        """The stabilized inverse denominators the backward applies (one extra map)."""
        weight, bias = op.weight, op.bias
        reciprocal = kernels(op.fused).reciprocal
        if op.input_nonnegative:
            positive = op(input, weight.clamp(min=0), None if self.ignore_bias else _positive(bias))
            inv_pos = reciprocal(positive, self.stabilizer, self.alpha)
            if self.beta == 0:
                return (inv_pos,)
            negative = output - positive
            if self.ignore_bias and bias is not None:
                negative -= _view_bias(bias, output, op)
            inv_neg = reciprocal(negative, self.stabilizer, self.beta)
            return (inv_pos.add_(inv_neg), inv_neg)
        # Mixed signs: with W+- = (W +- |W|) / 2 the positive contributions are P = (Wx + |W||x|) / 2 + b+ and the
        # negative ones N = (Wx - |W||x|) / 2 + b-: one extra map (of the magnitudes) instead of four.
        magnitude = op(input.abs(), weight.abs(), None if self.ignore_bias else _absolute(bias))
        linear = output - _view_bias(bias, output, op) if self.ignore_bias and bias is not None else output
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
            bias = None if self.ignore_bias else _positive(op.bias)
            return RectifiedForm((Term("all", op.weight.clamp(min=0), bias),), self.stabilizer)
        bias = _absolute(op.bias) if not self.ignore_bias else None if op.bias is None else -op.bias
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


def _view_bias(bias: Tensor, output: Tensor, op: AffineOp) -> Tensor:
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


class ZBox(Rule):
    """LRP-z^B for a first layer on inputs bounded by ``low <= x <= high``.

    ``R_x = x W^T s - low W+^T s - high W-^T s`` with ``s = R / stab(W x - W+ low - W- high)`` (the bias cancels).

    Parameters
    ----------
    low, high : float, Tensor or None
        Bounds of the input, broadcastable to the input's shape (e.g. ``(1, 3, 1, 1)`` per colour channel, or
        without the batch dimension). None takes each sample's own minimum (``low``) or maximum (``high``) over
        all its features, the seeds' deep Taylor default when the data range is not given.
    stabilizer : float
        Non-negative stabilizer of the denominator.

    Raises
    ------
    ValueError
        If a bound is not a number or tensor, or does not broadcast to the input (raised at the forward).
    """

    def __init__(self, low: float | Tensor | None, high: float | Tensor | None, stabilizer: float = 1e-6) -> None:
        for name, bound in (("low", low), ("high", high)):
            if bound is not None and not isinstance(bound, Tensor):
                _check_number(name, bound, minimum=-math.inf)
        self.low = low
        self.high = high
        self.stabilizer = _check_number("stabilizer", stabilizer)
        self._placed: dict[tuple[str, torch.device, torch.dtype], tuple[Any, int, Tensor]] = {}

    def _placed_bound(self, name: str, bound: float | Tensor, input: Tensor) -> Tensor:
        """``bound`` on the input's device and dtype, converted once and kept (no copy in the backward)."""
        key = (name, input.device, input.dtype)
        version = bound._version if isinstance(bound, Tensor) else 0
        cached = self._placed.get(key)
        if cached is not None and cached[0] is bound and cached[1] == version:
            return cached[2]
        placed = torch.as_tensor(bound, dtype=input.dtype, device=input.device)
        self._placed[key] = (bound, version, placed)
        return placed

    def _bound(self, name: str, bound: float | Tensor | None, input: Tensor) -> Tensor:
        if bound is None:  # the sample's own range
            features = tuple(range(1, input.dim()))
            detached = input.detach()
            own = detached.amin(features, keepdim=True) if name == "low" else detached.amax(features, keepdim=True)
            return own.expand(input.shape)
        bound = self._placed_bound(name, bound, input)
        shape = input.shape if bound.dim() == input.dim() and bound.shape[0] != 1 else (1, *input.shape[1:])
        try:
            if torch.broadcast_shapes(bound.shape, shape) != torch.Size(shape):
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"ZBox bound {name} of shape {tuple(bound.shape)} does not broadcast to the input "
                             f"shape {tuple(input.shape)}; use a number, or a tensor broadcastable to it "
                             f"(e.g. (1, C, 1, 1) per channel)") from None
        return bound.expand(shape)

    def forward(self, op: AffineOp, input: Tensor) -> tuple[Tensor, Saved]:  # noqa: D102
        weight = op.weight
        output = op(input, weight, op.bias)
        low, high = self._bound("low", self.low, input), self._bound("high", self.high, input)
        weight_pos, weight_neg = weight.clamp(min=0), weight.clamp(max=0)
        unbiased = output if op.bias is None else output - _view_bias(op.bias, output, op)
        denominator = unbiased - op(low, weight_pos) - op(high, weight_neg)
        return output, (input, kernels(op.fused).reciprocal(denominator, self.stabilizer), low, high)

    def folds_rectifier(self, op: AffineOp) -> bool:  # noqa: D102
        return True

    def forward_rectified(self, op: AffineOp, input: Tensor) -> Tensor:
        """``relu(z)``, after checking that the bounds broadcast to the input."""
        self._bound("low", self.low, input)
        self._bound("high", self.high, input)
        return super().forward_rectified(op, input)

    def rectified_form(self, op: AffineOp, input: Tensor) -> RectifiedForm:
        """``W`` on the input, ``-W+`` on ``low`` and ``-W-`` on ``high``, without bias (it cancels)."""
        weight = op.weight
        low, high = self._bound("low", self.low, input), self._bound("high", self.high, input)
        return RectifiedForm((Term("all", weight), Term(low, weight.clamp(min=0), scale=-1.0),
                              Term(high, weight.clamp(max=0), scale=-1.0)), self.stabilizer)

    def backward(self, op: AffineOp, relevance: Tensor, saved: Saved, input_shape: torch.Size) -> Tensor:  # noqa: D102
        input, inverse, low, high = saved
        weights = [op.weight, op.weight.clamp(min=0), op.weight.clamp(max=0)]
        transposed = op.transpose_each(relevance * inverse, input_shape, weights)
        result = input * transposed[0]
        result -= low * transposed[1]
        result -= high * transposed[2]
        return result


class _UnitInput(Rule):
    """Rules that replace the input by ones and the weight by a transform of it (flat, w-square, z+ of ones)."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = _check_number("stabilizer", stabilizer)

    @abc.abstractmethod
    def _parameters(self, op: AffineOp) -> tuple[Tensor, Tensor | None]:
        """Return the transformed weight and bias."""

    def forward(self, op: AffineOp, input: Tensor) -> tuple[Tensor, Saved]:  # noqa: D102
        output = op(input, op.weight, op.bias)
        weight, bias = self._parameters(op)
        ones = input.new_ones((1, *input.shape[1:]))
        inverse = kernels(op.fused).reciprocal(op(ones, weight, bias), self.stabilizer)
        return output, (inverse, weight)

    def backward(self, op: AffineOp, relevance: Tensor, saved: Saved, input_shape: torch.Size) -> Tensor:  # noqa: D102
        inverse, weight = saved
        return op.transpose(relevance * inverse, input_shape, weight)


class Flat(_UnitInput):
    """LRP-flat: relevance spread uniformly over each output's receptive field (ones as input and weight, no bias).

    Parameters
    ----------
    stabilizer : float
        Non-negative stabilizer of the denominator.
    """

    def _parameters(self, op: AffineOp) -> tuple[Tensor, Tensor | None]:
        return torch.ones_like(op.weight), None


class WSquare(_UnitInput):
    """LRP-w²: ``R_i = sum_j w_ij^2 / (sum_i' w_i'j^2 + b_j^2) R_j`` (ones as input, squared parameters).

    As in zennit, the squared bias takes part in the denominator.

    Parameters
    ----------
    stabilizer : float
        Non-negative stabilizer of the denominator.
    """

    def _parameters(self, op: AffineOp) -> tuple[Tensor, Tensor | None]:
        return op.weight.square(), None if op.bias is None else op.bias.square()


class ZPlusOnes(_UnitInput):
    """z+ with the input values replaced by ones (the first-layer variant of the VGG z+ blog post, seed 004).

    ``R_i = sum_j w_ij+ / sum_i' w_i'j+ R_j``: relevance follows the positive weights only, whatever the pixel values.

    Parameters
    ----------
    stabilizer : float
        Non-negative stabilizer of the denominator.
    """

    def _parameters(self, op: AffineOp) -> tuple[Tensor, Tensor | None]:
        return op.weight.clamp(min=0), None


class Gradient(Rule):
    """The plain gradient ``W^T R`` (for comparison; not a relevance rule)."""

    propagates_gradient = True

    def forward(self, op: AffineOp, input: Tensor) -> tuple[Tensor, Saved]:  # noqa: D102
        return op(input, op.weight, op.bias), ()

    def backward(self, op: AffineOp, relevance: Tensor, saved: Saved, input_shape: torch.Size) -> Tensor:  # noqa: D102
        return op.transpose(relevance, input_shape, op.weight)

    def __repr__(self) -> str:
        return "Gradient()"


class PatternNet(Gradient):
    """PatternNet (Kindermans et al. 2017): the backward signal ``P^T R`` with the layer's pattern ``P`` in place of
    the weight -- a signal estimate, not multiplied by the input. Needs patterns, see :mod:`torchlrp.patterns`."""

    needs_pattern = True

    def backward(self, op: AffineOp, relevance: Tensor, saved: Saved, input_shape: torch.Size) -> Tensor:  # noqa: D102
        return op.transpose(relevance, input_shape, op.pattern)

    def __repr__(self) -> str:
        return "PatternNet()"


class PatternAttribution(Gradient):
    """PatternAttribution (Kindermans et al. 2017): the backward signal with ``P * W`` in place of the weight.
    Needs patterns, see :mod:`torchlrp.patterns`."""

    needs_pattern = True

    def backward(self, op: AffineOp, relevance: Tensor, saved: Saved, input_shape: torch.Size) -> Tensor:  # noqa: D102
        return op.transpose(relevance, input_shape, op.pattern * op.weight)

    def __repr__(self) -> str:
        return "PatternAttribution()"


def _rule_factories() -> dict[str, type[Rule] | Any]:
    return {
        "gradient": Gradient,
        "epsilon": Epsilon,
        "zero": Zero,
        "simple": Zero,
        "gamma": Gamma,
        "gamma+epsilon": lambda: Gamma(gamma=0.1, stabilizer=0.1),
        "alpha1beta0": lambda: AlphaBeta(alpha=1.0, beta=0.0),
        "alpha2beta1": lambda: AlphaBeta(alpha=2.0, beta=1.0),
        "alphabeta": AlphaBeta,
        "zplus": ZPlus,
        "flat": Flat,
        "wsquare": WSquare,
        "ww": WSquare,
        "zplus_ones": ZPlusOnes,
        "patternnet": PatternNet,
        "patternattribution": PatternAttribution,
    }


#: keys that take one number: ``(key, parameter)``, as the seeds' ``lrp_rule_param``
_PARAMETERIZED = {
    "epsilon": lambda epsilon: Epsilon(epsilon),
    "gamma": lambda gamma: Gamma(gamma),
    "alphabeta": lambda alpha: AlphaBeta(alpha),
}


def rule_names() -> list[str]:
    """Return the string keys accepted wherever a rule is.

    Returns
    -------
    list of str
        ``"gradient"``, ``"epsilon"``, ``"zero"`` (alias ``"simple"``, LRP-0), ``"gamma"``, ``"gamma+epsilon"``,
        ``"alpha1beta0"``, ``"alpha2beta1"``, ``"alphabeta"`` (alpha 2, beta 1), ``"zplus"``, ``"flat"``,
        ``"wsquare"`` (alias ``"ww"``), ``"zplus_ones"``, ``"patternnet"``, ``"patternattribution"``. The composite
        keys of :func:`torchlrp.composites.composite_names` are accepted wherever a model's rule is.
    """
    return list(_rule_factories())


def _unknown(rule: Any, composite_names: tuple[str, ...]) -> ValueError:
    keys = ", ".join(repr(k) for k in (*_rule_factories(), *composite_names))
    parameterized = ", ".join(f"({k!r}, number)" for k in _PARAMETERIZED)
    if isinstance(rule, (str, tuple, list)):
        return ValueError(f"unknown rule {rule!r}; valid keys are {keys}, and {parameterized}; or a "
                          f"torchlrp.rules.Rule object")
    return ValueError(f"a rule must be a torchlrp.rules.Rule, a composite, one of the keys {keys}, or "
                      f"{parameterized}; got {type(rule).__name__} {rule!r}")


def resolve(rule: "str | tuple[str, float] | Rule", composite_names: tuple[str, ...] = ()) -> Rule:
    """Turn a string key, a ``(key, parameter)`` pair or a rule into a rule.

    Parameters
    ----------
    rule : str, tuple or Rule
        A key from :func:`rule_names` (each maps to the rule with default parameters; ``"gamma+epsilon"`` is
        ``Gamma(gamma=0.1, stabilizer=0.1)`` as in TorchLRP), a pair ``("epsilon", eps)``, ``("gamma", gamma)``
        or ``("alphabeta", alpha)`` (beta = alpha - 1; the seeds' ``lrp_rule_param``), or a :class:`Rule`.
    composite_names : tuple of str
        Keys of composite presets, named in the error for an unknown key (used by
        :func:`torchlrp.composites.as_composite`).

    Returns
    -------
    Rule
        The rule.

    Raises
    ------
    ValueError
        For an unknown key, a bad parameter or a value that is not a rule.
    """
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str):
        factories = _rule_factories()
        key = rule.strip().lower()
        if key not in factories:
            raise _unknown(rule, composite_names)
        return factories[key]()
    if isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str):
        key = rule[0].strip().lower()
        if key not in _PARAMETERIZED:
            raise _unknown(rule, composite_names)
        return _PARAMETERIZED[key](rule[1])
    raise _unknown(rule, composite_names)
