"""The rules that pass a layer's gradient: plain gradient, PatternNet and PatternAttribution."""
from __future__ import annotations

import torch
from torch import Tensor

from torchlrp.core.rules.base import Rule, Saved
from torchlrp.functional.affine import AffineOp


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
