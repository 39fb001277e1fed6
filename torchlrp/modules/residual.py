"""The residual addition as a module, so that relevance is split between the branches it sums."""
from __future__ import annotations

import torch
from torch import Tensor

from ..functional.kernels import sum_forward
from ..functional.relevance import sum_relevance
from ..state import current


class Add(torch.nn.Module):
    """Sum of tensors of one shape (a skip connection), explainable.

    While an explanation of its model is active (:func:`torchlrp.context.rules_applied`) each summand receives relevance in
    proportion to its contribution, ``R_i = x_i R / stab(sum_j x_j)``; without it (or for gradient-type rules) this
    is the plain sum. A plain ``a + b`` in a model would send the full relevance down both branches and double it
    at every block. ``feeds_rectifier`` (set by :func:`torchlrp.convert`) marks a sum that goes straight into a
    :class:`torchlrp.ReLU`: while explaining, the ReLU is applied here and explained together with the sum.
    """

    feeds_rectifier: bool = False

    def forward(self, *inputs: Tensor) -> Tensor:
        """Sum ``inputs``.

        Parameters
        ----------
        *inputs : Tensor
            Two or more tensors of one shape.

        Returns
        -------
        Tensor
            Their sum (while explaining a sum marked ``feeds_rectifier``: its ReLU, which the following
            ``torchlrp.ReLU`` passes on unchanged).
        """
        state = current()
        rule = None if state is None else state.rules.get(self)
        if rule is None or rule.propagates_gradient:
            return sum_forward(*inputs)
        rectified = self.feeds_rectifier or self in state.feeds_rectifier
        return sum_relevance(inputs, rule.epsilon, fused=state.fused, rectified=rectified)
