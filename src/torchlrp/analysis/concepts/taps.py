"""Taps: the tensors at named layers of one forward, as distinct autograd nodes a backward can stop at or mask."""
from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import Tensor

from torchlrp.explanation.trace import inline_block_calls, inline_blocks
from torchlrp.analysis.concepts.definitions import Concepts


def check_layers(model: torch.nn.Module, layers: Mapping[str, Concepts]) -> None:
    """Raise ``ValueError`` for a layer name that is not one of ``model``'s modules.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    layers : mapping of str to Concepts
        Layer names and the concept definitions read there.
    """
    names = dict(model.named_modules())
    inline = inline_blocks(model)
    for name, concepts in layers.items():
        if not isinstance(name, str) or not name or name not in names:
            close = [n for n in names if n and isinstance(name, str) and (name in n or n in name)][:5]
            raise ValueError(f"layer {name!r} is not a module of {type(model).__name__}" +
                             (f" (close: {close})" if close else "") + "; give dotted names from "
                             "model.named_modules()")
        if name in inline and concepts.at == "input":
            raise ValueError(f"layer {name!r} runs inline in the converted model (it is never called), so its "
                             f"input cannot be tapped; tap the output (at='output') or one of its submodules")


@contextmanager
def tapped(model: torch.nn.Module, layers: Mapping[str, Concepts]) -> Iterator[dict[str, Tensor]]:
    """Record, in forward order, the tensor each layer produces (or receives, ``at="input"``) during the block.

    Each recorded tensor is the layer's own tensor, and the model goes on with a copy of it: a backward can stop at
    the tap (``torch.autograd.grad(..., inputs=tap)``), a hook on it sees exactly the relevance at that layer, and
    an in-place operation after the layer (VGG's ``ReLU(inplace=True)``) changes the copy, not the recorded
    activation. Only calls in the thread that opened the block are recorded.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    layers : mapping of str to Concepts
        Layer names (see :func:`check_layers`) and their concept definitions.

    Yields
    ------
    dict of str to Tensor
        Filled during the forward, in forward order.

    Raises
    ------
    ValueError
        (During the forward) if a layer is called twice: a concept needs one tensor per layer.
    """
    check_layers(model, layers)
    inline = inline_block_calls(model)
    taps: dict[str, Tensor] = {}
    calls: dict[str, int] = {}
    owner = threading.get_ident()
    handles = []

    def keep(name: str, tensor: object) -> object:
        if threading.get_ident() != owner or not isinstance(tensor, Tensor) or not tensor.requires_grad:
            return tensor
        if name in inline:  # the block's output is one particular call of the module making it
            calls[name] = calls.get(name, -1) + 1
            if calls[name] != inline[name][1]:
                return tensor
        if name in taps:
            raise ValueError(f"layer {name!r} is called more than once in one forward (a shared or reused "
                             f"module); a concept needs one tensor per layer: give the name of a module called once")
        taps[name] = tensor
        return tensor.clone()

    def on_output(name: str):
        def hook(module: torch.nn.Module, args: tuple, output: object) -> object:
            return keep(name, output)
        return hook

    def unfolded(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        # a layer explained together with the ReLU after it returns the rectified output; a tapped layer's
        # activation is its own (pre-ReLU, as the plain model's), so it is explained apart from the ReLU
        return args, {**kwargs, "feeds_rectifier": False}

    def on_input(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> tuple:
            return (keep(name, args[0]), *args[1:]) if args else args
        return hook

    try:
        for name, concepts in layers.items():
            if concepts.at == "input":
                handles.append(model.get_submodule(name).register_forward_pre_hook(on_input(name)))
            else:
                module = model.get_submodule(inline[name][0] if name in inline else name)
                if "feeds_rectifier" in inspect.signature(module.forward).parameters:
                    handles.append(module.register_forward_pre_hook(unfolded, with_kwargs=True))
                handles.append(module.register_forward_hook(on_output(name)))
        yield taps
    finally:
        for handle in handles:
            handle.remove()
