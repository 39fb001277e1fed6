"""torchlrp: Layer-wise Relevance Propagation for PyTorch.

Drop-in layers (:class:`Linear`, :class:`Conv2d`, ...) whose explain-mode backward computes relevance by a rule,
so ``y[target].sum().backward()`` leaves the heatmap in ``x.grad``; rules and composites; conversion of any torch
model; tracing of intermediate relevances; heatmap rendering.
"""
from . import composites, functional, imagenet, patterns, rules, trace
from .composites import Composite, DeepTaylor, EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat
from .context import rules_applied
from .convert import ConversionError, convert, convert_vgg
from .explain import explain
from .generation import GenerationRelevance, explain_generation
from . import accounting, analysis, concepts, dataset, evaluate  # noqa: E402  (after explain, which they use)
from .modules import (Add, Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d, CyclicPool,
                      Linear, MaxPool1d, MaxPool2d, MaxPool3d, ReLU, Rotate, Sequential)
from .registry import OperationEntry, OperationRegistry, default_registry
from .trace import conservation

__version__ = "0.1.0"

__all__ = [
    "Add", "accounting", "analysis", "Composite", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "ConversionError", "CyclicPool", "DeepTaylor", "EpsilonAlpha2Beta1", "EpsilonGammaBox", "EpsilonPlus",
    "EpsilonPlusFlat", "GenerationRelevance", "Linear", "MaxPool1d", "MaxPool2d", "MaxPool3d", "OperationEntry", "OperationRegistry", "ReLU",
    "Rotate", "Sequential", "composites", "concepts", "conservation", "convert", "convert_vgg", "dataset", "default_registry", "evaluate", "explain",
    "explain_generation",
    "functional", "imagenet", "patterns", "rules", "rules_applied", "trace",
]
