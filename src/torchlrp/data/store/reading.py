"""Reading a store back: :class:`Relevances` (lazy, every read checked) and :func:`open_relevances`."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from torchlrp.data.store.schema import (CONCEPT_STATISTICS, concept_array, READABLE_FORMATS, StoreDamagedError, check_layout,
                                        fill_value, read_done, require_zarr, store_name)


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
    group : zarr.Group
        The store's root group.
    done : numpy.ndarray
        Per chunk: whether it was written.
    """

    def __init__(self, group: Any, name: str = "") -> None:
        self.group, self._name = group, name
        self.settings = dict(group.attrs["torchlrp"])
        self.done = read_done(group, name)
        self._written = np.repeat(self.done, self.settings["batch_size"])[:len(self)]

    def read(self, array: str, rows: np.ndarray | None = None) -> np.ndarray:
        """The rows of an array (all for None), checked (see the class docstring)."""
        source = self.group[array]
        try:
            values = np.asarray(source[:] if rows is None else source.oindex[rows])
        except Exception as error:  # noqa: BLE001 -- zarr raises per codec (RuntimeError from zstd, ...)
            chosen = np.arange(len(self)) if rows is None else rows
            chunk = next((chunk for chunk in np.unique(chosen // self.settings["batch_size"])
                          if chunk_error(self.group, array, int(chunk), self.settings) is not None), None)
            raise StoreDamagedError(damage_message(self._name, array, chunk, self.settings, str(error))) from None
        if self.settings.get("format", 1) >= 2 and values.size:
            per_chunk = array == "fingerprint"  # a row per chunk, not per sample
            written = self.done if per_chunk else self.written
            chosen = np.arange(len(written)) if rows is None else rows
            lost = (~values.any(1) if per_chunk else lost_rows(values, fill_value(array))) & written[chosen]
            if lost.any():
                row = int(chosen[np.argmax(lost)])
                chunk = row if per_chunk else row // self.settings["batch_size"]
                raise StoreDamagedError(damage_message(self._name, array, chunk, self.settings, "the chunk is "
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
        return bool(self.done.all())

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
        return torch.from_numpy(self.read(concept_array(layer, statistic)))

    def _column(self, name: str) -> Tensor:
        return torch.from_numpy(self.read(name))

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
        relevance = self.read("relevance", rows).astype(np.float32)
        scale = self.read("scale", rows).astype(np.float32)
        values = torch.from_numpy(relevance * scale.reshape(-1, *[1] * (relevance.ndim - 1)))
        return values[0] if single else values


def lost_rows(values: np.ndarray, fill: float | int) -> np.ndarray:
    """Per row (first axis): whether it holds the fill value of a lost chunk anywhere (for the per-sample arrays;
    a fingerprint is lost where all of its bytes are zero)."""
    flat = values.reshape(len(values), -1)
    lost = np.isnan(flat) if isinstance(fill, float) and np.isnan(fill) else flat == fill
    return lost.any(1)


def chunk_error(group: Any, array: str, chunk: int, settings: dict) -> str | None:
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
    if lost_rows(values, fill_value(array)).any():
        return "the chunk is missing"
    if array == "index" and not np.array_equal(values, np.arange(rows.start, rows.stop)):
        return "its sample indices are not the chunk's"
    return None


def damage_message(name: str, array: str, chunk: int | None, settings: dict, reason: str) -> str:
    where = "a chunk" if chunk is None else (
        f"chunk {chunk} (samples {chunk * settings['batch_size']}..."
        f"{min((chunk + 1) * settings['batch_size'], settings['samples']) - 1})")
    return (f"the store {name!r}: {where} of array {array!r} is damaged or missing ({reason}). Run "
            f"torchlrp.store.verify_store({name!r}, repair=True) (or: torchlrp verify-store {name} --repair) to mark "
            f"the damaged chunks undone, then the same explain_dataset call again to explain them anew")


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
