"""``torchlrp.dataset``: explain a whole dataset into a Zarr store, in one process or many (``torchrun``).

The unit of work is a *chunk* of ``batch_size`` consecutive samples of the dataset: chunk ``k`` holds samples
``k * batch_size`` up to the next chunk. Under ``torchrun --nproc-per-node N`` rank ``r`` explains chunks
``r, r + N, r + 2N, ...`` on its own device, so every sample is explained exactly once and every chunk of the store is
written by one rank only. A chunk's completion flag is written after its data: a run that is killed and started
again with the same call skips the chunks already written and ends with the same store as an uninterrupted run.
The store's layout, and reading it back (:func:`open_relevances`), are in :mod:`torchlrp.store`.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from torchlrp.core.composites import Composite
from torchlrp.analysis.concepts.conditional import attribute
from torchlrp.analysis.concepts.definitions import Concepts
from torchlrp.analysis.concepts.maximization import concept_layers, concept_statistics
from torchlrp.conversion.convert import convert
from torchlrp.explanation.explain import explain
from torchlrp.explanation.context import has_torchlrp_layers
from torchlrp.core.rules import Rule
from torchlrp.data.store import (STORE_DTYPES, STORE_FORMAT, Relevances, StoreDamagedError, concept_array, create_or_check,
                    data_fingerprint, definition_sha256, open_relevances, read_done, require_zarr, run_settings, scaled_for_storage, store_dtype, store_name,
                    write_chunk)


@dataclass(frozen=True)
class DatasetReport:
    """What one :func:`explain_dataset` call did (the same on every rank).

    Attributes
    ----------
    store : str
        The store.
    samples : int
        Samples in the dataset (and the store).
    written : int
        Samples explained and written by this call, all ranks together.
    skipped : int
        Samples already in the store from an earlier run (resumed), not explained again.
    per_rank : tuple of int
        Samples written by each rank.
    seconds : float
        Wall time of the explaining loop (the slowest rank's).
    """

    store: str
    samples: int
    written: int
    skipped: int
    per_rank: tuple[int, ...]
    seconds: float

    @property
    def images_per_second(self) -> float:
        """Samples written per second (all ranks)."""
        return self.written / self.seconds if self.seconds > 0 else 0.0


class _ChunkBatches(Sampler[list[int]]):
    """Index batches of the given chunks, chunk ``k`` being ``range(k * batch_size, ...)``, in order: a sampler for
    one rank that neither drops nor repeats a sample."""

    def __init__(self, chunks: Sequence[int], batch_size: int, samples: int) -> None:
        self.chunks, self.batch_size, self.samples = list(chunks), batch_size, samples

    def __iter__(self) -> Iterator[list[int]]:
        for chunk in self.chunks:
            yield list(range(chunk * self.batch_size, min((chunk + 1) * self.batch_size, self.samples)))

    def __len__(self) -> int:
        return len(self.chunks)


def _split_sample(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(inputs, labels or None)`` of a collated batch: a tensor, or a tuple/list ``(input, label, ...)`` whose
    label is an integer class index (other second elements are not labels)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        labels = batch[1] if len(batch) > 1 else None
        if isinstance(labels, Tensor) and labels.dim() == 1 and not labels.dtype.is_floating_point \
                and labels.dtype != torch.bool and len(labels) == len(batch[0]):
            return batch[0], labels.long()
        return batch[0], None
    raise ValueError(f"the dataset's samples must be tensors or (input, label, ...) tuples with a tensor input; "
                     f"got a batch of type {type(batch).__name__}")


def _target_setting(target: Any) -> str | int:
    if target is None or target == "prediction":
        return "prediction"
    if target == "label":
        return "label"
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool) and target >= 0:
        return int(target)
    raise ValueError(f"target must be None or 'prediction' (each sample's top class), 'label' (the dataset's "
                     f"label) or a class index >= 0; got {target!r}")


class _Ranks:
    """The process group of a run: joins torchrun's (``WORLD_SIZE`` > 1) unless one exists; left by :meth:`close`
    only if it was made here."""

    def __init__(self, device: "str | torch.device | None") -> None:
        import torch.distributed as dist

        self.dist, self.owned = dist, False
        local = int(os.environ.get("LOCAL_RANK", "0"))
        wants_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if wants_cuda:
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if wants_cuda else "gloo")
            self.owned = True
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        if device is None:
            device = f"cuda:{local if self.active else torch.cuda.current_device()}" if wants_cuda else "cpu"
        elif torch.device(device).type == "cuda" and torch.device(device).index is None and self.active:
            device = f"cuda:{local}"
        self.device = torch.device(device)

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def progress(self, key: str) -> "Callable[[int], int] | None":
        """``add(n)``: adds ``n`` to a counter all ranks share and returns its new value (the process group's key-value
        store); None in one process, or where the store is not reachable."""
        if not self.active:
            return None
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            store = _get_default_store()
        except (ImportError, RuntimeError, ValueError):
            return None
        return lambda count: int(store.add(key, count))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        if not self.active:
            return [value]
        values: list[Any] = [None] * self.world
        self.dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()


def _explain_chunk(model: torch.nn.Module, batch: Any, begin: int, shape: torch.Size, target: str | int, rule: Any,
                   start: str, dtype: str, device: torch.device, fused: bool,
                   concepts: dict[str, Concepts] | None = None) -> dict[str, np.ndarray]:
    """Explain one collated chunk (samples ``begin ...``) and return the store's arrays for it, on the CPU."""
    inputs, labels = _split_sample(batch)
    fingerprint = data_fingerprint(inputs, labels)
    last = begin + len(inputs) - 1
    if inputs.shape[1:] != shape:
        raise ValueError(f"sample {begin}..{last} has shape {tuple(inputs.shape[1:])}, the first sample "
                         f"{tuple(shape)}: every input must have one shape")
    if target == "label" and (labels is None or bool((labels < 0).any())):
        raise ValueError(f"target='label' needs (input, label) samples with integer labels >= 0; samples "
                         f"{begin}..{last} have none")
    inputs = inputs.to(device, non_blocking=True)
    chosen = None if target == "prediction" else (labels.to(device) if target == "label" else target)
    statistics = {}
    if concepts:  # the heatmap and every concept layer's relevance, in one backward
        result = attribute(model, inputs, [{}], rule, concepts=concepts, record=list(concepts), target=chosen,
                           start=start)
        relevance, scores = result.heatmaps[:, 0], result.scores
        statistics = {concept_array(layer, statistic): values
                      for layer, values_of in concept_statistics(result).items()
                      for statistic, values in values_of.items()}
    else:
        relevance, scores = explain(model, inputs, target=chosen, rule=rule, start=start, fused=fused,
                                    return_scores=True)
    if not bool(torch.isfinite(scores).all()):
        raise FloatingPointError(f"the model's scores of samples {begin}..{last} are not finite (NaN or inf); nothing "
                                 f"of them was written. Check the model's weights and inputs")
    if not bool(torch.isfinite(relevance).all()) or not all(bool(torch.isfinite(v).all()) for v in statistics.values()):
        raise FloatingPointError(f"the relevance of samples {begin}..{last} is not finite (NaN or inf); nothing of "
                                 f"them was written. A larger epsilon, or a float32 model, usually fixes it")
    prediction = scores.argmax(1)
    explained = prediction if chosen is None else (
        chosen if isinstance(chosen, Tensor) else torch.full_like(prediction, chosen))
    stored, scale = scaled_for_storage(relevance, dtype)
    return {"relevance": stored.to(getattr(torch, dtype)).cpu().numpy(), "scale": scale.cpu().numpy(),
            "logits": scores.float().cpu().numpy(), "prediction": prediction.cpu().numpy(),
            "target": explained.long().cpu().numpy(),
            "label": (labels if labels is not None else torch.full((len(inputs),), -1)).cpu().numpy(),
            "index": np.arange(begin, begin + len(inputs), dtype=np.int64), "fingerprint": fingerprint,
            **{name: values.float().cpu().numpy() for name, values in statistics.items()}}


#: data checks of a resume: the chunks it skips whose fingerprints are compared with the data it is given
DATA_CHECKS = ("sample", "all")


def _checked_chunks(done: np.ndarray, check_data: str) -> list[int]:
    """The done chunks a resume compares with its data: all, or the first, the last and up to 6 evenly between."""
    written = np.flatnonzero(done)
    if check_data == "all" or len(written) <= 8:
        return [int(chunk) for chunk in written]
    return sorted({int(written[round(position)]) for position in np.linspace(0, len(written) - 1, 8)})


def _check_resume(group: Any, dataset: Any, done: np.ndarray, batch_size: int, check_data: str, name: str) -> None:
    """Before a resume writes anything: the chunks it skips are intact (their small arrays and the count of
    relevance chunks) and were made from the data it is given (their fingerprints)."""
    settings = dict(group.attrs["torchlrp"])
    if not done.any() or settings.get("format", 1) < 2:
        return
    relevances = Relevances(group, name)
    relevances.indices, relevances.targets  # noqa: B018 -- read to check: a lost chunk raises, naming itself
    relevances.read("scale")
    stored = group["relevance"].nchunks_initialized
    if stored < int(done.sum()):
        raise StoreDamagedError(f"the store {name!r} marks {int(done.sum())} chunks done but holds {stored} relevance "
                                f"chunks: some are missing. Run torchlrp.store.verify_store({name!r}, repair=True) "
                                f"(torchlrp verify-store {name} --repair), then this call again")
    fingerprints = relevances.read("fingerprint")
    chunks = _checked_chunks(done, check_data)
    loader = DataLoader(dataset, batch_sampler=_ChunkBatches(chunks, batch_size, len(dataset)))
    for chunk, batch in zip(chunks, loader):
        if not np.array_equal(data_fingerprint(*_split_sample(batch)), fingerprints[chunk]):
            first = chunk * batch_size
            raise ValueError(f"the store {name!r} was made from other data: chunk {chunk} (samples {first}..."
                             f"{first + len(_split_sample(batch)[0]) - 1}) differs from this dataset's samples; "
                             f"nothing was written. Give the dataset the store was made from, or a new store path")


def explain_dataset(model: torch.nn.Module, dataset: Any, rule: "str | Rule | Composite", store: Any, *,
                    target: "str | int | None" = None, batch_size: int = 32, num_workers: int = 0,
                    dtype: "torch.dtype | str" = torch.float16, start: str = "one",
                    device: "str | torch.device | None" = None, model_name: str | None = None,
                    storage_options: dict | None = None, fused: bool = False, quiet: bool = False,
                    check_data: str = "sample",
                    concepts: "Sequence[str] | dict[str, Concepts | None] | None" = None) -> DatasetReport:
    """Explain every sample of ``dataset`` and write the relevances into a Zarr store.

    One process by default. Under ``torchrun --nproc-per-node N`` (one or many machines) each rank explains its
    own chunks of the dataset on its own device (GPU ``LOCAL_RANK`` where CUDA is present, else the CPU with the
    gloo backend) and writes them into the same store; the process group is joined (or made from torchrun's
    environment) here. Calling it again with the same arguments resumes a stopped run: chunks already written are
    skipped, and the store ends equal to an uninterrupted run's.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier (output ``(batch, classes)``), in eval mode. A model without torchlrp layers is converted
        (:func:`torchlrp.convert`, a copy, moved to the device); a model with them is used as it is (and moved
        to the device).
    dataset : torch.utils.data.Dataset
        A map-style dataset (``len`` and ``[i]``) whose samples are input tensors or ``(input, label, ...)`` tuples
        (an ``ImageFolder``, a ``TensorDataset``, :class:`torchlrp.imagenet.ImageFiles`, ...). All inputs must
        have one shape.
    rule : str, Rule or Composite
        As in :func:`torchlrp.explain`.
    store : str, os.PathLike or zarr store
        Where to write: a local path (``relevance.zarr``), an fsspec URL (``s3://bucket/run.zarr``, with
        ``storage_options``) or a Zarr store object. A new path is created; an existing store is continued only
        if it was made with the same settings.
    target : None, "prediction", "label" or int
        The class to explain: each sample's top class (default), the dataset's label, or one class for all.
    batch_size : int
        Samples per backward, and per chunk of the store.
    num_workers : int
        Data-loading worker processes per rank (``torch.utils.data.DataLoader``).
    dtype : torch.dtype or str
        Relevance dtype in the store: float16 (default; scaled per sample, see the module docstring), float32 or
        float64.
    start : {"one", "logit", "probability"}
        Start relevance, as in :func:`torchlrp.explain`.
    device : str or torch.device, optional
        Default: this rank's GPU when CUDA is present, else the CPU.
    model_name : str, optional
        Name recorded in the store (default: the model's class name).
    storage_options : dict, optional
        Passed to fsspec for URL stores.
    fused : bool
        Fuse the rules' elementwise work with ``torch.compile`` (as :func:`torchlrp.explain`; the first batch
        compiles). Not part of the run's settings: the numbers agree up to floating-point reassociation.
    quiet : bool
        No progress bar and no summary line (for logs).
    check_data : {"sample", "all"}
        What a resume compares with the data it is given before writing anything: the fingerprints of the first
        and last chunks already in the store and of up to 6 chunks evenly between them (``"sample"``, default: a
        few batches are loaded), or of every chunk in the store (``"all"``: loads the stored part of the dataset
        once more). A mismatch is refused.
    concepts : list of str or dict of str to Concepts, optional
        Layers whose concept statistics are recorded in the same backward (for relevance and activation
        maximization, :func:`torchlrp.concepts.reference_samples`): per sample and concept, the relevance for the
        explained class summed over positions and at its largest position, and the activation likewise, as arrays
        ``concepts/<layer>/<statistic>`` of the store. Names give channel concepts; a dict gives each layer its
        definition (:class:`torchlrp.concepts.Channels`, ``Groups``, ``Directions``). Needs ``start`` "one" or
        "logit" and ``fused=False``.

    Returns
    -------
    DatasetReport
        Counts and time of this call; read the relevances with :func:`open_relevances`.

    Raises
    ------
    ValueError
        For a bad argument, a store made by another model, rule or dataset (its data fingerprints differ), a path
        that is not a store, samples of different shapes, or a model whose output is not ``(batch, classes)``.
    StoreDamagedError
        For a store with missing or damaged chunks (see :func:`torchlrp.store.verify_store`).
    PermissionError
        For a store that cannot be written.
    FloatingPointError
        If a sample's relevance is not finite (nothing of its chunk is written).
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(f"dataset must be a map-style dataset (len() and [index]); got {type(dataset).__name__}")
    samples = len(dataset)
    if samples == 0:
        raise ValueError("the dataset is empty")
    if check_data not in DATA_CHECKS:
        raise ValueError(f"check_data must be one of {DATA_CHECKS}, got {check_data!r}")
    target_setting = _target_setting(target)
    stored_dtype = store_dtype(dtype)
    definitions = None if concepts is None else concept_layers(concepts)
    if definitions and (fused or start not in ("one", "logit")):
        raise ValueError(f"concepts= needs start 'one' or 'logit' and fused=False, got start={start!r}, "
                         f"fused={fused!r}")
    require_zarr()
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() first (dropout and batch statistics "
                         "would make the heatmaps random)")
    ranks = _Ranks(device)
    try:
        explainable = model if has_torchlrp_layers(model.modules()) else convert(model)
        explainable = explainable.to(ranks.device)
        try:
            first, _ = _split_sample(torch.utils.data.default_collate([dataset[0]]))
        except TypeError as error:  # e.g. PIL images: default_collate cannot batch them
            raise ValueError(f"the dataset's samples must be tensors or (input, label, ...) tuples with a tensor "
                             f"input (add a transform such as torchvision.transforms.ToTensor()); {error}") from None
        with torch.no_grad():
            output = explainable(first.to(ranks.device))
        if output.dim() != 2:
            raise ValueError(f"the model output has shape {tuple(output.shape)}, not (batch, classes)")
        if isinstance(target_setting, int) and target_setting >= output.shape[1]:
            raise ValueError(f"target {target_setting} is out of range for {output.shape[1]} classes")
        recorded = None
        if definitions:
            probe = attribute(explainable, first.to(ranks.device), [{}], rule, concepts=definitions,
                              record=list(definitions))
            recorded = {layer: {"definition": repr(definition), "sha256": definition_sha256(definition),
                                "count": int(probe.concept_relevances(layer).shape[-1])}
                        for layer, definition in definitions.items()}
        failure = None
        if ranks.rank == 0:
            try:
                settings = run_settings(model, model_name, rule, target_setting, start, samples, batch_size,
                                        stored_dtype, first.shape[1:], output.shape[1], recorded)
                create_or_check(store, settings, storage_options)
                written_group = require_zarr().open_group(store, mode="r", storage_options=storage_options)
                _check_resume(written_group, dataset, read_done(written_group, store_name(store)), batch_size,
                              check_data, store_name(store))
            except (ValueError, OSError) as error:
                failure = error
        shared, run = ranks.share((None if failure is None else f"{type(failure).__name__}: {failure}",
                                   f"torchlrp-explain-dataset-{os.getpid()}-{time.time_ns()}"))
        if failure is not None:
            raise failure
        if shared is not None:
            raise RuntimeError(f"rank 0 could not prepare the store: {shared}")
        count_all = ranks.progress(run)  # the bar counts every rank's samples where the ranks share a counter
        group = require_zarr().open_group(store, mode="r+", storage_options=storage_options)
        done = read_done(group, store_name(store))
        mine = [chunk for chunk in range(ranks.rank, len(done), ranks.world) if not done[chunk]]
        skipped = sum(min(batch_size, samples - chunk * batch_size) for chunk in np.flatnonzero(done))
        loader = DataLoader(dataset, batch_sampler=_ChunkBatches(mine, batch_size, samples), num_workers=num_workers,
                            pin_memory=ranks.device.type == "cuda")
        bar = tqdm(total=samples, initial=skipped, unit="img", desc="explaining", disable=quiet or ranks.rank != 0,
                   smoothing=0.1)
        written, pending = 0, []
        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1) as writer:
            for chunk, batch in zip(mine, loader):
                arrays = _explain_chunk(explainable, batch, chunk * batch_size, first.shape[1:], target_setting,
                                        rule, start, stored_dtype, ranks.device, fused, definitions)
                if len(pending) >= 2:  # at most two chunks in flight: the write overlaps the next batch's compute
                    pending.pop(0).result()
                pending.append(writer.submit(write_chunk, group, chunk, chunk * batch_size, arrays))
                size = len(arrays["index"])
                written += size
                if count_all is None:
                    bar.update(min(size * ranks.world, samples - bar.n))
                else:
                    bar.update(skipped + count_all(size) - bar.n)
            for future in pending:
                future.result()
        seconds = time.perf_counter() - began
        bar.close()
        counts = ranks.gather((written, seconds))
        per_rank = tuple(count for count, _ in counts)
        seconds = max(rank_seconds for _, rank_seconds in counts)
        report = DatasetReport(store_name(store), samples, sum(per_rank), skipped, per_rank, seconds)
        if ranks.rank == 0 and not quiet:
            listed = ", ".join(f"rank {rank}: {count}" for rank, count in enumerate(per_rank))
            print(f"torchlrp: {report.written} samples explained in {seconds:.1f} s "
                  f"({report.images_per_second:.1f}/s; {listed}); {skipped} already in the store {report.store}")
        return report
    finally:
        ranks.close()


__all__ = ["DatasetReport", "Relevances", "STORE_DTYPES", "STORE_FORMAT", "explain_dataset", "open_relevances"]
