"""Layer modules of torchlrp: drop-in twins of the torch layers with an explain mode, and the modules that
explain a model's parameter-free operations."""
from torchlrp.modules.activation import (CELU, ELU, GELU, SELU, Hardsigmoid, Hardswish, Hardtanh, LeakyReLU, Mish, PReLU, ReLU6,
                         Sigmoid, SiLU, Softplus, Tanh)
from torchlrp.modules.affine_call import AffineCall
from torchlrp.modules.affine import (Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d, ExplainableAffine,
                     Linear)
from torchlrp.modules.attention import MultiheadAttention, ScaledDotProductAttention
from torchlrp.modules.norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, LayerNorm, RMSNorm
from torchlrp.modules.operation import (Activation, Bilinear, Einsum, FunctionOperation, LayerNormFunction, Operation, OutputSoftmax,
                        Proportional, Scale, Softmax)
from torchlrp.modules.pooling import MaxPool, MaxPool1d, MaxPool2d, MaxPool3d
from torchlrp.modules.rectifier import ReLU
from torchlrp.modules.recurrent import GRU, LSTM
from torchlrp.modules.rotation import CyclicPool, Rotate
from torchlrp.modules.residual import Add

__all__ = [
    "Activation", "Add", "AffineCall", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Bilinear", "CELU", "Conv1d", "Conv2d", "Conv3d",
    "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "CyclicPool", "ELU", "Einsum", "ExplainableAffine",
    "FunctionOperation", "GELU", "GroupNorm", "GRU", "Hardsigmoid", "Hardswish", "Hardtanh", "LayerNorm", "LayerNormFunction", "LSTM",
    "LeakyReLU", "Linear", "MaxPool", "MaxPool1d", "MaxPool2d", "MaxPool3d", "Mish", "MultiheadAttention", "Operation", "OutputSoftmax",
    "PReLU", "Proportional", "RMSNorm", "ReLU", "ReLU6", "Rotate", "SELU", "ScaledDotProductAttention", "Scale", "SiLU", "Sigmoid", "Softmax",
    "Softplus", "Tanh",
]
