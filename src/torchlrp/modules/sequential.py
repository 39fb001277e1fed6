"""``torchlrp.Sequential``: TorchLRP's container, ``model(x, explain=True, rule=...)``."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..composites import Composite
    from ..patterns import PatternsLike
    from ..rules import Rule


class Sequential(torch.nn.Sequential):
    """A ``torch.nn.Sequential`` whose forward can explain.

    ``model(x, explain=True, rule=...)`` applies ``rule`` (a key, a :class:`~torchlrp.rules.Rule` or a
    :class:`~torchlrp.composites.Composite`) to every torchlrp layer inside for this call: max-pooling passes
    relevance to the maximum, average pooling splits it in proportion to the inputs, ReLU/Dropout/Flatten/Identity
    pass it on, and a batch norm right after a linear/conv layer is folded into it. Then
    ``y[target].sum().backward()`` leaves the relevance in ``x.grad``.
    """

    def forward(self, input: Tensor, explain: bool = False, rule: "str | Rule | Composite" = "epsilon",
                pattern: "PatternsLike | None" = None, fused: bool = False) -> Tensor:
        """Run the modules in order, in explain mode if asked.

        Parameters
        ----------
        input : Tensor
            Model input.
        explain : bool
            Explain mode for this call.
        rule : str, Rule or Composite
            Rule(s) for the torchlrp layers (default ``"epsilon"``).
        pattern : dict, list or None
            Patterns for ``"patternnet"``/``"patternattribution"`` (see :mod:`torchlrp.patterns`).
        fused : bool
            Fuse the rules' elementwise work with ``torch.compile`` (see :func:`torchlrp.rules_applied`).

        Returns
        -------
        Tensor
            The model output (identical to the plain forward).
        """
        if not explain:
            return super().forward(input)
        from ..context import rules_applied

        with rules_applied(self, rule, pattern, fused):
            return super().forward(input)
