"""``torchlrp.store``: the Zarr store that :func:`torchlrp.dataset.explain_dataset` writes, and reading it back.

Layout (a Zarr v3 group; ``N`` samples, input shape ``S``, ``K`` classes), every array chunked by the run's batch
(chunk ``k`` of each array holds samples ``k * batch_size ...``):

========================  ===================  ===============================================================
array                     shape, dtype         holds
========================  ===================  ===============================================================
``relevance``             ``(N, *S)``, dtype   the relevance, divided by ``scale`` (read it with
                                               :func:`open_relevances`, which multiplies it back)
``scale``                 ``(N,)``, float32    per sample: a power of two (float16 stores: the sample's
                                               largest absolute relevance rounded up, so float16's narrow
                                               range keeps 11 bits relative to each heatmap's peak), else 1
``logits``                ``(N, K)``, float32  the model's scores
``prediction``            ``(N,)``, int64      the top class
``target``                ``(N,)``, int64      the class explained
``label``                 ``(N,)``, int64      the dataset's label (-1 where the dataset gives none)
``index``                 ``(N,)``, int64      the sample's index in the dataset
``done``                  ``(chunks,)``, bool  chunk written (written last)
========================  ===================  ===============================================================

The run's settings (model, its parameters' SHA-256, rule, target, dtype, torchlrp version, ...) are the group's
attribute ``"torchlrp"``; a store is only ever continued with the same settings.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .composites import as_composite

#: layout version of the store; a reader refuses stores of another version
STORE_FORMAT = 1
#: relevance dtypes a store can hold (bfloat16 has no numpy/Zarr type: float16 with the per-sample scale keeps more)
STORE_DTYPES = {torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}
#: settings that must be equal to continue a store
MATCHING_SETTINGS = ("format", "model", "parameters_sha256", "rule_definition", "target", "start", "samples",
                     "batch_size", "dtype", "input_shape", "classes")


def require_zarr() -> Any:
    """Import zarr.

    Returns
    -------
    module
        The ``zarr`` package (version 3 or later).

    Raises
    ------
    ImportError
        Without zarr, or with zarr 2; the message says how to install it.
    """
    try:
        import zarr
    except ImportError:
        raise ImportError("torchlrp.dataset stores relevance in Zarr: pip install 'zarr>=3' "
                          "(or pip install 'torchlrp[dataset]')") from None
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(f"torchlrp.dataset needs zarr>=3, found {zarr.__version__}: pip install -U 'zarr>=3'")
    return zarr


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


def store_dtype(dtype: Any) -> str:
    """The store's name of a relevance dtype.

    Parameters
    ----------
    dtype : torch.dtype or str
        ``torch.float16`` / ``"float16"``, float32 or float64.

    Returns
    -------
    str
        ``"float16"``, ``"float32"`` or ``"float64"``.

    Raises
    ------
    ValueError
        For any other dtype (bfloat16: no Zarr type).
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype not in STORE_DTYPES:
        allowed = ", ".join(f"torch.{name}" for name in STORE_DTYPES.values())
        hint = " (float16 keeps 11 bits relative to each heatmap's peak: use it)" if dtype == torch.bfloat16 else ""
        raise ValueError(f"dtype must be one of {allowed}; got {dtype!r}{hint}")
    return STORE_DTYPES[dtype]


def store_name(store: Any) -> str:
    """A store's path or URL, or the repr of a store object (for messages and reports).

    Parameters
    ----------
    store : str, os.PathLike or zarr store
        The store.

    Returns
    -------
    str
        Its name.
    """
    return os.fspath(store) if isinstance(store, (str, os.PathLike)) else repr(store)


def run_settings(model: torch.nn.Module, model_name: str | None, rule: Any, target: str | int, start: str,
                 samples: int, batch_size: int, dtype: str, input_shape: Sequence[int], classes: int) -> dict:
    """The settings of a run, as the store's attribute ``"torchlrp"`` holds them.

    Parameters
    ----------
    model : torch.nn.Module
        The model as the user gave it (its parameters are hashed).
    model_name : str or None
        Its name (default: the class name).
    rule : str, Rule or Composite
        The rule (its name and its composite's definition are recorded).
    target, start, samples, batch_size, dtype, input_shape, classes
        The run's other settings.

    Returns
    -------
    dict
        JSON-serializable settings; :data:`MATCHING_SETTINGS` must be equal to continue a store.
    """
    from . import __version__

    return {"format": STORE_FORMAT, "torchlrp_version": __version__,
            "model": model_name or type(model).__name__, "parameters_sha256": parameters_sha256(model),
            "rule": rule if isinstance(rule, str) else type(rule).__name__,
            "rule_definition": repr(as_composite(rule)), "target": target, "start": start,
            "samples": samples, "batch_size": batch_size, "dtype": dtype, "input_shape": list(input_shape),
            "classes": classes, "chunks": math.ceil(samples / batch_size)}


