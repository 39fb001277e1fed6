"""Scaled dot-product attention explained through its math, whatever kernel runs the plain forward.

``softmax(q k^T * scale + mask) v`` is written out of the operations torchlrp has rules for: the two matrix
products take AttnLRP's uniform rule (each factor half of the epsilon-rule relevance, the other held constant), the
softmax AttnLRP's rule ``R_x = x (R - s sum R)`` (Achtibat et al. 2024), and an additive mask (a relative position
bias, ``-inf`` for masked keys) is a constant of the sum that takes its proportional share. With
``mode="cp"`` the attention weights are held constant instead (CP-LRP, Ali et al. 2022): relevance flows only
through the values, and the queries and keys receive none.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .operations import bilinear_rule, softmax_rule

ATTENTION_MODES = ("attnlrp", "cp")


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


def attention_rule(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None, is_causal: bool = False,
                   scale: float | None = None, mode: str = "attnlrp", epsilon: float = 1e-6) -> tuple[Tensor, Tensor]:
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

    Returns
    -------
    tuple of Tensor
        The output ``(..., L, Ev)`` and the attention weights ``(..., L, S)``.

    Raises
    ------
    ValueError
        For an unknown mode.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    additive = attention_mask(mask, is_causal, query, key)
    transposed_key = key.transpose(-2, -1)
    if mode == "cp":
        with torch.no_grad():
            scores = torch.matmul(query, transposed_key) * scale
            weights = torch.softmax(scores if additive is None else scores + additive, dim=-1)
        return bilinear_rule(torch.matmul, weights, value, (0.0, 1.0), epsilon), weights
    scores = bilinear_rule(torch.matmul, query, transposed_key, (0.5, 0.5), epsilon, scale)
    weights = softmax_rule(scores, -1, additive, epsilon)  # a mask is an additive constant of the logits
    return bilinear_rule(torch.matmul, weights, value, (0.5, 0.5), epsilon), weights
