"""The torchlrp twin of each torch layer class, and swapping a model's layers for their twins in place."""
from __future__ import annotations

import torch

from torchlrp.modules.activation import ACTIVATION_TWINS
from torchlrp.modules.affine import (Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d,
                                     Linear)
from torchlrp.modules.attention import MultiheadAttention
from torchlrp.modules.norm import NORM_TWINS
from torchlrp.modules.rectifier import ReLU
from torchlrp.modules.recurrent import GRU, LSTM

#: torch layer class -> torchlrp twin (exact type match: subclasses of the torch layers are left alone)
TWINS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.Linear: Linear, torch.nn.modules.linear.NonDynamicallyQuantizableLinear: Linear, torch.nn.Conv1d: Conv1d, torch.nn.Conv2d: Conv2d, torch.nn.Conv3d: Conv3d,
    torch.nn.ConvTranspose1d: ConvTranspose1d, torch.nn.ConvTranspose2d: ConvTranspose2d,
    torch.nn.ConvTranspose3d: ConvTranspose3d, torch.nn.ReLU: ReLU, torch.nn.MultiheadAttention: MultiheadAttention,
    torch.nn.LSTM: LSTM, torch.nn.GRU: GRU,
    **ACTIVATION_TWINS, **NORM_TWINS,
}


def swap_twins(model: torch.nn.Module) -> None:
    """Turn every torch layer of ``model`` whose exact class has a twin into that twin, in place."""
    for module in model.modules():
        twin = TWINS.get(type(module))
        if twin is not None:
            module.__class__ = twin  # the twins add no state: the (copied) module becomes its twin in place


__all__ = ["TWINS", "swap_twins"]
