"""A concept atlas of one prediction: its most relevant concepts in a layer, where each sits in the input (the
conditional heatmap), and what each is (reference samples from the dataset, cropped to the receptive field)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from torchlrp.core.composites import Composite
from torchlrp.viz.image import as_image, overlay, save_grid
from torchlrp.core.rules import Rule
from torchlrp.analysis.concepts.conditional import attribute
from torchlrp.analysis.concepts.definitions import Concepts
from torchlrp.analysis.concepts.maximization import ReceptiveField, receptive_field_crops, reference_samples


@dataclass
class ConceptAtlas:
    """The result of :func:`concept_atlas`.

    Attributes
    ----------
    image : Tensor
        The input, ``(C, H, W)``.
    target : int
        The class explained.
    layer : str
    concepts : list of int
        The top concepts, most relevant first.
    relevances : Tensor
        ``(top_k,)``: each one's relevance (a share of the start relevance when ``start="one"``).
    heatmaps : Tensor
        ``(top_k, C, H, W)``: the conditional heatmap of each (one batched backward).
    references : list of list of ReceptiveField
        Per concept, its reference samples (relevance maximization over the store's dataset), cropped.
    """

    image: Tensor
    target: int
    layer: str
    concepts: list[int]
    relevances: Tensor
    heatmaps: Tensor
    references: list[list[ReceptiveField]]

    def save(self, path: str, title: str | None = None) -> None:
        """Save the atlas as a figure: one row per concept, its conditional heatmap then its reference crops (dimmed
        where the neuron's heatmap is small).

        Parameters
        ----------
        path : str
            Output file (``.png``).
        title : str, optional
            Figure title (default: the class and layer).
        """
        columns = 1 + max((len(crops) for crops in self.references), default=0)
        blank = as_image(torch.ones(1, 1, 4, 4))[0]
        rows, titles = [], []
        image = self.image[None]
        for concept, relevance, heatmap, crops in zip(self.concepts, self.relevances, self.heatmaps,
                                                      self.references):
            cells = [overlay(image, heatmap[None].sum(1))[0]]
            cells += [_opaque(crop) for crop in crops]
            cells += [blank] * (columns - len(cells))
            rows.append(cells)
            titles.append([f"concept {concept}: {float(relevance):+.3g}"] +
                          [f"sample {crop.index}" for crop in crops] + [""] * (columns - 1 - len(crops)))
        save_grid(path, rows, cell_titles=titles, cell_size=1.5,
                  title=title or f"concept atlas: class {self.target}, layer {self.layer}")


def _opaque(crop: ReceptiveField) -> np.ndarray:
    """The crop as RGB, dimmed where its heatmap is small (zennit-crp's ``vis_opaque_img``): what the neuron sees."""
    magnitude = crop.heatmap.abs()
    weight = (magnitude / (0.2 * magnitude.max()).clamp_min(1e-12)).clamp(0, 1).numpy()[..., None]
    return as_image(crop.image[None])[0] * (0.25 + 0.75 * weight)


def concept_atlas(model: torch.nn.Module, input: Tensor, layer: str, store: Any, dataset: Any,
                  rule: "str | Rule | Composite" = "epsilon", *, target: int | None = None, top_k: int = 4,
                  references: int = 6, concepts: Concepts | None = None, start: str = "one",
                  mode: str = "relevance") -> ConceptAtlas:
    """The top concepts of ``layer`` for one prediction, each with its conditional heatmap and reference samples.

    Parameters
    ----------
    model : torch.nn.Module
        The converted model.
    input : Tensor
        One sample, ``(1, C, H, W)``.
    layer : str
        A layer whose concept statistics the store holds (``explain_dataset(..., concepts=[layer])``).
    store : str, zarr store or Relevances
        The store made from ``dataset``.
    dataset : torch.utils.data.Dataset
        The dataset of the store (reference images are read from it).
    rule : str, Rule or Composite
        As in :func:`torchlrp.explain` (use the store's).
    target : int, optional
        The class; default the prediction.
    top_k : int
        Concepts shown.
    references : int
        Reference samples per concept.
    concepts : Concepts, optional
        The layer's concept definition (default channels; use the store's).
    start : {"one", "logit"}
        Start relevance (see :func:`~torchlrp.concepts.attribute`).
    mode : {"relevance", "activation"}
        Reference samples by relevance maximization (default) or activation maximization.

    Returns
    -------
    ConceptAtlas
    """
    if not isinstance(input, Tensor) or input.dim() != 4 or len(input) != 1:
        raise ValueError(f"input must be one image (1, C, H, W), got "
                         f"{tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    definitions = None if concepts is None else {layer: concepts}
    whole = attribute(model, input, [{}], rule, concepts=definitions, record=[layer], target=target, start=start)
    per_concept = whole.concept_relevances(layer)[0, 0]
    chosen = per_concept.topk(min(top_k, len(per_concept))).indices.tolist()
    explained = int(whole.scores.argmax(1)[0]) if target is None else int(target)
    conditional = attribute(model, input, [{layer: [concept]} for concept in chosen], rule, concepts=definitions,
                            target=explained, start=start)
    ranked = reference_samples(store, layer, mode=mode, n=references)
    crops = [receptive_field_crops(model, dataset, layer, concept, ranked.indices[concept].tolist(), rule,
                                   mode=mode, concepts=concepts) for concept in chosen]
    return ConceptAtlas(input[0].detach().cpu(), explained, layer, chosen, per_concept[chosen].detach().cpu(),
                        conditional.heatmaps[0].detach().cpu(), crops)
