"""Conversion of torch models into explainable ones.

:func:`convert` copies any module tree and swaps every ``Linear``/``Conv1d/2d/3d`` for its torchlrp twin while
keeping the model's own ``forward`` (so ``torch.flatten`` in VGG or the residual additions of ResNet just work).
A ``torch.fx`` trace of the model then finds what is needed for a faithful explanation: batch norms fed by an
affine layer are folded into it (outputs unchanged), layers whose input follows a ReLU are marked non-negative, and
anything whose relevance torchlrp cannot propagate is reported in one :class:`ConversionError`.
"""
from __future__ import annotations

import copy
import fnmatch
import operator
from typing import Iterable

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import fold_batchnorm
from .composites import MIXING_TYPES
from .context import RECTIFIERS, SIGN_PRESERVING, final_softmax
from .modules.affine import Conv1d, Conv2d, Conv3d, ExplainableAffine, Linear
from .modules.rectifier import ReLU
from .modules.residual import Add
from .modules.sequential import Sequential


class ConversionError(ValueError):
    """A model holds modules or operations whose relevance torchlrp does not know how to propagate.

    Attributes
    ----------
    unsupported : list of tuple of str
        ``(dotted path, type or operation)`` for each offending place.
    """

    def __init__(self, unsupported: list[tuple[str, str]]) -> None:
        self.unsupported = unsupported
        lines = "\n".join(f"  {path}: {kind}" for path, kind in unsupported)
        super().__init__(
            f"cannot propagate relevance through {len(unsupported)} part(s) of the model:\n{lines}\n"
            f"Supported: Linear/Conv1d/2d/3d, ReLU, max/average pooling, Flatten, Dropout, Identity, batch norm after "
            f"a linear/conv layer, torchvision ResNet blocks and a final Softmax. To let a module pass relevance by "
            f"its plain gradient, name it: convert(model, allow_gradient=['path', 'glob.*'])")


def _twin(module: torch.nn.Module) -> type[torch.nn.Module] | None:
    for base, twin in ((torch.nn.Linear, Linear), (torch.nn.Conv1d, Conv1d), (torch.nn.Conv2d, Conv2d),
                       (torch.nn.Conv3d, Conv3d), (torch.nn.ReLU, ReLU)):
        if type(module) is base:
            return twin
    return None


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


class _LeafTracer(torch.fx.Tracer):
    """Keeps torch.nn leaves and torchlrp layers opaque."""

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (ExplainableAffine, Add, ReLU)) or super().is_leaf_module(module, qualified_name)


_NEUTRAL_FUNCTIONS = (torch.flatten, torch.relu, F.relu, F.dropout, torch.reshape, operator.getitem, getattr)
_NEUTRAL_METHODS = ("flatten", "view", "reshape", "relu", "size", "contiguous", "dim", "squeeze", "unsqueeze")
_SIGN_FUNCTIONS = (torch.flatten, torch.reshape, F.dropout)
_SIGN_METHODS = ("flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze")


def _supported_module(module: torch.nn.Module) -> bool:
    return isinstance(module, (ExplainableAffine, Add, *MIXING_TYPES, *SIGN_PRESERVING, *RECTIFIERS))


def _analyse(model: torch.nn.Module, allowed: set[str]) -> list[tuple[str, str]]:
    """Fold batch norms, mark non-negative inputs; return the unsupported places (fx-based)."""
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    users = {node: list(node.users) for node in graph.nodes}
    nonnegative: set[torch.fx.Node] = set()
    unsupported: list[tuple[str, str]] = []
    softmax = final_softmax(model)
    for node in graph.nodes:
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        first = args[0] if args else None
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, ExplainableAffine) and first in nonnegative:
                module.input_nonnegative = True
            if isinstance(module, _BatchNorm) and first is not None and first.op == "call_module" \
                    and isinstance(modules[first.target], ExplainableAffine) and len(users[first]) == 1:
                layer = modules[first.target]
                weight, bias = fold_batchnorm(layer.weight.detach(), _detached(layer.bias), module)
                layer.weight = torch.nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
                layer.bias = torch.nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
                _replace(model, node.target, torch.nn.Identity())
                continue
            if isinstance(module, RECTIFIERS):
                nonnegative.add(node)
                module.inplace = False
            elif isinstance(module, SIGN_PRESERVING) and first in nonnegative:
                nonnegative.add(node)
            elif isinstance(module, Add) and all(a in nonnegative for a in args):
                nonnegative.add(node)
            if not (_supported_module(module) or module is softmax or _is_allowed(node.target, allowed)):
                unsupported.append((node.target, type(module).__name__))
        elif node.op in ("call_function", "call_method"):
            name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
            neutral = node.target in _NEUTRAL_FUNCTIONS if node.op == "call_function" else node.target in _NEUTRAL_METHODS
            if node.target in (torch.relu, F.relu) or node.target == "relu":
                nonnegative.add(node)
            elif (node.target in _SIGN_FUNCTIONS or node.target in _SIGN_METHODS) and first in nonnegative:
                nonnegative.add(node)
            tensor_args = [a for a in args if a.op != "get_attr"]
            if not neutral and tensor_args and not _is_allowed(node.name, allowed):
                unsupported.append((node.name, f"operation {name}"))
    _mark_rectifier_feeds(graph, dict(model.named_modules()), users)
    return unsupported


