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
``fingerprint``           ``(chunks, 32)``,    per chunk: the SHA-256 of its input samples and labels (a resume
                          uint8                checks the chunks it skips against the data it is given)
``done``                  ``(chunks,)``, bool  chunk written (written last)
========================  ===================  ===============================================================

The run's settings (model, its architecture's and parameters' SHA-256, rule and the SHA-256 of its exact
definition, target, dtype, torchlrp version, ...) are the group's attribute ``"torchlrp"``, written before any array;
a store is only ever continued with the same settings.

Integrity: every chunk is compressed by zstd with its content checksum, so a damaged chunk fails to decode; a chunk
that is missing reads as the fill value (NaN for the float arrays, -2 for the integer ones), which a written chunk
never holds. Reading (:class:`Relevances`) and resuming raise :class:`StoreDamagedError` naming the chunk;
:func:`verify_store` (``torchlrp verify-store``) checks every chunk and, with ``repair=True``, marks the damaged ones
to be explained again by the next run.
"""
from __future__ import annotations

import errno
import hashlib
import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .composites import as_composite

#: layout version of the stores written now; format 1 (no fingerprints or checksums) is still read
STORE_FORMAT = 2
#: store formats :func:`open_relevances` reads
READABLE_FORMATS = (1, 2)
#: what a missing chunk of an integer array reads as (a written chunk never holds it; -1 is "no label")
MISSING_INDEX = -2
#: the arrays of a store and their fill values (what a chunk that was never written, or was lost, reads as)
ARRAY_FILLS = {"relevance": float("nan"), "scale": float("nan"), "logits": float("nan"), "prediction": MISSING_INDEX,
               "target": MISSING_INDEX, "label": MISSING_INDEX, "index": MISSING_INDEX, "fingerprint": 0}
#: per concept layer, the arrays ``concepts/<layer>/<statistic>``, ``(N, concepts)`` float32 (NaN where not written)
CONCEPT_STATISTICS = ("relevance_sum", "relevance_max", "activation_sum", "activation_max")
#: relevance dtypes a store can hold (bfloat16 has no numpy/Zarr type: float16 with the per-sample scale keeps more)
STORE_DTYPES = {torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}
#: settings that must be equal to continue a store
MATCHING_SETTINGS = ("format", "model", "architecture_sha256", "parameters_sha256", "rule_sha256", "target", "start",
                     "samples", "batch_size", "dtype", "input_shape", "classes", "concepts")


class StoreDamagedError(ValueError):
    """A store's chunk is missing or damaged, or its layout does not match its settings; the message names the
    chunk and how to redo it (:func:`verify_store` with ``repair=True``, then the same run again)."""


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


def fill_value(array: str) -> float | int:
    """What a never-written (or lost) chunk of ``array`` reads as.

    Parameters
    ----------
    array : str
        An array of the store (``"relevance"``, ``"concepts/features.28/relevance_sum"``, ...).

    Returns
    -------
    float or int
    """
    return float("nan") if array.startswith("concepts/") else ARRAY_FILLS[array]


def concept_array(layer: str, statistic: str) -> str:
    """The name of a concept statistic's array in a store.

    Parameters
    ----------
    layer : str
        The layer's dotted name.
    statistic : str
        One of :data:`CONCEPT_STATISTICS`.

    Returns
    -------
    str
    """
    return f"concepts/{layer}/{statistic}"


def run_settings(model: torch.nn.Module, model_name: str | None, rule: Any, target: str | int, start: str,
                 samples: int, batch_size: int, dtype: str, input_shape: Sequence[int], classes: int,
                 concepts: dict | None = None) -> dict:
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
    concepts : dict, optional
        Layer name -> ``{"definition": repr of its concept definition, "count": number of concepts}`` for the
        layers whose concept statistics the run records (``explain_dataset(concepts=...)``).

    Returns
    -------
    dict
        JSON-serializable settings; :data:`MATCHING_SETTINGS` must be equal to continue a store.
    """
    from . import __version__

    return {"format": STORE_FORMAT, "torchlrp_version": __version__,
            "model": model_name or type(model).__name__, "architecture_sha256": architecture_sha256(model),
            "parameters_sha256": parameters_sha256(model),
            "rule": rule if isinstance(rule, str) else type(rule).__name__,
            "rule_definition": repr(as_composite(rule)), "rule_sha256": definition_sha256(as_composite(rule)),
            "target": target, "start": start,
            "samples": samples, "batch_size": batch_size, "dtype": dtype, "input_shape": list(input_shape),
            "classes": classes, "chunks": math.ceil(samples / batch_size), "concepts": concepts}


