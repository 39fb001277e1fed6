"""Intermediate relevances: a hook-based trace collector, with per-layer conservation.

``with lrp.trace.collect(model) as trace:`` records, during a backward inside the block, the relevance at the input
of each selected module (and of the model, as ``"input"``), keyed by dotted module name in forward order. Hooks
are attached to the modules for the duration of the block only, and only calls made in the thread that opened it
are recorded, so concurrent or nested traces never mix. TorchLRP's ``enable_and_clean``/``collect_and_disable``
remain as a thin layer (state kept per thread/context, see :mod:`torchlrp.core.recorder`).
"""
from __future__ import annotations

import fnmatch
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor

from torchlrp.core.kinds import MIXING, MaxPooling
from torchlrp.core.recorder import recorder
from torchlrp.modules.affine import ExplainableAffine

INPUT = "input"


class Trace(OrderedDict):
    """Ordered mapping from dotted module name to the relevance at that module's input (forward order).

    Attributes
    ----------
    start : Tensor or None
        The relevance the backward started from (the gradient at the model output).
    """

    start: Tensor | None = None

    def layerwise(self) -> list[Tensor]:
        """Return the relevances output-to-input, like the seeds' ``lrp_layerwise``.

        Returns
        -------
        list of Tensor
            The recorded relevances, the model input's last.
        """
        return list(reversed(self.values()))

    def conservation(self) -> "LayerSums":
        """Return the per-layer, per-sample relevance sums and their ratios to the start relevance.

        Returns
        -------
        LayerSums
            The report; ``print`` it for a table.
        """
        return conservation(self)


@dataclass
class LayerSums:
    """Per-layer relevance sums of a trace (``sums[name]``: one per sample) and their ratios to the start relevance."""

    start: Tensor
    sums: "OrderedDict[str, Tensor]"

    @property
    def ratios(self) -> "OrderedDict[str, Tensor]":
        """Per layer, each sample's relevance sum divided by its start relevance sum."""
        return OrderedDict((name, total / self.start) for name, total in self.sums.items())

    def __str__(self) -> str:
        rows = [f"{'layer':<28} {'sum (mean over samples)':>24} {'ratio to start':>16}",
                f"{'(output)':<28} {float(self.start.mean()):>24.6g} {1.0:>16.2%}"]
        for name, total in self.sums.items():
            ratio = total / self.start
            rows.append(f"{name:<28} {float(total.mean()):>24.6g} {float(ratio.mean()):>16.2%}")
        return "\n".join(rows)


def conservation(trace: Trace) -> LayerSums:
    """Per layer and per sample: the relevance sum and its ratio to the start relevance.

    Parameters
    ----------
    trace : Trace
        A trace filled by :func:`collect`.

    Returns
    -------
    LayerSums
        The report.

    Raises
    ------
    ValueError
        If the trace recorded no backward.
    """
    if trace.start is None or not trace:
        raise ValueError("the trace holds no relevance: run the backward inside `with trace.collect(model)`")
    start = trace.start.flatten(1).sum(1).double()
    sums = OrderedDict((name, r.flatten(1).sum(1).double().to(start.device)) for name, r in trace.items())
    return LayerSums(start, sums)


def inline_blocks(model: torch.nn.Module) -> dict[str, str]:
    """The blocks of a converted model that its graph runs inline, each with the called module making its output.

    ``torch.fx`` traces through a transformer block or a ResNet bottleneck, so the block itself is never called;
    hooks that need the block's output attach to the module that produces it.

    Parameters
    ----------
    model : torch.nn.Module
        A model made by :func:`torchlrp.convert` (any other model has none).

    Returns
    -------
    dict of str to str
        Dotted block name -> dotted name of the module whose output is the block's.
    """
    return {path: target for path, (target, _) in inline_block_calls(model).items()}


