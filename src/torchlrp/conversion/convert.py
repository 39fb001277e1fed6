"""Conversion of torch models into explainable ones, operation by operation: :func:`convert`.

:func:`convert` copies a model, swaps its layers for their torchlrp twins (``Linear``, convolutions, transposed
convolutions, ``ReLU``, the other activations, normalizations) and traces it with ``torch.fx``. Every call in the
trace through which relevance flows is looked up in the operation table (:mod:`torchlrp.operations`): calls whose
gradient already is their relevance rule (``cat``, ``view``, ``permute``, max pooling, dropout) stay; the others
(``x + y``, ``x.mean(...)``, ``F.silu(x)``, ``gate * x``, ``F.layer_norm``) are replaced by operation modules
registered inside the module whose forward made the call (``features.1.add``). The trace also decides, per call:
batch norms fed by a linear/conv layer are folded into it, a layer's input is non-negative (it follows a ReLU), a
layer or sum feeds a ReLU (explained together with it), and which layer the input meets first. The result is a
``torch.fx.GraphModule`` that keeps the model's submodules and ``state_dict`` (folded batch norms aside) and
computes the same outputs; anything unknown is reported in one :class:`ConversionError`. A model ``torch.fx``
cannot trace keeps its forward, and the run-time engine (:mod:`torchlrp.conversion.runtime`) explains its calls from
the same table.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch.fx import Graph, GraphModule

from torchlrp.conversion.errors import ConversionError, is_allowed
from torchlrp.conversion.fusion import written_activation_types
from torchlrp.conversion.graph import CONTAINERS, GraphPass
from torchlrp.conversion.tracing import LeafTracer
from torchlrp.conversion.twins import swap_twins
from torchlrp.core.state import InPlaceRecord
from torchlrp.core.training import in_training_mode
from torchlrp.operations.default import default_registry
from torchlrp.operations.registry import OperationRegistry


@dataclass(eq=False)
class RunTimeConversion:
    """What :func:`convert` records on a model ``torch.fx`` cannot trace (its attribute ``torchlrp_conversion``),
    for the run-time engine that explains its forward call by call.

    Attributes
    ----------
    allow_gradient : tuple of str
        The calls that may pass their gradient (``convert``'s ``allow_gradient``).
    written_activations : dict
        Module class -> whether it is an activation written as a formula of its input (judged once, here).
    registry : OperationRegistry
        The operation table the model was converted with.
    in_place : InPlaceRecord
        Whether the forward updates tensors that carry relevance in place (learnt by the first explanation).
    """

    allow_gradient: tuple[str, ...]
    written_activations: dict[type, bool]
    registry: OperationRegistry
    in_place: InPlaceRecord = field(default_factory=InPlaceRecord)


#: the attribute of a converted model that holds its :class:`RunTimeConversion`
RUN_TIME_ATTRIBUTE = "torchlrp_conversion"


def _run_time(model: torch.nn.Module, registry: OperationRegistry, allowed: set[str]) -> torch.nn.Module:
    """``model`` (its layers converted) marked to be explained at run time, call by call, from the same table."""
    setattr(model, RUN_TIME_ATTRIBUTE, RunTimeConversion(tuple(sorted(allowed)), written_activation_types(model),
                                                         registry))
    return model


def graph_module(model: torch.nn.Module, graph: Graph) -> GraphModule:
    """A GraphModule running ``graph`` that keeps the model's submodules (containers included) and attributes."""
    graph.lint()
    module = GraphModule(model, graph, class_name=type(model).__name__)
    for name, child in model.named_children():
        setattr(module, name, child)
    for name, value in vars(model).items():
        if not name.startswith("_") and name not in vars(module) and name != "training":
            setattr(module, name, value)
    module.training = model.training
    module._tracer_cls = None  # unpickling re-traces the generated code with fx's own tracer (every call a leaf)
    return module


def check_leaves(model: torch.nn.Module, registry: OperationRegistry, allowed: set[str]) -> list[tuple[str, str]]:
    """Module-only check for models that torch.fx cannot trace: torch's own leaf modules need a registry entry;
    other leaf modules run their forward under :class:`torchlrp.conversion.runtime.RunTimeOperations`."""
    unsupported, inside_known = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_known):
            continue  # explained by the registered module that holds it (the attention's out_proj)
        if next(module.children(), None) is not None:
            if registry.for_module(module) is not None and name:
                inside_known.append(name)
            continue
        if isinstance(module, CONTAINERS):
            continue  # an empty ModuleList (a stage without downsampling): holds nothing to explain
        if is_allowed(name, allowed) or not type(module).__module__.startswith("torch."):
            continue  # a leaf module of its own (GELUActivation): its calls are explained at run time
        if registry.for_module(module) is None:
            unsupported.append((name, type(module).__name__))
        elif hasattr(module, "inplace"):
            module.inplace = False
    return unsupported


