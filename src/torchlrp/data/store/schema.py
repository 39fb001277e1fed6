"""A store's schema: its format, arrays, fill values and settings, and the checks of a layout against them."""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
import torch

from torchlrp.core.composites import as_composite
from torchlrp.data.store.hashing import architecture_sha256, definition_sha256, parameters_sha256
from torchlrp.version import __version__

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
        Layer name -> ``{"definition": repr of its concept definition, "sha256": the SHA-256 of its exact definition
        (membership, basis, where it applies), "count": number of concepts}`` for the layers whose concept
        statistics the run records (``explain_dataset(concepts=...)``): a store is continued only with the same.

    Returns
    -------
    dict
        JSON-serializable settings; :data:`MATCHING_SETTINGS` must be equal to continue a store.
    """

    return {"format": STORE_FORMAT, "torchlrp_version": __version__,
            "model": model_name or type(model).__name__, "architecture_sha256": architecture_sha256(model),
            "parameters_sha256": parameters_sha256(model),
            "rule": rule if isinstance(rule, str) else type(rule).__name__,
            "rule_definition": repr(as_composite(rule)), "rule_sha256": definition_sha256(as_composite(rule)),
            "target": target, "start": start,
            "samples": samples, "batch_size": batch_size, "dtype": dtype, "input_shape": list(input_shape),
            "classes": classes, "chunks": math.ceil(samples / batch_size), "concepts": concepts}


def array_layout(settings: dict) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], str]]:
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


def create_arrays(group: Any, settings: dict) -> None:
    """Create a store's arrays (zstd with its content checksum; fills that a written chunk never holds)."""
    from zarr.codecs import ZstdCodec

    for name, (shape, chunks, dtype) in array_layout(settings).items():
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
        expected = array_layout({**settings, "chunks": math.ceil(samples / batch)}) if samples > 0 and batch > 0 else None
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
