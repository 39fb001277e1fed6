"""The autograd Functions whose backward computes relevance.

* :class:`AffineRelevance` -- a linear or convolutional layer explained by a rule from :mod:`torchlrp.rules`,
  optionally together with the ReLU after it (``op.rectified``, see :mod:`torchlrp.functional.rectified`).
* :class:`ProportionalRelevance` -- a parameter-free linear map (average pooling): each input receives relevance in
  proportion to its contribution to the output (the epsilon rule with a small stabilizer).
* :class:`SumRelevance` -- the sum of several tensors (a residual connection), split the same way between them.

In each of them the gradient reaching the output is the output relevance, and what ``backward`` returns is the
input relevance. Nothing in a backward synchronizes with the host.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from torchlrp.functional.affine import AffineOp
from torchlrp.functional.autocast import autocast_enabled
from torchlrp.functional.kernels import kernels
from torchlrp.functional.rectified import rectified_relevance
from torchlrp.functional.stabilize import stabilize

class LayerRule(Protocol):
    """What :class:`AffineRelevance` asks of a layer rule (:class:`torchlrp.rules.Rule` implements it)."""

    def forward(self, op: AffineOp, input: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The layer's output and what the backward keeps."""

    def forward_rectified(self, op: AffineOp, input: Tensor) -> Tensor:
        """The output of the layer and the ReLU after it."""

    def rectified_form(self, op: AffineOp, input: Tensor) -> Any:
        """The modified weights of the layer and its ReLU, explained together."""

    def backward(self, op: AffineOp, relevance: Tensor, saved: tuple[Tensor, ...], input_shape: torch.Size) -> Tensor:
        """The input relevance from the output relevance."""


class AffineRelevance(torch.autograd.Function):
    """Forward: the layer's output. Backward: the input relevance by ``rule``.

    With ``op.rectified`` the forward returns ``relu(z)`` and keeps only the input and that output; the rule's
    :meth:`~torchlrp.rules.Rule.rectified_form` (modified weights) is built in the backward, so that no
    weight-sized copy waits from forward to backward. The output's ``grad_fn`` carries ``output_rectified = True``
    so that :class:`torchlrp.ReLU` passes it on untouched, and ``keeps_output = True`` where the rule keeps the
    output itself (the epsilon rule, a folded ReLU): an identity-rule activation after the layer then keeps that
    same tensor, and the next layer, instead of its own input ``f(z)``, keeps ``z`` and recomputes ``f(z)`` in the
    backward (:class:`~torchlrp.functional.operations.IdentityRelevance`): one tensor instead of two.
    ``record``, if given, is called with the input and the output relevance in the backward (TorchLRP's trace, the
    run-time conservation check).
    """

    @staticmethod
    def forward(ctx, input: Tensor, op: AffineOp, rule: LayerRule,
                record: Callable[[Tensor, Tensor], None] | None = None) -> Tensor:  # noqa: D102
        ctx.op, ctx.rule, ctx.input_shape, ctx.record = op, rule, input.shape, record
        ctx.autocast = autocast_enabled(input)
        if op.rectified:
            ctx.output_rectified = True
            output = rule.forward_rectified(op, input)
            saved = (input, output)
        else:
            output, saved = rule.forward(op, input)
        if output._is_view():  # (a flattened batch viewed back): code may update the output in place, which
            viewed, output = output, output.clone()  # autograd forbids on a view made inside a Function
            saved = tuple(output if tensor is viewed else tensor for tensor in saved)
        ctx.parameter_versions = _versions(op)
        ctx.keeps_output = any(tensor is output for tensor in saved)
        ctx.recompute_input = getattr(input.grad_fn, "recompute_output", None)
        ctx.recomputed = tuple(index for index, tensor in enumerate(saved) if tensor is input)
        if ctx.recompute_input is not None and ctx.recomputed:
            source, = input.grad_fn.saved_tensors
            saved = tuple(source if tensor is input else tensor for tensor in saved)
        ctx.save_for_backward(*saved)
        return output

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: D102
        input_relevance = AffineRelevance._relevance(ctx, relevance)
        if ctx.record is not None:
            ctx.record(input_relevance, relevance)
        return input_relevance, None, None, None

    @staticmethod
    def _relevance(ctx, relevance: Tensor) -> Tensor:
        try:
            saved = ctx.saved_tensors
        except RuntimeError as error:
            raise RuntimeError(f"torchlrp: a tensor that a {type(ctx.rule).__name__} layer kept for its relevance "
                               f"(its input or output) was modified in place after the layer ran (e.g. "
                               f"out.mul_(2) or out.relu_() on a layer output in a hand-written forward); write "
                               f"that operation out of place (out = out * 2); in-place modules such as "
                               f"nn.ReLU(inplace=True) need no change. A model explained at run time whose "
                               f"earlier explanations made no such update: explain it again (torchlrp.explain "
                               f"does so by itself; this run taught it that the forward updates in place)") from error
        if _versions(ctx.op) != ctx.parameter_versions:
            raise RuntimeError(f"torchlrp: the weight or bias of a layer explained by {ctx.rule!r} was modified in "
                               f"place between the forward and the backward; its relevance would use the new "
                               f"values -- run the forward again after changing parameters")
        if ctx.recompute_input is not None and ctx.recomputed:
            input = ctx.recompute_input(saved[ctx.recomputed[0]])
            saved = tuple(input if index in ctx.recomputed else tensor for index, tensor in enumerate(saved))
        op = ctx.op
        if ctx.autocast:  # the forward ran in mixed precision: the whole backward runs in the output's dtype
            op = op.cast(relevance.dtype)
            saved = tuple(tensor.to(relevance.dtype) for tensor in saved)
        if op.rectified:
            input, output = saved
            form = ctx.rule.rectified_form(op, input)
            return rectified_relevance(op, form, relevance, input, output, ctx.input_shape)
        return ctx.rule.backward(op, relevance, saved, ctx.input_shape)