def convert(model: torch.nn.Module, inplace: bool = False, allow_gradient: Iterable[str] = (),
            registry: OperationRegistry | None = None) -> torch.nn.Module:
    """Return an explainable copy of any model.

    Layers become their torchlrp twins (same parameters); the model is traced with ``torch.fx`` and every
    operation through which relevance flows gets its rule from the operation registry (sums split relevance
    between their summands, means and average pooling proportionally, gates pass it to the features, element-wise
    activations pass it unchanged, normalizations are explained as the affine maps they are; see the README's
    operation table). Batch norms fed by a linear/conv layer are folded into it (eval-mode outputs unchanged:
    convert a trained model in eval mode). Per call, the trace marks layers whose input follows a ReLU
    (non-negative input), layers and sums that feed a ReLU (explained together with it) and the first layer the
    input meets (a composite's ``first`` rule). These marks describe the model as converted: after changing its
    modules, convert it again.

    Parameters
    ----------
    model : torch.nn.Module
        Any model, e.g. any torchvision CNN classifier.
    inplace : bool
        Modify ``model``'s modules instead of those of a deep copy (the returned model shares them).
    allow_gradient : iterable of str
        Dotted module paths or fx node names (globs allowed) that may pass relevance by their plain gradient
        although torchlrp has no rule for them (such modules are not traced into).
    registry : OperationRegistry, optional
        The operations and their rules; default :func:`torchlrp.default_registry`.

    Returns
    -------
    torch.nn.Module
        A ``torch.fx.GraphModule`` with the model's submodules, attributes and outputs; a ``Sequential`` of layers
        stays a ``Sequential`` (explained by position). Where ``torch.fx`` cannot trace the model (data-dependent
        control flow), the model itself with its modules converted, and a warning.

    Raises
    ------
    ConversionError
        Listing every module (dotted path and type) or operation (fx node name) whose relevance cannot be
        propagated.
    TypeError
        If ``model`` is not a module, or is a TorchScript module.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"convert cannot explain a TorchScript model ({type(model).__name__}): scripting compiled its "
                        f"Python forward away, and the rules replace that code. Convert the nn.Module you scripted "
                        f"(before torch.jit.script / torch.jit.trace)")
    training = in_training_mode(model)
    if training:
        warnings.warn(f"{type(model).__name__} is in training mode ({training[0]!r}{', ...' if len(training) > 1 else ''}"
                      f"): convert folds batch norms with their running statistics, and explanations are of the "
                      f"eval-mode model (explaining raises while such modules are in training mode); call "
                      f"model.eval() before converting", stacklevel=2)
    model = model if inplace else copy.deepcopy(model)
    registry = default_registry() if registry is None else registry
    allowed = set(allow_gradient)
    swap_twins(model)
    try:
        graph = LeafTracer(registry, allowed).trace(model, concrete_args=_sequential_options(model))
    except Exception as error:  # noqa: BLE001 -- torch.fx raises many kinds (TraceError, NameError for a module
        # created in the forward, TypeError, ...): the model is explained at run time, where anything without a
        # rule raises a ConversionError
        unsupported = check_leaves(model, registry, allowed)
        if unsupported:
            raise ConversionError(unsupported) from None
        warnings.warn(f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {error}); its layers "
                      f"were converted and the operations of its forward (sums, products, softmax, attention, "
                      f"means) are explained at run time (torchlrp.conversion.runtime)", stacklevel=2)
        return _run_time(model, registry, allowed)
    analysis = GraphPass(model, graph, registry, allowed)
    analysis.run()
    if analysis.updates_in_place:  # (found before the pass changed anything)
        warnings.warn(f"{type(model).__name__} updates tensors in place that it reads again "
                      f"({', '.join(analysis.updates_in_place[:3])}{', ...' if len(analysis.updates_in_place) > 3 else ''}"
                      f"); its layers were converted and its forward is explained at run time, as it runs",
                      stacklevel=2)
        return _run_time(model, registry, allowed)
    if analysis.unsupported:
        raise ConversionError(analysis.unsupported)
    if analysis.folded:
        model._register_load_state_dict_pre_hook(FoldedStateDictGuard(analysis.folded))
    if isinstance(model, torch.nn.Sequential) and not analysis.insertions and analysis.is_chain():
        return model
    for container, name, replacement in analysis.insertions:
        container.add_module(name, replacement)
    converted = graph_module(model, graph)
    if analysis.folded:
        converted._register_load_state_dict_pre_hook(FoldedStateDictGuard(analysis.folded))
    return converted


class FoldedStateDictGuard:
    """Refuses, before any parameter is touched, a state dict of the model as it was before batch norms were folded.

    ``convert`` folds a batch norm into the layer before it: that layer's weight and bias change and the batch
    norm's keys disappear. The original model's state dict then does not fit (with ``strict=False`` it would
    silently load unfolded weights). Load such weights into the original model and convert it again; a converted
    model's own ``state_dict()`` loads as usual.

    Parameters
    ----------
    folded : dict of str to str
        Path of each folded batch norm -> path of the layer it was folded into.
    """

    def __init__(self, folded: dict[str, str]) -> None:
        self.folded = dict(folded)

    def __call__(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Raise ``ValueError`` if ``state_dict`` holds parameters or statistics of a folded batch norm."""
        for norm, layer in self.folded.items():
            stale = [key for key in state_dict if key.startswith(f"{prefix}{norm}.")]
            if stale:
                raise ValueError(f"this state dict holds batch norm {norm!r} ({stale[0]!r}, ...), which "
                                 f"torchlrp.convert folded into layer {layer!r}: it belongs to the unconverted model. "
                                 f"Load it into the original model and convert that again "
                                 f"(lrp.convert(model)); nothing was loaded")


def _sequential_options(model: torch.nn.Module) -> dict[str, Any] | None:
    """For a Sequential (e.g. ``torchlrp.Sequential``, whose forward takes ``explain=``...): its options' defaults,
    so that the trace follows the plain forward."""
    if not isinstance(model, torch.nn.Sequential):
        return None
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty} or None


__all__ = ["ConversionError", "FoldedStateDictGuard", "RUN_TIME_ATTRIBUTE", "RunTimeConversion", "convert"]