def _layout(settings: dict) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], str]]:
    """Each array's ``(shape, chunks, dtype)`` for a run's settings."""
    samples, batch, shape = settings["samples"], settings["batch_size"], tuple(settings["input_shape"])
    classes, chunks = settings["classes"], settings["chunks"]
    layout = {"relevance": ((samples, *shape), (batch, *shape), settings["dtype"]),
              "scale": ((samples,), (batch,), "float32"),
              "logits": ((samples, classes), (batch, classes), "float32"),
              "fingerprint": ((chunks, 32), (1, 32), "uint8"), "done": ((chunks,), (1,), "bool")}
    layout.update({name: ((samples,), (batch,), "int64") for name in ("prediction", "target", "label", "index")})
    for layer, concepts in (settings.get("concepts") or {}).items():
        count = int(concepts["count"])
        layout.update({concept_array(layer, statistic): ((samples, count), (batch, count), "float32")
                       for statistic in CONCEPT_STATISTICS})
    return layout


def _create_arrays(group: Any, settings: dict) -> None:
    """Create a store's arrays (zstd with its content checksum; fills that a written chunk never holds)."""
    from zarr.codecs import ZstdCodec

    for name, (shape, chunks, dtype) in _layout(settings).items():
        fill = False if name == "done" else fill_value(name)
        group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                           compressors=ZstdCodec(level=0, checksum=True), overwrite=True)


def check_layout(group: Any, settings: dict, name: str) -> None:
    """Check that a store's arrays have the shapes, chunks and dtypes its settings imply.

    Parameters
    ----------
    group : zarr.Group
        The store.
    settings : dict
        Its ``"torchlrp"`` attribute.
    name : str
        The store's name, for messages.

    Raises
    ------
    StoreDamagedError
        For settings that are not a run's (a hand-edited ``samples`` or ``batch_size``), or an array missing or of
        another shape (a ``done`` array shortened by hand); read before anything of the size the settings claim is
        allocated.
    """
    try:
        samples, batch = int(settings["samples"]), int(settings["batch_size"])
        expected = _layout({**settings, "chunks": math.ceil(samples / batch)}) if samples > 0 and batch > 0 else None
    except (KeyError, TypeError, ValueError):
        expected = None
    if expected is None:
        raise StoreDamagedError(f"the store {name!r} has settings that are not a run's (samples "
                                f"{settings.get('samples')!r}, batch_size {settings.get('batch_size')!r}); it was "
                                f"edited or damaged: explain into a new store")
    formats = {1: set(expected) - {"fingerprint"}, 2: set(expected)}
    for array in sorted(formats.get(settings.get("format"), set(expected))):
        shape, chunks, _ = expected[array]
        try:
            found = group[array]
            found_shape, found_chunks = tuple(found.shape), tuple(found.chunks)
        except (KeyError, AttributeError, TypeError, ValueError):
            raise StoreDamagedError(f"the store {name!r} has no array {array!r}; it is damaged: explain into a new "
                                    f"store") from None
        if found_shape != shape or found_chunks != chunks:
            raise StoreDamagedError(f"the store {name!r}: array {array!r} has shape {found_shape} in chunks of "
                                    f"{found_chunks}, its settings say {shape} in chunks of {chunks} (edited by "
                                    f"hand?); explain into a new store")


def read_done(group: Any, name: str) -> np.ndarray:
    """A store's ``done`` flags, raising :class:`StoreDamagedError` naming a flag that cannot be read.

    Parameters
    ----------
    group : zarr.Group
        The store (layout checked by :func:`check_layout`).
    name : str
        The store's name, for messages.

    Returns
    -------
    ndarray
        ``(chunks,)`` bool.
    """
    array = group["done"]
    try:
        return np.asarray(array[:], dtype=bool)
    except Exception:  # noqa: BLE001 -- zarr raises per codec (RuntimeError from zstd, ValueError, ...)
        for chunk in range(array.shape[0]):
            try:
                array[chunk]
            except Exception as error:  # noqa: BLE001
                raise StoreDamagedError(f"the store {name!r}: the done flag of chunk {chunk} is damaged ({error}); "
                                        f"run torchlrp.store.verify_store({name!r}, repair=True) (torchlrp "
                                        f"verify-store --repair) and then the same run again") from None
        raise


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
        _create_arrays(group, settings)
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
            _create_arrays(group, settings)
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


