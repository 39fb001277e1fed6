"""Heatmaps people can look at: relevance to RGB, overlays and grid figures (numpy and matplotlib only).

Relevance is shown with a diverging colormap centred on zero (red positive, blue negative, white zero), scaled
symmetrically per sample by its largest absolute value or a percentile of it. Colour-channel relevance is either
summed (a grayscale-input map) or shown per channel as an RGB image (the blog post of seed 004 shows both).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

CHANNEL_MODES = ("sum", "rgb")


def _as_numpy(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().to("cpu", torch.float32).numpy()
    return np.asarray(tensor, dtype=np.float32)


def normalize(relevance: torch.Tensor | np.ndarray, percentile: float | None = None,
              shared: bool = False) -> np.ndarray:
    """Scale each sample of ``relevance`` symmetrically into ``[-1, 1]``.

    Parameters
    ----------
    relevance : Tensor or ndarray
        Shape ``(N, ...)``.
    percentile : float, optional
        Scale by this percentile of ``|R|`` (e.g. 99.5, clipping outliers) instead of the maximum.
    shared : bool
        One scale for all ``N`` samples (maps that are compared, such as one input's classes or channels) instead
        of one per sample.

    Returns
    -------
    ndarray
        Float32 array of the same shape in ``[-1, 1]``; all-zero samples stay zero.

    Raises
    ------
    ValueError
        For a percentile outside ``(0, 100]``.
    """
    values = _as_numpy(relevance)
    flat = np.abs(values.reshape(1 if shared else len(values), -1))
    if percentile is None:
        scale = flat.max(axis=1)
    else:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        scale = np.percentile(flat, percentile, axis=1)
    scale = np.where(scale > 0, scale, 1.0).reshape(-1, *([1] * (values.ndim - 1)))
    return np.clip(values / scale, -1.0, 1.0).astype(np.float32)


def heatmap(relevance: torch.Tensor | np.ndarray, channels: str = "sum", percentile: float | None = None,
            cmap: str = "bwr", shared: bool = False) -> np.ndarray:
    """Turn relevance into RGB heatmaps.

    Parameters
    ----------
    relevance : Tensor or ndarray
        ``(N, C, H, W)`` or ``(N, H, W)`` relevance (CUDA tensors are moved to the CPU).
    channels : {"sum", "rgb"}
        ``"sum"``: sum over colour channels, colour by ``cmap``; ``"rgb"``: per-channel relevance as an RGB image
        (grey is zero; needs 3 channels).
    percentile : float, optional
        Normalize by this percentile of ``|R|`` per sample instead of the maximum.
    cmap : str
        Diverging matplotlib colormap for ``"sum"`` (centre = zero).
    shared : bool
        One colour scale for all ``N`` maps instead of one per map (see :func:`normalize`).

    Returns
    -------
    ndarray
        ``(N, H, W, 3)`` float32 RGB values in ``[0, 1]``.

    Raises
    ------
    ValueError
        For a bad shape or channel mode.
    """
    import matplotlib

    values = _as_numpy(relevance)
    if channels not in CHANNEL_MODES:
        raise ValueError(f"channels must be one of {CHANNEL_MODES}, got {channels!r}")
    if values.ndim == 3:
        values = values[:, None]
    if values.ndim != 4:
        raise ValueError(f"relevance must have shape (N, C, H, W) or (N, H, W), got {values.shape}")
    if channels == "rgb":
        if values.shape[1] != 3:
            raise ValueError(f"channels='rgb' needs 3 colour channels, got {values.shape[1]}")
        return (0.5 + 0.5 * normalize(values, percentile, shared)).transpose(0, 2, 3, 1).astype(np.float32)
    summed = normalize(values.sum(axis=1), percentile, shared)
    colormap = matplotlib.colormaps[cmap]
    return colormap((summed + 1.0) / 2.0)[..., :3].astype(np.float32)


def patch_relevance(relevance: torch.Tensor | np.ndarray, patch_size: int) -> np.ndarray:
    """Sum relevance over each ``patch_size x patch_size`` patch (a ViT's tokens) and spread it back over the patch.

    Parameters
    ----------
    relevance : Tensor or ndarray
        ``(N, C, H, W)`` pixel relevance, ``H`` and ``W`` multiples of ``patch_size``.
    patch_size : int
        The patch side (16 for ``vit_b_16``).

    Returns
    -------
    ndarray
        ``(N, H, W)``: every pixel holds its patch's total relevance divided by the patch's pixel count, so the map
        sums to what the input relevance sums to and renders with :func:`heatmap` or :func:`overlay`.

    Raises
    ------
    ValueError
        For a bad shape or patch size.
    """
    values = _as_numpy(relevance)
    if values.ndim != 4:
        raise ValueError(f"relevance must have shape (N, C, H, W), got {values.shape}")
    count, _, height, width = values.shape
    if not isinstance(patch_size, int) or patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(f"patch_size must be a positive int dividing the image size {height}x{width}, got "
                         f"{patch_size!r}")
    rows, columns = height // patch_size, width // patch_size
    per_patch = values.sum(axis=1).reshape(count, rows, patch_size, columns, patch_size).sum(axis=(2, 4))
    spread = per_patch / (patch_size * patch_size)
    return np.repeat(np.repeat(spread, patch_size, axis=1), patch_size, axis=2).astype(np.float32)


def as_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Turn an image batch ``(N, C, H, W)`` (C = 1 or 3) into displayable ``(N, H, W, 3)`` values in [0, 1].

    Parameters
    ----------
    image : Tensor or ndarray
        Images, scaled per sample to ``[0, 1]`` for display.

    Returns
    -------
    ndarray
        RGB float32 array.
    """
    values = _as_numpy(image)
    if values.ndim == 3:
        values = values[:, None]
    low = values.reshape(len(values), -1).min(1).reshape(-1, 1, 1, 1)
    high = values.reshape(len(values), -1).max(1).reshape(-1, 1, 1, 1)
    values = (values - low) / np.where(high > low, high - low, 1.0)
    if values.shape[1] == 1:
        values = np.repeat(values, 3, axis=1)
    return values.transpose(0, 2, 3, 1).astype(np.float32)


def overlay(image: torch.Tensor | np.ndarray, relevance: torch.Tensor | np.ndarray, alpha: float = 0.6,
            percentile: float | None = 99.5) -> np.ndarray:
    """Blend relevance heatmaps over grayscale versions of their images.

    Parameters
    ----------
    image : Tensor or ndarray
        ``(N, C, H, W)`` images.
    relevance : Tensor or ndarray
        Their relevance, same ``N, H, W``.
    alpha : float
        Weight of the heatmap, in ``[0, 1]``.
    percentile : float, optional
        Normalization percentile of the heatmap.

    Returns
    -------
    ndarray
        ``(N, H, W, 3)`` RGB values in ``[0, 1]``.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    gray = as_image(image).mean(axis=3, keepdims=True)
    return (1 - alpha) * gray + alpha * heatmap(relevance, percentile=percentile)


def save_grid(path: str, rows: Sequence[Sequence[np.ndarray]], column_titles: Sequence[str] | None = None,
              row_titles: Sequence[str] | None = None, cell_size: float = 1.6, title: str | None = None,
              cell_titles: Sequence[Sequence[str]] | None = None) -> None:
    """Save a grid of RGB images as a PNG figure (rows = inputs, columns = rules or classes).

    Parameters
    ----------
    path : str
        Output file (``.png``).
    rows : sequence of sequences of ndarray
        ``rows[i][j]`` is an ``(H, W, 3)`` image.
    column_titles, row_titles : sequence of str, optional
        Titles above the columns / left of the rows.
    cell_size : float
        Size of one cell in inches.
    title : str, optional
        Figure title.
    cell_titles : sequence of sequences of str, optional
        A title above every cell (``cell_titles[i][j]``), e.g. each class's logit; replaces ``column_titles``.

    Raises
    ------
    ValueError
        If rows are empty or of unequal length, or titles do not match the grid.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows or len({len(r) for r in rows}) != 1 or not rows[0]:
        raise ValueError("rows must be a non-empty list of equally long, non-empty lists of images")
    n_rows, n_cols = len(rows), len(rows[0])
    if column_titles is not None and len(column_titles) != n_cols:
        raise ValueError(f"{len(column_titles)} column titles for {n_cols} columns")
    if row_titles is not None and len(row_titles) != n_rows:
        raise ValueError(f"{len(row_titles)} row titles for {n_rows} rows")
    if cell_titles is not None and [len(t) for t in cell_titles] != [n_cols] * n_rows:
        raise ValueError(f"cell_titles must hold {n_rows} rows of {n_cols} titles")
    # a Figure with its own Agg canvas: pyplot's global backend (a notebook's) is left alone
    figure = Figure(figsize=(cell_size * n_cols, cell_size * n_rows + 0.4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            axis = axes[i][j]
            axis.imshow(np.clip(cell, 0, 1), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if cell_titles is not None:
                axis.set_title(cell_titles[i][j], fontsize=8)
            elif i == 0 and column_titles is not None:
                axis.set_title(column_titles[j], fontsize=9)
            if j == 0 and row_titles is not None:
                axis.set_ylabel(row_titles[i], fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def save_classes(path: str, model: torch.nn.Module, input: torch.Tensor,
                 labels: Sequence[int] | torch.Tensor | None = None, rule: Any = "epsilon", pattern: Any = None,
                 class_names: Sequence[str] | None = None, percentile: float | None = 99.5, start: str = "logit") -> torch.Tensor:
    """Save seed 001's per-class view: each input, its true class's relevance, the empty filter, every class.

    One row per input: the input; the relevance for its true class (``labels``; the predicted class when
    omitted); the relevance for the class filter of all zeros (``output_relevance`` zero: the all-zero map); then one
    heatmap per class, all of a row's heatmaps on one colour scale, each titled with the class's logit. All
    classes of all inputs are explained in one batched backward.

    Parameters
    ----------
    path : str
        Output ``.png``.
    model : torch.nn.Module
        A model with torchlrp layers whose output is ``(batch, classes)``.
    input : Tensor
        ``(N, C, H, W)`` images (C = 1 or 3), shown as they are (values in ``[0, 1]`` look right).
    labels : sequence of int or Tensor, optional
        The true class of each input.
    rule : str, Rule or Composite
        The rule (see :func:`torchlrp.explain`).
    pattern : optional
        Patterns for the pattern rules.
    class_names : sequence of str, optional
        Names of the classes (default: their indices).
    percentile : float, optional
        Colour scale: this percentile of ``|R|`` over the row (default 99.5), or the maximum if None.
    start : {"logit", "one", "probability"}
        Start relevance of each class (see :func:`torchlrp.explain`); the logit (seed 001's ``R = y * T``) keeps
        the maps of one row comparable.

    Returns
    -------
    Tensor
        The relevance of every class, ``(N, classes, C, H, W)``.

    Raises
    ------
    ValueError
        For a model output that is not ``(batch, classes)``, or labels or class names that do not fit.
    """
    from torchlrp.explanation.explain import explain

    with torch.no_grad():
        logits = model(input)
    if logits.dim() != 2:
        raise ValueError(f"the model output has shape {tuple(logits.shape)}, not (batch, classes)")
    count, classes = logits.shape
    names = [str(c) for c in range(classes)] if class_names is None else list(class_names)
    if len(names) != classes:
        raise ValueError(f"{len(names)} class names for {classes} classes")
    truth = logits.argmax(1) if labels is None else torch.as_tensor(labels, device=logits.device).reshape(-1)
    if truth.shape != (count,) or bool(((truth < 0) | (truth >= classes)).any()):
        raise ValueError(f"labels must be {count} class indices in [0, {classes}), got {labels!r}")
    every_class = torch.arange(classes, device=input.device).expand(count, classes)
    relevance = explain(model, input, every_class, rule=rule, pattern=pattern, start=start)
    empty = explain(model, input, rule=rule, pattern=pattern, output_relevance=torch.zeros_like(logits))
    pictures = as_image(input)
    rows, titles = [], []
    for index in range(count):
        label = int(truth[index])
        maps = torch.cat([relevance[index, label][None], empty[index][None], relevance[index]])
        rows.append([pictures[index], *heatmap(maps, percentile=percentile, shared=True)])
        titles.append([f"input ({names[label]})", f"true class {names[label]}", "all-zero filter",
                       *(f"{names[c]}: {float(logits[index, c]):.2f}" for c in range(classes))])
    save_grid(path, rows, cell_titles=titles)
    return relevance
