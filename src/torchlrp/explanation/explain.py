"""``torchlrp.explain``: the input relevance of a model's decision in one call."""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch
from torch.utils.checkpoint import CheckpointError
from torch import Tensor

from torchlrp.core.composites import Composite
from torchlrp.explanation.accounting import Conservation, check
from torchlrp.explanation.context import retrying_after_in_place, rules_applied
from torchlrp.explanation.patterns import PatternsLike
from torchlrp.core.rules import Rule

#: where relevance starts at the target: 1, the logit's value, or the class probability
STARTS = ("one", "logit", "probability")


def _as_target(target: Any) -> int | Tensor | None:
    """``target`` as None, a Python int (one class for every sample: ints, numpy integers, 0-d tensors and arrays)
    or an integer tensor; anything else raises ``ValueError``."""
    if target is None:
        return None
    if isinstance(target, (bool, str, bytes)) or (isinstance(target, Tensor) and target.dtype == torch.bool):
        raise ValueError(f"target must be an int, a sequence or tensor of class indices, or None; got {target!r}")
    if isinstance(target, numbers.Integral):
        return int(target)
    try:
        tensor = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"target must be an int, a sequence or tensor of class indices, or None; got "
                         f"{type(target).__name__}") from None
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {tensor.dtype}")
    return int(tensor) if tensor.dim() == 0 else tensor


def _targets(target: int | Tensor | None, output: Tensor, batch: int) -> Tensor:
    """Validate ``target`` (from :func:`_as_target`) and return it as a (batch, k) long tensor."""
    classes = output.shape[1]
    if target is None:
        return output.detach().argmax(1, keepdim=True)
    if isinstance(target, int):
        if not 0 <= target < classes:
            raise ValueError(f"target {target} is out of range for an output of {classes} classes (0..{classes - 1})")
        return torch.full((batch, 1), target, dtype=torch.long, device=output.device)
    target = target.to(output.device)
    if target.dim() == 1:
        target = target[:, None]
    if target.dim() != 2 or target.shape[0] != batch:
        raise ValueError(f"target of shape {tuple(target.shape)} does not fit a batch of {batch}: give one class per "
                         f"sample (shape ({batch},)) or k classes per sample (shape ({batch}, k))")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= classes):
        raise ValueError(f"target holds classes out of range 0..{classes - 1}: "
                         f"min {int(target.min())}, max {int(target.max())}")
    return target.long()


