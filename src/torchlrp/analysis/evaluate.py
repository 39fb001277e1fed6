"""Faithfulness you can measure: pixel flipping, the randomization check, relevance mass/rank accuracy, tuning.

Every measure runs batched (all samples of a step in one forward, no per-sample Python loop), on the device of
the data, and comes with a chance level: :func:`random_relevance` gives the attribution to compare against.

* :func:`pixel_flipping` (region perturbation, Samek et al. 2017): replace the most relevant patches first (MoRF)
  or the least relevant first (LeRF) and follow the target score; AOPC is the mean drop below the unperturbed score
  over the steps, ABPC the mean gap between the LeRF and MoRF curves (larger: the order found what the score rests
  on).
* :func:`randomization` (Adebayo et al. 2018): re-initialize the layers from the top down (cascading) or one at a
  time (independent) and report the Spearman rank correlation between the heatmaps of the trained and of the
  randomized model -- an explanation of the model should change when the model does (correlation well below 1).
* :func:`relevance_mass_accuracy` and :func:`relevance_rank_accuracy` (Arras et al. 2022) for inputs with a
  ground-truth mask.
* :func:`tune` scores candidate rules/composites on one of these and returns them ranked.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from torchlrp.explanation.explain import explain
from torchlrp.modules.affine import ExplainableAffine

ORDERS = ("morf", "lerf", "both")
FILLS = ("mean", "noise")


def random_relevance(input: Tensor, seed: int = 0) -> Tensor:
    """Return a random attribution of ``input``'s shape (standard normal, seeded): the chance level of a measure.

    Parameters
    ----------
    input : Tensor
        The inputs.
    seed : int
        Seed of the generator (on the CPU; moved to the input's device).

    Returns
    -------
    Tensor
        Random relevance, same shape, dtype and device as ``input``.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(input.shape, generator=generator, dtype=torch.float64).to(input.device, input.dtype)


@dataclass
class FlipResult:
    """Curves and areas of :func:`pixel_flipping` (one value per sample).

    Attributes
    ----------
    morf, lerf : Tensor or None
        ``(N, steps + 1)``: the target score with the most / least relevant patches replaced first, step 0
        unperturbed (None for the order not computed).
    aopc : Tensor or None
        ``(N,)``: mean of ``score[0] - score[k]`` over ``k = 0 .. steps`` of the MoRF curve (Samek et al. 2017).
    abpc : Tensor or None
        ``(N,)``: mean of ``lerf[k] - morf[k]`` over the steps (with ``order="both"``).
    """

    morf: Tensor | None
    lerf: Tensor | None
    aopc: Tensor | None
    abpc: Tensor | None


def _patch_scores(relevance: Tensor, patch: int) -> Tensor:
    """``(N, rows, columns)`` relevance summed over channels and patches."""
    values = relevance if relevance.dim() == 3 else relevance.sum(1)
    count, height, width = values.shape
    return values.reshape(count, height // patch, patch, width // patch, patch).sum((2, 4))


def _fill(input: Tensor, fill: str | Tensor | float, seed: int) -> Tensor:
    if isinstance(fill, str):
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, a number or a tensor, got {fill!r}")
        mean = input.mean((2, 3), keepdim=True)
        if fill == "mean":
            return mean.expand_as(input)
        if input.shape[2] * input.shape[3] < 2:
            raise ValueError(f"fill='noise' takes each image's standard deviation, which {input.shape[2]}x"
                             f"{input.shape[3]} images do not have; use fill='mean' or a value")
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(input.shape, generator=generator, dtype=torch.float64).to(input.device, input.dtype)
        return mean + noise * input.std((2, 3), keepdim=True)
    return torch.as_tensor(fill, dtype=input.dtype, device=input.device).expand_as(input)


def _scores(model: torch.nn.Module, inputs: Tensor, target: Tensor, batch_size: int) -> Tensor:
    """The target logit of each input, ``batch_size`` inputs per forward, without a graph."""
    chunks = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            output = model(inputs[start:start + batch_size])
            chunks.append(output.gather(1, target[start:start + batch_size, None]).squeeze(1))
    return torch.cat(chunks)


def pixel_flipping(model: torch.nn.Module, input: Tensor, relevance: Tensor, target: Tensor | Sequence[int],
                   patch: int = 1, steps: int = 20, fill: str | Tensor | float = "mean", order: str = "both",
                   batch_size: int = 256, seed: int = 0) -> FlipResult:
    """Region perturbation: replace patches in the order of their relevance and follow the target logit.

    Parameters
    ----------
    model : torch.nn.Module
        The model (plain or converted; run without a graph).
    input : Tensor
        ``(N, C, H, W)`` images, ``H`` and ``W`` multiples of ``patch``.
    relevance : Tensor
        ``(N, C, H, W)`` or ``(N, H, W)``; patches are ranked by their summed relevance.
    target : Tensor or sequence of int
        ``(N,)`` class whose logit is followed.
    patch : int
        Side of the square patches replaced together.
    steps : int
        Number of perturbation steps; step ``k`` has the first ``round(k * patches / steps)`` patches replaced.
    fill : {"mean", "noise"}, number or Tensor
        What replaces a patch: each image's channel mean, Gaussian noise with each image's channel mean and
        standard deviation (seeded), or a value broadcastable to ``input`` (e.g. the dataset mean).
    order : {"morf", "lerf", "both"}
        Most relevant first (AOPC), least relevant first, or both (and ABPC).
    batch_size : int
        Perturbed images per forward.
    seed : int
        Seed of the noise fill and of the random tie-breaking between equally relevant patches.

    Returns
    -------
    FlipResult
        The curves and areas.

    Raises
    ------
    ValueError
        For mismatched shapes, a patch that does not divide the image, relevance holding NaN or inf, a bad order,
        fill or step count, or ``fill="noise"`` on images of one pixel.
    """
    if input.dim() != 4:
        raise ValueError(f"input must have shape (N, C, H, W), got {tuple(input.shape)}")
    if relevance.shape != input.shape and relevance.shape != (input.shape[0], *input.shape[2:]):
        raise ValueError(f"relevance of shape {tuple(relevance.shape)} does not fit input {tuple(input.shape)}")
    count, channels, height, width = input.shape
    if not isinstance(patch, int) or patch < 1 or height % patch or width % patch:
        raise ValueError(f"patch must be a positive int dividing {height}x{width}, got {patch!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    target = torch.as_tensor(target, device=input.device).reshape(-1)
    if target.shape != (count,):
        raise ValueError(f"target must hold one class per sample ({count}), got shape {tuple(target.shape)}")
    input = input.detach()
    if not bool(torch.isfinite(relevance).all()):
        bad = (~torch.isfinite(relevance.detach().flatten(1))).any(1).nonzero()
        raise ValueError(f"relevance holds NaN or inf ({len(bad)} sample(s), first: {int(bad[0])}); pixel flipping "
                         f"ranks patches by their relevance and needs finite maps")
    replacement = _fill(input, fill, seed)
    scores = _patch_scores(relevance.detach().to(input.device, torch.float64), patch).flatten(1)  # (N, P)
    patches = scores.shape[1]
    generator = torch.Generator().manual_seed(seed)
    jitter = torch.rand(scores.shape, generator=generator, dtype=torch.float64).to(scores.device) * 1e-12
    magnitude = scores.abs().amax(1, keepdim=True)
    jitter = jitter * torch.where(magnitude > 0, magnitude, 1.0)  # (an all-zero map: ties broken at random too)
    removed = [round(k * patches / steps) for k in range(steps + 1)]
    curves = {}
    for name, sign in (("morf", -1.0), ("lerf", 1.0)):
        if order not in (name, "both"):
            continue
        position = torch.empty_like(scores, dtype=torch.long)
        ranking = torch.argsort(sign * (scores + jitter), dim=1)
        position.scatter_(1, ranking, torch.arange(patches, device=scores.device).expand(count, -1))
        position = position.reshape(count, 1, height // patch, width // patch)
        position = position.repeat_interleave(patch, 2).repeat_interleave(patch, 3)  # (N, 1, H, W)
        perturbed = torch.cat([torch.where(position < n, replacement, input) for n in removed])
        curves[name] = _scores(model, perturbed, target.repeat(steps + 1), batch_size).reshape(steps + 1, count).T
    morf, lerf = curves.get("morf"), curves.get("lerf")
    aopc = None if morf is None else (morf[:, :1] - morf).mean(1)
    abpc = None if morf is None or lerf is None else (lerf - morf).mean(1)
    return FlipResult(morf, lerf, aopc, abpc)


def average_ranks(values: Tensor) -> Tensor:
    """Ranks of each row's values, ties given the mean of the ranks they span (as ``scipy.stats.rankdata``).

    Parameters
    ----------
    values : Tensor
        ``(N, ...)``; each sample is ranked over its flattened values.

    Returns
    -------
    Tensor
        ``(N, numel / N)`` float64 ranks, ``0 .. numel / N - 1``.
    """
    flat = values.detach().flatten(1).double()
    count, size = flat.shape
    ordered, order = flat.sort(1)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(1) - 1 + torch.arange(count, device=flat.device)[:, None] * size  # (N, size)
    position = torch.arange(size, dtype=flat.dtype, device=flat.device).expand(count, -1)
    totals = torch.zeros(count * size, dtype=flat.dtype, device=flat.device).scatter_add_(0, group.flatten(),
                                                                                         position.flatten())
    members = torch.zeros_like(totals).scatter_add_(0, group.flatten(), torch.ones_like(totals))
    mean_rank = (totals / members.clamp(min=1))[group]
    return torch.empty_like(flat).scatter_(1, order, mean_rank)


def spearman(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation of each sample's two maps (flattened; ties take their average rank).

    Parameters
    ----------
    first, second : Tensor
        Same shape ``(N, ...)``.

    Returns
    -------
    Tensor
        ``(N,)`` correlations in ``[-1, 1]``; NaN (with a warning) for a sample where either map is constant,
        whose correlation is undefined.

    Raises
    ------
    ValueError
        For maps of different shapes, or maps holding NaN or inf.
    """
    if first.shape != second.shape:
        raise ValueError(f"spearman needs two maps of one shape, got {tuple(first.shape)} and {tuple(second.shape)}")
    for name, values in (("first", first), ("second", second)):
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"the {name} maps hold NaN or inf; rank correlation needs finite maps")
    a, b = average_ranks(first), average_ranks(second)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    norms = a.norm(dim=1) * b.norm(dim=1)
    constant = norms == 0
    if bool(constant.any()):
        warnings.warn(f"{int(constant.sum())} of {len(norms)} sample(s) have a constant map (first: sample "
                      f"{int(constant.nonzero()[0])}): their rank correlation is undefined and returned as NaN",
                      RuntimeWarning, stacklevel=2)
    return torch.where(constant, torch.full_like(norms, float("nan")), (a * b).sum(1) / norms.clamp(min=1e-300))


@dataclass
class RandomizationResult:
    """Output of :func:`randomization`.

    Attributes
    ----------
    layers : list of str
        The randomized layers, top (output side) first (with ``at=``: the last layer re-drawn at each count).
    correlation : Tensor
        ``(len(layers), N)``: Spearman correlation between the trained model's heatmap and the heatmap after
        randomizing up to (cascading) or only (independent) each layer.
    """

    layers: list[str]
    correlation: Tensor


def _randomize(layer: ExplainableAffine, generator: torch.Generator) -> None:
    """Re-draw a layer's weight (normal, the trained weight's std) and zero its bias, in place."""
    with torch.no_grad():
        std = float(layer.weight.std()) or 1.0
        weight = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64) * std
        layer.weight.copy_(weight.to(layer.weight))
        if layer.bias is not None:
            layer.bias.zero_()


def randomization(model: torch.nn.Module, input: Tensor, target: Tensor | Sequence[int] | int, rule: Any,
                  layers: str = "cascading", absolute: bool = False, seed: int = 0,
                  attribution: Callable[[torch.nn.Module, Tensor, Tensor], Tensor] | None = None,
                  at: Sequence[int] | None = None) -> RandomizationResult:
    """The model-randomization check: how much the heatmaps change when the layers are re-initialized.

    Parameters
    ----------
    model : torch.nn.Module
        A model with torchlrp layers (see :func:`torchlrp.convert`); it is not modified (a copy is randomized).
    input : Tensor
        Inputs.
    target : Tensor, sequence of int or int
        Classes to explain (as :func:`torchlrp.explain` takes them).
    rule : str, Rule or Composite
        The explanation under test.
    layers : {"cascading", "independent"}
        Randomize from the top layer down, keeping the layers above randomized; or each layer alone.
    absolute : bool
        Correlate the magnitudes of the maps instead of the signed maps.
    seed : int
        Seed of the new weights.
    attribution : callable, optional
        ``attribution(model, input, target) -> relevance`` instead of ``explain(model, input, target, rule)``
        (e.g. a baseline that ignores the model, to see what chance looks like).
    at : sequence of int, optional
        Cascading only: explain only after re-drawing this many top layers (e.g. ``(1, 5, 20)``; a count above the
        number of layers means all of them), instead of after every layer -- one explanation per entry, for deep
        models.

    Returns
    -------
    RandomizationResult
        Per randomized layer, each sample's correlation with the trained model's map.

    Raises
    ------
    ValueError
        For an unknown ``layers`` mode, ``at`` with independent layers or counts below 1, or a model without
        torchlrp layers.
    """
    if layers not in ("cascading", "independent"):
        raise ValueError(f"layers must be 'cascading' or 'independent', got {layers!r}")
    explain_with = attribution or (lambda m, x, t: explain(m, x, t, rule=rule))
    names = [name for name, module in model.named_modules() if isinstance(module, ExplainableAffine)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no torchlrp layer to randomize; convert it first")
    if at is not None and (layers != "cascading" or not at or min(at) < 1):
        raise ValueError(f"at= takes counts >= 1 of top layers, with layers='cascading'; got {at!r} with {layers!r}")
    counts = set(range(1, len(names) + 1)) if at is None else {min(count, len(names)) for count in at}
    original = explain_with(model, input, target)
    generator = torch.Generator().manual_seed(seed)
    randomized = copy.deepcopy(model)
    reported, correlations = [], []
    for drawn, name in enumerate(reversed(names), start=1):
        if layers == "independent":
            randomized = copy.deepcopy(model)
        _randomize(randomized.get_submodule(name), generator)
        if drawn not in counts:
            continue
        changed = explain_with(randomized, input, target)
        first, second = (original.abs(), changed.abs()) if absolute else (original, changed)
        reported.append(name)
        correlations.append(spearman(first, second))
    return RandomizationResult(reported, torch.stack(correlations))


def _per_pixel(relevance: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    values = relevance.sum(1) if relevance.dim() == mask.dim() + 1 else relevance
    if values.shape != mask.shape:
        raise ValueError(f"relevance of shape {tuple(relevance.shape)} does not fit the mask {tuple(mask.shape)}")
    return values.detach().flatten(1).double(), mask.detach().flatten(1).bool()


def relevance_mass_accuracy(relevance: Tensor, mask: Tensor) -> Tensor:
    """Share of the positive relevance that falls inside the ground-truth mask (Arras et al. 2022).

    Parameters
    ----------
    relevance : Tensor
        ``(N, C, H, W)`` (summed over channels) or ``(N, H, W)``.
    mask : Tensor
        ``(N, H, W)``, true inside the ground truth.

    Returns
    -------
    Tensor
        ``(N,)`` in ``[0, 1]`` (0 where a map has no positive relevance).
    """
    values, inside = _per_pixel(relevance, mask)
    positive = values.clamp(min=0)
    return (positive * inside).sum(1) / positive.sum(1).clamp(min=torch.finfo(torch.float64).tiny)


def relevance_rank_accuracy(relevance: Tensor, mask: Tensor) -> Tensor:
    """Share of the ``K`` most relevant pixels that lie inside the mask, ``K`` the mask's size (Arras et al. 2022).

    Parameters
    ----------
    relevance : Tensor
        ``(N, C, H, W)`` (summed over channels) or ``(N, H, W)``.
    mask : Tensor
        ``(N, H, W)``, true inside the ground truth.

    Returns
    -------
    Tensor
        ``(N,)`` in ``[0, 1]``: pixels tied at the ``K``-th value count by their expected share of the places left
        (ties broken at random), so a map without information scores the mask's share of the image; NaN, with a
        warning, for a constant map.

    Raises
    ------
    ValueError
        For relevance holding NaN or inf, or shapes that do not fit.
    """
    values, inside = _per_pixel(relevance, mask)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("relevance holds NaN or inf; relevance_rank_accuracy needs finite maps")
    sizes = inside.sum(1)
    ordered = values.sort(1, descending=True).values
    threshold = ordered.gather(1, (sizes - 1).clamp(min=0)[:, None])  # the K-th largest value
    above, tied = values > threshold, values == threshold
    slots = (sizes - above.sum(1)).double()  # places among the top K that the tied pixels share
    share = slots / tied.sum(1).clamp(min=1)  # each tied pixel's chance of a place, ties broken at random
    accuracy = ((above & inside).sum(1) + share * (tied & inside).sum(1)) / sizes.clamp(min=1)
    constant = ordered[:, 0] == ordered[:, -1]
    if bool(constant.any()):
        warnings.warn(f"{int(constant.sum())} of {len(values)} map(s) are constant (first: sample "
                      f"{int(constant.nonzero()[0])}): they rank no pixel above another, so their rank accuracy is "
                      f"undefined and returned as NaN", RuntimeWarning, stacklevel=2)
    return torch.where(constant, torch.full_like(accuracy, float("nan")), accuracy)


METRICS = ("abpc", "aopc")


@dataclass
class Ranking:
    """Candidates ranked by :func:`tune`, best first.

    Attributes
    ----------
    rows : list of tuple
        ``(name, mean, standard error)``.
    metric : str
        What was measured.
    """

    rows: list[tuple[str, float, float]]
    metric: str

    def table(self) -> str:
        """Return the ranking as a markdown table.

        Returns
        -------
        str
            One row per candidate.
        """
        lines = [f"| candidate | {self.metric} (mean) | standard error |", "|---|---|---|"]
        lines += [f"| {name} | {mean:.4f} | {error:.4f} |" for name, mean, error in self.rows]
        return "\n".join(lines)


def tune(model: torch.nn.Module, input: Tensor, target: Tensor | Sequence[int], candidates: Mapping[str, Any],
         metric: str = "abpc", **flipping: Any) -> Ranking:
    """Score candidate rules or composites on a validation batch and rank them (best first).

    Parameters
    ----------
    model : torch.nn.Module
        A model with torchlrp layers.
    input : Tensor
        ``(N, C, H, W)`` validation inputs.
    target : Tensor or sequence of int
        ``(N,)`` classes.
    candidates : mapping of str to rule or composite
        E.g. ``{"EpsilonPlus": lrp.EpsilonPlus(), "gamma 0.25": lrp.EpsilonGammaBox(l, h, gamma=0.25)}``; a value
        may also be a callable ``(model, input, target) -> relevance`` (a baseline).
    metric : {"abpc", "aopc"}
        What to rank by (larger is better).
    **flipping
        Arguments of :func:`pixel_flipping` (``patch``, ``steps``, ``fill``, ...).

    Returns
    -------
    Ranking
        Names with the mean and standard error over the batch, best first; ``.table()`` renders them.

    Raises
    ------
    ValueError
        For an unknown metric, no candidates, or a candidate whose relevance holds NaN or inf.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not candidates:
        raise ValueError("tune needs at least one candidate")
    target = torch.as_tensor(target, device=input.device).reshape(-1)
    rows = []
    for name, candidate in candidates.items():
        relevance = candidate(model, input, target) if callable(candidate) else explain(model, input, target,
                                                                                        rule=candidate)
        if not bool(torch.isfinite(relevance).all()):
            raise ValueError(f"candidate {name!r} gives relevance holding NaN or inf; it cannot be ranked (a larger "
                             f"epsilon usually fixes it)")
        result = pixel_flipping(model, input, relevance, target, order="both" if metric == "abpc" else "morf",
                                **flipping)
        values = result.abpc if metric == "abpc" else result.aopc
        error = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
        rows.append((name, float(values.mean()), error))
    rows.sort(key=lambda row: -row[1])
    return Ranking(rows, metric)
