"""Putting rules on a model for the duration of an explanation.

:func:`rules_applied` is the one place where a model enters explain mode. It builds an
:class:`~torchlrp.core.state.ExplainState` -- each layer's rule (from a rule or a composite), batch norms that directly
follow a torchlrp layer in a ``Sequential`` (folded into it), layers whose input follows a ReLU (non-negative
input) -- and activates it for the current thread/context. Average pooling is made to split relevance
proportionally and a final softmax to pass relevance unchanged to the scores before it (its output stays the same)
through forward hooks that act only for this state. Everything is undone when the context ends, also on error, and
nothing is written on the modules.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from torchlrp.functional.folding import check_foldable
from torchlrp.core.composites import Composite, as_composite
from torchlrp.core.kinds import PROJECTING, TORCH_AVERAGE_POOLINGS, TORCH_MAX_POOLINGS, AveragePooling, MaxPooling, Rectifier, SoftmaxModule
from torchlrp.functional.relevance import proportional
from torchlrp.modules.affine import ExplainableAffine
from torchlrp.modules.norm import NORM_TWINS
from torchlrp.modules.operation import output_softmax_rule
from torchlrp.modules.pooling import proportional_max_pool, window_mean
from torchlrp.core.training import in_training_mode
from torchlrp.modules.rectifier import ReLU
from torchlrp.explanation.patterns import PatternsLike, patterns_by_module
from torchlrp.core.rules import Rule
from torchlrp.conversion.convert import RUN_TIME_ATTRIBUTE, RunTimeConversion
from torchlrp.conversion.runtime import RunTimeOperations
from torchlrp.core.state import ACTIVE, ExplainState, current

#: modules after which a non-negative tensor stays non-negative
SIGN_PRESERVING = (
    MaxPooling, *TORCH_AVERAGE_POOLINGS, torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d,
    torch.nn.Dropout3d, torch.nn.Identity,
)


def final_softmax(model: torch.nn.Module) -> torch.nn.Module | None:
    """Return the softmax/log-softmax module that ends a sequential model, if any.

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    torch.nn.Module or None
        The ``Softmax``/``LogSoftmax`` module whose output is the model's (the last module, looking into nested
        ``Sequential`` containers; for a model made by :func:`torchlrp.convert`, the module its graph returns).
    """
    graph = getattr(model, "graph", None)
    if isinstance(graph, torch.fx.Graph):  # made by torchlrp.convert: the module that gives the output
        value = next(node for node in graph.nodes if node.op == "output").args[0]
        if isinstance(value, torch.fx.Node) and value.op == "call_module":
            module = model.get_submodule(value.target)
            return module if isinstance(module, SoftmaxModule) else None
        return None
    while isinstance(model, torch.nn.Sequential) and len(model) > 0:
        model = model[-1]
    return model if isinstance(model, SoftmaxModule) else None


def _scan_sequential(container: torch.nn.Sequential, names: dict[torch.nn.Module, str], state: ExplainState,
                     tied: set[torch.nn.Module]) -> None:
    """Record, inside one Sequential, batch norms after torchlrp layers, layers that follow a ReLU and layers that
    feed a :class:`torchlrp.ReLU` (possibly through a batch norm to fold). These are marks on the module, so a layer
    the model calls more than once (``tied``) gets none: they would hold at every call."""
    children = list(container)
    nonnegative = False
    for index, child in enumerate(children):
        if isinstance(child, ExplainableAffine) and child in tied:
            following = children[index + 1:index + 2]
            if following and isinstance(following[0], _BatchNorm) and _plain_batchnorm(following[0]):
                raise ValueError(f"layer {names.get(child, '')!r} is used more than once and is followed by the batch "
                                 f"norm {names.get(following[0], '')!r} at one of its uses: the norm cannot be folded "
                                 f"into a layer it does not follow at every call; give each use its own layer, or "
                                 f"explain the model with torchlrp.convert(model), which folds per call")
            nonnegative = False
        elif isinstance(child, ExplainableAffine):
            if nonnegative:
                state.nonnegative.add(child)
            following = children[index + 1:index + 3]
            if following and isinstance(following[0], _BatchNorm) and _plain_batchnorm(following[0]):
                check_foldable(following[0], names.get(following[0], ""))
                state.batchnorms[child] = following.pop(0)
            if following and type(following[0]) is ReLU:
                state.feeds_rectifier.add(child)
            nonnegative = False
        elif isinstance(child, Rectifier):
            nonnegative = True
        elif not isinstance(child, SIGN_PRESERVING):
            nonnegative = False


def _plain_batchnorm(module: torch.nn.Module) -> bool:
    """Whether a batch norm computes just the batch norm (torch's forward or its twin's), so that it can be folded
    and skipped; a subclass with a forward of its own (timm's ``BatchNormAct2d``: norm and activation) cannot."""
    forward = type(module).forward
    return forward is _BatchNorm.forward or any(forward is twin.forward for twin in NORM_TWINS.values())


def _when_active(state: ExplainState, transform: Callable[[torch.nn.Module, Tensor, Tensor], Tensor]):
    """A forward hook applying ``transform(module, input, output)`` only while ``state`` is this thread's."""
    def hook(module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        if ACTIVE.get() is not state:
            return None
        return transform(module, inputs[0], output)
    return hook


def _proportional_pool(state: ExplainState) -> Callable[[torch.nn.Module, Tensor, Tensor], Tensor]:
    def transform(module: torch.nn.Module, input: Tensor, output: Tensor) -> Tensor:
        rule = state.rules[module]
        return output if rule.propagates_gradient else proportional(input, module.forward, rule.epsilon)
    return transform


def _proportional_max_pool(state: ExplainState) -> Callable[[torch.nn.Module, Tensor, Tensor], Tensor]:
    def transform(module: torch.nn.Module, input: Tensor, output: Tensor) -> Tensor:
        return proportional_max_pool(module, input, state.rules[module].epsilon)
    return transform


def _skip(module: torch.nn.Module, input: Tensor, output: Tensor) -> Tensor:
    return input


def _output_softmax(state: ExplainState) -> Callable[[torch.nn.Module, Tensor, Tensor], Tensor]:
    """The model's final softmax: same output, relevance passed to the scores unchanged (which are recorded)."""
    def transform(module: torch.nn.Module, input: Tensor, output: Tensor) -> Tensor:
        return output_softmax_rule(state, input, module.forward)
    return transform


def _kept(module: torch.nn.Module, arg: Any) -> bool:
    """Whether ``arg`` is a tensor an explained layer keeps for its backward (a folded ReLU's rectified output
    is passed on untouched by the torchlrp ReLU after it, so that one needs no copy)."""
    if not isinstance(arg, Tensor) or not getattr(arg.grad_fn, "keeps_output", False):
        return False
    return not (isinstance(module, ReLU) and getattr(arg.grad_fn, "output_rectified", False))


def _out_of_place(state: ExplainState) -> Callable[[torch.nn.Module, tuple[Any, ...]], tuple[Any, ...] | None]:
    """A forward pre-hook for in-place modules (``nn.ReLU(inplace=True)``): while ``state`` is this thread's, an
    input that an explained layer keeps for its backward (``grad_fn.keeps_output``) is copied first, so that the
    module modifies the copy and the layer's relevance stays right. The module itself is not changed."""
    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if ACTIVE.get() is not state:
            return None
        return tuple(arg.clone() if _kept(module, arg) else arg for arg in args)
    return hook


def _first_layer(model: torch.nn.Module) -> tuple[torch.nn.Module | None, bool]:
    """The first layer the input meets, where :func:`torchlrp.convert` marked its call, and whether it is called
    again (later calls then take the layer's non-first rule); ``(None, False)`` for other models."""
    graph = getattr(model, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None, False
    calls = [node for node in graph.nodes if node.op == "call_module" and "first" in node.kwargs]
    first = next((node for node in calls if node.kwargs["first"]), None)
    if first is None:
        return None, False
    return model.get_submodule(first.target), sum(node.target == first.target for node in calls) > 1


def _attribute(module: torch.nn.Module, name: str) -> Any:
    """``getattr(module, name, None)`` for a plain (non-module, non-tensor) attribute, without the exception that
    ``Module.__getattr__`` raises for a missing one (rules_applied asks every module of the model at each call)."""
    found = vars(module).get(name)
    return getattr(type(module), name, None) if found is None else found


def _check_eval_mode(model: torch.nn.Module) -> None:
    """Raise if a module whose output depends on training mode is in training mode."""
    training = in_training_mode(model)
    if training:
        listed = ", ".join(repr(name) for name in training[:5]) + (", ..." if len(training) > 5 else "")
        raise ValueError(f"{len(training)} module(s) of {type(model).__name__} are in training mode ({listed}): batch "
                         f"norms would use batch statistics and dropout would drop at random, so the explanation "
                         f"would not be of the model's decision; explanations are of the eval-mode model -- call "
                         f"model.eval() first")


def has_torchlrp_layers(modules: Iterable[torch.nn.Module]) -> bool:
    """Whether any of ``modules`` is a torchlrp layer or attention module: something an explanation has a rule for.

    Parameters
    ----------
    modules : iterable of torch.nn.Module
        E.g. ``model.modules()``.

    Returns
    -------
    bool
        False for a model that needs :func:`torchlrp.convert` first.
    """
    return any(isinstance(module, (ExplainableAffine, *PROJECTING)) for module in modules)


def build_state(model: torch.nn.Module, rule: "str | Rule | Composite" = "epsilon",
                pattern: PatternsLike | None = None, fused: bool = False) -> ExplainState:
    """Decide rules, patterns, batch-norm folds and non-negative inputs for explaining ``model``.

    Parameters
    ----------
    model, rule, pattern, fused
        As in :func:`rules_applied`.

    Returns
    -------
    ExplainState
        The decisions (not yet active).

    Raises
    ------
    ValueError
        As in :func:`rules_applied`.
    """
    _check_eval_mode(model)
    meta = next((name for name, tensor in model.named_parameters() if tensor.is_meta), None) if next(
        model.parameters(), torch.empty(0)).is_meta else None
    if meta is not None:
        raise ValueError(f"{type(model).__name__} is on the 'meta' device ({meta!r} holds no values): load its weights "
                         f"first (model.to_empty(device=...) and load_state_dict), then explain it")
    composite = as_composite(rule)
    first_layer, first_call_only = _first_layer(model)
    state = ExplainState(rules=composite.assign(model, first_layer), fused=bool(fused),
                         attention=composite.attention)
    layers = [m for m in state.rules if isinstance(m, ExplainableAffine)]
    if not has_torchlrp_layers(state.rules):
        raise ValueError(f"{type(model).__name__} contains no torchlrp layer to explain; build it from "
                         f"torchlrp.Linear/Conv2d/... or convert it with torchlrp.convert(model)")
    names = {module: name for name, module in model.named_modules()}
    state.first_layer = first_layer if first_layer is not None else next(iter(layers), None)
    if first_call_only and state.first_layer is not None:
        state.repeat_rule = composite.rule_for(names[state.first_layer], state.first_layer, is_first=False)
    if pattern is not None:
        state.patterns = patterns_by_module(model, pattern)
    for module in layers:
        if state.rules[module].needs_pattern and module not in state.patterns:
            raise ValueError(f"rule {state.rules[module]!r} needs a pattern for layer {names[module]!r}; pass "
                             f"pattern=torchlrp.patterns.fit_patternnet(model, loader)")
    if not isinstance(getattr(model, "graph", None), torch.fx.Graph):  # convert decided folds and marks per call
        uses = Counter(module for _, module in model.named_modules(remove_duplicate=False))
        tied = {module for module, count in uses.items() if count > 1}
        if state.first_layer in tied and state.repeat_rule is None:
            state.counts_first_calls = True
            state.repeat_rule = composite.rule_for(names[state.first_layer], state.first_layer, is_first=False)
        for container in model.modules():
            if isinstance(container, torch.nn.Sequential):
                _scan_sequential(container, names, state, tied)
    return state


@contextmanager
def rules_applied(model: torch.nn.Module, rule: "str | Rule | Composite" = "epsilon",
                  pattern: PatternsLike | None = None, fused: bool = False) -> Iterator[ExplainState]:
    """Put ``model`` in explain mode with ``rule`` while the context is active (in this thread).

    Parameters
    ----------
    model : torch.nn.Module
        A model containing torchlrp layers (see :func:`torchlrp.convert`).
    rule : str, Rule or Composite
        One rule for every layer, or a composite choosing per layer.
    pattern : dict, list or None
        PatternNet patterns (see :mod:`torchlrp.patterns`), required by the pattern rules.
    fused : bool
        Run the rules' elementwise work as ``torch.compile``'d kernels (one pass each instead of one per
        operation; compiled on first use, see :mod:`torchlrp.functional.kernels`). Same results.

    Yields
    ------
    ExplainState
        The active decisions (``state.rules[module]`` is a module's rule).

    Raises
    ------
    ValueError
        If the model has no torchlrp layer, a rule is invalid, a batch norm, dropout or stochastic depth module is
        in training mode, or a pattern rule lacks patterns.
    RuntimeError
        Under ``torch.inference_mode()``.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("explain mode records a backward, which torch.inference_mode() forbids; call "
                           "torchlrp.explain(...) (it leaves inference mode for its own call) or explain outside "
                           "inference_mode")
    state = build_state(model, rule, pattern, fused)
    handles = []
    token = ACTIVE.set(state)
    try:
        pooling = _when_active(state, _proportional_pool(state))
        skip = _when_active(state, _skip)
        max_pooling = _when_active(state, _proportional_max_pool(state))
        for module, module_rule in state.rules.items():
            if isinstance(module, AveragePooling):
                handles.append(module.register_forward_hook(pooling))
            elif isinstance(module, TORCH_MAX_POOLINGS) and not module_rule.propagates_gradient:
                window_mean(module)  # a max pooling the proportional split cannot take fails here, clearly
                handles.append(module.register_forward_hook(max_pooling))
        for batchnorm in state.batchnorms.values():
            handles.append(batchnorm.register_forward_hook(skip))
        out_of_place = _out_of_place(state)
        modules = list(model.modules())
        for module in modules:
            if _attribute(module, "inplace") is True:
                handles.append(module.register_forward_pre_hook(out_of_place))
        softmax = final_softmax(model)
        if softmax is not None:
            handles.append(softmax.register_forward_hook(_when_active(state, _output_softmax(state))))
        conversion = next((record for module in modules if isinstance(
            record := _attribute(module, RUN_TIME_ATTRIBUTE), RunTimeConversion)), None)
        if conversion is not None:
            run_time = RunTimeOperations(state, as_composite(rule), model, conversion)
            state.run_time = True
            with run_time:
                yield state
            run_time.report()
        else:
            yield state
    finally:
        ACTIVE.reset(token)
        for handle in handles:
            handle.remove()


def retrying_after_in_place(model: torch.nn.Module, explanation: Callable[[], Any]) -> Any:
    """Run ``explanation()``; run it once more where it failed because the forward updated in place a tensor its
    backward kept, in a model explained at run time that an earlier explanation had found to update nothing in
    place (its copies were off: :class:`torchlrp.core.state.InPlaceRecord`; this run has turned them on).

    Parameters
    ----------
    model : torch.nn.Module
        The explained model.
    explanation : callable
        One explanation (forward and backward).

    Returns
    -------
    Any
        What ``explanation`` returns.
    """
    records = [record.in_place for module in model.modules()
               if isinstance(record := _attribute(module, RUN_TIME_ATTRIBUTE), RunTimeConversion)
               and record.in_place.updates is False]
    try:
        return explanation()
    except RuntimeError:
        if not any(record.updates for record in records):
            raise
    return explanation()


__all__ = ["SIGN_PRESERVING", "build_state", "current", "final_softmax",
           "retrying_after_in_place",
           "has_torchlrp_layers", "rules_applied"]
