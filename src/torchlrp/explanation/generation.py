"""Token-level attributions for generation: explain every generated token of a causal language model with respect
to the prompt and the tokens generated before it, in one call.

:func:`explain_generation` continues a prompt greedily (or takes a given continuation), runs the explained forward
once over the whole sequence and sends relevance back from each generated token's logit in turn, reusing that
forward (relevance is linear in where it starts, so the rows of the matrix share every activation). Row ``g`` of
the result is the relevance of each token of the sequence for generating token ``prompt_length + g``; a causal
model gives the tokens at and after that position exactly zero.
"""
from __future__ import annotations

import numbers

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from torchlrp.core.composites import Composite
from torchlrp.explanation.accounting import Conservation, check
from torchlrp.explanation.context import retrying_after_in_place, rules_applied
from torchlrp.explanation.explain import STARTS, relevance_backward
from torchlrp.core.rules import Rule

@dataclass(frozen=True)
class GenerationRelevance:
    """The relevance matrix of a generated sequence.

    Attributes
    ----------
    tokens : Tensor
        ``(batch, length)`` token ids: the prompt, then the generated tokens.
    prompt_length : int
        How many of ``tokens`` are the prompt.
    relevance : Tensor
        ``(batch, generated, length)``: ``relevance[b, g, t]`` is token ``t``'s relevance for generating token
        ``prompt_length + g`` (summed over the embedding dimension; zero for ``t >= prompt_length + g``).
    logits : Tensor
        ``(batch, generated)``: the logit of each generated token where it was generated (the explained score).
    conservation : Conservation
        Where the start relevance of all rows went (see :mod:`torchlrp.accounting`).
    """

    tokens: Tensor
    prompt_length: int
    relevance: Tensor
    logits: Tensor
    conservation: Conservation

    @property
    def generated(self) -> Tensor:
        """``(batch, generated)``: the generated token ids."""
        return self.tokens[:, self.prompt_length:]


def _forward(model: torch.nn.Module, embeddings: Tensor) -> Tensor:
    """The logits ``(batch, length, vocabulary)`` of a model called with ``inputs_embeds=``."""
    output: Any = model(inputs_embeds=embeddings)
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != embeddings.shape[:2]:
        raise ValueError(f"the model must return logits of shape (batch, length, vocabulary) for inputs_embeds of "
                         f"shape {tuple(embeddings.shape)}; got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(output).__name__}")
    return logits


def _greedy(model: torch.nn.Module, embed: Callable[[Tensor], Tensor], input_ids: Tensor, steps: int,
            stop: int | None) -> Tensor:
    """Continue ``input_ids`` by ``steps`` greedy tokens (the plain model; stopping where every row made ``stop``)."""
    tokens = input_ids
    with torch.no_grad():
        for _ in range(steps):
            following = _forward(model, embed(tokens))[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, following], dim=1)
            if stop is not None and bool((tokens[:, input_ids.shape[1]:] == stop).any(1).all()):
                break
    return tokens


def explain_generation(model: torch.nn.Module, input_ids: Tensor, max_new_tokens: int | None = None,
                       continuation: Tensor | None = None, rule: "str | Rule | Composite" = "epsilon",
                       start: str = "logit", embedding: torch.nn.Module | None = None,
                       eos_token_id: int | None = None) -> GenerationRelevance:
    """Explain each token a causal language model generates, with respect to all tokens before it.

    Parameters
    ----------
    model : torch.nn.Module
        A converted (:func:`torchlrp.convert`) causal LM that takes ``inputs_embeds=`` and returns logits
        ``(batch, length, vocabulary)`` (a Hugging Face ``...ForCausalLM``, or any module returning them).
    input_ids : Tensor
        ``(batch, prompt_length)`` prompt token ids (no padding: prompts of one length).
    max_new_tokens : int, optional
        Continue the prompt greedily by up to this many tokens (the model's argmax; ``eos_token_id`` ends it).
    continuation : Tensor, optional
        ``(batch, generated)`` tokens to explain instead (a sampled continuation, a reference answer).
    rule : str, Rule or Composite
        As for :func:`torchlrp.explain` (``Composite(attention="cp")`` for CP-LRP).
    start : {"logit", "one", "probability"}
        Each row starts at the generated token's logit (its value), at 1, or at its probability.
    embedding : torch.nn.Module, optional
        The token embedding (default ``model.get_input_embeddings()``); relevance is of its output.
    eos_token_id : int, optional
        Stop generating where every row made this token.

    Returns
    -------
    GenerationRelevance
        The sequence, the relevance matrix and the explained logits.

    Raises
    ------
    ValueError
        For a prompt that is not ``(batch, length)`` integer ids, neither or both of ``max_new_tokens`` and
        ``continuation``, a continuation of another batch size, a bad ``start``, or a model without an embedding.
    """
    return retrying_after_in_place(model, lambda: _explain_generation_once(
        model, input_ids, max_new_tokens, continuation, rule, start, embedding, eos_token_id))