def create_or_check(store: Any, settings: dict, storage_options: dict | None) -> None:
    """Create a store for a run, or check that an existing one was made by the same run.

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
        For a store made by another run (the message lists what differs), a folder that is not a Zarr store, or a
        Zarr store torchlrp did not make; nothing is written into it.
    PermissionError
        For a store that cannot be written.
    """
    zarr = require_zarr()
    name = store_name(store)
    try:
        existing = zarr.open_group(store, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        existing = None
    if existing is None and isinstance(store, (str, os.PathLike)) and os.path.isdir(store) and os.listdir(store):
        raise ValueError(f"{name!r} is a folder that is not a Zarr store; it is not written into: give a new path "
                         f"(e.g. relevance.zarr)")
    if existing is not None:
        found = dict(existing.attrs).get("torchlrp")
        if not isinstance(found, dict):
            raise ValueError(f"{name!r} is a Zarr store that torchlrp did not make; it is not written into: give a "
                             f"new path")
        differ = [key for key in MATCHING_SETTINGS if found.get(key) != settings[key]]
        if differ:
            shown = {"rule_definition": "rule"}  # the rule's name; its full definition is long
            details = "; ".join(f"{shown.get(key, key)}: store {found.get(shown.get(key, key))!r}, now "
                                f"{settings[shown.get(key, key)]!r}" for key in differ)
            if "rule_definition" in differ and found.get("rule") == settings["rule"]:
                details += " (same name, other parameters)"
            raise ValueError(f"the store {name!r} was made by another run ({details}); nothing was written. Give a "
                             f"new store path, or delete this one to start over")
        read_only = getattr(store, "read_only", False) is True or (
            isinstance(store, (str, os.PathLike)) and os.path.isdir(store) and not os.access(store, os.W_OK))
        if read_only:
            raise PermissionError(f"the store {name!r} is read-only; nothing was written. Make it writable to "
                                  f"continue the run, or give a new path")
        return
    chunks, batch = settings["chunks"], settings["batch_size"]
    samples, shape = settings["samples"], tuple(settings["input_shape"])
    try:
        group = zarr.open_group(store, mode="w-", storage_options=storage_options)
        group.create_array("relevance", shape=(samples, *shape), chunks=(batch, *shape), dtype=settings["dtype"],
                           fill_value=0)
        group.create_array("scale", shape=(samples,), chunks=(batch,), dtype="float32", fill_value=1)
        group.create_array("logits", shape=(samples, settings["classes"]), chunks=(batch, settings["classes"]),
                           dtype="float32", fill_value=0)
        for array in ("prediction", "target", "label", "index"):
            group.create_array(array, shape=(samples,), chunks=(batch,), dtype="int64", fill_value=-1)
        group.create_array("done", shape=(chunks,), chunks=(1,), dtype="bool", fill_value=False)
        group.attrs.update({"torchlrp": settings})
    except (PermissionError, ValueError, OSError) as error:
        if isinstance(error, (PermissionError, NotADirectoryError)) or "read-only" in str(error):
            raise PermissionError(f"cannot write the store {name!r}: {error}. Give a writable path") from None
        raise


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
        Values of ``relevance``, ``scale``, ``logits``, ``prediction``, ``target``, ``label`` and ``index``.
    """
    stop = start + len(arrays["index"])
    for name, values in arrays.items():
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


class Relevances:
    """A store written by :func:`explain_dataset`, read lazily: ``relevances[i]``, ``relevances[10:20]``,
    ``relevances[mask]`` read only those samples.

    Parameters
    ----------
    group : zarr.Group
        The store's root group (see :func:`open_relevances`).

    Attributes
    ----------
    settings : dict
        The run's settings (model, rule, target, dtype, torchlrp version, ...).
    """

    def __init__(self, group: Any) -> None:
        self._group = group
        self.settings = dict(group.attrs["torchlrp"])
        self._done = group["done"][:]
        self._written = np.repeat(self._done, self.settings["batch_size"])[:len(self)]

    def __len__(self) -> int:
        return int(self.settings["samples"])

    def __repr__(self) -> str:
        return (f"Relevances({len(self)} samples of shape {tuple(self.settings['input_shape'])}, "
                f"{self.written.sum()} written, model={self.settings['model']!r}, rule={self.settings['rule']!r})")

    @property
    def shape(self) -> tuple[int, ...]:
        """``(samples, *input_shape)``."""
        return (len(self), *self.settings["input_shape"])

    @property
    def written(self) -> np.ndarray:
        """Boolean mask ``(samples,)``: which samples were in the store when it was opened (all of them once the run
        finished)."""
        return self._written

    @property
    def complete(self) -> bool:
        """Whether every sample is in the store."""
        return bool(self._done.all())

    def _column(self, name: str) -> Tensor:
        return torch.from_numpy(np.asarray(self._group[name][:]))

    @property
    def logits(self) -> Tensor:
        """``(samples, classes)`` float32 scores."""
        return self._column("logits")

    @property
    def predictions(self) -> Tensor:
        """``(samples,)`` top classes."""
        return self._column("prediction")

    @property
    def targets(self) -> Tensor:
        """``(samples,)`` classes explained."""
        return self._column("target")

    @property
    def labels(self) -> Tensor:
        """``(samples,)`` dataset labels (-1 where the dataset gave none)."""
        return self._column("label")

    @property
    def indices(self) -> Tensor:
        """``(samples,)`` indices in the dataset."""
        return self._column("index")

    def __getitem__(self, index: Any) -> Tensor:
        """Relevance of the selected samples as float32: an int (one sample), a slice, a sequence or tensor of
        indices, or a boolean mask of length ``len(self)``.

        Raises
        ------
        IndexError
            For indices out of range.
        ValueError
            If a selected sample is not in the store yet (the run was stopped: resume it).
        """
        single = isinstance(index, (int, np.integer)) and not isinstance(index, bool)
        if isinstance(index, slice):
            rows = np.arange(len(self))[index]
        else:
            rows = np.asarray(index.cpu() if isinstance(index, Tensor) else index)
            rows = rows.astype(np.int64) if rows.size == 0 else rows  # [] selects nothing
            if rows.dtype == bool:
                if rows.shape != (len(self),):
                    raise IndexError(f"a boolean mask must have shape ({len(self)},), got {rows.shape}")
                rows = np.flatnonzero(rows)
            elif not np.issubdtype(rows.dtype, np.integer) or rows.ndim > 1:
                raise IndexError(f"index samples with an int, a slice, integer indices or a boolean mask; got "
                                 f"{type(index).__name__}")
            rows = rows.reshape(-1)
            if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
                raise IndexError(f"sample index out of range for {len(self)} samples")
            rows = rows % len(self)
        missing = rows[~self.written[rows]]
        if missing.size:
            raise ValueError(f"{missing.size} selected sample(s) are not in the store yet (first: {missing[0]}); the "
                             f"run was stopped: run the same explain_dataset call again to finish it")
        relevance = np.asarray(self._group["relevance"].oindex[rows], dtype=np.float32)
        scale = np.asarray(self._group["scale"].oindex[rows], dtype=np.float32)
        values = torch.from_numpy(relevance * scale.reshape(-1, *[1] * (relevance.ndim - 1)))
        return values[0] if single else values


def open_relevances(store: Any, storage_options: dict | None = None) -> Relevances:
    """Open a store written by :func:`explain_dataset` for reading (lazily; nothing is loaded until indexed).

    Parameters
    ----------
    store : str, os.PathLike or zarr store
        The store's path, URL or object.
    storage_options : dict, optional
        Passed to fsspec for URL stores.

    Returns
    -------
    Relevances
        The lazy view.

    Raises
    ------
    FileNotFoundError
        If there is no store there.
    ValueError
        If the store was not written by torchlrp, or by a version with another layout.
    """
    zarr = require_zarr()
    name = store_name(store)
    try:
        group = zarr.open_group(store, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise FileNotFoundError(f"no Zarr store at {name!r}") from None
    settings = dict(group.attrs).get("torchlrp")
    if not isinstance(settings, dict):
        raise ValueError(f"{name!r} is a Zarr store that torchlrp's explain_dataset did not write")
    if settings.get("format") != STORE_FORMAT:
        raise ValueError(f"{name!r} has store format {settings.get('format')!r}; this torchlrp reads format "
                         f"{STORE_FORMAT}")
    return Relevances(group)


__all__ = ["MATCHING_SETTINGS", "Relevances", "STORE_DTYPES", "STORE_FORMAT", "create_or_check", "open_relevances",
           "parameters_sha256", "require_zarr", "run_settings", "scaled_for_storage", "store_dtype", "store_name",
           "write_chunk"]
