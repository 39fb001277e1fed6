"""Folding batch normalization into the affine layer before it.

For explanation, ``BN(conv(x))`` is one affine map: folding the batch norm's eval-mode statistics into the
convolution's weight and bias leaves the output unchanged and lets the rule see the whole map, as zennit's
batch-norm canonizers do.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm


def check_foldable(batchnorm: torch.nn.Module, name: str = "") -> None:
    """Raise a ValueError unless ``batchnorm`` can be folded (eval mode, running statistics).

    Parameters
    ----------
    batchnorm : torch.nn.Module
        The batch norm module.
    name : str
        Its dotted name, for the message.

    Raises
    ------
    ValueError
        If the module is not a batch norm, is in training mode, or tracks no running statistics.
    """
    label = f"{name!r} " if name else ""
    if not isinstance(batchnorm, _BatchNorm):
        raise ValueError(f"module {label}is a {type(batchnorm).__name__}, not a batch norm")
    if batchnorm.training:
        raise ValueError(f"batch norm {label}is in training mode: its output depends on the batch and cannot be "
                         f"folded for an explanation; call model.eval() first")
    if batchnorm.running_mean is None or batchnorm.running_var is None:
        raise ValueError(f"batch norm {label}tracks no running statistics (track_running_stats=False) and cannot "
                         f"be folded into the layer before it")


def fold_batchnorm(weight: Tensor, bias: Tensor | None, batchnorm: _BatchNorm) -> tuple[Tensor, Tensor]:
    """Return the weight and bias of ``batchnorm(layer(x))`` as one affine layer.

    Parameters
    ----------
    weight : Tensor
        The layer's weight, output channels first.
    bias : Tensor or None
        The layer's bias.
    batchnorm : torch.nn.modules.batchnorm._BatchNorm
        An eval-mode batch norm over the layer's output channels.

    Returns
    -------
    tuple of Tensor
        The folded ``(weight, bias)``.
    """
    scale = (batchnorm.running_var + batchnorm.eps).rsqrt()
    shift = -batchnorm.running_mean * scale
    if batchnorm.affine:
        scale = scale * batchnorm.weight
        shift = shift * batchnorm.weight + batchnorm.bias
    folded_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    folded_bias = shift if bias is None else bias * scale + shift
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)


def fold_batchnorm_tensors(weight: Tensor, bias: Tensor | None, running_mean: Tensor, running_var: Tensor,
                           norm_weight: Tensor | None, norm_bias: Tensor | None,
                           eps: float) -> tuple[Tensor, Tensor]:
    """Return the weight and bias of ``F.batch_norm(layer(x), running_mean, running_var, norm_weight, norm_bias)``
    (eval mode) as one affine layer -- :func:`fold_batchnorm` for a batch norm called as a function.

    Parameters
    ----------
    weight, bias : Tensor
        The layer's weight (output channels first) and bias (or None).
    running_mean, running_var, norm_weight, norm_bias : Tensor
        The batch norm's statistics, weight and bias (or None).
    eps : float
        The batch norm's ``eps``.

    Returns
    -------
    tuple of Tensor
        The folded ``(weight, bias)``.
    """
    scale = (running_var + eps).rsqrt()
    shift = -running_mean * scale
    if norm_weight is not None:
        scale = scale * norm_weight
        shift = shift * norm_weight
    if norm_bias is not None:
        shift = shift + norm_bias
    folded_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    folded_bias = shift if bias is None else bias * scale + shift
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)
