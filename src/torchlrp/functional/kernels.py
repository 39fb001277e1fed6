"""The rules' elementwise work, run eagerly or fused into single kernels by ``torch.compile``.

Between its convolutions a rule spends its time in elementwise passes over whole activations (stabilizing,
selecting, dividing). Each function below is written once in plain torch; :func:`kernels` hands out either the
functions themselves (eager: one pass per operation) or their ``torch.compile``'d versions (fused: one pass per
function). The fused versions are compiled once per process (``dynamic=True``: shapes do not trigger recompiles)
and need what ``torch.compile`` needs: a C++ compiler on the CPU, Triton on CUDA. Both give the same numbers up to
floating-point reassociation.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from torchlrp.functional.stabilize import effective_epsilon, stabilize


def gamma_inverse(output: Tensor, positive: Tensor, gamma: float, stabilizer: float) -> Tensor:
    """The signed inverse denominator of the generalized gamma rule on a non-negative input.

    With ``z = Wx + b`` and ``p = W+ x + b+`` the denominator is ``z + gamma p`` where ``z > 0`` and
    ``(1 + gamma) z - gamma p`` where ``z < 0``; both have ``z``'s sign, so the stabilizer is added to their
    magnitude ``u``. This returns ``sign(z) / (u + eps)`` (zero where ``z == 0``): one tensor from which
    :func:`gamma_signal` rebuilds both coefficients in the backward.

    Parameters
    ----------
    output : Tensor
        ``z``, the layer output.
    positive : Tensor
        ``p``, the output with the positive parts of weight and bias.
    gamma, stabilizer : float
        The rule's parameters.

    Returns
    -------
    Tensor
        ``sign(z) / (u + eps)``.
    """
    stabilizer = effective_epsilon(output.dtype, stabilizer)
    above = output > 0
    magnitude = torch.where(above, output, output * -(1.0 + gamma)) + gamma * positive + stabilizer
    return magnitude.reciprocal_().mul_(output.sign()).masked_fill_(output == 0, 0.0)


def gamma_signal(relevance: Tensor, inverse: Tensor, gamma: float, stack_dim: int) -> Tensor:
    """The backward signals of the generalized gamma rule on a non-negative input, for ``W`` and ``W+``.

    The input relevance is ``x * (W^T (R c) + W+^T (R c+))`` with, for ``v`` from :func:`gamma_inverse`,
    ``c = v`` and ``c+ = gamma v`` where ``z > 0`` (``v > 0``), ``c = (1 + gamma) v`` and ``c+ = -gamma v``
    where ``z < 0``, and both zero where ``z == 0``.

    Parameters
    ----------
    relevance : Tensor
        ``R``, the output relevance.
    inverse : Tensor
        ``v``, from :func:`gamma_inverse`.
    gamma : float
        The rule's gamma.
    stack_dim : int
        Where to stack ``R c`` and ``R c+``: the output's channel dimension (1 for a convolution, the last for
        linear).

    Returns
    -------
    Tensor
        ``R c`` and ``R c+`` stacked at ``stack_dim`` (for a ``(N, C, ...)`` output: ``(N, 2, C, ...)``).
    """
    signal = relevance * inverse
    above = inverse > 0
    return torch.stack((torch.where(above, signal, signal * (1.0 + gamma)),
                        torch.where(above, signal, -signal) * gamma), dim=stack_dim)


def reciprocal(denominator: Tensor, epsilon: float, scale: float = 1.0) -> Tensor:
    """Return ``scale / stabilize(denominator, epsilon)``.

    Parameters
    ----------
    denominator : Tensor
        A rule's denominator.
    epsilon : float
        Stabilizer (see :func:`~torchlrp.functional.stabilize`).
    scale : float
        Numerator.

    Returns
    -------
    Tensor
        The stabilized, scaled reciprocal (zero where ``epsilon == 0`` and ``denominator == 0``).
    """
    return scale / stabilize(denominator, epsilon)


def quotient(relevance: Tensor, denominator: Tensor, epsilon: float) -> Tensor:
    """Return ``relevance / stabilize(denominator, epsilon)`` (the epsilon rule's signal).

    Parameters
    ----------
    relevance : Tensor
        Output relevance.
    denominator : Tensor
        The layer's output ``z`` (kept from the forward; not modified).
    epsilon : float
        Stabilizer (see :func:`~torchlrp.functional.stabilize`).

    Returns
    -------
    Tensor
        The signal, finite everywhere.
    """
    stabilized = stabilize(denominator, epsilon)
    return torch.div(relevance, stabilized, out=stabilized)


def part_reciprocal(linear: Tensor, magnitude: Tensor, sign: float, epsilon: float, scale: float) -> Tensor:
    """Return ``scale / stabilize(u)`` for one signed part ``u = (Wx + sign |W||x|) / 2`` of an affine map.

    With ``W+- = (W +- |W|) / 2`` the positive contributions to ``Wx`` add up to ``(Wx + |W||x|) / 2`` and the
    negative ones to ``(Wx - |W||x|) / 2``: one map of the magnitudes instead of four maps of the parts. The
    difference loses precision where the part is small against the magnitude ``|W||x|``; where it is below
    ``sqrt(machine epsilon)`` of it (float32: 2.4e-4) the part cannot be told from rounding and the reciprocal is
    zero, so that the unit passes no relevance (as a zero denominator does) instead of sharing rounding errors.

    Parameters
    ----------
    linear : Tensor
        ``Wx`` (with the bias of the part folded in: ``z`` with ``|b|`` in ``magnitude`` gives ``b+``/``b-``).
    magnitude : Tensor
        ``|W||x|`` (plus ``|b|`` where the bias takes part).
    sign : float
        ``+1`` for the positive part, ``-1`` for the negative one.
    epsilon : float
        Stabilizer (see :func:`~torchlrp.functional.stabilize`).
    scale : float
        Numerator.

    Returns
    -------
    Tensor
        The stabilized, scaled reciprocal; zero where the part is zero or not resolved.
    """
    # 2u = Wx + sign |W||x| is resolved where sign 2u > 2 tau |W||x|, i.e. sign Wx > (2 tau - 1) |W||x|
    bound = magnitude * (sign * (2.0 * torch.finfo(linear.dtype).eps ** 0.5 - 1.0))
    unresolved = linear <= bound if sign > 0 else linear >= bound
    twice = torch.add(linear, magnitude, alpha=sign).add_(2.0 * sign * effective_epsilon(linear.dtype, epsilon))
    return twice.reciprocal_().mul_(2.0 * scale).masked_fill_(unresolved, 0.0)


def rectified_quotient(relevance: Tensor, output: Tensor, denominator: Tensor, epsilon: float) -> Tensor:
    """Return ``R / stabilize(d)`` where the rectified output is positive, zero elsewhere.

    The signal of a layer whose following ReLU is folded into it: the ReLU passes relevance only where
    ``relu(z) > 0``, and there ``z`` equals the rectified output, so ``d`` may be that output itself.

    Parameters
    ----------
    relevance : Tensor
        Relevance of the rectified output.
    output : Tensor
        The rectified output ``relu(z)``.
    denominator : Tensor
        The rule's denominator (the same tensor as ``output`` for the epsilon rule).
    epsilon : float
        Stabilizer (see :func:`~torchlrp.functional.stabilize`).

    Returns
    -------
    Tensor
        The signal, finite everywhere.
    """
    return torch.ops.aten.threshold_backward(relevance, output, 0).div_(stabilize(denominator, epsilon))


def sum_forward(*summands: Tensor) -> Tensor:
    """Return the sum of ``summands`` (tensors of one shape).

    Parameters
    ----------
    *summands : Tensor
        Tensors of one shape.

    Returns
    -------
    Tensor
        Their sum.
    """
    total = summands[0]
    for summand in summands[1:]:
        total = total + summand
    return total


def sum_backward(relevance: Tensor, total: Tensor, epsilon: float, rectified: bool,
                 *others: Tensor) -> tuple[Tensor, ...]:
    """Split ``relevance`` of a sum between its summands: ``x_i * R / stabilize(total)``.

    Only the summands after the first are kept from the forward (they are usually alive anyway); the first is
    recovered as ``total - sum(others)``, which saves keeping it alive until the backward.

    Parameters
    ----------
    relevance : Tensor
        Relevance of the sum (of ``relu(sum)`` if ``rectified``).
    total : Tensor
        The sum, or ``relu(sum)`` if ``rectified``.
    epsilon : float
        Stabilizer of the denominator.
    rectified : bool
        A ReLU after the sum is folded in: relevance passes only where ``total > 0``, and there ``relu(sum)`` is the
        sum (see :func:`rectified_quotient`).
    *others : Tensor
        The summands after the first.

    Returns
    -------
    tuple of Tensor
        One relevance per summand, the first first.
    """
    if rectified:
        signal = rectified_quotient(relevance, total, total, epsilon)
    else:
        signal = quotient(relevance, total, epsilon)
    first = total - others[0]
    for summand in others[1:]:
        first.sub_(summand)
    middle = tuple(summand * signal for summand in others[:-1])
    return (first.mul_(signal), *middle, signal.mul_(others[-1]))  # new tensors, filled in place


@dataclass(frozen=True)
class Kernels:
    """The elementwise functions the rules call; eager or fused (see :func:`kernels`).

    Attributes
    ----------
    stabilize : callable
        :func:`torchlrp.functional.stabilize`.
    reciprocal : callable
        :func:`reciprocal`.
    gamma_inverse, gamma_signal : callable
        :func:`gamma_inverse`, :func:`gamma_signal`.
    part_reciprocal, quotient : callable
        :func:`part_reciprocal`, :func:`quotient`.
    rectified_quotient : callable
        :func:`rectified_quotient`.
    sum_forward, sum_backward : callable
        :func:`sum_forward`, :func:`sum_backward`.
    """

    stabilize: Callable[[Tensor, float], Tensor]
    reciprocal: Callable[[Tensor, float, float], Tensor]
    gamma_inverse: Callable[[Tensor, Tensor, float, float], Tensor]
    gamma_signal: Callable[[Tensor, Tensor, float, int], Tensor]
    part_reciprocal: Callable[[Tensor, Tensor, float, float, float], Tensor]
    quotient: Callable[[Tensor, Tensor, float], Tensor]
    rectified_quotient: Callable[[Tensor, Tensor, Tensor, float], Tensor]
    sum_forward: Callable[..., Tensor]
    sum_backward: Callable[..., tuple[Tensor, ...]]


EAGER = Kernels(stabilize, reciprocal, gamma_inverse, gamma_signal, part_reciprocal, quotient, rectified_quotient, sum_forward, sum_backward)


def _compiled(function: Callable) -> Callable:
    """``torch.compile`` ``function``; a failure to compile becomes an error that says how to do without."""
    fused = torch.compile(function, dynamic=True)

    @functools.wraps(function)
    def call(*args: Any) -> Any:
        try:
            return fused(*args)
        except torch._dynamo.exc.TorchDynamoException as error:
            raise RuntimeError(f"fused=True could not compile torchlrp's {function.__name__} kernel with "
                               f"torch.compile ({type(error).__name__}); it needs a C++ compiler on the CPU or "
                               f"Triton on CUDA -- install one or explain with fused=False") from error

    return call


@functools.cache
def _fused() -> Kernels:
    return Kernels(*(_compiled(getattr(EAGER, name)) for name in Kernels.__dataclass_fields__))


def kernels(fused: bool = False) -> Kernels:
    """Return the eager or the fused (``torch.compile``'d) elementwise kernels.

    Parameters
    ----------
    fused : bool
        False: plain torch operations. True: each function compiled once into one kernel (compiled lazily on
        first use; later calls in the process reuse it).

    Returns
    -------
    Kernels
        The functions. A fused function that cannot be compiled raises a ``RuntimeError`` naming what is missing.
    """
    return _fused() if fused else EAGER
