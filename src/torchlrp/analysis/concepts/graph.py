"""Attribution graphs: how the relevance of one concept splits over the concepts of the layers below it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from torchlrp.core.composites import Composite
from torchlrp.core.rules import Rule
from torchlrp.analysis.concepts.conditional import OUTPUT_KEY, attribute
from torchlrp.analysis.concepts.definitions import Concepts


@dataclass
class ConceptNode:
    """One concept on a path of an attribution graph.

    Attributes
    ----------
    layer : str
        The layer of the concept.
    concept : int
        Its index among the layer's concepts.
    relevance : float
        The relevance that reaches this concept through the path above it (the root: the concept's relevance for the
        explained class).
    share : float
        ``relevance`` as a fraction of the parent's (1 at the root).
    children : list of ConceptNode
        The ``top_k`` concepts of the next layer down that receive the most of this concept's relevance.
    rest : float
        This concept's relevance that reaches the next layer's concepts not in ``children`` (what a conserving rule
        sends on in all, less the children's); 0 at the bottom layer.
    """

    layer: str
    concept: int
    relevance: float
    share: float = 1.0
    children: list["ConceptNode"] = field(default_factory=list)
    rest: float = 0.0

    def walk(self) -> Iterator["ConceptNode"]:
        """This node and every node below it, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    def lines(self, depth: int = 0) -> list[str]:
        """The tree below this node as indented text lines."""
        line = f"{'  ' * depth}{self.layer}[{self.concept}]  relevance {self.relevance:+.4g}"
        if depth:
            line += f"  ({100 * self.share:.1f}% of its parent)"
        lines = [line]
        for child in self.children:
            lines += child.lines(depth + 1)
        if self.children:
            lines.append(f"{'  ' * (depth + 1)}(other concepts of {self.children[0].layer}: {self.rest:+.4g})")
        return lines


@dataclass
class AttributionGraph:
    """The result of :func:`attribution_graph`.

    Attributes
    ----------
    root : ConceptNode
        The concept explained, with the tree of its lower-layer concepts.
    layers : list of str
        The layers, top (the root's) to bottom.
    target : int
        The class explained.
    """

    root: ConceptNode
    layers: list[str]
    target: int

    def nodes(self) -> list[ConceptNode]:
        """Every node, depth first from the root."""
        return list(self.root.walk())

    def __str__(self) -> str:
        return "\n".join([f"attribution graph of class {self.target}, from {self.layers[0]} down to "
                          f"{self.layers[-1]}:", *self.root.lines()])


def attribution_graph(model: torch.nn.Module, input: Tensor, layers: Sequence[str], concept: int,
                      rule: "str | Rule | Composite" = "epsilon", *, target: int | None = None, top_k: int = 3,
                      concepts: Mapping[str, Concepts] | None = None, start: str = "one") -> AttributionGraph:
    """How the relevance of one concept of ``layers[0]`` splits over the concepts of each lower layer.

    The root is ``concept`` of ``layers[0]`` for the explained class. Its children are the ``top_k`` concepts of
    ``layers[1]`` that receive the most of its relevance: the relevance conditioned on the class and the root,
    recorded at ``layers[1]`` (the backward restarts at each conditioned layer, so only relevance through the path
    counts: zennit-crp's ``exclude_parallel``). Each child's children are found conditioned on the whole path down
    to it, and so on; each level is one batched backward (:func:`~torchlrp.concepts.attribute`). Where the rules
    conserve (LRP-0 and no biases), a node's children and ``rest`` sum to its relevance exactly.

    Parameters
    ----------
    model : torch.nn.Module
        A converted model, in eval mode.
    input : Tensor
        One sample, ``(1, ...)``.
    layers : sequence of str
        At least two layers, from the top (the root's layer) down, each on the path of the one above it.
    concept : int
        The root concept, in ``layers[0]``.
    rule : str, Rule or Composite
        As in :func:`torchlrp.explain`.
    target : int, optional
        The class explained; default the prediction.
    top_k : int
        Children per node.
    concepts : mapping of str to Concepts, optional
        Concept definitions per layer (default channels).
    start : {"one", "logit"}
        As in :func:`~torchlrp.concepts.attribute`.

    Returns
    -------
    AttributionGraph
    """
    layers = list(layers)
    if len(layers) < 2 or len(set(layers)) != len(layers) or not all(isinstance(name, str) for name in layers):
        raise ValueError(f"layers must be two or more distinct layer names, top first, got {layers!r}")
    if not isinstance(input, Tensor) or input.dim() < 1 or len(input) != 1:
        raise ValueError(f"input must be one sample with a batch dimension (1, ...), got "
                         f"{tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if target is None:
        with torch.no_grad():
            target = int(model(input).argmax(-1).reshape(-1)[0])
    common: dict[str, Any] = dict(concepts=concepts, target=target, start=start, exclude_parallel=True)
    top = attribute(model, input, [{layers[0]: [concept]}], rule, record=[layers[0]], **common)
    root = ConceptNode(layers[0], int(concept), float(top.concept_relevances(layers[0])[0, 0, concept]))
    level = [(root, {OUTPUT_KEY: [target], layers[0]: [concept]})]
    for below in layers[1:]:
        result = attribute(model, input, [path for _, path in level], rule, record=[below], **common)
        split = result.concept_relevances(below)[0]  # (nodes, concepts of the layer below)
        next_level = []
        for (node, path), relevance in zip(level, split):
            chosen = relevance.topk(min(top_k, len(relevance))).indices.tolist()
            node.rest = float(relevance.sum() - relevance[chosen].sum())
            for index in chosen:
                child = ConceptNode(below, index, float(relevance[index]),
                                    float(relevance[index] / node.relevance) if node.relevance else 0.0)
                node.children.append(child)
                next_level.append((child, {**path, below: [index]}))
        level = next_level
    return AttributionGraph(root, layers, target)


def plot_attribution_graph(graph: AttributionGraph, path: str | None = None, ax: Any = None) -> Any:
    """Draw an attribution graph: one row per layer, edges as wide as the share of the parent's relevance.

    Parameters
    ----------
    graph : AttributionGraph
        From :func:`attribution_graph`.
    path : str, optional
        Where to save the figure (PNG, PDF, ...).
    ax : matplotlib Axes, optional
        Draw into these axes instead of a new figure.

    Returns
    -------
    matplotlib Figure
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows: dict[int, list[ConceptNode]] = {}

    def place(node: ConceptNode, depth: int) -> None:
        rows.setdefault(depth, []).append(node)
        for child in node.children:
            place(child, depth + 1)

    place(graph.root, 0)
    position = {id(node): ((i + 0.5) / len(nodes), -depth) for depth, nodes in rows.items()
                for i, node in enumerate(nodes)}
    if ax is None:  # a Figure with its own Agg canvas: pyplot's global backend (a notebook's) is left alone
        width = max(6.0, 1.3 * max(len(nodes) for nodes in rows.values()))
        figure = Figure(figsize=(width, 1.6 * len(rows) + 0.6))
        FigureCanvasAgg(figure)
        ax = figure.subplots()
    else:
        figure = ax.figure
    cmap = colormaps["bwr"]
    scale = max(abs(node.relevance) for node in graph.nodes()) or 1.0
    for node in graph.nodes():
        x0, y0 = position[id(node)]
        for child in node.children:
            x1, y1 = position[id(child)]
            ax.plot([x0, x1], [y0 - 0.12, y1 + 0.12], color="0.4", lw=0.5 + 6 * min(abs(child.share), 1.0),
                    alpha=0.7, zorder=1)
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"{100 * child.share:.0f}%", fontsize=7, ha="center",
                    va="center", color="0.2", bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none"))
        ax.text(x0, y0, f"{node.concept}\n{node.relevance:+.2g}", ha="center", va="center", fontsize=8, zorder=2,
                bbox=dict(boxstyle="round,pad=0.3", fc=cmap(0.5 + 0.5 * node.relevance / scale), ec="0.3"))
    for depth, nodes in rows.items():
        ax.text(-0.02, -depth, nodes[0].layer, ha="right", va="center", fontsize=9)
    ax.set_xlim(-0.25, 1.02)
    ax.set_ylim(-len(rows) + 0.5, 0.5)
    ax.axis("off")
    ax.set_title(f"attribution graph, class {graph.target}", fontsize=10)
    if path is not None:
        figure.savefig(path, dpi=120, bbox_inches="tight")
    return figure