def _versions(op: AffineOp) -> tuple[int, ...]:
    """Version counters of the layer's weight and bias (they change with every in-place modification)."""
    return tuple(tensor._version for tensor in (op.weight, op.bias) if tensor is not None)


class ProportionalRelevance(torch.autograd.Function):
    """Relevance through a bias-free linear map ``fn``: ``R_in = x * J^T (R / stabilize(fn(x)))``.

    The forward returns ``value(x)`` where given (max pooling: the maximum, split as the window mean), else
    ``fn(x)``.
    """

    @staticmethod
    def forward(ctx, input: Tensor, fn: Callable[[Tensor], Tensor], epsilon: float,
                value: Callable[[Tensor], Tensor] | None) -> Tensor:  # noqa: D102
        output = fn(input)
        ctx.fn = fn
        ctx.save_for_backward(input, stabilize(output, epsilon))
        return output if value is None else value(input)

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: D102
        input, denominator = ctx.saved_tensors
        with torch.enable_grad():
            carrier = input.detach().requires_grad_(True)
            (transposed,) = torch.autograd.grad(ctx.fn(carrier), carrier, relevance / denominator)
        return input * transposed, None, None, None


class SumRelevance(torch.autograd.Function):
    """Relevance through ``sum(inputs)``: each summand gets ``x_i * R / stabilize(sum)``.

    With ``rectified`` the forward returns ``relu(sum)`` (a following :class:`torchlrp.ReLU` folded in, as for
    :class:`AffineRelevance`) and keeps that instead of the sum.
    """

    @staticmethod
    def forward(ctx, epsilon: float, fused: bool, rectified: bool, *inputs: Tensor) -> Tensor:  # noqa: D102
        ctx.kernels, ctx.epsilon, ctx.rectified = kernels(fused), epsilon, rectified
        output = ctx.kernels.sum_forward(*inputs)
        if rectified:
            output = output.relu_()
            ctx.output_rectified = True
        ctx.save_for_backward(output, *inputs[1:])
        return output

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        output, *others = ctx.saved_tensors
        return (None, None, None, *ctx.kernels.sum_backward(relevance, output, ctx.epsilon, ctx.rectified, *others))


def proportional(input: Tensor, fn: Callable[[Tensor], Tensor], epsilon: float = 1e-6,
                 value: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Apply the bias-free linear map ``fn`` with proportional relevance redistribution.

    Parameters
    ----------
    input : Tensor
        Input of ``fn``.
    fn : callable
        A linear, parameter-free map such as ``torch.nn.functional.avg_pool2d`` with fixed arguments.
    epsilon : float
        Stabilizer of the denominator.
    value : callable, optional
        The function whose output is returned (default ``fn``): a max pooling returns its maxima, while relevance
        splits as through ``fn``, the mean over the same windows.

    Returns
    -------
    Tensor
        ``fn(input)`` (or ``value(input)``), whose backward redistributes relevance in proportion to each input's
        contribution to ``fn``.
    """
    return ProportionalRelevance.apply(input, fn, epsilon, value)


def sum_relevance(inputs: tuple[Tensor, ...] | list[Tensor], epsilon: float = 1e-6, fused: bool = False,
                  rectified: bool = False) -> Tensor:
    """Sum tensors of one shape, redistributing relevance in proportion to each summand.

    Parameters
    ----------
    inputs : sequence of Tensor
        Summands, all of the same shape.
    epsilon : float
        Stabilizer of the denominator.
    fused : bool
        Run the elementwise work fused by ``torch.compile`` (see :mod:`torchlrp.functional.kernels`).
    rectified : bool
        Return ``relu(sum)``, explaining sum and ReLU together (the sum's relevance is that of the ReLU output).

    Returns
    -------
    Tensor
        The sum (rectified if asked).

    Raises
    ------
    ValueError
        If fewer than two tensors are given or their shapes differ.
    """
    if len(inputs) < 2:
        raise ValueError(f"sum_relevance needs at least two tensors, got {len(inputs)}")
    shapes = {tuple(t.shape) for t in inputs}
    if len(shapes) != 1:
        raise ValueError(f"sum_relevance needs tensors of one shape, got shapes {sorted(shapes)}")
    return SumRelevance.apply(epsilon, fused, rectified, *inputs)
