"""Putting rules on a model for the duration of an explanation.

:func:`rules_applied` is the one place where a model enters explain mode: it sets each layer's rule (from a rule or
a composite), folds batch norms that directly follow a torchlrp layer in a ``Sequential``, marks layers whose input
follows a ReLU as non-negative, makes average pooling split relevance proportionally and skips a final softmax.
Everything is undone when the context ends, also on error.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import check_foldable
from .composites import MIXING_TYPES, Composite, as_composite
from .functional.relevance import proportional
from .modules.affine import ExplainableAffine
from .modules.residual import Add
from .patterns import PatternsLike, patterns_by_module
from .rules import Rule

#: modules after which a non-negative tensor stays non-negative
_SIGN_PRESERVING = (
    torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.MaxPool3d,
    torch.nn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool3d,
    torch.nn.AvgPool1d, torch.nn.AvgPool2d, torch.nn.AvgPool3d,
    torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d,
    torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d,
    torch.nn.Dropout3d, torch.nn.Identity,
)
_RECTIFIERS = (torch.nn.ReLU, torch.nn.ReLU6)
_OUTPUT_SOFTMAX = (torch.nn.Softmax, torch.nn.LogSoftmax)


class _Restorer:
    """Records attribute changes and hooks so they can be undone."""

    def __init__(self) -> None:
        self._attributes: list[tuple[object, str, Any]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def set(self, obj: object, name: str, value: Any) -> None:
        self._attributes.append((obj, name, obj.__dict__.get(name, _MISSING)))
        object.__setattr__(obj, name, value)

    def hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._handles.append(handle)

    def restore(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        for obj, name, value in reversed(self._attributes):
            if value is _MISSING:
                delattr(obj, name)
            else:
                object.__setattr__(obj, name, value)


_MISSING = object()


def _proportional_pool_hook(module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    rule = module.lrp_rule
    if rule.propagates_gradient:
        return output
    return proportional(inputs[0], module.forward, rule.epsilon)


def _skip_output(module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    return inputs[0]


def final_softmax(model: torch.nn.Module) -> torch.nn.Module | None:
    """Return the softmax/log-softmax module that ends a sequential model, if any.

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    torch.nn.Module or None
        The last module if it is a ``Softmax``/``LogSoftmax`` (looking into nested ``Sequential``\\ s).
    """
    while isinstance(model, torch.nn.Sequential) and len(model) > 0:
        model = model[-1]
    return model if isinstance(model, _OUTPUT_SOFTMAX) else None


def _prepare_sequential(container: torch.nn.Sequential, names: dict[torch.nn.Module, str],
                        restorer: _Restorer) -> None:
    """Fold batch norms after torchlrp layers and mark layers that follow a ReLU, inside one Sequential."""
    children = list(container)
    nonnegative = False
    for index, child in enumerate(children):
        if isinstance(child, ExplainableAffine):
            if nonnegative and not child.input_nonnegative:
                restorer.set(child, "input_nonnegative", True)
            following = children[index + 1] if index + 1 < len(children) else None
            if isinstance(following, _BatchNorm) and child.lrp_batchnorm is None:
                check_foldable(following, names.get(following, ""))
                restorer.set(child, "lrp_batchnorm", following)
                restorer.hook(following.register_forward_hook(_skip_output))
            nonnegative = False
        elif isinstance(child, _RECTIFIERS):
            nonnegative = True
        elif not isinstance(child, _SIGN_PRESERVING):
            nonnegative = False


@contextmanager
def rules_applied(model: torch.nn.Module, rule: "str | Rule | Composite" = "epsilon",
                  pattern: PatternsLike | None = None) -> Iterator[torch.nn.Module]:
    """Put ``model`` in explain mode with ``rule`` while the context is active.

    Parameters
    ----------
    model : torch.nn.Module
        A model containing torchlrp layers (see :func:`torchlrp.convert`).
    rule : str, Rule or Composite
        One rule for every layer, or a composite choosing per layer.
    pattern : dict, list or None
        PatternNet patterns (see :mod:`torchlrp.patterns`), required by the pattern rules.

    Yields
    ------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    ValueError
        If the model has no torchlrp layer, a rule is invalid, a batch norm to fold is in training mode, or a
        pattern rule lacks patterns.
    """
    composite = as_composite(rule)
    assignment = composite.assign(model)
    layers = [m for m in assignment if isinstance(m, ExplainableAffine)]
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no torchlrp layer to explain; build it from "
                         f"torchlrp.Linear/Conv2d/... or convert it with torchlrp.convert(model)")
    names = {module: name for name, module in model.named_modules()}
    module_patterns = patterns_by_module(model, pattern) if pattern is not None else {}
    for module in layers:
        if assignment[module].needs_pattern and module not in module_patterns:
            raise ValueError(f"rule {assignment[module]!r} needs a pattern for layer {names[module]!r}; pass "
                                 f"pattern=torchlrp.patterns.fit_patternnet(model, loader)")
    restorer = _Restorer()
    try:
        for module, module_rule in assignment.items():
            restorer.set(module, "lrp_rule", module_rule)
            if module in module_patterns:
                restorer.set(module, "lrp_pattern", module_patterns[module])
            if isinstance(module, MIXING_TYPES) and not isinstance(module, Add):
                restorer.hook(module.register_forward_hook(_proportional_pool_hook))
        for container in model.modules():
            if isinstance(container, torch.nn.Sequential):
                _prepare_sequential(container, names, restorer)
        softmax = final_softmax(model)
        if softmax is not None:
            restorer.hook(softmax.register_forward_hook(_skip_output))
        yield model
    finally:
        restorer.restore()

