"""Text: explain what makes two sentences similar, and show relevance on tokens (HTML and PNG).

:class:`SentenceSimilarity` wraps a sentence encoder (a Hugging Face BERT-family model, converted with
:func:`torchlrp.convert`) into a model whose input is the token embeddings of a pair of sentences and whose output
is the cosine similarity of their mean-pooled embeddings. The cosine is invariant to each vector's length, so its
relevance would sum to about zero; the two norms are held constant (a scaling, as AttnLRP treats a layer norm's
standard deviation), so the explanation is of the dot product of the embeddings divided by their norms, which
equals the cosine.
"""
from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


class SentenceSimilarity(torch.nn.Module):
    """Cosine similarity of two sentences' mean-pooled embeddings, as a function of their token embeddings.

    Parameters
    ----------
    encoder : torch.nn.Module
        A Hugging Face encoder (``AutoModel``) that takes ``inputs_embeds=`` and ``attention_mask=`` and returns
        ``last_hidden_state`` (converted with :func:`torchlrp.convert` to explain it).
    attention_mask : Tensor
        ``(2, L)``: 1 for the tokens of each sentence, 0 for padding (the tokenizer's ``attention_mask``).
    """

    def __init__(self, encoder: torch.nn.Module, attention_mask: Tensor) -> None:
        super().__init__()
        if attention_mask.dim() != 2 or attention_mask.shape[0] != 2:
            raise ValueError(f"attention_mask must have shape (2, tokens) for a pair of sentences, got "
                             f"{tuple(attention_mask.shape)}")
        self.encoder = encoder
        self.register_buffer("attention_mask", attention_mask)

    def embed(self, input_ids: Tensor) -> Tensor:
        """Return the word embeddings of ``input_ids`` (the input to explain), detached.

        Parameters
        ----------
        input_ids : Tensor
            ``(2, L)`` token ids.

        Returns
        -------
        Tensor
            ``(2, L, hidden)`` in the encoder's dtype.
        """
        with torch.no_grad():
            return self.encoder.get_input_embeddings()(input_ids).detach()

    def forward(self, embeddings: Tensor) -> Tensor:
        """Compute the similarity.

        Parameters
        ----------
        embeddings : Tensor
            ``(2, L, hidden)`` token embeddings of the two sentences.

        Returns
        -------
        Tensor
            Shape ``(1,)``: the cosine similarity (its relevance starts there: ``output_relevance=`` the value).
        """
        hidden = self.encoder(inputs_embeds=embeddings, attention_mask=self.attention_mask).last_hidden_state
        mask = self.attention_mask[..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        unit = pooled / pooled.detach().norm(dim=-1, keepdim=True)  # the norms held constant
        return (unit[0] * unit[1]).sum().reshape(1)


def _colour(value: float, scale: float) -> tuple[float, float, float]:
    """White at zero, red for positive, blue for negative relevance (``bwr``)."""
    strength = 0.0 if scale == 0 else max(-1.0, min(1.0, value / scale))
    if strength >= 0:
        return 1.0, 1.0 - strength, 1.0 - strength
    return 1.0 + strength, 1.0 + strength, 1.0


def _clean(token: str) -> str:
    return token[2:] if token.startswith("##") else token


def token_html(rows: Sequence[Sequence[str]], relevance: Sequence[Sequence[float]] | Tensor,
               skip: Sequence[str] = ("[PAD]",)) -> str:
    """Return HTML with each token's background coloured by its relevance (red for, blue against).

    Parameters
    ----------
    rows : sequence of sequences of str
        Tokens of each text (e.g. ``tokenizer.convert_ids_to_tokens(ids)``).
    relevance : sequence of sequences of float, or Tensor
        One relevance per token (e.g. the embedding relevance summed over the hidden dimension).
    skip : sequence of str
        Tokens left out (padding).

    Returns
    -------
    str
        An HTML fragment, one ``<p>`` per text; all texts on one colour scale (the largest magnitude).

    Raises
    ------
    ValueError
        If a row's tokens and relevances differ in number.
    """
    values = [np.asarray(torch.as_tensor(r).detach().cpu(), dtype=float) for r in relevance]
    scale = max((float(np.abs(v).max()) for v in values if v.size), default=0.0)
    paragraphs = []
    for tokens, scores in zip(rows, values):
        if len(tokens) != len(scores):
            raise ValueError(f"{len(tokens)} tokens but {len(scores)} relevances")
        spans = []
        for token, score in zip(tokens, scores):
            if token in skip:
                continue
            red, green, blue = (int(255 * c) for c in _colour(float(score), scale))
            spans.append(f'<span style="background: rgb({red},{green},{blue}); padding: 2px" '
                         f'title="{score:.4f}">{html.escape(_clean(token))}</span>')
        paragraphs.append("<p>" + " ".join(spans) + "</p>")
    return "\n".join(paragraphs)


def save_tokens(path: str, rows: Sequence[Sequence[str]], relevance: Sequence[Sequence[float]] | Tensor,
                titles: Sequence[str] | None = None, skip: Sequence[str] = ("[PAD]",)) -> None:
    """Save texts with each token's background coloured by its relevance as a PNG figure.

    Parameters
    ----------
    path : str
        Output ``.png``.
    rows, relevance, skip
        As in :func:`token_html`.
    titles : sequence of str, optional
        A title per text (drawn above it).

    Raises
    ------
    ValueError
        If a row's tokens and relevances differ in number, or titles do not match the rows.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = [np.asarray(torch.as_tensor(r).detach().cpu(), dtype=float) for r in relevance]
    if titles is not None and len(titles) != len(rows):
        raise ValueError(f"{len(titles)} titles for {len(rows)} texts")
    scale = max((float(np.abs(v).max()) for v in values if v.size), default=0.0)
    figure = Figure(figsize=(8, 0.9 * len(rows) + 0.3))
    FigureCanvasAgg(figure)
    renderer = figure.canvas.get_renderer()
    axis = figure.add_axes((0, 0, 1, 1))
    axis.set_axis_off()
    height = 1.0 / len(rows)
    for index, (tokens, scores) in enumerate(zip(rows, values)):
        if len(tokens) != len(scores):
            raise ValueError(f"{len(tokens)} tokens but {len(scores)} relevances")
        top = 1.0 - index * height
        if titles is not None:
            axis.text(0.01, top - 0.25 * height, titles[index], fontsize=9, color="0.3", va="center")
        x = 0.01
        for token, score in zip(tokens, scores):
            if token in skip:
                continue
            text = axis.text(x, top - 0.65 * height, _clean(token), fontsize=12, va="center",
                             bbox={"facecolor": _colour(float(score), scale), "edgecolor": "none", "pad": 2})
            box = text.get_window_extent(renderer=renderer).transformed(axis.transAxes.inverted())
            x += box.width + 0.012
    figure.savefig(path, dpi=120)


def save_generation(path: str, tokens: Sequence[str], relevance: Tensor, prompt_length: int,
                    title: str | None = None) -> None:
    """Save a generated sequence's relevance matrix as a PNG: one row per generated token, one column per token of
    the sequence (red for, blue against; each row on its own colour scale).

    Parameters
    ----------
    path : str
        Output ``.png``.
    tokens : sequence of str
        The sequence's tokens as text (prompt, then generated).
    relevance : Tensor
        ``(generated, length)``: one sample of :attr:`torchlrp.generation.GenerationRelevance.relevance`.
    prompt_length : int
        How many of ``tokens`` are the prompt (a line marks where generation starts).
    title : str, optional
        Drawn above the matrix.

    Raises
    ------
    ValueError
        If the matrix does not have ``len(tokens) - prompt_length`` rows of ``len(tokens)`` columns.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(torch.as_tensor(relevance).detach().cpu(), dtype=float)
    generated = len(tokens) - prompt_length
    if values.shape != (generated, len(tokens)):
        raise ValueError(f"relevance must be (generated={generated}, length={len(tokens)}) for {len(tokens)} tokens "
                         f"with a prompt of {prompt_length}, got {values.shape}")
    scale = np.abs(values).max(axis=1, keepdims=True)
    normalized = np.divide(values, scale, out=np.zeros_like(values), where=scale > 0)
    figure = Figure(figsize=(0.45 * len(tokens) + 1.5, 0.4 * generated + 1.4))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    axis.imshow(normalized, cmap="bwr", vmin=-1, vmax=1, aspect="auto")
    axis.set_xticks(range(len(tokens)), [_clean(t) for t in tokens], fontsize=9)
    axis.set_yticks(range(generated), [f"→ {_clean(t)}" for t in tokens[prompt_length:]], fontsize=9)
    axis.axvline(prompt_length - 0.5, color="0.3", linewidth=1)
    axis.set_xlabel("token of the sequence (prompt | generated)")
    axis.set_ylabel("generated token")
    if title is not None:
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
