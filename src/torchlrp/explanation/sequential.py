"""TorchLRP's container and VGG conversion: ``torchlrp.Sequential`` (``model(x, explain=True, rule=...)``) and
:func:`convert_vgg`."""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from torchlrp.conversion.convert import convert
from torchlrp.core.composites import Composite
from torchlrp.core.rules import Rule
from torchlrp.explanation.context import rules_applied
from torchlrp.explanation.patterns import PatternsLike


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
        with rules_applied(self, rule, pattern, fused):
            return super().forward(input)


def convert_vgg(vgg: torch.nn.Module) -> Sequential:
    """Convert a torchvision VGG (vgg11/13/16/19 and the ``_bn`` variants) into a :class:`torchlrp.Sequential`.

    TorchLRP's API: the result is ``Sequential(*features, avgpool, Flatten(), *classifier)`` with the same
    parameters (batch norms folded) and the same outputs, explained by ``model(x, explain=True, rule=...)``.

    Parameters
    ----------
    vgg : torch.nn.Module
        A torchvision VGG (anything with ``features``, ``avgpool`` and ``classifier``).

    Returns
    -------
    Sequential
        The converted model, in ``vgg``'s training mode.

    Raises
    ------
    TypeError
        If ``vgg`` lacks the VGG structure.
    """
    if not all(hasattr(vgg, part) for part in ("features", "avgpool", "classifier")):
        raise TypeError(f"convert_vgg expects a torchvision VGG (features, avgpool, classifier), "
                        f"got {type(vgg).__name__}; use torchlrp.convert for other models")
    parts = copy.deepcopy([*vgg.features, vgg.avgpool, torch.nn.Flatten(), *vgg.classifier])
    sequential = Sequential(*parts)
    sequential.train(vgg.training)
    return convert(sequential, inplace=True)
