"""Conditional relevance (Concept Relevance Propagation): heatmaps of the part of a decision that passes through
chosen concepts, many conditions in one batched backward, with the concept relevances of any layers recorded."""
from __future__ import annotations

import operator

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from torchlrp.core.composites import Composite
from torchlrp.explanation.context import rules_applied
from torchlrp.explanation.explain import relevance_backward, selected_output
from torchlrp.core.rules import Rule
from torchlrp.analysis.concepts.definitions import Concepts, as_concepts
from torchlrp.analysis.concepts.taps import tapped

#: the key of a condition that names the explained class(es), as in zennit-crp
OUTPUT_KEY = "y"
#: reductions of a concept's per-position values to one value per concept
REDUCTIONS = ("sum", "max")
_STARTS = ("one", "logit")

Condition = Mapping[str, "int | Sequence[int]"]


def _ids(value: Any, where: str, count: int | None = None) -> list[int]:
    """A condition's value as a non-empty list of ints (in ``0..count-1`` where ``count`` is known): Python and
    numpy integers and integer tensors; floats, strings and booleans are refused, never truncated or split."""
    if isinstance(value, Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{where}: give integer ids (not booleans, floats or strings), got a {value.dtype} tensor "
                             f"{value.tolist()!r}")
        values = value.reshape(-1).tolist()
    elif isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        values = [value]
    else:
        values = list(value)
    ids = []
    for item in values:
        if isinstance(item, (bool, str, bytes)) or isinstance(item, Tensor) and item.dtype == torch.bool:
            raise ValueError(f"{where}: give integer ids (not booleans, floats or strings), got {item!r} in {value!r}")
        try:
            ids.append(operator.index(item))
        except TypeError:
            raise ValueError(f"{where}: give an integer or a sequence of integers, got {item!r} in {value!r}") from None
    if not ids:
        raise ValueError(f"{where}: an empty condition selects nothing; give at least one index")
    if count is not None and any(not 0 <= i < count for i in ids):
        raise ValueError(f"{where}: {ids} holds indices out of range 0..{count - 1}")
    return ids


