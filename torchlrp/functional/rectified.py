"""Relevance through an affine layer together with the ReLU that follows it.

A ReLU passes relevance only where ``z > 0``, and there ``z`` equals the rectified output ``relu(z)``. On those
units the epsilon, gamma, z+ and z^B rules share one form (:class:`RectifiedForm`):
``R_x = sum_k sign_k x_k * M_k^T s`` with ``s = R [z > 0] / stab(d)`` and ``d = sum_k sign_k (M_k x_k + c_k)``,
where ``x_k`` is the input, its positive or negative part, or a bound (z^B). A layer explained in this form keeps
from the forward only its input and its rectified output -- tensors the model keeps anyway (the next layer's
input, the ReLU's mask) -- and rebuilds ``d`` and the modified weights in the backward: ``d`` is the output itself
for epsilon, one map for gamma and z+ on a non-negative input. The backward then costs what the unfolded rule
costs, without a denominator per layer held from forward to backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .affine import AffineOp
from .kernels import kernels


class Term(NamedTuple):
    """One part of a rule's modified map: ``sign * (weight x_k + bias)`` with ``x_k`` the ``part`` of the input.

    ``part`` is ``"all"`` (the input), ``"positive"``/``"negative"`` (its positive/negative part) or a tensor that
    replaces the input (a bound of the z^B rule, broadcastable to the input; not the first term of a form).
    """

    part: Literal["all", "positive", "negative"] | Tensor
    weight: Tensor
    bias: Tensor | None = None
    sign: float = 1.0


@dataclass(frozen=True)
class RectifiedForm:
    """A rule on the units a following ReLU lets through (see the module docstring).

    Attributes
    ----------
    terms : tuple of Term
        The modified map ``M_k`` (with bias ``c_k``) on each part ``x_k`` of the input.
    stabilizer : float
        Stabilizer of the denominator ``d``.
    denominator_is_output : bool
        ``d`` is the layer's own ``z`` (the epsilon rule): the rectified output serves as ``d`` and nothing is
        recomputed.
    """

    terms: tuple[Term, ...]
    stabilizer: float
    denominator_is_output: bool = False


def _input_part(input: Tensor, part: str | Tensor) -> Tensor:
    if isinstance(part, Tensor):
        return part
    if part == "positive":
        return input.clamp(min=0)
    if part == "negative":
        return input.clamp(max=0)
    return input


def rectified_relevance(op: AffineOp, form: RectifiedForm, relevance: Tensor, input: Tensor, output: Tensor,
                        input_shape: torch.Size) -> Tensor:
    """Return the input relevance of an affine layer and the ReLU folded into it.

    Parameters
    ----------
    op : AffineOp
        The layer's map.
    form : RectifiedForm
        The rule's form on the positive units.
    relevance : Tensor
        Relevance of the rectified output.
    input : Tensor
        The layer input.
    output : Tensor
        The rectified output ``relu(z)``.
    input_shape : torch.Size
        Shape of the layer input.

    Returns
    -------
    Tensor
        ``sum_k x_k * M_k^T (R [output > 0] / stab(d))`` (each term with its sign).
    """
    parts = [_input_part(input, term.part) for term in form.terms]
    if form.denominator_is_output:
        denominator = output
    else:
        denominator = _signed_sum([op(part, term.weight, term.bias) for part, term in zip(parts, form.terms)],
                                  form.terms)
    signal = kernels(op.fused).rectified_quotient(relevance, output, denominator, form.stabilizer)
    transposed = op.transpose_each(signal, input_shape, [term.weight for term in form.terms])
    return _signed_sum([mapped.mul_(part) for part, mapped in zip(parts, transposed)], form.terms)


def _signed_sum(tensors: list[Tensor], terms: tuple[Term, ...]) -> Tensor:
    """``sum_k sign_k tensors[k]``, accumulated in place into the first (full-shaped) tensor."""
    total = tensors[0] if terms[0].sign == 1 else tensors[0].mul_(terms[0].sign)
    for tensor, term in zip(tensors[1:], terms[1:]):
        total = total.add_(tensor, alpha=term.sign)
    return total