def inline_block_calls(model: torch.nn.Module) -> dict[str, tuple[str, int]]:
    """As :func:`inline_blocks`, with which call of that module (0 for its first in a forward) is the block's output.

    A module the graph calls more than once (torchvision's ``BasicBlock`` applies one ``ReLU`` twice) makes the
    block's output at one of its calls only.

    Parameters
    ----------
    model : torch.nn.Module
        A model made by :func:`torchlrp.convert` (any other model has none).

    Returns
    -------
    dict of str to (str, int)
        Dotted block name -> (dotted module name, index of the call among that module's calls in one forward).
    """
    graph = getattr(model, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return {}
    nodes = list(graph.nodes)
    called = {node.target for node in nodes if node.op == "call_module"}
    inside: dict[str, list[torch.fx.Node]] = {}
    for node in nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            if path and path not in called:
                inside.setdefault(path, []).append(node)
    blocks = {}
    for path, members in inside.items():
        members_set = set(members)
        leaving = [node for node in members if any(user not in members_set for user in node.users)]
        if len(leaving) == 1 and leaving[0].op == "call_module":
            same = [node for node in nodes if node.op == "call_module" and node.target == leaving[0].target]
            blocks[path] = (leaving[0].target, same.index(leaving[0]))
    return blocks


def _selected(model: torch.nn.Module, layers: Iterable[str | type] | None) -> list[tuple[str, torch.nn.Module]]:
    if layers is None:
        return [(n, m) for n, m in model.named_modules()
                if isinstance(m, (ExplainableAffine, *MIXING)) and not isinstance(m, MaxPooling)]
    patterns = [layer for layer in layers if isinstance(layer, str)]
    types = tuple(layer for layer in layers if isinstance(layer, type))
    bad = [layer for layer in layers if not isinstance(layer, (str, type))]
    if bad:
        raise ValueError(f"layers must be module names (globs) or module classes, got {bad}")
    chosen = [(n, m) for n, m in model.named_modules() if n and (
        any(fnmatch.fnmatchcase(n, p) for p in patterns) or (types and isinstance(m, types)))]
    if not chosen and layers:
        raise ValueError(f"no module of {type(model).__name__} matches layers={list(layers)}")
    return chosen


@contextmanager
def collect(model: torch.nn.Module, layers: Iterable[str | type] | None = None,
            to: torch.device | str | None = None) -> Iterator[Trace]:
    """Record the relevance at the input of modules during a backward inside the block.

    A block that a model made by :func:`torchlrp.convert` runs inline (a transformer block, a ResNet bottleneck:
    ``torch.fx`` traced through it, so it is never called) is recorded at its *output* instead: the relevance of
    the tensor it returns, which the next block receives (the last one's, what the head gets).

    Parameters
    ----------
    model : torch.nn.Module
        The model (Sequential or not).
    layers : iterable of str or type, optional
        Modules to watch, by dotted name (glob patterns allowed) or class. Default: every torchlrp layer and
        mixing layer (average pooling, residual sums), not max pooling. The model input is always recorded as
        ``"input"``.
    to : torch.device or str, optional
        Move the recorded (detached) relevances there, e.g. ``"cpu"``.

    Yields
    ------
    Trace
        Filled during the backward; entries in forward order.
    """
    trace = Trace()
    owner = threading.get_ident()
    handles = []

    def store(name: str):
        def hook(relevance: Tensor) -> None:
            relevance = relevance.detach()
            relevance = relevance if to is None else relevance.to(to)
            trace[name] = relevance if trace.get(name) is None else trace[name] + relevance
        return hook

    def watch(name: str):
        def pre_hook(module: torch.nn.Module, args: tuple) -> tuple | None:
            if threading.get_ident() != owner:
                return None
            watched = []
            for index, arg in enumerate(args):
                if isinstance(arg, Tensor) and arg.requires_grad:
                    view = arg.view_as(arg)
                    key = name if index == 0 else f"{name}[{index}]"
                    trace.setdefault(key, None)
                    view.register_hook(store(key))
                    arg = view
                watched.append(arg)
            return tuple(watched)
        return pre_hook

    def watch_output(module: torch.nn.Module, args: tuple, output: Tensor) -> None:
        if threading.get_ident() == owner and isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(lambda g: setattr(trace, "start", g.detach() if to is None else g.detach().to(to)))

    def watch_block_output(name: str):
        def hook(module: torch.nn.Module, args: tuple, output: Tensor) -> None:
            if threading.get_ident() == owner and isinstance(output, Tensor) and output.requires_grad:
                trace.setdefault(name, None)
                output.register_hook(store(name))
        return hook

    handles.append(model.register_forward_pre_hook(watch(INPUT)))
    handles.append(model.register_forward_hook(watch_output))
    inline = inline_blocks(model)
    for name, module in _selected(model, layers):
        if name in inline:
            handles.append(model.get_submodule(inline[name]).register_forward_hook(watch_block_output(name)))
        else:
            handles.append(module.register_forward_pre_hook(watch(name)))
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()
        for name in [n for n, r in trace.items() if r is None]:
            del trace[name]


def enable_and_clean() -> None:
    """TorchLRP API: start recording the relevance at each torchlrp layer's input (in this thread/context).

    Call it any time before the backward: before the explain-mode forward or between it and ``backward()``
    (TorchLRP's order).
    """
    trace = recorder()
    trace.relevances = []
    trace.enabled = True


def collect_and_disable() -> list[Tensor]:
    """TorchLRP API: stop recording and return the relevances, in backward order (output side first).

    Returns
    -------
    list of Tensor
        One relevance per torchlrp layer call in the backward.
    """
    trace = recorder()
    recorded, trace.relevances, trace.enabled = trace.relevances, [], False
    return recorded
