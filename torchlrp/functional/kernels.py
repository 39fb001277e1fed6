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

from .stabilize import effective_epsilon, stabilize


def gamma_coefficients(output: Tensor, positive: Tensor, gamma: float, stabilizer: float, stack_dim: int) -> Tensor:
    """Per-unit coefficients of the generalized gamma rule on a non-negative input.

    With ``z = Wx + b`` and ``p = W+ x + b+`` the denominator is ``z + gamma p`` where ``z > 0`` and
    ``(1 + gamma) z - gamma p`` where ``z < 0``; both have ``z``'s sign, so the stabilizer is added to their
    magnitude ``u``. The input relevance is then ``x * (W^T (R c) + W+^T (R c+))`` with ``c = 1/(u + eps)`` and
    ``c+ = gamma / (u + eps)`` where ``z > 0``, ``c = -(1 + gamma)/(u + eps)`` and ``c+ = gamma / (u + eps)`` where
    ``z < 0``, and both zero where ``z == 0``.

    Parameters
    ----------
    output : Tensor
        ``z``, the layer output.
    positive : Tensor
        ``p``, the output with the positive parts of weight and bias.
    gamma, stabilizer : float
        The rule's parameters.
    stack_dim : int
        Where to stack ``c`` and ``c+``: the output's channel dimension (1 for a convolution, the last for linear).

    Returns
    -------
    Tensor
        ``c`` and ``c+`` stacked at ``stack_dim`` (for a ``(N, C, ...)`` output: ``(N, 2, C, ...)``).
    """
    stabilizer = effective_epsilon(output.dtype, stabilizer)
    above, below = output > 0, output < 0
    magnitude = torch.where(above, output, output * -(1.0 + gamma)) + gamma * positive + stabilizer
    inverse = torch.where(above | below, magnitude.reciprocal(), 0.0)
    coefficient = torch.where(above, inverse, inverse * -(1.0 + gamma))
    return torch.stack((coefficient, inverse * gamma), dim=stack_dim)


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


def sum_backward(relevance: Tensor, total: Tensor, epsilon: float, *others: Tensor) -> tuple[Tensor, ...]:
    """Split ``relevance`` of a sum between its summands: ``x_i * R / stabilize(total)``.

    Only the summands after the first are kept from the forward (they are usually alive anyway); the first is
    recovered as ``total - sum(others)``, which saves keeping it alive until the backward.

    Parameters
    ----------
    relevance : Tensor
        Relevance of the sum.
    total : Tensor
        The sum.
    epsilon : float
        Stabilizer of the denominator.
    *others : Tensor
        The summands after the first.

    Returns
    -------
    tuple of Tensor
        One relevance per summand, the first first.
    """
    signal = relevance / stabilize(total, epsilon)
    first = total
    for summand in others:
        first = first - summand
    return (first * signal, *(summand * signal for summand in others))


@dataclass(frozen=True)
class Kernels:
    """The elementwise functions the rules call; eager or fused (see :func:`kernels`).

    Attributes
    ----------
    stabilize : callable
        :func:`torchlrp.functional.stabilize`.
    reciprocal : callable
        :func:`reciprocal`.
    gamma_coefficients : callable
        :func:`gamma_coefficients`.
    sum_forward, sum_backward : callable
        :func:`sum_forward`, :func:`sum_backward`.
    """

    stabilize: Callable[[Tensor, float], Tensor]
    reciprocal: Callable[[Tensor, float, float], Tensor]
    gamma_coefficients: Callable[[Tensor, Tensor, float, float, int], Tensor]
    sum_forward: Callable[..., Tensor]
    sum_backward: Callable[..., tuple[Tensor, ...]]


EAGER = Kernels(stabilize, reciprocal, gamma_coefficients, sum_forward, sum_backward)


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