def _integral(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds integers (not floats, not booleans)."""
    return not tensor.dtype.is_floating_point and not tensor.dtype.is_complex and tensor.dtype != torch.bool


def _check_ids(name: str, ids: Tensor, vocabulary: int | None) -> None:
    """Raise ``ValueError`` for token ids outside ``[0, vocabulary)``."""
    if ids.numel() and (int(ids.min()) < 0 or (vocabulary is not None and int(ids.max()) >= vocabulary)):
        raise ValueError(f"{name} holds token ids outside [0, {vocabulary}) (the embedding's vocabulary): "
                         f"min {int(ids.min())}, max {int(ids.max())}")


def _position_limit(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's positions allow (its config's ``max_position_embeddings`` or
    ``n_positions``), where it says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        limit = getattr(config, name, None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return None


def _check_length(inputs: int, limit: int | None) -> None:
    """Raise ``ValueError`` where the explained forward's ``inputs`` positions exceed the model's limit."""
    if limit is not None and inputs > limit:
        raise ValueError(f"the prompt and the tokens to explain need {inputs} positions; the model takes at most "
                         f"{limit} (its config's position limit): shorten the prompt or max_new_tokens")


def _check_causal(relevance: Tensor, position: int) -> None:
    """Raise ``ValueError`` where relevance for the token at ``position`` reached inputs at or after it: the model is
    not causal (its logits there see the future), so the row is no explanation of generating that token."""
    future = relevance[:, position:]
    if future.numel() and bool((future.abs().amax() > 1e-6 * relevance.abs().amax().clamp(min=1e-30)).item()):
        raise ValueError("explain_generation needs a causal language model: the relevance of a generated token "
                         f"reached the tokens after it (position {position} on); a bidirectional model's logits see "
                         "the future, so they are not what the token was generated from")


def _explain_generation_once(model: torch.nn.Module, input_ids: Tensor, max_new_tokens: int | None,
                             continuation: Tensor | None, rule: "str | Rule | Composite", start: str,
                             embedding: torch.nn.Module | None, eos_token_id: int | None) -> GenerationRelevance:
    """One explanation of a generated sequence (see :func:`explain_generation`)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or not _integral(input_ids) or \
            input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a (batch, prompt_length >= 1) tensor of token ids, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    if (max_new_tokens is None) == (continuation is None):
        raise ValueError("give exactly one of max_new_tokens (generate greedily) and continuation (tokens to explain)")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if embedding is None:
        getter = getattr(model, "get_input_embeddings", None)
        embedding = getter() if callable(getter) else None
        if embedding is None:
            raise ValueError("the model has no get_input_embeddings(); pass embedding= (its token embedding module)")

    def embed(ids: Tensor) -> Tensor:
        with torch.no_grad():
            return embedding(ids).detach()

    vocabulary = getattr(embedding, "num_embeddings", None)
    _check_ids("input_ids", input_ids, vocabulary)
    limit = _position_limit(model)
    if continuation is None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        _check_length(input_ids.shape[1] + max_new_tokens - 1, limit)
        tokens = _greedy(model, embed, input_ids, max_new_tokens, eos_token_id)
    else:
        if not isinstance(continuation, Tensor) or not _integral(continuation):
            raise ValueError(f"continuation must be a tensor of integer token ids, got "
                             f"{continuation.dtype if isinstance(continuation, Tensor) else type(continuation).__name__}"
                             f" (token ids are not cast)")
        if continuation.dim() != 2 or continuation.shape[0] != input_ids.shape[0] or continuation.shape[1] == 0:
            raise ValueError(f"continuation must be (batch={input_ids.shape[0]}, generated >= 1) token ids, got "
                             f"{tuple(continuation.shape)}")
        _check_ids("continuation", continuation, vocabulary)
        _check_length(input_ids.shape[1] + continuation.shape[1] - 1, limit)
        tokens = torch.cat([input_ids, continuation.to(input_ids.device, input_ids.dtype)], dim=1)
    prompt_length, length = input_ids.shape[1], tokens.shape[1]
    generated = length - prompt_length
    with torch.inference_mode(False), torch.enable_grad():
        carrier = embed(tokens[:, :-1]).clone().requires_grad_(True)  # the last token is no one's input
        with rules_applied(model, rule) as state:
            logits = _forward(model, carrier)
        positions = torch.arange(prompt_length - 1, length - 1, device=tokens.device)
        targets = tokens[:, prompt_length:]
        chosen = logits.detach()[:, positions].gather(-1, targets[..., None])[..., 0]  # (batch, generated)
        values = {"one": torch.ones_like(chosen), "logit": chosen,
                  "probability": logits.detach()[:, positions].softmax(-1).gather(-1, targets[..., None])[..., 0]}
        starts = values[start]
        leaves = [leaf for _, leaf in state.absorbed]
        rows, absorbed = [], {}
        for step in range(generated):
            output_relevance = torch.zeros_like(logits)
            output_relevance[:, prompt_length - 1 + step].scatter_(-1, targets[:, step, None], starts[:, step, None])
            relevance, *shares = relevance_backward(logits, [carrier, *leaves], output_relevance,
                                                     retain_graph=step < generated - 1, allow_unused=True)
            _check_causal(relevance, prompt_length + step)
            rows.append(torch.cat([relevance.sum(-1), relevance.new_zeros(relevance.shape[0], 1)], dim=1))
            for (name, _), share in zip(state.absorbed, shares):
                if share is not None:
                    absorbed[name] = absorbed.get(name, 0) + share.detach().nansum()
    absorbed.update(state.layer_shares)  # run time: what the layers' stabilizers took (measured in the backward)
    matrix = torch.stack(rows, dim=1).detach()
    report = Conservation(start=starts.detach(), input=matrix.sum(-1), absorbed=absorbed,
                          unruled=dict(state.unruled), losses_allowed=tuple(sorted(state.losses_allowed)))
    if state.run_time:
        check(report, state.biases)
    return GenerationRelevance(tokens=tokens, prompt_length=prompt_length, relevance=matrix, logits=chosen,
                               conservation=report)


__all__ = ["GenerationRelevance", "explain_generation"]