def reduce_positions(values: Tensor, reduction: str) -> Tensor:
    """``(N, P, K)`` per-position values reduced over the positions: ``(N, K)``.

    Parameters
    ----------
    values : Tensor
        Per-position concept values.
    reduction : {"sum", "max"}
        Sum over positions, or the largest value.

    Returns
    -------
    Tensor
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return values.sum(1) if reduction == "sum" else values.amax(1)


@dataclass
class ConditionalRelevance:
    """The result of :func:`attribute`: ``B`` samples times ``K`` conditions.

    Attributes
    ----------
    heatmaps : Tensor
        ``(B, K, *input.shape[1:])``: the input relevance of each sample under each condition.
    relevances : dict of str to Tensor
        For each recorded layer: ``(B, K, *layer.shape[1:])``, its relevance (after the mask, at a conditioned
        layer).
    activations : dict of str to Tensor
        For each recorded or conditioned layer: ``(B, *layer.shape[1:])``, its activation.
    scores : Tensor
        ``(B, classes)``: the model's output (the tensor explained; the tapped layer's activation for
        ``start_layer``).
    concepts : dict of str to Concepts
        The concept definition of each layer.
    """

    heatmaps: Tensor
    relevances: dict[str, Tensor]
    activations: dict[str, Tensor]
    scores: Tensor
    concepts: dict[str, Concepts] = field(default_factory=dict)

    def concept_relevances(self, layer: str, reduction: str = "sum") -> Tensor:
        """The relevance of every concept of a recorded layer, reduced over positions.

        Parameters
        ----------
        layer : str
            A layer given in ``record``.
        reduction : {"sum", "max"}
            Sum over positions (the concept's relevance; default) or the largest per-position value.

        Returns
        -------
        Tensor
            ``(B, K, concepts)``.
        """
        if layer not in self.relevances:
            raise ValueError(f"layer {layer!r} was not recorded; recorded: {list(self.relevances)} (pass it in "
                             f"record=)")
        relevance = self.relevances[layer]
        batch, conditions = relevance.shape[:2]
        activation = self.activations[layer].repeat_interleave(conditions, 0)
        values = self.concepts[layer].relevance(relevance.flatten(0, 1), activation)
        return reduce_positions(values, reduction).reshape(batch, conditions, -1)


def _start(output: Tensor, scores: Tensor, row_classes: list[list[int] | None], start: str) -> Tensor:
    """The start relevance at the model output: 1 (or the score) at each row's classes, its prediction where None."""
    if output.dim() != 2:
        raise ValueError(f"the model output has shape {tuple(output.shape)}, not (batch, classes); condition on "
                         f"a layer with start_layer= instead")
    relevance = torch.zeros_like(output)
    predicted = scores.argmax(1)
    for row, classes in enumerate(row_classes):
        relevance[row, int(predicted[row]) if classes is None else classes] = 1.0
    return relevance * scores if start == "logit" else relevance


def _row_classes(conditions: list[dict], target: Any, samples: int, classes: int, begin: int,
                 end: int) -> list[list[int] | None]:
    """The classes each row ``begin..end-1`` explains: its condition's ``"y"``, else ``target``, else None."""
    per_sample = len(conditions)
    targets = None
    if target is not None:
        targets = torch.as_tensor(target).reshape(-1).tolist()
        if len(targets) not in (1, samples):
            raise ValueError(f"target holds {len(targets)} classes for {samples} samples: give one int or one "
                             f"class per sample")
    chosen: list[list[int] | None] = []
    for row in range(begin, end):
        sample, index = divmod(row, per_sample)
        if OUTPUT_KEY in conditions[index]:
            chosen.append(_ids(conditions[index][OUTPUT_KEY], f"condition {index}, {OUTPUT_KEY!r}", classes))
        elif targets is not None:
            chosen.append(_ids(targets[0 if len(targets) == 1 else sample], "target", classes))
        else:
            chosen.append(None)
    return chosen


def _check_conditions(conditions: Any) -> list[dict]:
    if isinstance(conditions, Mapping):
        conditions = [conditions]
    if not isinstance(conditions, (list, tuple)) or not conditions:
        raise ValueError("conditions must be a non-empty list of dicts such as {'features.28': [3], 'y': [1]}")
    for index, condition in enumerate(conditions):
        if not isinstance(condition, Mapping):
            raise ValueError(f"condition {index} must be a dict of layer name -> concept indices, got "
                             f"{type(condition).__name__}")
    return [dict(condition) for condition in conditions]


def attribute(model: torch.nn.Module, input: Tensor, conditions: "Condition | Sequence[Condition]",
              rule: "str | Rule | Composite" = "epsilon", *, concepts: Mapping[str, Concepts] | None = None,
              record: Sequence[str] = (), target: Any = None, start: str = "one",
              start_layer: str | None = None, exclude_parallel: bool = True,
              batch_size: int | None = None) -> ConditionalRelevance:
    """Conditional relevance: each sample's heatmap under each condition, all in batched backwards.

    A condition maps layer names to concept indices (``{"features.28": [50], "y": [1]}``: the relevance of class 1
    that passes through concept 50 of ``features.28``), as zennit-crp's. At each conditioned layer the relevance
    is masked to the chosen concepts (see :mod:`torchlrp.concepts.definitions`). The ``B`` samples are each
    explained under all ``K`` conditions: the batch is expanded to ``B * K`` rows, and one forward and one
    backward explain them all (in chunks of ``batch_size`` rows).

    Parameters
    ----------
    model : torch.nn.Module
        A model with torchlrp layers (:func:`torchlrp.convert`), in eval mode.
    input : Tensor
        ``(B, ...)`` samples. Not modified.
    conditions : dict or list of dicts
        Layer name -> concept index or indices; the key ``"y"`` names the explained class(es) (else ``target``,
        else each sample's prediction). An empty dict is the unconditional heatmap.
    rule : str, Rule or Composite
        As in :func:`torchlrp.explain`.
    concepts : mapping of str to Concepts, optional
        The concept definition of layers (default for any layer: :class:`~torchlrp.concepts.Channels` along
        dimension 1).
    record : sequence of str
        Layers whose relevance (and activation) is recorded in the same backward, for
        :meth:`ConditionalRelevance.concept_relevances`.
    target : int or sequence, optional
        The class to explain for conditions without ``"y"``: one for all samples or one per sample.
    start : {"one", "logit"}
        Start relevance at the target: 1, or the logit's value (zennit-crp's default).
    start_layer : str, optional
        Start at this layer instead of the model output: with its activation as the start relevance, masked to
        the concepts the condition names there (all where it names none): the heatmap of the concept itself,
        independent of any class.
    exclude_parallel : bool
        True (default, as zennit-crp): the heatmap holds only the relevance that passes through the conditioned
        concepts (the backward restarts at each conditioned layer, from the masked relevance, so branches parallel
        to it -- a residual connection around it -- carry nothing); every condition must then name the same
        layers, one path from the output to the input. False: the relevance is masked at each conditioned layer
        and everything else flows as usual (residual connections carry their share unconditioned).
    batch_size : int, optional
        Rows (sample, condition) per forward/backward; default all at once.

    Returns
    -------
    ConditionalRelevance

    Raises
    ------
    ValueError
        For an unknown layer, concept indices out of range, conditions that name different layers with
        ``exclude_parallel``, a conditioned layer the backward does not reach, or a bad ``target``/``start``.
    """
    conditions = _check_conditions(conditions)
    if not isinstance(input, Tensor) or input.dim() < 1 or not len(input):
        raise ValueError("input must be a non-empty batch tensor (B, ...)")
    if start not in _STARTS:
        raise ValueError(f"start must be one of {_STARTS}, got {start!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    conditioned = list(dict.fromkeys(name for condition in conditions for name in condition if name != OUTPUT_KEY))
    if exclude_parallel and len({frozenset(set(c) - {OUTPUT_KEY}) for c in conditions}) > 1:
        raise ValueError("with exclude_parallel=True every condition must name the same layers (the backward "
                         "restarts at each of them); split the conditions into calls by layers, or pass "
                         "exclude_parallel=False")
    layers = [*conditioned, *(name for name in record if name not in conditioned)]
    if start_layer is not None and start_layer not in layers:
        layers.append(start_layer)
    definitions = {name: as_concepts((concepts or {}).get(name)) for name in layers}
    samples, per_sample = len(input), len(conditions)
    rows = samples * per_sample
    step = rows if batch_size is None else batch_size
    parts = [_attribute_rows(model, input, conditions, rule, definitions, conditioned, list(record), target, start,
                             start_layer, exclude_parallel, begin, min(begin + step, rows))
             for begin in range(0, rows, step)]
    heatmaps = torch.cat([part[0] for part in parts]).reshape(samples, per_sample, *input.shape[1:])
    relevances = {name: torch.cat([part[1][name] for part in parts]) for name in record}
    relevances = {name: value.reshape(samples, per_sample, *value.shape[1:]) for name, value in relevances.items()}
    activations = {name: torch.cat([part[2][name] for part in parts])[::per_sample] for name in layers}
    scores = torch.cat([part[3] for part in parts])[::per_sample]
    return ConditionalRelevance(heatmaps, relevances, activations, scores, definitions)


def _attribute_rows(model: torch.nn.Module, input: Tensor, conditions: list[dict], rule: Any,
                    definitions: dict[str, Concepts], conditioned: list[str], record: list[str], target: Any,
                    start: str, start_layer: str | None, exclude_parallel: bool, begin: int,
                    end: int) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Rows ``begin..end-1`` (row = sample * K + condition) of :func:`attribute`, in one forward and backward."""
    per_sample = len(conditions)
    row_conditions = [conditions[row % per_sample] for row in range(begin, end)]
    samples = input[torch.arange(begin, end, device=input.device) // per_sample]
    recorded: dict[str, Tensor] = {}
    with torch.inference_mode(False), torch.enable_grad():
        carrier = samples.detach().clone().requires_grad_(True)
        with rules_applied(model, rule) as state, tapped(model, definitions) as taps:
            output = selected_output(model(carrier), None)
        missing = [name for name in definitions if name not in taps]
        if missing:
            raise ValueError(f"layers {missing} were not reached by the forward, or their tensor does not require a "
                             f"gradient: give layers the model's forward calls (a batch norm that convert merged "
                             f"into the convolution before it is never called: give that convolution)")
        activations = {name: tap.detach() for name, tap in taps.items()}
        selections = {name: _row_selection(row_conditions, name, definitions[name], taps[name])
                      for name in conditioned}
        for name in record:
            if name not in conditioned:
                taps[name].register_hook(_recorder(recorded, name))
        if start_layer is None:
            scores = output.detach() if state.output_scores is None else state.output_scores
            row_classes = _row_classes(conditions, target, len(input), output.shape[-1], begin, end)
            wrt, relevance = output, _start(output, scores, row_classes, start)
        else:
            scores = activations[start_layer]
            relevance = activations[start_layer]
            if start_layer in selections:
                relevance = definitions[start_layer].mask(relevance, relevance, selections.pop(start_layer))
            wrt = taps[start_layer]
        order = [name for name in taps if name in selections]
        if exclude_parallel:
            for name in reversed(order):
                reached = torch.autograd.grad(wrt, taps[name], relevance, retain_graph=True, allow_unused=True)[0]
                if reached is None:
                    raise ValueError(f"layer {name!r} is not reached by the backward from the layers after it in "
                                     f"the condition (parallel layers cannot be conditioned together with "
                                     f"exclude_parallel=True)")
                relevance = definitions[name].mask(reached, activations[name], selections[name])
                if name in record:
                    recorded[name] = relevance.detach()
                wrt = taps[name]
        else:
            for name in order:
                taps[name].register_hook(_masker(definitions[name], activations[name], selections[name]))
                if name in record:
                    taps[name].register_hook(_recorder(recorded, name))
        heatmap = relevance_backward(wrt, carrier, relevance, allow_unused=True)[0]
    if heatmap is None:
        heatmap = torch.zeros_like(carrier)
    for name in record:
        if name not in recorded:  # above start_layer, or on no path: no relevance reaches it
            recorded[name] = torch.zeros_like(activations[name])
    return heatmap.detach(), recorded, activations, scores


def _row_selection(row_conditions: list[dict], name: str, concepts: Concepts, tap: Tensor) -> Tensor:
    """``(rows, concepts)`` float selection of each row at ``name`` (rows of one chunk)."""
    units = tap.shape[concepts.dim]
    count = concepts.count(units)
    selected = torch.zeros(len(row_conditions), count, dtype=tap.dtype, device=tap.device)
    for row, condition in enumerate(row_conditions):
        if name in condition:
            selected[row, _ids(condition[name], f"the condition on layer {name!r}", count)] = 1.0
        else:  # start_layer without a condition there: all of its concepts
            selected[row] = 1.0
    return selected


def _recorder(recorded: dict[str, Tensor], name: str):
    def hook(relevance: Tensor) -> None:
        recorded[name] = relevance.detach() if name not in recorded else recorded[name] + relevance.detach()
    return hook


def _masker(concepts: Concepts, activation: Tensor, selected: Tensor):
    def hook(relevance: Tensor) -> Tensor:
        return concepts.mask(relevance, activation, selected)
    return hook
