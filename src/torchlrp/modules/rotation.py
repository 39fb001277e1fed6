"""Rotation-invariant networks (seed 000): :class:`Rotate` stacks the four 90-degree rotations of the input along the
batch, :class:`CyclicPool` pools the four branches back (Dieleman et al. 2016, cyclic slicing and pooling; used by
Cabrera-Vives et al. 2017, Deep-HiTS).

``Rotate`` is an index map: relevance of each branch is rotated back and summed (its gradient), so it is conserved.
``CyclicPool`` passes relevance to each branch in proportion to its contribution (mean: ``x_k / sum_j x_j``; root
mean square: ``x_k^2 / sum_j x_j^2``) or all of it to the largest (max: its gradient), also conserved. A network
``Rotate -> layers -> CyclicPool -> ...`` whose layers act on each sample alone is invariant to 90-degree rotations
of its input, and its explanation of a rotated input is the rotated explanation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from torchlrp.functional.operations import root_mean_square_rule
from torchlrp.functional.relevance import proportional
from torchlrp.modules.operation import Operation

ROTATIONS = 4
CYCLIC_POOLING_MODES = ("mean", "max", "rms")


class Rotate(torch.nn.Module):
    """Stack the input with its rotations by 90, 180 and 270 degrees along the batch dimension.

    ``(B, C, H, W) -> (4B, C, H, W)``, rotation-major: rows ``k*B .. (k+1)*B - 1`` hold the input rotated ``k``
    times by 90 degrees counter-clockwise (``torch.rot90`` over the last two dimensions). Relevance: each branch's
    relevance rotated back, summed (the gradient of this index map).
    """

    def forward(self, input: Tensor) -> Tensor:
        """Stack the rotations.

        Parameters
        ----------
        input : Tensor
            Shape ``(B, ..., H, W)`` with ``H == W`` (square images: a rotation keeps the shape).

        Returns
        -------
        Tensor
            Shape ``(4B, ..., H, W)``.

        Raises
        ------
        ValueError
            For fewer than 3 dimensions or a non-square image.
        """
        if input.dim() < 3 or input.shape[-1] != input.shape[-2]:
            raise ValueError(f"Rotate needs a batch of square images (B, ..., H, W) with H == W, got shape "
                             f"{tuple(input.shape)}")
        return torch.cat([torch.rot90(input, k, dims=(-2, -1)) for k in range(ROTATIONS)], dim=0)


class CyclicPool(Operation, torch.nn.Module):
    """Pool the four rotation branches made by :class:`Rotate` back into one: ``(4B, ...) -> (B, ...)``.

    Parameters
    ----------
    mode : {"mean", "max", "rms"}
        Mean (default), maximum or root mean square over the four branches (Dieleman et al. 2016).

    Raises
    ------
    ValueError
        For an unknown mode.

    Notes
    -----
    While explaining with a proportional rule (``Epsilon``, the composites' choice for parameter-free operations),
    ``mean`` gives branch ``k`` the share ``x_k / stab(sum_j x_j)`` of the relevance, ``rms`` the share
    ``x_k^2 / stab(sum_j x_j^2)``, and ``max`` all of it to the largest branch. Under a gradient-type rule, the
    gradient.
    """

    def __init__(self, mode: str = "mean") -> None:
        super().__init__()
        if mode not in CYCLIC_POOLING_MODES:
            raise ValueError(f"CyclicPool mode must be one of {CYCLIC_POOLING_MODES}, got {mode!r}")
        self.mode = mode

    def forward(self, input: Tensor) -> Tensor:
        """Pool the branches.

        Parameters
        ----------
        input : Tensor
            Shape ``(4B, ...)``, rotation-major as :class:`Rotate` makes it.

        Returns
        -------
        Tensor
            Shape ``(B, ...)``.

        Raises
        ------
        ValueError
            If the batch is not a multiple of 4.
        """
        if input.dim() == 0 or input.shape[0] % ROTATIONS:
            raise ValueError(f"CyclicPool needs a batch of 4 rotation branches per sample (a multiple of 4, as "
                             f"Rotate makes it), got shape {tuple(input.shape)}")
        branches = input.reshape(ROTATIONS, input.shape[0] // ROTATIONS, *input.shape[1:])
        rule = self.operation_rule()
        if self.mode == "max":
            return branches.max(dim=0).values
        if self.mode == "mean":
            if rule is None:
                return branches.mean(dim=0)
            return proportional(branches, lambda tensor: tensor.mean(dim=0), rule.epsilon)
        if rule is None:  # sqrt(mean x^2) as a norm: its gradient at an all-zero position is 0, not NaN
            return torch.linalg.vector_norm(branches, dim=0) / ROTATIONS ** 0.5
        return root_mean_square_rule(branches, rule.epsilon)

    def extra_repr(self) -> str:  # noqa: D102
        return f"mode={self.mode!r}"
