"""Layer modules of torchlrp: drop-in twins of the torch layers with an explain mode."""
from .affine import Conv1d, Conv2d, Conv3d, ExplainableAffine, Linear
from .rectifier import ReLU
from .residual import Add
from .sequential import Sequential

__all__ = ["Add", "Conv1d", "Conv2d", "Conv3d", "ExplainableAffine", "Linear", "ReLU", "Sequential"]
