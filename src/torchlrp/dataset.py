"""``torchlrp.dataset``: explain a whole dataset into a Zarr store, in one process or many (``torchrun``).

The unit of work is a *chunk* of ``batch_size`` consecutive samples of the dataset: chunk ``k`` holds samples
``k * batch_size`` up to the next chunk. Under ``torchrun --nproc-per-node N`` rank ``r`` explains chunks
``r, r + N, r + 2N, ...`` on its own device, so every sample is explained exactly once and every chunk of the store is
written by one rank only. A chunk's completion flag is written after its data: a run that is killed and started
again with the same call skips the chunks already written and ends with the same store as an uninterrupted run.

Store layout (a Zarr v3 group; ``N`` samples, input shape ``S``, ``K`` classes), all arrays chunked by batch:

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
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from .composites import Composite, as_composite
from .convert import convert
from .explain import explain
from .modules import ExplainableAffine
from .modules.attention import ATTENTION_TYPES
from .rules import Rule

#: layout version of the store; a reader refuses stores of another version
STORE_FORMAT = 1
#: relevance dtypes a store can hold (bfloat16 has no numpy/Zarr type: float16 with the per-sample scale keeps more)
STORE_DTYPES = {torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}
#: settings that must be equal to continue a store
_MATCHING = ("format", "model", "parameters_sha256", "rule_definition", "target", "start", "samples", "batch_size", "dtype",
             "input_shape", "classes")


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


def _zarr() -> Any:
    try:
        import zarr
    except ImportError:
        raise ImportError("torchlrp.dataset stores relevance in Zarr: pip install 'zarr>=3' "
                          "(or pip install 'torchlrp[dataset]')") from None
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(f"torchlrp.dataset needs zarr>=3, found {zarr.__version__}: pip install -U 'zarr>=3'")
    return zarr


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


def _parameters_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state (names, shapes, dtypes and values of every parameter and buffer)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, Tensor):
            continue
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(values.shape)}:{values.dtype}".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _target_setting(target: Any) -> str | int:
    if target is None or target == "prediction":
        return "prediction"
    if target == "label":
        return "label"
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool) and target >= 0:
        return int(target)
    raise ValueError(f"target must be None or 'prediction' (each sample's top class), 'label' (the dataset's "
                     f"label) or a class index >= 0; got {target!r}")


def _store_dtype(dtype: Any) -> str:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype not in STORE_DTYPES:
        allowed = ", ".join(f"torch.{name}" for name in STORE_DTYPES.values())
        hint = " (float16 keeps 11 bits relative to each heatmap's peak: use it)" if dtype == torch.bfloat16 else ""
        raise ValueError(f"dtype must be one of {allowed}; got {dtype!r}{hint}")
    return STORE_DTYPES[dtype]


def _is_explainable(model: torch.nn.Module) -> bool:
    return any(isinstance(module, (ExplainableAffine, *ATTENTION_TYPES)) for module in model.modules())


def _store_name(store: Any) -> str:
    return os.fspath(store) if isinstance(store, (str, os.PathLike)) else repr(store)


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


def _settings(model: torch.nn.Module, model_name: str | None, rule: Any, target: str | int, start: str,
              samples: int, batch_size: int, dtype: str, input_shape: Sequence[int], classes: int) -> dict:
    from . import __version__

    return {"format": STORE_FORMAT, "torchlrp_version": __version__,
            "model": model_name or type(model).__name__, "parameters_sha256": _parameters_sha256(model),
            "rule": rule if isinstance(rule, str) else type(rule).__name__,
            "rule_definition": repr(as_composite(rule)), "target": target, "start": start,
            "samples": samples, "batch_size": batch_size, "dtype": dtype, "input_shape": list(input_shape),
            "classes": classes, "chunks": math.ceil(samples / batch_size)}


def _open_for_writing(store: Any, settings: dict, storage_options: dict | None) -> None:
    """Create the store with ``settings``, or check that an existing one was made with the same settings.
    Raises ``ValueError``/``PermissionError`` with what differs; writes nothing into a store it refuses."""
    zarr = _zarr()
    name = _store_name(store)
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
        differ = [key for key in _MATCHING if found.get(key) != settings[key]]
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


def _write_chunk(group: Any, chunk: int, start: int, arrays: dict[str, np.ndarray]) -> None:
    stop = start + len(arrays["index"])
    for name, values in arrays.items():
        group[name][start:stop] = values
    group["done"][chunk] = True  # last: a chunk counts only once all of it is written


def _scaled(relevance: Tensor, dtype: str) -> tuple[Tensor, Tensor]:
    """``(relevance / scale, scale)`` per sample: for float16 the scale is the peak's power of two (exact), else 1."""
    if dtype != "float16":
        return relevance, torch.ones(len(relevance), dtype=torch.float32, device=relevance.device)
    peak = relevance.flatten(1).abs().amax(1).float()
    _, exponent = torch.frexp(peak)
    scale = torch.where(peak > 0, torch.ldexp(torch.ones_like(peak), exponent), torch.ones_like(peak))
    return relevance / scale.to(relevance.dtype).view(-1, *[1] * (relevance.dim() - 1)), scale