class Relevances:
    """A store written by :func:`explain_dataset`, read lazily: ``relevances[i]``, ``relevances[10:20]``,
    ``relevances[mask]`` read only those samples.

    Every read checks what it reads: a chunk that fails to decode (its zstd checksum) or reads as the fill value
    of a lost chunk raises :class:`StoreDamagedError` naming the chunk (stores of format 1 have no such checks).

    Parameters
    ----------
    group : zarr.Group
        The store's root group (see :func:`open_relevances`; its layout checked by :func:`check_layout`).
    name : str
        The store's name, for messages.

    Attributes
    ----------
    settings : dict
        The run's settings (model, rule, target, dtype, torchlrp version, ...).
    """

    def __init__(self, group: Any, name: str = "") -> None:
        self._group, self._name = group, name
        self.settings = dict(group.attrs["torchlrp"])
        self._done = read_done(group, name)
        self._written = np.repeat(self._done, self.settings["batch_size"])[:len(self)]

    def _read(self, array: str, rows: np.ndarray | None = None) -> np.ndarray:
        """The rows of an array (all for None), checked (see the class docstring)."""
        source = self._group[array]
        try:
            values = np.asarray(source[:] if rows is None else source.oindex[rows])
        except Exception as error:  # noqa: BLE001 -- zarr raises per codec (RuntimeError from zstd, ...)
            chosen = np.arange(len(self)) if rows is None else rows
            chunk = next((chunk for chunk in np.unique(chosen // self.settings["batch_size"])
                          if _chunk_error(self._group, array, int(chunk), self.settings) is not None), None)
            raise StoreDamagedError(_damage_message(self._name, array, chunk, self.settings, str(error))) from None
        if self.settings.get("format", 1) >= 2 and values.size:
            per_chunk = array == "fingerprint"  # a row per chunk, not per sample
            written = self._done if per_chunk else self.written
            chosen = np.arange(len(written)) if rows is None else rows
            lost = (~values.any(1) if per_chunk else _lost_rows(values, fill_value(array))) & written[chosen]
            if lost.any():
                row = int(chosen[np.argmax(lost)])
                chunk = row if per_chunk else row // self.settings["batch_size"]
                raise StoreDamagedError(_damage_message(self._name, array, chunk, self.settings, "the chunk is "
                                                                                                   "missing"))
        return values

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

    @property
    def concept_layers(self) -> list[str]:
        """The layers whose concept statistics the run recorded (``explain_dataset(concepts=...)``)."""
        return list(self.settings.get("concepts") or {})

    def concept_values(self, layer: str, statistic: str) -> Tensor:
        """One concept statistic of every sample: ``(samples, concepts)`` float32.

        Parameters
        ----------
        layer : str
            One of :attr:`concept_layers`.
        statistic : str
            One of :data:`CONCEPT_STATISTICS`: ``"relevance_sum"`` (a concept's relevance for the explained
            class, summed over positions), ``"relevance_max"`` (its largest per-position value),
            ``"activation_sum"``, ``"activation_max"``.

        Returns
        -------
        Tensor
            NaN for samples not yet written (see :attr:`written`).

        Raises
        ------
        ValueError
            For a layer the run did not record, or an unknown statistic.
        StoreDamagedError
            For a damaged or lost chunk.
        """
        if layer not in self.concept_layers:
            raise ValueError(f"the store {self._name!r} holds no concept statistics of layer {layer!r}; it has "
                             f"{self.concept_layers or 'none'} (explain_dataset(..., concepts=[...]) records them)")
        if statistic not in CONCEPT_STATISTICS:
            raise ValueError(f"statistic must be one of {CONCEPT_STATISTICS}, got {statistic!r}")
        return torch.from_numpy(self._read(concept_array(layer, statistic)))

    def _column(self, name: str) -> Tensor:
        return torch.from_numpy(self._read(name))

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
        StoreDamagedError
            If a selected sample's chunk is missing or damaged.
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
        relevance = self._read("relevance", rows).astype(np.float32)
        scale = self._read("scale", rows).astype(np.float32)
        values = torch.from_numpy(relevance * scale.reshape(-1, *[1] * (relevance.ndim - 1)))
        return values[0] if single else values


def _lost_rows(values: np.ndarray, fill: float | int) -> np.ndarray:
    """Per row (first axis): whether it holds the fill value of a lost chunk anywhere (for the per-sample arrays;
    a fingerprint is lost where all of its bytes are zero)."""
    flat = values.reshape(len(values), -1)
    lost = np.isnan(flat) if isinstance(fill, float) and np.isnan(fill) else flat == fill
    return lost.any(1)


def _chunk_error(group: Any, array: str, chunk: int, settings: dict) -> str | None:
    """Why chunk ``chunk`` of ``array`` is damaged or missing, or None where it reads back intact."""
    batch = settings["batch_size"]
    per_chunk = array in ("fingerprint", "done")
    rows = slice(chunk, chunk + 1) if per_chunk else slice(chunk * batch, min((chunk + 1) * batch, settings["samples"]))
    try:
        values = np.asarray(group[array][rows])
    except Exception as error:  # noqa: BLE001 -- zarr raises per codec
        return f"it does not decode: {error}"
    if settings.get("format", 1) < 2 or array == "done":
        return None
    if array == "fingerprint":
        return "the chunk is missing" if not values.any() else None
    if _lost_rows(values, fill_value(array)).any():
        return "the chunk is missing"
    if array == "index" and not np.array_equal(values, np.arange(rows.start, rows.stop)):
        return "its sample indices are not the chunk's"
    return None


def _damage_message(name: str, array: str, chunk: int | None, settings: dict, reason: str) -> str:
    where = "a chunk" if chunk is None else (
        f"chunk {chunk} (samples {chunk * settings['batch_size']}..."
        f"{min((chunk + 1) * settings['batch_size'], settings['samples']) - 1})")
    return (f"the store {name!r}: {where} of array {array!r} is damaged or missing ({reason}). Run "
            f"torchlrp.store.verify_store({name!r}, repair=True) (or: torchlrp verify-store {name} --repair) to mark "
            f"the damaged chunks undone, then the same explain_dataset call again to explain them anew")


@dataclass(frozen=True)
class StoreHealth:
    """What :func:`verify_store` found.

    Attributes
    ----------
    store : str
        The store.
    chunks : int
        Chunks in the store.
    done : int
        Chunks marked done (before any repair).
    damaged : dict of int to str
        Done chunks that are missing or damaged, with the array and the reason.
    repaired : bool
        Whether the damaged chunks were marked undone (the next run with the same call explains them again).
    """

    store: str
    chunks: int
    done: int
    damaged: dict[int, str]
    repaired: bool

    @property
    def healthy(self) -> bool:
        """Whether every done chunk reads back intact."""
        return not self.damaged

    def __str__(self) -> str:
        if self.healthy:
            return f"{self.store}: healthy ({self.done} of {self.chunks} chunks done, every one intact)"
        listed = "; ".join(f"chunk {chunk}: {reason}" for chunk, reason in list(self.damaged.items())[:10])
        more = f"; and {len(self.damaged) - 10} more" if len(self.damaged) > 10 else ""
        action = ("marked undone: run the same explain_dataset call again to explain them anew" if self.repaired
                  else "repair with verify_store(..., repair=True) (torchlrp verify-store --repair), then run the "
                       "same explain_dataset call again")
        return (f"{self.store}: {len(self.damaged)} of {self.done} done chunks damaged or missing ({listed}{more}); "
                f"{action}")


def verify_store(store: Any, repair: bool = False, storage_options: dict | None = None) -> StoreHealth:
    """Check every done chunk of a store: that each of its arrays decodes (zstd checksum), is not missing, and holds
    its own samples' indices.

    Parameters
    ----------
    store : str, os.PathLike or zarr store
        The store.
    repair : bool
        Mark the damaged chunks undone (their ``done`` flags only; nothing else is changed), so that the next
        :func:`explain_dataset` call with the same settings and data explains them again.
    storage_options : dict, optional
        Passed to fsspec for URL stores.

    Returns
    -------
    StoreHealth
        What was found (``str()`` of it is a one-paragraph report).

    Raises
    ------
    FileNotFoundError, ValueError, StoreDamagedError
        As :func:`open_relevances`, for a path that holds no torchlrp store or one whose layout is damaged.
    """
    relevances = open_relevances(store, storage_options)
    group, settings, name = relevances._group, relevances.settings, store_name(store)
    done = np.flatnonzero(relevances._done)
    arrays = [array for array in _layout(settings) if array != "done" and array in group]
    damaged: dict[int, str] = {}
    for chunk in done:
        for array in arrays:
            reason = _chunk_error(group, array, int(chunk), settings)
            if reason is not None:
                damaged[int(chunk)] = f"{array}: {reason}"
                break
    if repair and damaged:
        writable = require_zarr().open_group(store, mode="r+", storage_options=storage_options)
        for chunk in damaged:
            writable["done"][chunk] = False
    return StoreHealth(name, len(relevances._done), len(done), damaged, bool(repair and damaged))


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
    StoreDamagedError
        If its layout does not match its settings, its creation was interrupted, or its done flags are damaged.
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
    if settings.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{name!r} has store format {settings.get('format')!r}; this torchlrp reads formats "
                         f"{', '.join(map(str, READABLE_FORMATS))}")
    if settings.get("creating"):
        raise StoreDamagedError(f"the store {name!r} was stopped while being created and holds nothing; run the "
                                f"same explain_dataset call to create it again")
    check_layout(group, settings, name)
    return Relevances(group, name)


__all__ = ["ARRAY_FILLS", "CONCEPT_STATISTICS", "MATCHING_SETTINGS", "MISSING_INDEX", "READABLE_FORMATS", "Relevances",
           "STORE_DTYPES", "STORE_FORMAT", "StoreDamagedError", "StoreHealth", "architecture_sha256", "check_layout",
           "concept_array", "create_or_check", "data_fingerprint", "definition_sha256", "fill_value", "open_relevances",
           "parameters_sha256", "read_done", "require_zarr", "run_settings", "scaled_for_storage", "store_dtype",
           "store_name", "verify_store", "write_chunk"]
