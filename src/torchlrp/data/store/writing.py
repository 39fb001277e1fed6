"""Writing a store: creating it (or checking an existing one against the run's settings) and writing chunks."""
from __future__ import annotations

import errno
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from torchlrp.data.store.schema import MATCHING_SETTINGS, check_layout, create_arrays, require_zarr, store_name


def create_or_check(store: Any, settings: dict, storage_options: dict | None) -> None:
    """Create a store for a run, or check that an existing one was made by the same run.

    The settings are written before any array, with ``"creating": true`` until every array exists: a store whose
    creation was interrupted is recognised and created again by the same run.

    Parameters
    ----------
    store : str, os.PathLike or zarr store
        Where.
    settings : dict
        From :func:`run_settings`.
    storage_options : dict or None
        For fsspec URLs.

    Raises
    ------
    ValueError
        For a store made by another run (the message lists what differs), a path that is a file or a folder that is
        not a Zarr store, a Zarr store torchlrp did not make, or a store another process is creating at the same
        moment; nothing is written into it.
    StoreDamagedError
        For a store whose layout does not match its settings.
    PermissionError
        For a store that cannot be written.
    """
    zarr = require_zarr()
    name = store_name(store)
    if isinstance(store, (str, os.PathLike)) and os.path.lexists(store) and not os.path.isdir(store):
        raise ValueError(f"{name!r} is a file, not a Zarr store; it is not written into: give a new path "
                         f"(e.g. relevance.zarr)")
    try:
        existing = zarr.open_group(store, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        existing = None
    if existing is None and isinstance(store, (str, os.PathLike)) and os.path.isdir(store) and os.listdir(store):
        raise ValueError(f"{name!r} is a folder that is not a Zarr store; it is not written into: give a new path "
                         f"(e.g. relevance.zarr)")
    if existing is not None:
        _check_existing(store, existing, settings, name, storage_options)
        return
    try:
        group = zarr.open_group(store, mode="w-", storage_options=storage_options,  # settings in its first write
                                attributes={"torchlrp": {**settings, "creating": True}})
        create_arrays(group, settings)
        group.attrs.update({"torchlrp": settings})
    except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError):
        raise ValueError(f"another process created the store {name!r} at the same moment; nothing was written. Run "
                         f"one explain_dataset per store (under torchrun, rank 0 creates it), then run this call "
                         f"again to continue") from None
    except OSError as error:
        _raise_unwritable(error, name)
        raise


def _raise_unwritable(error: OSError, name: str) -> None:
    """Raise PermissionError for an OSError that says the store cannot be written (by errno, not by its text)."""
    if isinstance(error, (PermissionError, NotADirectoryError)) or error.errno in (errno.EROFS, errno.EACCES,
                                                                                     errno.EPERM):
        raise PermissionError(f"cannot write the store {name!r}: {error.strerror or error}. Give a writable "
                              f"path") from None


def _check_existing(store: Any, existing: Any, settings: dict, name: str, storage_options: dict | None) -> None:
    """An existing store may be continued by this run: same settings, intact layout, writable (see create_or_check)."""
    zarr = require_zarr()
    found = dict(existing.attrs).get("torchlrp")
    if not isinstance(found, dict):
        raise ValueError(f"{name!r} is a Zarr store that torchlrp did not make; it is not written into: give a "
                         f"new path")
    differ = [key for key in MATCHING_SETTINGS if found.get(key) != settings[key]]
    if differ:
        shown = {"rule_sha256": "rule", "architecture_sha256": "model"}  # names, for digests that differ
        details = "; ".join(f"{shown.get(key, key)}: store {found.get(shown.get(key, key))!r}, now "
                            f"{settings[shown.get(key, key)]!r}" for key in differ)
        if "rule_sha256" in differ and found.get("rule") == settings["rule"]:
            details += " (same name, other parameters)"
        if "architecture_sha256" in differ and found.get("model") == settings["model"]:
            details += " (same name, another architecture: other modules or forward code)"
        raise ValueError(f"the store {name!r} was made by another run ({details}); nothing was written. Give a "
                         f"new store path, or delete this one to start over")
    read_only = getattr(store, "read_only", False) is True or (
        isinstance(store, (str, os.PathLike)) and os.path.isdir(store) and not os.access(store, os.W_OK))
    if read_only:
        raise PermissionError(f"the store {name!r} is read-only; nothing was written. Make it writable to "
                              f"continue the run, or give a new path")
    if found.get("creating"):  # stopped while creating: nothing can have been written yet
        try:
            group = zarr.open_group(store, mode="r+", storage_options=storage_options)
            create_arrays(group, settings)
            group.attrs.update({"torchlrp": settings})
        except OSError as error:
            _raise_unwritable(error, name)
            raise
        return
    check_layout(existing, found, name)


def write_chunk(group: Any, chunk: int, start: int, arrays: dict[str, np.ndarray]) -> None:
    """Write one chunk's arrays, then mark the chunk done (last, so that a chunk counts only once all of it is in).

    Parameters
    ----------
    group : zarr.Group
        The store, open for writing.
    chunk : int
        The chunk's number.
    start : int
        Its first sample.
    arrays : dict of str to ndarray
        Values of ``relevance``, ``scale``, ``logits``, ``prediction``, ``target``, ``label`` and ``index`` for the
        chunk's samples, and its ``fingerprint`` (:func:`data_fingerprint`).
    """
    stop = start + len(arrays["index"])
    for name, values in arrays.items():
        if name == "fingerprint":
            group[name][chunk] = values
        else:
            group[name][start:stop] = values
    group["done"][chunk] = True


def scaled_for_storage(relevance: Tensor, dtype: str) -> tuple[Tensor, Tensor]:
    """Relevance divided by a per-sample scale, and the scale.

    Parameters
    ----------
    relevance : Tensor
        ``(N, ...)`` relevance.
    dtype : str
        The store's relevance dtype: for ``"float16"`` the scale is each sample's peak ``|R|`` rounded up to a power
        of two (dividing by it is exact), else 1.

    Returns
    -------
    (Tensor, Tensor)
        ``relevance / scale`` and ``scale`` (``(N,)``, float32).
    """
    if dtype != "float16":
        return relevance, torch.ones(len(relevance), dtype=torch.float32, device=relevance.device)
    peak = relevance.flatten(1).abs().amax(1).float()
    _, exponent = torch.frexp(peak)
    scale = torch.where(peak > 0, torch.ldexp(torch.ones_like(peak), exponent), torch.ones_like(peak))
    return relevance / scale.to(relevance.dtype).view(-1, *[1] * (relevance.dim() - 1)), scale
