"""Relevance and activation maximization: the dataset samples in which each concept is most relevant (or most
active), from the concept statistics :func:`torchlrp.dataset.explain_dataset` records (``concepts=``), and the
reference images cropped to each concept's receptive field by its conditional heatmap."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from torchlrp.core.composites import Composite
from torchlrp.explanation.context import rules_applied
from torchlrp.core.rules import Rule
from torchlrp.data.store import CONCEPT_STATISTICS, Relevances, open_relevances
from torchlrp.analysis.concepts.conditional import ConditionalRelevance, attribute, reduce_positions
from torchlrp.analysis.concepts.definitions import Concepts, as_concepts
from torchlrp.analysis.concepts.taps import tapped

MODES = ("relevance", "activation")
#: zennit-crp's normalization constant of ``abs_norm``
NORM_EPS = 1e-10


def concept_layers(concepts: "Sequence[str] | Mapping[str, Concepts | None]") -> dict[str, Concepts]:
    """Layer names (or names with their concept definitions) as a dict of definitions (default channels).

    Parameters
    ----------
    concepts : sequence of str or mapping of str to Concepts or None

    Returns
    -------
    dict of str to Concepts
    """
    if isinstance(concepts, str) or not isinstance(concepts, (Sequence, Mapping)) or not concepts:
        raise ValueError(f"concepts must be a non-empty list of layer names or a dict of layer name -> concept "
                         f"definition (torchlrp.concepts.Channels, ...), got {concepts!r}")
    items = concepts.items() if isinstance(concepts, Mapping) else ((name, None) for name in concepts)
    return {name: as_concepts(definition) for name, definition in items}


def concept_statistics(result: ConditionalRelevance) -> dict[str, dict[str, Tensor]]:
    """Per recorded layer, the four :data:`~torchlrp.store.CONCEPT_STATISTICS` of the first condition: ``(B, K)``.

    Parameters
    ----------
    result : ConditionalRelevance
        From :func:`~torchlrp.concepts.attribute` with ``record=`` the layers.

    Returns
    -------
    dict of str to dict of str to Tensor
        Layer -> statistic -> values.
    """
    statistics = {}
    for layer in result.relevances:
        activation = result.concepts[layer].activation(result.activations[layer])
        statistics[layer] = {"relevance_sum": result.concept_relevances(layer, "sum")[:, 0],
                             "relevance_max": result.concept_relevances(layer, "max")[:, 0],
                             "activation_sum": reduce_positions(activation, "sum"),
                             "activation_max": reduce_positions(activation, "max")}
    return statistics


@dataclass
class ReferenceSamples:
    """The result of :func:`reference_samples`.

    Attributes
    ----------
    indices : Tensor
        ``(concepts, n)`` int64: per concept, the dataset indices of its reference samples, most relevant (active)
        first.
    values : Tensor
        ``(concepts, n)``: the value each was ranked by.
    layer : str
    mode : str
    """

    indices: Tensor
    values: Tensor
    layer: str
    mode: str


def reference_samples(store: "Any | Relevances", layer: str, mode: str = "relevance", n: int = 40,
                      reduction: str = "sum", normalize: bool = True) -> ReferenceSamples:
    """Relevance (or activation) maximization: per concept of ``layer``, the ``n`` samples that rank it highest.

    The ranking of zennit-crp's ``FeatureVisualization``: a sample's value for a concept is the concept's relevance
    for the explained class (or its activation), summed over positions (``reduction="sum"``) or at its largest
    position (``"max"``); ``normalize`` divides each sample's values by the sum of their absolute values over the
    layer's concepts (``abs_norm``), so that a sample counts by the share of its explanation a concept holds.

    Parameters
    ----------
    store : str, zarr store or Relevances
        A store :func:`torchlrp.dataset.explain_dataset` wrote with ``concepts=`` (complete).
    layer : str
        One of its concept layers.
    mode : {"relevance", "activation"}
        Relevance maximization (default) or activation maximization.
    n : int
        Reference samples per concept (zennit-crp keeps 40).
    reduction : {"sum", "max"}
        Over positions.
    normalize : bool
        Divide by the per-sample sum of absolute values over concepts.

    Returns
    -------
    ReferenceSamples
    """
    relevances = store if isinstance(store, Relevances) else open_relevances(store)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    statistic = f"{mode}_{reduction}"
    if statistic not in CONCEPT_STATISTICS:
        raise ValueError(f"reduction must be 'sum' or 'max', got {reduction!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not relevances.complete:
        raise ValueError(f"the store {relevances!r} is not complete: run explain_dataset again with the same "
                         f"arguments to finish it, then rank its samples")
    values = relevances.concept_values(layer, statistic).double()
    if normalize:
        values = values / (values.abs().sum(1, keepdim=True) + NORM_EPS)
    order = values.argsort(dim=0, descending=True, stable=True)[:n]
    dataset_indices = torch.from_numpy(np.asarray(relevances.indices))
    return ReferenceSamples(dataset_indices[order].T.contiguous(), values.gather(0, order).T.contiguous().float(),
                            layer, mode)


@dataclass
class ReceptiveField:
    """One reference sample of a concept, cropped to the part of the input its most relevant neuron depends on.

    Attributes
    ----------
    index : int
        The dataset index.
    image : Tensor
        The input cropped, ``(C, h, w)``.
    heatmap : Tensor
        The neuron's conditional heatmap over the crop, ``(h, w)`` (summed over input channels).
    box : tuple of int
        ``(top, bottom, left, right)`` of the crop in the input (bottom, right exclusive).
    """

    index: int
    image: Tensor
    heatmap: Tensor
    box: tuple[int, int, int, int]


def receptive_field_crops(model: torch.nn.Module, dataset: Any, layer: str, concept: int, indices: Sequence[int],
                          rule: "str | Rule | Composite" = "epsilon", *, mode: str = "relevance",
                          concepts: Concepts | None = None, threshold: float = 0.1,
                          target: "str | int | None" = "label") -> list[ReceptiveField]:
    """Crop reference samples to the receptive field of the concept's most relevant (most active) neuron.

    For each sample: the position where ``concept`` of ``layer`` is most relevant for the explained class (or most
    active) is found; the heatmap of that one neuron (relevance starting at the layer, the neuron's activation;
    zennit-crp's ``rf=True``) says which input pixels it depends on; the crop is the bounding box of the pixels whose
    absolute relevance is at least ``threshold`` times the largest. The crop follows the heatmap, not a fixed rule
    about the layer's geometry.

    Parameters
    ----------
    model : torch.nn.Module
        The converted model the store was made with.
    dataset : torch.utils.data.Dataset
        The dataset the store was made from: ``dataset[i]`` is an image ``(C, H, W)`` or ``(image, label, ...)``.
    layer : str
        The concept's layer.
    concept : int
        The concept.
    indices : sequence of int
        Dataset indices (e.g. ``reference_samples(...).indices[concept]``).
    rule : str, Rule or Composite
        As in :func:`torchlrp.explain`.
    mode : {"relevance", "activation"}
        Choose the neuron by relevance or by activation.
    concepts : Concepts, optional
        The layer's concept definition (default channels).
    threshold : float
        In ``(0, 1]``: the share of the heatmap's peak that bounds the crop.
    target : "label", "prediction" or int
        The class whose relevance chooses the neuron (``mode="relevance"``).

    Returns
    -------
    list of ReceptiveField
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    indices = [int(index) for index in indices]
    if not indices:
        return []
    samples = [dataset[index] for index in indices]
    inputs = torch.stack([sample[0] if isinstance(sample, (tuple, list)) else sample for sample in samples])
    if inputs.dim() != 4:
        raise ValueError(f"receptive fields crop images: the samples have shape {tuple(inputs.shape[1:])}, not "
                         f"(C, H, W)")
    if target == "label":
        if not isinstance(samples[0], (tuple, list)) or len(samples[0]) < 2:
            raise ValueError("target='label' needs (image, label) samples; give target='prediction' or a class")
        target = torch.as_tensor([int(sample[1]) for sample in samples])
    elif target == "prediction":
        target = None
    parameter = next(model.parameters(), None)
    inputs = inputs.to(parameter.device if parameter is not None else "cpu",
                       parameter.dtype if parameter is not None else inputs.dtype)
    definition = as_concepts(concepts)
    if mode == "relevance":
        found = attribute(model, inputs, [{}], rule, concepts={layer: definition}, record=[layer], target=target,
                          start="logit")
        values = definition.relevance(found.relevances[layer][:, 0], found.activations[layer])
    else:
        found = attribute(model, inputs, [{}], rule, concepts={layer: definition}, record=[layer], target=target)
        values = definition.activation(found.activations[layer])
    count = values.shape[-1]
    if not 0 <= concept < count:
        raise ValueError(f"concept {concept} is out of range: {layer!r} has {count} concepts")
    positions = values[..., concept].argmax(1)
    heatmaps = _neuron_heatmaps(model, inputs, layer, definition, concept, count, positions, rule)
    crops = []
    for index, image, heatmap in zip(indices, inputs, heatmaps):
        top, bottom, left, right = _support_box(heatmap, threshold)
        crops.append(ReceptiveField(index, image[:, top:bottom, left:right].detach().cpu(),
                                    heatmap[top:bottom, left:right].detach().cpu(), (top, bottom, left, right)))
    return crops


def _neuron_heatmaps(model: torch.nn.Module, inputs: Tensor, layer: str, definition: Concepts, concept: int,
                     count: int, positions: Tensor, rule: Any) -> Tensor:
    """``(N, H, W)``: the heatmap of one neuron per sample (``concept`` at ``positions``), relevance starting at its
    activation."""
    with torch.inference_mode(False), torch.enable_grad():
        carrier = inputs.detach().clone().requires_grad_(True)
        with rules_applied(model, rule), tapped(model, {layer: definition}) as taps:
            model(carrier)
        activation = taps[layer].detach()
        selected = torch.zeros(len(inputs), count, dtype=activation.dtype, device=activation.device)
        selected[:, concept] = 1.0
        start = definition.mask_at(activation, activation, selected, positions)
        heatmap = torch.autograd.grad(taps[layer], carrier, start, allow_unused=True)[0]
    if heatmap is None:
        return torch.zeros(inputs.shape[0], *inputs.shape[2:], dtype=inputs.dtype, device=inputs.device)
    return heatmap.detach().sum(1)


def _support_box(heatmap: Tensor, threshold: float) -> tuple[int, int, int, int]:
    """The bounding box of the pixels with ``|heatmap| >= threshold * max``; the whole image where it is zero."""
    magnitude = heatmap.abs()
    peak = magnitude.max()
    if not bool(peak > 0):
        return 0, heatmap.shape[0], 0, heatmap.shape[1]
    rows = torch.nonzero((magnitude >= threshold * peak).any(1)).flatten()
    columns = torch.nonzero((magnitude >= threshold * peak).any(0)).flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1
