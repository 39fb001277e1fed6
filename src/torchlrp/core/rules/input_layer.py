"""The rules for a model's first layer: z-box (bounded input) and the unit-input rules flat, w-square, z+ with unit input."""
from __future__ import annotations

import abc
import math
from typing import Any

import torch
from torch import Tensor

from torchlrp.core.rules.base import Rule, Saved, check_number
from torchlrp.core.rules.proportional import view_bias
from torchlrp.functional.affine import AffineOp
from torchlrp.functional.kernels import kernels
from torchlrp.functional.rectified import RectifiedForm, Term


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
                check_number(name, bound, minimum=-math.inf)
        self.low = low
        self.high = high
        self.stabilizer = check_number("stabilizer", stabilizer)
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
        unbiased = output if op.bias is None else output - view_bias(op.bias, output, op)
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


class UnitInput(Rule):
    """Rules that replace the input by ones and the weight by a transform of it (flat, w-square, z+ of ones)."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = check_number("stabilizer", stabilizer)

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


class Flat(UnitInput):
    """LRP-flat: relevance spread uniformly over each output's receptive field (ones as input and weight, no bias).

    Parameters
    ----------
    stabilizer : float
        Non-negative stabilizer of the denominator.
    """

    def _parameters(self, op: AffineOp) -> tuple[Tensor, Tensor | None]:
        return torch.ones_like(op.weight), None


class WSquare(UnitInput):
    """LRP-w²: ``R_i = sum_j w_ij^2 / (sum_i' w_i'j^2 + b_j^2) R_j`` (ones as input, squared parameters).

    As in zennit, the squared bias takes part in the denominator.

    Parameters
    ----------
    stabilizer : float
        Non-negative stabilizer of the denominator.
    """

    def _parameters(self, op: AffineOp) -> tuple[Tensor, Tensor | None]:
        return op.weight.square(), None if op.bias is None else op.bias.square()


class ZPlusOnes(UnitInput):
    """z+ with the input values replaced by ones (the first-layer variant of the VGG z+ blog post, seed 004).

    ``R_i = sum_j w_ij+ / sum_i' w_i'j+ R_j``: relevance follows the positive weights only, whatever the pixel values.

    Parameters
    ----------
    stabilizer : float
        Non-negative stabilizer of the denominator.
    """

    def _parameters(self, op: AffineOp) -> tuple[Tensor, Tensor | None]:
        return op.weight.clamp(min=0), None
