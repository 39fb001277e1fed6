"""Stabilized denominators shared by every rule."""
import torch
from torch import Tensor

#: smallest stabilizer used in float16 (its reciprocal, 16384, leaves headroom below float16's maximum 65504)
HALF_MIN_STABILIZER = 2.0 ** -14


def effective_epsilon(dtype: torch.dtype, epsilon: float) -> float:
    """Return the stabilizer used for ``dtype``: ``epsilon``, raised to ``2**-14`` in float16.

    Parameters
    ----------
    dtype : torch.dtype
        Dtype of the denominator.
    epsilon : float
        Requested stabilizer.

    Returns
    -------
    float
        The stabilizer actually added.
    """
    return max(epsilon, HALF_MIN_STABILIZER) if dtype == torch.float16 else epsilon


def stabilize(denominator: Tensor, epsilon: float) -> Tensor:
    """Return ``denominator + epsilon * sign(denominator)`` with ``sign(0) = +1``, safe to divide by.

    Parameters
    ----------
    denominator : Tensor
        The pre-activations (or modified pre-activations) a rule divides by.
    epsilon : float
        Non-negative stabilizer. With ``epsilon == 0`` the zero entries become ``inf``, so that dividing by them
        gives zero relevance instead of ``inf``/``NaN``. In float16, whose largest value is 65504, a stabilizer
        below ``2**-14`` is raised to it so that reciprocals stay finite.

    Returns
    -------
    Tensor
        A new tensor of the same shape: never zero, so ``x / stabilize(z, eps)`` is finite for finite ``x``.
    """
    epsilon = effective_epsilon(denominator.dtype, epsilon)
    if epsilon == 0:
        return denominator.masked_fill(denominator == 0, float("inf"))
    return torch.copysign(denominator.new_full((), epsilon), denominator).add_(denominator)


def mul_stabilized_ratio_(target: Tensor, values: Tensor, epsilon: float, out: Tensor) -> Tensor:
    """Multiply ``target`` in place by ``values / stabilize(values, epsilon)``, the share of a sum's relevance that
    its term ``values`` keeps when the stabilizer takes the rest.

    For ``epsilon > 0`` the ratio is ``|v| / (|v| + epsilon)`` (the same floating-point numbers: the signs cancel
    exactly), computed in ``out`` without a new tensor and without ``copysign``; with ``epsilon == 0`` it is 1, and 0
    where ``v == 0`` (as :func:`stabilize` divides by ``inf`` there).

    Parameters
    ----------
    target : Tensor
        Modified in place.
    values : Tensor
        Shape of ``target``; not modified unless it is ``out``.
    epsilon : float
        Stabilizer (raised to ``2**-14`` in float16, see :func:`effective_epsilon`).
    out : Tensor
        A tensor whose contents are no longer needed (it may be ``values``), used for the ratio where it has
        ``values``' shape and dtype (under autocast the two can differ: then a new tensor is used).

    Returns
    -------
    Tensor
        ``target``.
    """
    epsilon = effective_epsilon(values.dtype, epsilon)
    if epsilon == 0:
        return target.mul_(values).div_(stabilize(values, 0.0))
    fits = out.shape == values.shape and out.dtype == values.dtype
    magnitude = torch.abs(values, out=out) if fits else values.abs()
    return target.mul_(magnitude).div_(magnitude.add_(epsilon))
