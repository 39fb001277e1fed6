"""Concepts: Concept Relevance Propagation (CRP) and relevance maximization.

* :mod:`~torchlrp.concepts.definitions` -- what a concept is: :class:`Channels`, :class:`Groups` (attention heads),
  :class:`Directions`;
* :func:`attribute` -- conditional heatmaps, many conditions in one batched backward, with the concept relevances
  of any layers recorded;
* :func:`attribution_graph` -- how a concept's relevance splits over the concepts of lower layers;
* :func:`reference_samples` -- relevance and activation maximization over a dataset, from the concept statistics
  :func:`torchlrp.dataset.explain_dataset` writes (``concepts=``), and :func:`receptive_field_crops`;
* :func:`concept_atlas` -- one prediction's top concepts, each with its conditional heatmap and reference samples.
"""
from torchlrp.analysis.concepts.atlas import ConceptAtlas, concept_atlas
from torchlrp.analysis.concepts.conditional import OUTPUT_KEY, ConditionalRelevance, attribute
from torchlrp.analysis.concepts.definitions import Channels, Concepts, Directions, Groups
from torchlrp.analysis.concepts.graph import AttributionGraph, ConceptNode, attribution_graph, plot_attribution_graph
from torchlrp.analysis.concepts.maximization import (ReceptiveField, ReferenceSamples, concept_statistics, receptive_field_crops,
                           reference_samples)

__all__ = ["AttributionGraph", "Channels", "ConceptAtlas", "ConceptNode", "ConditionalRelevance", "Concepts",
           "Directions", "Groups", "OUTPUT_KEY", "ReceptiveField", "ReferenceSamples", "attribute", "attribution_graph",
           "concept_atlas", "concept_statistics", "plot_attribution_graph", "receptive_field_crops",
           "reference_samples"]
