"""torchlrp: Layer-wise Relevance Propagation for PyTorch.

Drop-in layers (:class:`Linear`, :class:`Conv2d`, ...) whose explain-mode backward computes relevance by a rule,
so ``y[target].sum().backward()`` leaves the heatmap in ``x.grad``; rules and composites; conversion of any torch
model; tracing of intermediate relevances; heatmap rendering.

The package is layered, each folder importing only from the ones before it:

``functional`` (autograd Functions, kernels) -> ``core`` (rules, composites, module kinds, explanation state) ->
``modules`` (layer twins, operation modules) -> ``operations`` (the operation table) -> ``conversion`` (the traced
and the run-time engine) -> ``explanation`` (explain, generation, traces, patterns, accounting) -> ``analysis``
(concepts, evaluation, SpRAy), ``data`` (store, dataset, ImageNet, models) and ``viz`` (images, text) -> ``cli``.

The module paths of earlier releases (``torchlrp.rules``, ``torchlrp.image``, ``torchlrp.dataset``, ...) stay
importable: each names the module where that code now lives (:data:`PUBLIC_MODULES`).
"""
import sys

from torchlrp import functional, modules
from torchlrp.analysis import concepts, evaluate
from torchlrp.analysis import spray as analysis
from torchlrp.conversion.convert import ConversionError, convert
from torchlrp.core import composites, rules
from torchlrp.core.composites import Composite, DeepTaylor, EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat
from torchlrp.data import dataset, imagenet, models, store
from torchlrp.explanation import accounting, patterns, trace
from torchlrp.explanation.context import rules_applied
from torchlrp.explanation.explain import explain
from torchlrp.explanation.generation import GenerationRelevance, explain_generation
from torchlrp.explanation.sequential import Sequential, convert_vgg
from torchlrp.explanation.trace import conservation
from torchlrp.modules import (Add, Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d, CyclicPool,
                              Linear, MaxPool1d, MaxPool2d, MaxPool3d, ReLU, Rotate)
from torchlrp.operations import OperationEntry, OperationRegistry, default_registry
from torchlrp.version import __version__
from torchlrp.viz import image, text

#: the public module paths of torchlrp 0.1, each the module where its code now lives
PUBLIC_MODULES = (("accounting", accounting), ("analysis", analysis), ("composites", composites),
                  ("concepts", concepts), ("dataset", dataset), ("evaluate", evaluate), ("image", image),
                  ("imagenet", imagenet), ("models", models), ("patterns", patterns), ("rules", rules),
                  ("store", store), ("text", text), ("trace", trace))
for _path, _module in PUBLIC_MODULES:  # ``import torchlrp.image``, ``from torchlrp.rules import Epsilon``
    sys.modules.setdefault(f"{__name__}.{_path}", _module)
del _path, _module

__all__ = [
    "Add", "Composite", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "ConversionError", "CyclicPool", "DeepTaylor", "EpsilonAlpha2Beta1", "EpsilonGammaBox", "EpsilonPlus",
    "EpsilonPlusFlat", "GenerationRelevance", "Linear", "MaxPool1d", "MaxPool2d", "MaxPool3d", "OperationEntry",
    "OperationRegistry", "PUBLIC_MODULES", "ReLU", "Rotate", "Sequential", "__version__", "accounting", "analysis",
    "composites", "concepts", "conservation", "convert", "convert_vgg", "dataset", "default_registry", "evaluate",
    "explain", "explain_generation", "functional", "image", "imagenet", "models", "modules", "patterns", "rules",
    "rules_applied", "store", "text", "trace",
]
