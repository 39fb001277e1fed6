"""Scaled dot-product attention explained through its math, whatever kernel runs the plain forward.

``softmax(q k^T * scale + mask) v`` is written out of the operations torchlrp has rules for: the two matrix
products take AttnLRP's uniform rule (each factor half of the epsilon-rule relevance, the other held constant), the
softmax AttnLRP's rule ``R_x = x (R - s sum R)`` (Achtibat et al. 2024), and an additive mask (a relative position
bias, ``-inf`` for masked keys) is a constant of the sum that takes its proportional share. With
``mode="cp"`` the attention weights are held constant instead (CP-LRP, Ali et al. 2022): relevance flows only
through the values, and the queries and keys receive none.

Where no weights are asked for and the stabilizer is at most 1e-6, the kernel itself explains
(:class:`KernelAttentionRelevance`: AttnLRP's and CP-LRP's rules are input x gradient of the kernel with the
gradient halved at each product). Otherwise, and for Swin's
windowed masks, the three steps are one autograd node (:class:`AttentionRelevance`): torch's attention kernel runs the
forward and nothing of ``heads x L x S`` size is kept (where the forward is written out -- Swin's mask per window --
the scores it computed are kept instead of recomputed, as the gradient keeps its weights); the backward computes the
weights once and applies the three rules in place.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from torchlrp.functional.kernels import kernels
from torchlrp.functional.operations import add_logit_constant, bilinear_rule
from torchlrp.functional.stabilize import mul_stabilized_ratio_

ATTENTION_MODES = ("attnlrp", "cp")
#: up to this stabilizer the inner products' stabilizers change nothing beyond rounding, and the kernel explains
#: (:class:`KernelAttentionRelevance`, which stabilizes the output only); above it the rules run one by one
KERNEL_EPSILON = 1e-6


def additive_mask(masks: Sequence[tuple[Tensor | None, bool]], dtype: torch.dtype) -> Tensor | None:
    """Merge attention masks into one additive mask with finite values (``-inf`` becomes the dtype's minimum).

    Parameters
    ----------
    masks : sequence of (Tensor or None, bool)
        Each mask with the meaning of True in it when boolean: ``True`` if True marks a position to attend
        (``scaled_dot_product_attention``), ``False`` if it marks one to leave out (``nn.MultiheadAttention``).
        Float masks are additive already. Shapes must broadcast together.
    dtype : torch.dtype
        The dtype of the scores.

    Returns
    -------
    Tensor or None
        Their sum as one additive mask, or None when every mask is None.
    """
    lowest = torch.finfo(dtype).min
    merged = None
    for mask, true_attends in masks:
        if mask is None:
            continue
        if mask.dtype == torch.bool:
            left_out = ~mask if true_attends else mask
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(left_out, lowest)
        mask = mask.to(dtype).clamp(min=lowest)
        merged = mask if merged is None else (merged + mask).clamp(min=lowest)
    return merged


def attention_mask(mask: Tensor | None, is_causal: bool, query: Tensor, key: Tensor) -> Tensor | None:
    """Turn SDPA's mask arguments into one additive mask with finite values (see :func:`additive_mask`).

    Parameters
    ----------
    mask : Tensor or None
        ``scaled_dot_product_attention``'s ``attn_mask``: boolean (True: attend) or additive.
    is_causal : bool
        Mask the keys after each query.
    query, key : Tensor
        Shapes ``(..., L, E)`` and ``(..., S, E)``.

    Returns
    -------
    Tensor or None
        An additive mask broadcastable to ``(..., L, S)``, or None.
    """
    causal = None
    if is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    return additive_mask([(causal, True), (mask, True)], query.dtype)


def attention_weights(query: Tensor, key: Tensor, constant: Tensor | None, scale: float | Tensor) -> Tensor:
    """Return ``softmax(query key^T * scale + constant)`` without a graph (CP-LRP's constant weights, or weights a
    caller returns).

    Parameters
    ----------
    query, key, constant, scale
        As for :func:`scaled_attention_rule` (``scale`` given).

    Returns
    -------
    Tensor
        The weights ``(..., L, S)``.
    """
    with torch.no_grad():
        scores = torch.matmul(query, key.transpose(-2, -1)) * scale
        return torch.softmax(scores if constant is None else add_logit_constant(scores, constant), dim=-1)


class AttentionRelevance(torch.autograd.Function):
    """Forward: ``softmax(q k^T * scale + c) v`` by torch's kernel. Backward: AttnLRP's rules of its three steps.

    With ``z = q k^T * scale``, ``w = softmax(z + c)``, ``o = w v`` and ``s = R_o / stab(o)``: the uniform rule of
    ``w v`` gives ``R_v = v * w^T s / 2`` and ``R_w = w * s v^T / 2``; the softmax rule gives the logits
    ``R_{z+c} = (z + c)(R_w - w sum R_w)``, of which the scores take ``z / stab(z + c)``; the uniform rule of
    ``q k^T`` gives ``R_q = q * (R_z / stab(z)) k * scale / 2`` and ``R_k`` likewise -- the numbers of the three
    rules applied one after the other (:func:`~torchlrp.functional.operations.bilinear_rule`,
    :func:`~torchlrp.functional.operations.softmax_rule`). Kept: ``q``, ``k``, ``v``, ``o``, the constant, and where
    the forward is written out (a constant per window) the scores ``z`` it computed, which the backward would
    otherwise recompute with a third product.
    """

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, constant: Tensor | None, scale: float | Tensor,
                epsilon: float) -> Tensor:  # noqa: D102
        ctx.scale, ctx.epsilon = scale, epsilon
        kept: tuple[Tensor, ...] = ()
        if constant is not None and constant.dim() == query.dim() + 1:  # a constant per window of each image:
            scores = torch.matmul(query, key.transpose(-2, -1)).mul_(scale)  # written out (torch's kernel takes
            output = torch.matmul(torch.softmax(add_logit_constant(scores, constant), -1), value)  # a slow path)
            kept = (scores,)  # computed anyway: kept, as the gradient keeps its weights, not recomputed
        else:  # a scale per head (Swin V2) is applied to the queries, with the kernel's scale 1
            scaled, kernel_scale = (query * scale, 1.0) if isinstance(scale, Tensor) else (query, scale)
            mask = None if constant is None else constant.to(query.dtype)
            output = F.scaled_dot_product_attention(scaled, key, value, attn_mask=mask, scale=kernel_scale)
        ctx.has_constant = constant is not None
        ctx.save_for_backward(query, key, value, output, *(() if constant is None else (constant,)), *kept)
        return output

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        query, key, value, output, *rest = ctx.saved_tensors
        constant = rest.pop(0) if ctx.has_constant else None
        epsilon = ctx.epsilon
        scores = rest[0] if rest else torch.matmul(query, key.transpose(-2, -1)).mul_(ctx.scale)  # kept, or again
        logits = scores if constant is None else add_logit_constant(scores, constant)
        weights = torch.softmax(logits, -1)
        signal = kernels(False).quotient(relevance, output, epsilon)
        value_relevance = torch.matmul(weights.transpose(-2, -1), signal).mul_(value).mul_(0.5)
        core = torch.matmul(signal, value.transpose(-2, -1)).mul_(weights)  # 2 R_w
        core.addcmul_(weights, core.sum(-1, keepdim=True), value=-1)  # 2 (R_w - w sum R_w)
        if constant is not None:  # the logits' relevance, the scores' share of it, over the scores: one factor
            mul_stabilized_ratio_(core, logits, epsilon, out=logits)  # the logits (a new tensor) are not needed
        mul_stabilized_ratio_(core, scores, epsilon, out=weights)  # after this, nor are the weights
        factor = ctx.scale * 0.25  # the scale's Jacobian, the two halves (the softmax's 2 R_w, the uniform rule)
        query_relevance = torch.matmul(core, key).mul_(query).mul_(factor)
        key_relevance = torch.matmul(core.transpose(-2, -1), query).mul_(key).mul_(factor)
        return query_relevance, key_relevance, value_relevance, None, None, None


class KernelAttentionRelevance(torch.autograd.Function):
    """AttnLRP (or CP-LRP) through torch's attention kernel, forward and backward.

    The three rules of :class:`AttentionRelevance` compose to input x gradient at each factor with the gradient
    halved at each product: with ``s = R_o / stab(o)`` and ``(dq, dk, dv)`` the kernel's vector-Jacobian product at
    ``s``, ``R_q = q * dq / 4``, ``R_k = k * dk / 4``, ``R_v = v * dv / 2`` (the softmax rule is input x gradient
    itself; a mask's share is what its gradient times its value would be, dropped). CP-LRP holds the weights
    constant: ``R_v = v * dv`` and the queries and keys get none. The forward records the kernel's own graph on
    detached copies (what the kernel keeps for its gradient, nothing of ``heads x L x S`` size on its fused paths);
    the backward is that graph's one backward.
    """

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, is_causal: bool,
                scale: float | None, constant_weights: bool, epsilon: float,
                enable_gqa: bool = False) -> Tensor:  # noqa: D102
        with torch.enable_grad():
            leaves = [tensor.detach().requires_grad_(not (constant_weights and index < 2))
                      for index, tensor in enumerate((query, key, value))]
            grouped = {"enable_gqa": True} if enable_gqa else {}  # (torch >= 2.5)
            output = F.scaled_dot_product_attention(*leaves, attn_mask=None if mask is None else mask.detach(),
                                                    is_causal=is_causal, scale=scale, **grouped)
        ctx.graph, ctx.leaves, ctx.epsilon, ctx.constant_weights = output, leaves, epsilon, constant_weights
        return output.detach()

    @staticmethod
    def backward(ctx, relevance: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        query, key, value = ctx.leaves
        signal = kernels(False).quotient(relevance, ctx.graph.detach(), ctx.epsilon)
        # the kernel's graph lives as long as this node does: a second backward of the same forward (a relevance
        # matrix, explain_generation) uses it again; it is freed with the node
        if ctx.constant_weights:
            (value_gradient,) = torch.autograd.grad(ctx.graph, value, signal, retain_graph=True)
            return None, None, value_gradient.mul_(value), None, None, None, None, None, None
        query_gradient, key_gradient, value_gradient = torch.autograd.grad(ctx.graph, ctx.leaves, signal,
                                                                           retain_graph=True)
        return (query_gradient.mul_(query).mul_(0.25), key_gradient.mul_(key).mul_(0.25),
                value_gradient.mul_(value).mul_(0.5), None, None, None, None, None, None)


def scaled_attention_rule(query: Tensor, key: Tensor, value: Tensor, constant: Tensor | None = None,
                          scale: float | Tensor | None = None, epsilon: float = 1e-6) -> Tensor:
    """``softmax(query key^T * scale + constant) value`` explained by AttnLRP's rules, in one autograd node.

    Parameters
    ----------
    query, key, value : Tensor
        Shapes ``(..., L, E)``, ``(..., S, E)``, ``(..., S, Ev)``.
    constant : Tensor, optional
        An additive constant of the logits (a mask with finite values, a relative position bias), broadcastable to
        ``(..., L, S)``, or with one more leading dimension: ``(1, windows, ...)`` for queries of shape
        ``(images * windows, ...)`` (Swin). It takes its proportional share of the logits' relevance.
    scale : float or Tensor, optional
        Factor of the scores (default ``1 / sqrt(E)``); a tensor broadcastable to ``(..., L, S)`` with size 1 in
        the last two dimensions (Swin V2's per-head logit scale).
    epsilon : float
        Stabilizer of the products' and the constant's shares.

    Returns
    -------
    Tensor
        The attention output ``(..., L, Ev)``.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scale = scale.detach() if isinstance(scale, Tensor) else float(scale)
    constant = None if constant is None else constant.detach()
    return AttentionRelevance.apply(query, key, value, constant, scale, epsilon)


def attention_rule(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None, is_causal: bool = False,
                   scale: float | None = None, mode: str = "attnlrp", epsilon: float = 1e-6,
                   need_weights: bool = True, enable_gqa: bool = False) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention whose backward is AttnLRP's (or CP-LRP's) relevance.

    Parameters
    ----------
    query, key, value : Tensor
        Shapes ``(..., L, E)``, ``(..., S, E)``, ``(..., S, Ev)``.
    mask : Tensor, optional
        Boolean (True: attend) or additive, broadcastable to ``(..., L, S)`` (``scaled_dot_product_attention``'s
        ``attn_mask``).
    is_causal : bool
        Mask the keys after each query.
    scale : float, optional
        Factor of the scores (default ``1 / sqrt(E)``).
    mode : {"attnlrp", "cp"}
        AttnLRP's rules, or the attention weights held constant (CP-LRP).
    epsilon : float
        Stabilizer of the products' and the mask sum's denominators.
    need_weights : bool
        Whether to return the attention weights (computed apart, without relevance, under AttnLRP).
    enable_gqa : bool
        Grouped-query attention (``scaled_dot_product_attention``'s ``enable_gqa``): each key/value head serves a
        group of query heads, and its relevance is the sum over the group.

    Returns
    -------
    tuple of Tensor
        The output ``(..., L, Ev)`` and the attention weights ``(..., L, S)`` (None if not ``need_weights``).

    Raises
    ------
    ValueError
        For an unknown mode.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    if not need_weights and epsilon <= KERNEL_EPSILON:  # the kernel's forward and backward: the same relevance
        return KernelAttentionRelevance.apply(query, key, value, mask, is_causal, scale, mode == "cp", epsilon,
                                              enable_gqa), None
    if enable_gqa:  # each key/value head repeated for its group of query heads (the repeat sums their relevance)
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    additive = attention_mask(mask, is_causal, query, key)
    if mode == "cp":
        weights = attention_weights(query, key, additive, scale)
        return bilinear_rule(torch.matmul, weights, value, (0.0, 1.0), epsilon), weights
    output = scaled_attention_rule(query, key, value, additive, scale, epsilon)  # a mask: an additive constant
    return output, attention_weights(query, key, additive, scale) if need_weights else None