def _explain_chunk(model: torch.nn.Module, batch: Any, begin: int, shape: torch.Size, target: str | int, rule: Any,
                   start: str, dtype: str, device: torch.device) -> dict[str, np.ndarray]:
    """Explain one collated chunk (samples ``begin ...``) and return the store's arrays for it, on the CPU."""
    inputs, labels = _split_sample(batch)
    last = begin + len(inputs) - 1
    if inputs.shape[1:] != shape:
        raise ValueError(f"sample {begin}..{last} has shape {tuple(inputs.shape[1:])}, the first sample "
                         f"{tuple(shape)}: every input must have one shape")
    if target == "label" and (labels is None or bool((labels < 0).any())):
        raise ValueError(f"target='label' needs (input, label) samples with integer labels >= 0; samples "
                         f"{begin}..{last} have none")
    inputs = inputs.to(device, non_blocking=True)
    chosen = None if target == "prediction" else (labels.to(device) if target == "label" else target)
    relevance, scores = explain(model, inputs, target=chosen, rule=rule, start=start, return_scores=True)
    if not bool(torch.isfinite(relevance).all()):
        raise FloatingPointError(f"the relevance of samples {begin}..{last} is not finite (NaN or inf); nothing of "
                                 f"them was written. A larger epsilon, or a float32 model, usually fixes it")
    prediction = scores.argmax(1)
    explained = prediction if chosen is None else (
        chosen if isinstance(chosen, Tensor) else torch.full_like(prediction, chosen))
    stored, scale = _scaled(relevance, dtype)
    return {"relevance": stored.to(getattr(torch, dtype)).cpu().numpy(), "scale": scale.cpu().numpy(),
            "logits": scores.float().cpu().numpy(), "prediction": prediction.cpu().numpy(),
            "target": explained.long().cpu().numpy(),
            "label": (labels if labels is not None else torch.full((len(inputs),), -1)).cpu().numpy(),
            "index": np.arange(begin, begin + len(inputs), dtype=np.int64)}


def explain_dataset(model: torch.nn.Module, dataset: Any, rule: "str | Rule | Composite", store: Any, *,
                    target: "str | int | None" = None, batch_size: int = 32, num_workers: int = 0,
                    dtype: "torch.dtype | str" = torch.float16, start: str = "one",
                    device: "str | torch.device | None" = None, model_name: str | None = None,
                    storage_options: dict | None = None, quiet: bool = False) -> DatasetReport:
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
    quiet : bool
        No progress bar and no summary line (for logs).

    Returns
    -------
    DatasetReport
        Counts and time of this call; read the relevances with :func:`open_relevances`.

    Raises
    ------
    ValueError
        For a bad argument, a store made by another model, rule or dataset, a folder that is not a store, samples
        of different shapes, or a model whose output is not ``(batch, classes)``.
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
    target_setting = _target_setting(target)
    stored_dtype = _store_dtype(dtype)
    _zarr()
    if model.training:
        raise ValueError("the model is in training mode; call model.eval() first (dropout and batch statistics "
                         "would make the heatmaps random)")
    ranks = _Ranks(device)
    try:
        explainable = model if _is_explainable(model) else convert(model)
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
        failure = None
        if ranks.rank == 0:
            try:
                settings = _settings(model, model_name, rule, target_setting, start, samples, batch_size,
                                     stored_dtype, first.shape[1:], output.shape[1])
                _open_for_writing(store, settings, storage_options)
            except (ValueError, OSError) as error:
                failure = error
        shared, run = ranks.share((None if failure is None else f"{type(failure).__name__}: {failure}",
                                   f"torchlrp-explain-dataset-{os.getpid()}-{time.time_ns()}"))
        if failure is not None:
            raise failure
        if shared is not None:
            raise RuntimeError(f"rank 0 could not prepare the store: {shared}")
        count_all = ranks.progress(run)  # the bar counts every rank's samples where the ranks share a counter
        group = _zarr().open_group(store, mode="r+", storage_options=storage_options)
        done = group["done"][:]
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
                                        rule, start, stored_dtype, ranks.device)
                if len(pending) >= 2:  # at most two chunks in flight: the write overlaps the next batch's compute
                    pending.pop(0).result()
                pending.append(writer.submit(_write_chunk, group, chunk, chunk * batch_size, arrays))
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
        report = DatasetReport(_store_name(store), samples, sum(per_rank), skipped, per_rank, seconds)
        if ranks.rank == 0 and not quiet:
            listed = ", ".join(f"rank {rank}: {count}" for rank, count in enumerate(per_rank))
            print(f"torchlrp: {report.written} samples explained in {seconds:.1f} s "
                  f"({report.images_per_second:.1f}/s; {listed}); {skipped} already in the store {report.store}")
        return report
    finally:
        ranks.close()


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
        """Boolean mask ``(samples,)``: which samples are in the store (all of them once the run finished)."""
        return np.repeat(self._done, self.settings["batch_size"])[:len(self)]

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
    zarr = _zarr()
    name = _store_name(store)
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


__all__ = ["DatasetReport", "Relevances", "STORE_DTYPES", "STORE_FORMAT", "explain_dataset", "open_relevances"]
