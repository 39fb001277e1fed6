"""PatternNet and PatternAttribution (Kindermans et al. 2017): fit signal patterns from data.

For a layer with weight ``w`` and output ``y = w^T x + b``, the linear estimator ``S_a`` gives the pattern
``a = cov(x, y) / (w^T cov(x, y))`` per output unit; the two-component estimator ``S_a+-`` restricted to positive
outputs (:func:`fit_patternnet_positive`) computes the same statistics only over the samples where ``y > 0``.
Statistics stream over a DataLoader in one pass: per batch, the sums ``sum x y`` and ``sum x`` over every patch
come from one weight-gradient convolution each (so stride, padding, dilation and groups are honoured exactly), and
are merged into float64 running means and co-moments (Chan et al.'s pairwise update).

Patterns are returned as :class:`Patterns`: a list of tensors of the weights' shapes in layer order, as
TorchLRP returns them (``[p.detach() for p in patterns]`` works), that also knows the layers' names
(``patterns["features.0"]``, ``patterns.items()``). Pass them as ``pattern=`` together with ``rule="patternnet"``
or ``rule="patternattribution"``; a plain list, or a dict of layer name to tensor, works as well.

The PatternNet signal and the PatternAttribution relevance are returned unscaled. TorchLRP (after iNNvestigate)
divides the backward signal of image-shaped tensors by its per-sample maximum magnitude at each layer, which
only rescales each sample's result: :func:`normalize_per_sample` gives that scaling (max magnitude 1 per sample).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence, Union

import torch
from torch import Tensor

from torchlrp.functional.affine import AffineOp
from torchlrp.modules.affine import ExplainableAffine

PatternsLike = Union[Mapping[str, Tensor], Sequence[Tensor]]


class Patterns(list):
    """Patterns in layer order (a ``list`` of tensors, TorchLRP's return type) that know their layers' names.

    Parameters
    ----------
    by_name : mapping of str to Tensor
        Layer name to pattern, in layer order.

    Attributes
    ----------
    names : list of str
        The layer names, one per pattern.
    """

    def __init__(self, by_name: Mapping[str, Tensor]) -> None:
        super().__init__(by_name.values())
        self.names = list(by_name)

    def __getitem__(self, key):  # noqa: D105
        if isinstance(key, str):
            if key not in self.names:
                raise KeyError(f"no pattern for layer {key!r}; the layers are {self.names}")
            return super().__getitem__(self.names.index(key))
        return super().__getitem__(key)

    def keys(self) -> list[str]:
        """Return the layer names.

        Returns
        -------
        list of str
            One name per pattern, in layer order.
        """
        return list(self.names)

    def items(self) -> list[tuple[str, Tensor]]:
        """Return ``(layer name, pattern)`` pairs in layer order.

        Returns
        -------
        list of tuple
            The pairs.
        """
        return list(zip(self.names, self))


def normalize_per_sample(signal: Tensor) -> Tensor:
    """Divide each sample of ``signal`` by its maximum magnitude (TorchLRP's scaling of pattern signals).

    TorchLRP scales the PatternNet/PatternAttribution backward signal of every image-shaped (more than 2-D) tensor
    per sample at each layer; the result differs from torchlrp's unscaled one by one positive factor per sample,
    which this function removes. All-zero samples stay zero.

    Parameters
    ----------
    signal : Tensor
        Shape ``(batch, ...)``.

    Returns
    -------
    Tensor
        ``signal / max|signal|`` per sample, in ``[-1, 1]``.
    """
    magnitude = signal.detach().abs().flatten(1).amax(1)
    magnitude = torch.where(magnitude == 0, torch.ones_like(magnitude), magnitude)
    return signal / magnitude.view(-1, *([1] * (signal.dim() - 1)))


class _RunningCovariance:
    """Float64 running means of x and y and their co-moment, per output unit (weight-shaped)."""

    def __init__(self) -> None:
        self.count: Tensor | None = None
        self.mean_x: Tensor | None = None
        self.mean_y: Tensor | None = None
        self.comoment: Tensor | None = None

    def update(self, count: Tensor, sum_x: Tensor, sum_y: Tensor, sum_xy: Tensor) -> None:
        count, sum_x, sum_y, sum_xy = (t.double() for t in (count, sum_x, sum_y, sum_xy))
        safe = count.clamp(min=1)
        mean_x, mean_y = sum_x / safe, sum_y / safe
        comoment = sum_xy - mean_x * sum_y
        if self.count is None:
            self.count, self.mean_x, self.mean_y, self.comoment = count, mean_x, mean_y, comoment
            return
        total = self.count + count
        total_safe = total.clamp(min=1)
        delta_x, delta_y = mean_x - self.mean_x, mean_y - self.mean_y
        self.comoment = self.comoment + comoment + delta_x * delta_y * self.count * count / total_safe
        self.mean_x = self.mean_x + delta_x * count / total_safe
        self.mean_y = self.mean_y + delta_y * count / total_safe
        self.count = total

    def pattern(self, weight: Tensor) -> Tensor:
        covariance = self.comoment / self.count.clamp(min=1)
        scale = (weight.double() * covariance).flatten(1).sum(1).view(-1, *([1] * (weight.dim() - 1)))
        pattern = torch.where(scale == 0, 0.0, covariance / torch.where(scale == 0, 1.0, scale))
        return pattern.to(weight.dtype)


def _weight_shaped(op: AffineOp, signal: Tensor, input: Tensor) -> Tensor:
    """``sum over samples and positions of signal_j * patch`` for every output unit j (weight-shaped)."""
    if op.spatial_dims == 0:
        return signal.reshape(-1, signal.shape[-1]).T.matmul(input.reshape(-1, input.shape[-1]))
    if op.explicit_padding is not None:
        input = torch.nn.functional.pad(input, op.explicit_padding, mode=op.padding_mode)
    n = op.spatial_dims
    return torch.ops.aten.convolution_backward(
        signal, input, op.weight, None, op.stride, op.padding, op.dilation, False, (0,) * n, op.groups,
        (False, True, False),
    )[1]


def _unit_sum(op: AffineOp, tensor: Tensor) -> Tensor:
    """Sum over samples and positions per output unit, shaped to broadcast against the weight."""
    dims = [d for d in range(tensor.dim()) if d != (tensor.dim() - 1 if op.spatial_dims == 0 else 1)]
    return tensor.sum(dims).view(-1, *([1] * (op.weight.dim() - 1)))


def _layers(model: torch.nn.Module) -> list[tuple[str, ExplainableAffine]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, ExplainableAffine)]
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no torchlrp layer to fit patterns for")
    return layers


def _fit(model: torch.nn.Module, loader: Iterable, max_iter: int | None, device: torch.device | str | None,
         positive: bool, progress: bool | None) -> Patterns:
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"max_iter must be a positive number of batches or None (all), got {max_iter!r}")
    layers = _layers(model)
    statistics = {name: _RunningCovariance() for name, _ in layers}

    def record(name: str):
        def hook(module: ExplainableAffine, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            op = module.affine_op()
            # under autocast the activations are in a lower precision than the weight: statistics in the weight's
            input, output = inputs[0].to(op.weight.dtype), output.to(op.weight.dtype)
            mask = (output > 0).to(output.dtype) if positive else torch.ones_like(output)
            signal = output * mask
            statistics[name].update(_unit_sum(op, mask), _weight_shaped(op, mask, input),
                                    _unit_sum(op, signal), _weight_shaped(op, signal, input))
        return hook

    if device is None:
        device = next(model.parameters()).device
    handles = [module.register_forward_hook(record(name)) for name, module in layers]
    batches = loader
    if progress or (progress is None and hasattr(loader, "__len__") and len(loader) > 50):
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="fitting patterns", unit="batch")
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(inputs.to(device))
                seen += 1
                if seen == max_iter:
                    break
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise ValueError("the loader yielded no batch; patterns need data")
    return Patterns({name: statistics[name].pattern(module.weight.detach()) for name, module in layers})


def fit_patternnet(model: torch.nn.Module, loader: Iterable, max_iter: int | None = None,
                   device: torch.device | str | None = None, progress: bool | None = None) -> Patterns:
    """Fit the linear PatternNet estimator ``S_a`` for every torchlrp layer of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        A model with torchlrp layers, in eval mode.
    loader : iterable
        Batches of inputs, or ``(input, label, ...)`` tuples (e.g. a DataLoader). One pass is made.
    max_iter : int, optional
        Stop after this many batches (TorchLRP's argument; default: the whole loader).
    device : torch.device or str, optional
        Where to run (default: the model's device).
    progress : bool, optional
        Show a tqdm progress bar (default: for loaders of more than 50 batches).

    Returns
    -------
    Patterns
        One pattern (weight-shaped) per torchlrp layer, in layer order; also by layer name.

    Raises
    ------
    ValueError
        If the loader yields nothing, ``max_iter`` is not a positive int, or the model has no torchlrp layer.
    """
    return _fit(model, loader, max_iter, device, positive=False, progress=progress)


def fit_patternnet_positive(model: torch.nn.Module, loader: Iterable, max_iter: int | None = None,
                            device: torch.device | str | None = None, progress: bool | None = None) -> Patterns:
    """Fit the two-component estimator ``S_a+-`` restricted to positive outputs (statistics over ``y > 0`` only).

    Parameters
    ----------
    model, loader, max_iter, device, progress
        As in :func:`fit_patternnet`.

    Returns
    -------
    Patterns
        One pattern (weight-shaped) per torchlrp layer, in layer order; also by layer name.
    """
    return _fit(model, loader, max_iter, device, positive=True, progress=progress)


def patterns_by_module(model: torch.nn.Module, patterns: PatternsLike) -> dict[torch.nn.Module, Tensor]:
    """Match patterns to the torchlrp layers of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    patterns : Patterns, dict or list
        Layer name to pattern, or a list (TorchLRP's) with one pattern per torchlrp layer in layer order.

    Returns
    -------
    dict
        Module to pattern.

    Raises
    ------
    ValueError
        For a name that is no torchlrp layer, a list of the wrong length, or a pattern of the wrong shape.
    """
    layers = _layers(model)
    if isinstance(patterns, Mapping):
        by_name = dict(layers)
        unknown = [name for name in patterns if name not in by_name]
        if unknown:
            raise ValueError(f"patterns given for {unknown}, which are not torchlrp layers of the model; "
                             f"its layers are {list(by_name)}")
        matched = {by_name[name]: (name, pattern) for name, pattern in patterns.items()}
    elif isinstance(patterns, Sequence) and not isinstance(patterns, (str, Tensor)):
        if len(patterns) != len(layers):
            raise ValueError(f"got {len(patterns)} patterns for {len(layers)} torchlrp layers")
        patterns = [torch.as_tensor(p) if not isinstance(p, Tensor) and hasattr(p, "__array__") else p
                    for p in patterns]  # numpy arrays from a TorchLRP pickle
        matched = {module: (name, pattern) for (name, module), pattern in zip(layers, patterns)}
    else:
        raise ValueError(f"patterns must be a dict of layer name to tensor or a list of tensors, "
                         f"got {type(patterns).__name__}")
    for module, (name, pattern) in matched.items():
        if not isinstance(pattern, Tensor) or pattern.shape != module.weight.shape:
            shape = tuple(pattern.shape) if isinstance(pattern, Tensor) else type(pattern).__name__
            raise ValueError(f"pattern for {name!r} has shape {shape}, the layer's weight has shape "
                             f"{tuple(module.weight.shape)}")
    return {module: pattern.to(module.weight.device, module.weight.dtype) for module, (_, pattern) in matched.items()}


def save(patterns: PatternsLike, path: str) -> None:
    """Save patterns with :func:`torch.save` (a dict of tensors, or a list).

    Parameters
    ----------
    patterns : Patterns, dict or list
        Patterns as returned by :func:`fit_patternnet` (saved with their layer names).
    path : str
        File to write.
    """
    named = isinstance(patterns, (Mapping, Patterns))
    torch.save(dict(patterns.items()) if named else list(patterns), path)


def load(path: str, map_location: torch.device | str | None = None) -> Patterns | list[Tensor]:
    """Load patterns saved by :func:`save`, with ``weights_only=True`` (no code is unpickled).

    Parameters
    ----------
    path : str
        File to read.
    map_location : torch.device or str, optional
        Where to put the tensors.

    Returns
    -------
    Patterns or list
        The patterns (with their layer names where they were saved with them).

    Raises
    ------
    ValueError
        If the file does not hold a dict of tensors or a list of tensors.
    """
    patterns = torch.load(path, map_location=map_location, weights_only=True)
    values = patterns.values() if isinstance(patterns, dict) else patterns
    if not isinstance(patterns, (dict, list)) or not all(isinstance(v, Tensor) for v in values):
        raise ValueError(f"{path} does not hold patterns (a dict or list of tensors)")
    return Patterns(patterns) if isinstance(patterns, dict) else patterns
