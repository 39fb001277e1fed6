"""Module kinds, declared once: what composites, the explanation context, traces and the operation table match on.

Each kind is an abstract base class. torch's own classes of that kind are registered here; torchlrp's twins and
operation modules register with the kind they are where they are defined (``@AffineLayer.register``), so that every
layer above matches ``isinstance(module, MaxPooling)`` instead of keeping a list of classes of its own.
"""
from __future__ import annotations

import abc

import torch


class AffineLayer(abc.ABC):
    """A linear map or convolution explained by a layer rule (torchlrp's layer twins and layer calls)."""


class ParameterFree(abc.ABC):
    """An operation module without parameters of its own (a sum, a product, a softmax, a norm's statistics): it
    takes ``Epsilon`` (the proportional split) or a gradient-type rule."""


class MaxPooling(abc.ABC):
    """A max pooling: winner takes all, or the proportional split of its windows (a composite's choice)."""


class AveragePooling(abc.ABC):
    """An average pooling or upsampling: the proportional split."""


class Attention(abc.ABC):
    """An attention module whose projections take a linear layer's rule (AttnLRP / CP-LRP inside)."""


class Recurrent(abc.ABC):
    """A recurrent layer (LSTM, GRU) whose projections take a linear layer's rule."""


class Rectifier(abc.ABC):
    """A rectifier module (``ReLU``, ``ReLU6``): its output is non-negative."""


class SoftmaxModule(abc.ABC):
    """A softmax module (``Softmax``, ``LogSoftmax``): the identity at a model's output."""


#: torch's max pooling modules
TORCH_MAX_POOLINGS = (torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.MaxPool3d, torch.nn.AdaptiveMaxPool1d,
                      torch.nn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool3d)
#: torch's average pooling modules
TORCH_AVERAGE_POOLINGS = (torch.nn.AvgPool1d, torch.nn.AvgPool2d, torch.nn.AvgPool3d, torch.nn.AdaptiveAvgPool1d,
                          torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d)
for _kind, _classes in ((MaxPooling, TORCH_MAX_POOLINGS), (AveragePooling, (*TORCH_AVERAGE_POOLINGS, torch.nn.Upsample)),
                        (Rectifier, (torch.nn.ReLU, torch.nn.ReLU6)),
                        (SoftmaxModule, (torch.nn.Softmax, torch.nn.LogSoftmax))):
    for _class in _classes:
        _kind.register(_class)
del _kind, _classes, _class

#: the kinds that mix activations without parameters of their own: they take Epsilon or a gradient-type rule
MIXING = (ParameterFree, AveragePooling, MaxPooling)
#: the kinds whose projections take the rule of a linear layer
PROJECTING = (Attention, Recurrent)

__all__ = ["AffineLayer", "Attention", "AveragePooling", "MIXING", "MaxPooling", "PROJECTING", "ParameterFree",
           "Rectifier", "Recurrent", "SoftmaxModule", "TORCH_AVERAGE_POOLINGS", "TORCH_MAX_POOLINGS"]