def _mark_rectifier_feeds(graph: torch.fx.Graph, modules: dict[str, torch.nn.Module],
                          users: dict[torch.fx.Node, list[torch.fx.Node]]) -> None:
    """Mark the layers and sums whose every call feeds, through identities only, a torchlrp ``ReLU``.

    Batch norms are already folded (they are ``Identity`` modules in ``modules``). The folded layer keeps the
    ReLU's output for its backward, as the ReLU's own backward does: a model that modifies it in place cannot be
    differentiated with or without folding.
    """
    feeds: dict[torch.nn.Module, bool] = {}
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(layer, (ExplainableAffine, Add)):
            continue
        follower = node
        while len(users[follower]) == 1 and users[follower][0].op == "call_module" \
                and isinstance(modules[users[follower][0].target], torch.nn.Identity):
            follower = users[follower][0]
        after = users[follower]
        rectified = len(after) == 1 and after[0].op == "call_module" and type(modules[after[0].target]) is ReLU
        feeds[layer] = feeds.get(layer, True) and rectified
    for layer, rectified in feeds.items():
        layer.feeds_rectifier = rectified


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def _is_allowed(path: str, allowed: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in allowed)


def _check_leaves(model: torch.nn.Module, allowed: set[str]) -> list[tuple[str, str]]:
    """Module-only check for models that torch.fx cannot trace."""
    unsupported = []
    softmax = final_softmax(model)
    folded: set[torch.nn.Module] = set()
    for container in model.modules():
        if isinstance(container, torch.nn.Sequential):
            children = list(container)
            folded.update(b for a, b in zip(children, children[1:])
                          if isinstance(a, ExplainableAffine) and isinstance(b, _BatchNorm))
    for name, module in model.named_modules():
        if next(module.children(), None) is not None or isinstance(module, ExplainableAffine):
            continue
        if isinstance(module, RECTIFIERS):
            module.inplace = False
        if not (_supported_module(module) or module is softmax or module in folded or _is_allowed(name, allowed)):
            unsupported.append((name, type(module).__name__))
    return unsupported


def convert(model: torch.nn.Module, inplace: bool = False, allow_gradient: Iterable[str] = ()) -> torch.nn.Module:
    """Return an explainable copy of any model.

    Every ``torch.nn.Linear``/``Conv1d``/``Conv2d``/``Conv3d`` becomes its torchlrp twin (same parameters), the
    residual additions of torchvision ResNet blocks become :class:`~torchlrp.Add` modules, batch norms fed by a
    linear/conv layer are folded into it (the batch norm becomes an ``Identity``; eval-mode outputs are unchanged,
    so convert a trained model in eval mode), ``ReLU`` modules become (out-of-place) :class:`torchlrp.ReLU`, layers
    that follow a ReLU are marked as having non-negative input and layers that feed one directly are marked to be
    explained together with it (fewer tensors kept from forward to backward; same relevance). The model's own
    ``forward`` is kept. These marks describe the model as converted: after changing its modules, convert it again.

    Parameters
    ----------
    model : torch.nn.Module
        Any model, e.g. a torchvision VGG, AlexNet or ResNet.
    inplace : bool
        Modify ``model`` itself instead of a deep copy.
    allow_gradient : iterable of str
        Dotted module paths or fx node names (globs allowed) that may pass relevance by their plain gradient
        although torchlrp has no rule for them.

    Returns
    -------
    torch.nn.Module
        The converted model.

    Raises
    ------
    ConversionError
        Listing every module (dotted path and type) or operation whose relevance cannot be propagated.
    """
    from .modules.resnet import TorchBasicBlock, TorchBottleneck, explainable_block

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    allowed = set(allow_gradient)
    for name, module in list(model.named_modules()):
        if type(module) in (TorchBasicBlock, TorchBottleneck):
            explainable_block(module)
        twin = _twin(module)
        if twin is not None:
            module.__class__ = twin  # the twin adds no state: the (copied) module becomes its twin in place
    try:
        unsupported = _analyse(model, allowed)
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError):
        unsupported = _check_leaves(model, allowed)
    if unsupported:
        raise ConversionError(unsupported)
    return model


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
