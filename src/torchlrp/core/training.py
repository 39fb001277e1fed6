"""Training mode: which modules behave differently in it (explanations are of the eval-mode model)."""
from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd


def depends_on_training_mode(module: torch.nn.Module) -> bool:
    """Whether ``module``'s output depends on training mode.

    Parameters
    ----------
    module : torch.nn.Module
        Any module.

    Returns
    -------
    bool
        True for batch norms (batch statistics) and for dropout and torchvision's stochastic depth with ``p > 0``
        (random dropping).
    """
    if isinstance(module, _BatchNorm):
        return True
    if isinstance(module, (_DropoutNd, torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)):
        return module.p > 0
    return type(module).__name__ == "StochasticDepth" and getattr(module, "p", 0) > 0


def in_training_mode(model: torch.nn.Module) -> list[str]:
    """Dotted names of ``model``'s training-mode-dependent modules that are in training mode.

    Parameters
    ----------
    model : torch.nn.Module
        Any model.

    Returns
    -------
    list of str
        The names (the model's class name for the model itself), in module order.
    """
    return [name or type(model).__name__ for name, module in model.named_modules()
            if module.training and depends_on_training_mode(module)]
