"""The SHA-256 digests a store records: of a model's parameters and architecture, of a rule's exact definition, of
each chunk's input samples."""
from __future__ import annotations

import hashlib
import inspect
from typing import Any

import numpy as np
import torch
from torch import Tensor


def parameters_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state: the names, shapes, dtypes and values of its parameters and buffers.

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    str
        The hex digest (equal for equal state dicts, on any device).
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, Tensor):
            continue
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(values.shape)}:{values.dtype}".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def architecture_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's architecture: every module's path, type, ``extra_repr`` and the source of its forward.

    Two models with equal parameters but another activation (``ReLU`` vs ``LeakyReLU(0.5)``) differ here, where
    :func:`parameters_sha256` cannot tell them apart.

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    str
        The hex digest.
    """
    digest = hashlib.sha256()
    for name, module in model.named_modules(remove_duplicate=False):
        kind = type(module)
        try:
            source = inspect.getsource(kind.forward)
        except (OSError, TypeError):  # built at run time or compiled: its name stands for it
            source = getattr(kind.forward, "__qualname__", "")
        digest.update(f"{name}:{kind.__module__}.{kind.__qualname__}:{module.extra_repr()}:{source}\n".encode())
    return digest.hexdigest()


def definition_sha256(value: Any) -> str:
    """SHA-256 of a rule's or composite's exact definition: its type and every public attribute, tensors by their
    bytes and floats by their exact value (``repr`` abbreviates long tensors and rounds them).

    Parameters
    ----------
    value : Rule, Composite or any value
        What to hash.

    Returns
    -------
    str
        The hex digest.
    """
    digest = hashlib.sha256()

    def feed(item: Any) -> None:
        if isinstance(item, Tensor):
            values = item.detach().cpu().contiguous()
            digest.update(f"tensor:{values.dtype}:{tuple(values.shape)}:".encode())
            digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(item, float):
            digest.update(f"float:{item.hex()};".encode())
        elif isinstance(item, dict):
            digest.update(f"dict:{len(item)}:".encode())
            for key, entry in sorted(item.items(), key=lambda pair: repr(pair[0])):
                feed(key)
                feed(entry)
        elif isinstance(item, (tuple, list, set, frozenset)):
            digest.update(f"{type(item).__name__}:{len(item)}:".encode())
            for entry in (sorted(item, key=repr) if isinstance(item, (set, frozenset)) else item):
                feed(entry)
        elif isinstance(item, type):
            digest.update(f"type:{item.__module__}.{item.__qualname__};".encode())
        elif hasattr(item, "__dict__") and type(item).__module__.startswith("torchlrp"):
            digest.update(f"object:{type(item).__module__}.{type(item).__qualname__}:".encode())
            feed({key: entry for key, entry in vars(item).items() if not key.startswith("_")})
        else:
            digest.update(f"{type(item).__name__}:{item!r};".encode())

    feed(value)
    return digest.hexdigest()


def data_fingerprint(inputs: Tensor, labels: Tensor | None) -> np.ndarray:
    """The fingerprint a store records for a chunk: the SHA-256 of its inputs' (and labels') dtype, shape and bytes.

    Parameters
    ----------
    inputs : Tensor
        The chunk's collated inputs.
    labels : Tensor or None
        Its labels.

    Returns
    -------
    ndarray
        ``(32,)`` uint8.
    """
    digest = hashlib.sha256()
    for tensor in (inputs, labels):
        if tensor is None:
            digest.update(b"none;")
            continue
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{values.dtype}:{tuple(values.shape)}:".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return np.frombuffer(digest.digest(), dtype=np.uint8).copy()
