"""Relevance through an affine layer together with the ReLU that follows it.

A ReLU passes relevance only where ``z > 0``, and there ``z`` equals the rectified output ``relu(z)``. On those
units the epsilon, gamma, z+ and z^B rules share one form (:class:`RectifiedForm`):
``R_x = sum_k a_k x_k * M_k^T s`` with ``s = R [z > 0] / stab(d)`` and ``d = sum_k a_k (M_k x_k + c_k)``,
where ``x_k`` is the input, its magnitude ``|x|`` or a bound (z^B). A layer explained in this form keeps
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

from torchlrp.functional.affine import AffineOp
from torchlrp.functional.kernels import kernels


class Term(NamedTuple):
    """One part of a rule's modified map: ``scale * (weight x_k + bias)`` with ``x_k`` the ``part`` of the input.

    ``part`` is ``"all"`` (the input), ``"magnitude"`` (its absolute value) or a tensor that replaces the input (a
    bound of the z^B rule, broadcastable to the input; not the first term of a form). ``is_output`` marks a term
    whose map is the layer's own (``weight x + bias = z``): on the units the ReLU lets through, the rectified
    output stands for it in the denominator and nothing is recomputed.
    """

    part: Literal["all", "magnitude"] | Tensor
    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    is_output: bool = False


@dataclass(frozen=True)
class RectifiedForm:
    """A rule on the units a following ReLU lets through (see the module docstring).

    Attributes
    ----------
    terms : tuple of Term
        The modified map ``M_k`` (with bias ``c_k``) on each part ``x_k`` of the input.
    stabilizer : float
        Stabilizer of the denominator ``d``.
    """

    terms: tuple[Term, ...]
    stabilizer: float


def _input_part(input: Tensor, part: str | Tensor) -> Tensor:
    if isinstance(part, Tensor):
        return part
    if part == "magnitude":
        return input.abs()
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
        ``sum_k a_k x_k * M_k^T (R [output > 0] / stab(d))``.
    """
    parts = [_input_part(input, term.part) for term in form.terms]
    mapped = [output if term.is_output else op(part, term.weight, term.bias) for part, term in zip(parts, form.terms)]
    denominator = _scaled_sum(mapped, form.terms, owns_first=not form.terms[0].is_output)
    signal = kernels(op.fused).rectified_quotient(relevance, output, denominator, form.stabilizer)
    transposed = op.transpose_each(signal, input_shape, [term.weight for term in form.terms])
    return _scaled_sum([back.mul_(part) for part, back in zip(parts, transposed)], form.terms, owns_first=True)


def _scaled_sum(tensors: list[Tensor], terms: tuple[Term, ...], owns_first: bool) -> Tensor:
    """``sum_k a_k tensors[k]``, accumulated in place into the first (full-shaped) tensor where it may be changed.

    A sum of one unscaled tensor is that tensor (the epsilon rule's denominator is the output: no copy).
    """
    first, scale = tensors[0], terms[0].scale
    if len(terms) == 1 and scale == 1:
        return first
    if not owns_first:
        total = first * scale
    else:
        total = first if scale == 1 else first.mul_(scale)
    for tensor, term in zip(tensors[1:], terms[1:]):
        total = total.add_(tensor, alpha=term.scale)
    return total
