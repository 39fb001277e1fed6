"""Mixed precision: whether a Function's forward runs under ``torch.autocast``."""
from __future__ import annotations

import torch
from torch import Tensor


def autocast_enabled(tensor: Tensor) -> bool:
    """Whether autocast is active for ``tensor``'s device.

    Under autocast a layer computes in a lower precision than its parameters; its backward (which runs outside
    autocast) must then bring parameters and kept tensors to one dtype, and a recomputation in the backward could
    differ from the forward.

    Parameters
    ----------
    tensor : Tensor
        A tensor on the device in question.

    Returns
    -------
    bool
        True inside ``torch.autocast(tensor.device.type)``.
    """
    try:
        return torch.is_autocast_enabled(tensor.device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