def relevance_backward(outputs: Any, inputs: Any, grad_outputs: Any, **options: Any) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` of an explained forward, with one clear error for a forward that checkpoints.

    Parameters
    ----------
    outputs, inputs, grad_outputs, **options
        As for :func:`torch.autograd.grad`.

    Returns
    -------
    tuple of Tensor
        The relevance at ``inputs``.

    Raises
    ------
    ValueError
        Where the forward used ``torch.utils.checkpoint``: the checkpointed part is recomputed in the backward,
        outside the explanation's rules, so it cannot be explained.
    """
    try:
        return torch.autograd.grad(outputs, inputs, grad_outputs, **options)
    except RuntimeError as error:
        if isinstance(error, CheckpointError) or isinstance(error.__cause__, CheckpointError) or \
                "torch.utils.checkpoint" in str(error):
            raise ValueError("the model's forward uses torch.utils.checkpoint: the checkpointed part is computed "
                             "again in the backward, outside the explanation's rules, so it cannot be explained; "
                             "turn checkpointing off to explain it (model.gradient_checkpointing_disable() for "
                             "Hugging Face models, or call the checkpointed function directly)") from None
        raise


def selected_output(raw: Any, output: "int | str | None") -> Tensor:
    """The tensor to explain of a model's output: the output itself, ``raw[output]`` of a tuple/list/dict, else the
    first tensor of a tuple/list or the ``"logits"`` of a dict (Hugging Face's ``ModelOutput``).

    Parameters
    ----------
    raw : Any
        What the model returned.
    output : int, str or None
        Which part to explain (None: the tensor itself, the first tensor, or ``"logits"``).

    Returns
    -------
    Tensor
        The tensor to explain.
    """
    if isinstance(raw, Tensor) and output is None:
        return raw
    if output is not None:
        try:
            chosen = raw[output]
        except (KeyError, IndexError, TypeError):
            keys = list(raw.keys()) if isinstance(raw, dict) else (
                f"0..{len(raw) - 1}" if isinstance(raw, (tuple, list)) else "none: it is one tensor")
            raise ValueError(f"output={output!r} selects nothing of the model's {type(raw).__name__} output "
                             f"(keys/indices: {keys})") from None
    elif isinstance(raw, dict):
        chosen = raw.get("logits")
    elif isinstance(raw, (tuple, list)) and raw:
        chosen = raw[0]
    else:
        chosen = None
    if not isinstance(chosen, Tensor):
        keys = list(raw.keys()) if isinstance(raw, dict) else None
        raise ValueError(f"the model returns a {type(raw).__name__}" + (f" (keys {keys})" if keys else "") +
                         ", and the part to explain is not a tensor; pass output= (an index or key) to say which "
                         "tensor of the output is explained")
    return chosen


def explain(model: torch.nn.Module, input: Tensor, target: int | Sequence[int] | Tensor | None = None,
            rule: "str | Rule | Composite" = "epsilon", pattern: PatternsLike | None = None, start: str = "one",
            output_relevance: Tensor | None = None, fused: bool = False,
            return_scores: bool = False, return_absorbed: bool = False,
            output: "int | str | None" = None, return_conservation: bool = False) -> "Tensor | tuple[Any, ...]":
    """Explain ``model``'s decision on ``input``: return the input relevance.

    Relevance starts at the target logit of each sample (1 there, 0 elsewhere; ``start="logit"`` starts it at the
    logit's value, ``start="probability"`` at the target's softmax probability, as seed 004's ``R = f(x)``) and is
    propagated back by the rule(s) in one backward for the whole batch. A final ``Softmax``/``LogSoftmax`` of the
    model passes relevance unchanged: the score before it is explained (and is the logit of ``start="logit"``).

    Parameters
    ----------
    model : torch.nn.Module
        A model with torchlrp layers (see :func:`torchlrp.convert`), usually in eval mode.
    input : Tensor
        Batch of inputs. It is not modified.
    target : int, sequence, Tensor or None
        Class to explain: one int for all samples (also a numpy integer or a 0-d tensor such as
        ``logits.argmax()``), one class per sample (shape ``(batch,)``), ``k`` classes per sample (shape
        ``(batch, k)``: all are explained in one batched backward), or None for each sample's highest-scoring
        class.
    rule : str, Rule or Composite
        Rule for every layer, or a composite.
    pattern : dict or list, optional
        Patterns for the pattern rules (see :mod:`torchlrp.patterns`).
    start : {"one", "logit", "probability"}
        Start relevance at the target: 1, the logit's value, or the class probability (the softmax over the
        classes of the logits; the model's own output where it ends in a softmax).
    output_relevance : Tensor, optional
        Start relevance of the model output's shape; replaces ``target``/``start`` (needed for models whose
        output is not ``(batch, classes)``).
    fused : bool
        Run the rules' elementwise work as ``torch.compile``'d kernels (faster; the first call compiles them, which
        takes seconds and needs a C++ compiler on the CPU or Triton on CUDA). Same results.
    return_scores : bool
        Also return the model's scores from the same forward (the logits; the scores before a final softmax), so
        a caller that needs the prediction too does not run the model twice.
    return_absorbed : bool
        Also return the relevance that parameters took on the way: class and distillation tokens concatenated to
        the input, registers (``{parameter name: relevance}``), position embeddings and other parameter
        expressions added to activations (``{name of the sum: relevance}``: an interpolated embedding plus a
        tiled one is one share), each summed over the batch. With LRP-0 and zero biases, ``relevance.sum()``
        plus these shares is the start relevance: this is what lets conservation be checked on ViT-style models.
    output : int or str, optional
        For a model that returns a tuple, list or dict (Hugging Face's ``ModelOutput``): the index or key of the
        tensor to explain. Default: the output itself where it is a tensor, else the first element of a tuple/list
        or the ``"logits"`` of a dict.
    return_conservation : bool
        Also return a :class:`~torchlrp.accounting.Conservation` report (last): the start relevance, the input's,
        the absorbed shares, what calls without a rule changed (run time) and the residual. A model explained at
        run time is checked after every explanation: a warning says where relevance went missing (see
        :mod:`torchlrp.accounting`).

    Returns
    -------
    Tensor or tuple
        Relevance of ``input``'s shape, or ``(batch, k, *input.shape[1:])`` for a ``(batch, k)`` target; with
        ``return_scores=True`` also the detached scores, ``(batch, classes)``; with ``return_absorbed=True`` also
        the dict of absorbed shares; with ``return_conservation=True`` also the report (last).

    Raises
    ------
    ValueError
        For a bad target, start, rule or output shape, an output that is not a tensor and that ``output`` does not
        select one of, or a model without torchlrp layers.
    """
    return retrying_after_in_place(model, lambda: _explain_once(
        model, input, target, rule, pattern, start, output_relevance, fused, return_scores, return_absorbed, output,
        return_conservation))


def _explain_once(model: torch.nn.Module, input: Tensor, target: int | Sequence[int] | Tensor | None,
                  rule: "str | Rule | Composite", pattern: PatternsLike | None, start: str,
                  output_relevance: Tensor | None, fused: bool, return_scores: bool, return_absorbed: bool,
                  output: "int | str | None", return_conservation: bool) -> "Tensor | tuple[Any, ...]":
    """One explanation (see :func:`explain`)."""
    if not isinstance(input, Tensor):
        raise ValueError(f"input must be a tensor, got {type(input).__name__}")
    if input.is_meta:
        raise ValueError("input is on the 'meta' device: it holds no values to explain; give a real tensor")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    batch = input.shape[0]
    target = _as_target(target)
    target_shape = () if target is None or isinstance(target, int) else target.shape
    multi = len(target_shape) == 2
    per_sample = target_shape[1] if multi else 1
    with torch.inference_mode(False), torch.enable_grad():  # works under inference_mode / no_grad alike
        carrier = input.detach()
        if carrier.is_inference():  # made under inference_mode: a normal copy can record a backward
            carrier = carrier.clone()
        if per_sample > 1:
            carrier = carrier.repeat_interleave(per_sample, dim=0)
        carrier.requires_grad_(True)
        with rules_applied(model, rule, pattern, fused) as state:
            output = selected_output(model(carrier), output)
        scores = output.detach() if state.output_scores is None else state.output_scores
        if output_relevance is None:
            if output.dim() != 2:
                raise ValueError(f"the model output has shape {tuple(output.shape)}, not (batch, classes); pass "
                                 f"output_relevance= (a tensor of that shape) to say where relevance starts")
            targets = _targets(target, output[::per_sample], batch).reshape(-1, 1)
            output_relevance = torch.zeros_like(output).scatter_(1, targets, 1.0)
            if start == "logit":
                output_relevance = output_relevance * scores
            elif start == "probability":
                output_relevance = output_relevance * scores.softmax(dim=1)
        elif output_relevance.shape != output.shape:
            raise ValueError(f"output_relevance has shape {tuple(output_relevance.shape)}, the model output "
                             f"{tuple(output.shape)}")
        elif output_relevance.is_inference():
            output_relevance = output_relevance.clone()
        reported = return_absorbed or return_conservation
        named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad] \
            if reported else []
        # constants added to activations, by the sum's name (cheap leaves: kept for the run-time check too)
        named += state.absorbed if reported or state.run_time else []
        relevance, *shares = relevance_backward(output, [carrier, *(p for _, p in named)], output_relevance,
                                                 allow_unused=True)
    absorbed: dict[str, Tensor] = {}
    for (name, _), share in zip(named, shares):
        if share is not None:  # (an additive mask's -inf takes 0 * -inf: nothing)
            absorbed[name] = absorbed[name] + share.nansum() if name in absorbed else share.nansum()
    absorbed.update(state.layer_shares)  # run time: what the layers' stabilizers took (measured in the backward)
    report = None
    if return_conservation or state.run_time:
        def row_sums(tensor: Tensor) -> Tensor:
            rows = (batch, per_sample) if multi else tensor.shape[:1] or (1,)
            return tensor.detach().reshape(*rows, -1).sum(-1)
        report = Conservation(start=row_sums(output_relevance), input=row_sums(relevance), absorbed=absorbed,
                              unruled=dict(state.unruled), losses_allowed=tuple(sorted(state.losses_allowed)))
        if state.run_time:
            check(report, state.biases)
    if multi:
        relevance = relevance.reshape(batch, per_sample, *input.shape[1:])
    results = (relevance, scores[::per_sample]) if return_scores else (relevance,)
    if return_absorbed:
        results = (*results, absorbed)
    if return_conservation:
        results = (*results, report)
    return results[0] if len(results) == 1 else results
