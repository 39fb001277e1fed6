"""``torchlrp.analysis``: spectral relevance analysis (SpRAy) of many heatmaps.

SpRAy (Lapuschkin et al., Nature Communications 2019) looks for the strategies a model uses for one class: it
downsizes the class's heatmaps, connects each to its nearest neighbours, clusters that graph spectrally, and
suggests the number of strategies by the eigengap of the graph's normalized Laplacian. A cluster whose mean heatmap
sits on something that is not the object (a watermark, a frame, a background) is a Clever-Hans strategy.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from torchlrp.viz.image import as_image, heatmap

#: 2-D embeddings :func:`spray` can draw with
EMBEDDINGS = ("tsne", "umap", "none")


@dataclass(frozen=True)
class SprayResult:
    """What :func:`spray` found.

    Attributes
    ----------
    clusters : ndarray
        ``(N,)`` cluster of each heatmap, ``0 .. n_clusters - 1``.
    n_clusters : int
        Clusters made (``n_clusters`` given, else the eigengap's suggestion).
    suggested_clusters : int
        The eigengap's suggestion: the ``k <= max_clusters`` after which the Laplacian's eigenvalues jump most.
    eigenvalues : ndarray
        The ``max_clusters + 1`` smallest eigenvalues of the nearest-neighbour graph's normalized Laplacian.
    features : ndarray
        ``(N, h, w)`` the downsized, normalized heatmaps that were clustered.
    embedding : ndarray or None
        ``(N, 2)`` t-SNE/UMAP coordinates (None for ``embedding="none"``).
    samples : ndarray
        ``(N,)`` which samples of the input these are (their indices).
    """

    clusters: np.ndarray
    n_clusters: int
    suggested_clusters: int
    eigenvalues: np.ndarray
    features: np.ndarray
    embedding: np.ndarray | None
    samples: np.ndarray

    def mean_heatmaps(self) -> np.ndarray:
        """``(n_clusters, h, w)``: each cluster's mean downsized heatmap."""
        return np.stack([self.features[self.clusters == k].mean(0) for k in range(self.n_clusters)])

    def sizes(self) -> np.ndarray:
        """``(n_clusters,)`` samples per cluster."""
        return np.bincount(self.clusters, minlength=self.n_clusters)

    def purity(self, groups: "Sequence[int] | np.ndarray | torch.Tensor") -> float:
        """Cluster purity against known ``groups`` (one integer per sample): the fraction of samples that share
        their cluster's most common group; 1 when every cluster holds one group only.

        Parameters
        ----------
        groups : sequence of int, ndarray or Tensor
            ``(N,)`` group of each sample (e.g. 1 where a sample carries a confounder, else 0).

        Returns
        -------
        float
            The purity, in ``[max group share, 1]``.
        """
        groups = np.asarray(groups.cpu() if isinstance(groups, torch.Tensor) else groups).reshape(-1)
        if groups.shape != self.clusters.shape:
            raise ValueError(f"groups has {groups.size} entries for {self.clusters.size} clustered samples")
        _, groups = np.unique(groups, return_inverse=True)
        counts = np.zeros((self.n_clusters, groups.max() + 1), dtype=np.int64)
        np.add.at(counts, (self.clusters, groups), 1)
        return float(counts.max(1).sum() / groups.size)


def _features(relevances: Any, samples: np.ndarray, size: tuple[int, int], block: int = 256) -> np.ndarray:
    """Sum over channels, average-pool to ``size``, divide by the L2 norm; read in blocks (lazy stores)."""
    parts = []
    for start in range(0, len(samples), block):
        chunk = relevances[samples[start:start + block]]
        chunk = torch.as_tensor(np.asarray(chunk) if not isinstance(chunk, torch.Tensor) else chunk).float()
        if chunk.dim() == 4:
            chunk = chunk.sum(1)
        if chunk.dim() != 3:
            raise ValueError(f"relevances must be (N, C, H, W) or (N, H, W); got samples of shape "
                             f"{tuple(chunk.shape[1:])}")
        pooled = torch.nn.functional.adaptive_avg_pool2d(chunk[:, None], size)[:, 0]
        norms = pooled.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        parts.append((pooled / norms[:, None, None]).numpy())
    return np.concatenate(parts)


def _distinct_maps(features: np.ndarray, samples: np.ndarray, enough: int) -> int:
    """Number of different normalized maps (apart by more than 1e-5), counted up to ``enough``, with a warning for
    all-zero maps and for a single map."""
    flat = features.reshape(len(features), -1)
    zero = np.flatnonzero(~flat.any(1))
    kept = [flat[0]]
    for row in flat[1:]:
        if len(kept) >= enough:
            break
        if np.abs(np.stack(kept) - row).max(1).min() > 1e-5:
            kept.append(row)
    distinct = len(kept)
    if zero.size:
        warnings.warn(f"{zero.size} of {len(flat)} heatmaps are all zero (first: sample {samples[zero[0]]}): a class "
                      f"the model never scores, or a rule that loses all relevance; they form one cluster",
                      RuntimeWarning, stacklevel=3)
    if distinct == 1:
        warnings.warn("every heatmap is the same map after downsizing and normalizing (scaled copies or all zero): "
                      "spray returns one cluster and, for an embedding, every point at the origin",
                      RuntimeWarning, stacklevel=3)
    return distinct


def _graph(features: np.ndarray, n_neighbors: int) -> Any:
    """Symmetric nearest-neighbour connectivity graph (scipy sparse)."""
    from sklearn.neighbors import kneighbors_graph

    connectivity = kneighbors_graph(features.reshape(len(features), -1), n_neighbors, include_self=False)
    return 0.5 * (connectivity + connectivity.T)


def _eigenvalues(affinity: Any, count: int) -> np.ndarray:
    """The ``count`` smallest eigenvalues of the normalized Laplacian ``I - D^-1/2 A D^-1/2``."""
    from scipy.sparse import diags
    from scipy.sparse.linalg import eigsh

    degree = np.asarray(affinity.sum(1)).reshape(-1)
    scaling = diags(1.0 / np.sqrt(np.maximum(degree, 1e-12)))
    normalized = scaling @ affinity @ scaling
    if affinity.shape[0] <= 500 or count >= affinity.shape[0] - 1:
        largest = np.linalg.eigvalsh(normalized.toarray())[::-1][:count]
    else:
        largest = np.sort(eigsh(normalized, k=count, which="LA", return_eigenvectors=False))[::-1]
    return np.clip(1.0 - largest, 0.0, 2.0)


def spray(relevances: Any, n_clusters: int | None = None, *, samples: Any = None, size: tuple[int, int] = (32, 32),
          n_neighbors: int = 10, max_clusters: int = 10, embedding: str = "tsne",
          random_state: int = 0) -> SprayResult:
    """Spectral relevance analysis: cluster heatmaps by where their relevance lies.

    Parameters
    ----------
    relevances : Tensor, ndarray or torchlrp.dataset.Relevances
        ``(N, C, H, W)`` or ``(N, H, W)`` heatmaps, usually of one class (a store of :func:`~torchlrp.dataset.
        explain_dataset` is read lazily, in blocks).
    n_clusters : int, optional
        Clusters to make; default: the eigengap's suggestion.
    samples : boolean mask or integer indices, optional
        The samples of ``relevances`` to analyse (e.g. ``store.labels == 7``); default all.
    size : (int, int)
        Heatmaps are summed over channels and average-pooled to this size (SpRAy's downsizing).
    n_neighbors : int
        Neighbours per heatmap in the graph.
    max_clusters : int
        Largest number of clusters the eigengap may suggest.
    embedding : {"tsne", "umap", "none"}
        2-D embedding for the figure (UMAP needs ``umap-learn``).
    random_state : int
        Seed of the clustering and the embedding.

    Returns
    -------
    SprayResult
        Clusters, eigenvalues, suggestion, features and embedding; draw it with :func:`save_spray_figure`.

    Raises
    ------
    ValueError
        For fewer than ``n_neighbors + 2`` heatmaps, heatmaps holding NaN or inf, bad shapes or arguments, or an
        ``n_clusters`` larger than the number of different maps.
    ImportError
        Without scikit-learn (``pip install scikit-learn``), or without umap-learn for ``embedding="umap"``.

    Warns
    -----
    RuntimeWarning
        When heatmaps are all zero (a class the model never scores), and when every heatmap is the same map after
        normalizing (scaled copies, or all zero): the result is then one cluster with every embedded point at the
        origin (t-SNE and UMAP are undefined on one point repeated). The eigengap's suggestion never exceeds the
        number of different maps.

    Notes
    -----
    The eigengap is a suggestion, as in the SpRAy paper: strategies far enough apart disconnect the graph (as many
    zero eigenvalues as strategies), but on a sparse graph of loosely knit clusters the largest gap can lie higher
    up; look at ``eigenvalues`` (and more ``n_neighbors``) before trusting it.
    """
    try:
        from sklearn.cluster import SpectralClustering
    except ImportError:
        raise ImportError("spray needs scikit-learn: pip install scikit-learn (or 'torchlrp[dataset]')") from None
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    total = len(relevances)
    if samples is None:
        chosen = np.arange(total)
    else:
        chosen = np.asarray(samples.cpu() if isinstance(samples, torch.Tensor) else samples).reshape(-1)
        chosen = np.flatnonzero(chosen) if chosen.dtype == bool else chosen.astype(np.int64)
    if len(chosen) < n_neighbors + 2:
        raise ValueError(f"spray needs at least n_neighbors + 2 = {n_neighbors + 2} heatmaps, got {len(chosen)}")
    if max_clusters < 2 or max_clusters > len(chosen) - 2:
        raise ValueError(f"max_clusters must be in 2..{len(chosen) - 2} for {len(chosen)} heatmaps, got "
                         f"{max_clusters}")
    if n_clusters is not None and not 1 <= n_clusters <= len(chosen):
        raise ValueError(f"n_clusters must be in 1..{len(chosen)}, got {n_clusters}")
    features = _features(relevances, chosen, tuple(size))
    if not np.isfinite(features).all():
        bad = np.flatnonzero(~np.isfinite(features.reshape(len(features), -1)).all(1))
        raise ValueError(f"{bad.size} heatmap(s) hold NaN or inf (first: sample {chosen[bad[0]]}); spray needs finite "
                         f"relevance")
    distinct = _distinct_maps(features, chosen, max(max_clusters, n_clusters or 1) + 1)
    if n_clusters is not None and n_clusters > distinct:
        raise ValueError(f"n_clusters={n_clusters} but the heatmaps are only {distinct} different maps (after "
                         f"downsizing and normalizing); ask for at most {distinct}")
    if distinct == 1:  # one map repeated (or all zero): nothing to cluster, and t-SNE/UMAP are undefined
        return SprayResult(np.zeros(len(chosen), dtype=np.int64), 1, 1, np.zeros(max_clusters + 1), features,
                           None if embedding == "none" else np.zeros((len(chosen), 2), dtype=np.float32), chosen)
    affinity = _graph(features, n_neighbors)
    eigenvalues = _eigenvalues(affinity, max_clusters + 1)
    suggested = min(int(np.argmax(np.diff(eigenvalues))) + 1, distinct)
    clusters_made = suggested if n_clusters is None else int(n_clusters)
    if clusters_made == 1:
        clusters = np.zeros(len(chosen), dtype=np.int64)
    else:
        clustering = SpectralClustering(clusters_made, affinity="precomputed", random_state=random_state,
                                        assign_labels="cluster_qr")
        with warnings.catch_warnings():  # strategies apart enough to disconnect the graph are what SpRAy looks for
            warnings.filterwarnings("ignore", message="Graph is not fully connected")
            clusters = clustering.fit_predict(affinity.toarray() if len(chosen) <= 2000 else affinity)
        order = np.argsort(-np.bincount(clusters, minlength=clusters_made), kind="stable")
        clusters = np.argsort(order)[clusters]  # cluster 0 is the largest
    coordinates = _embed(features, embedding, random_state)
    return SprayResult(clusters.astype(np.int64), clusters_made, suggested, eigenvalues, features, coordinates,
                       chosen)


def _embed(features: np.ndarray, embedding: str, random_state: int) -> np.ndarray | None:
    flat = features.reshape(len(features), -1)
    if embedding == "none":
        return None
    if embedding == "umap":
        try:
            import umap
        except ImportError:
            raise ImportError("embedding='umap' needs umap-learn: pip install umap-learn (or use 'tsne')") from None
        return umap.UMAP(random_state=random_state).fit_transform(flat)
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (len(flat) - 1) / 3))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=random_state).fit_transform(flat)


def save_spray_figure(path: str, result: SprayResult, images: Any = None, examples: int = 5,
                      title: str | None = None) -> None:
    """Draw a SpRAy result: the 2-D embedding coloured by cluster, and per cluster its mean heatmap and examples.

    Parameters
    ----------
    path : str
        Image file to write (PNG, ...).
    result : SprayResult
        From :func:`spray` (with an embedding).
    images : Tensor or ndarray, optional
        ``(N, C, H, W)`` inputs in ``[0, 1]`` for the same samples as the relevances given to :func:`spray`
        (indexed by ``result.samples``), shown as examples; without them the examples are heatmaps.
    examples : int
        Examples per cluster.
    title : str, optional
        Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if result.embedding is None:
        raise ValueError("this result has no embedding (spray(..., embedding='none')); run spray with 'tsne'")
    rows, colours = result.n_clusters, plt.get_cmap("tab10")
    figure = plt.figure(figsize=(4.2 + 1.3 * (examples + 1), max(3.6, 1.3 * rows)))
    grid = figure.add_gridspec(rows, examples + 2, width_ratios=[3.0] + [1.0] * (examples + 1), wspace=0.08)
    scatter = figure.add_subplot(grid[:, 0])
    sizes = result.sizes()
    for cluster in range(rows):
        points = result.embedding[result.clusters == cluster]
        scatter.scatter(points[:, 0], points[:, 1], s=9, color=colours(cluster % 10),
                        label=f"cluster {cluster} ({sizes[cluster]})")
    scatter.set_xticks([])
    scatter.set_yticks([])
    scatter.legend(fontsize=7, loc="best")
    scatter.set_title(f"embedding ({result.suggested_clusters} suggested by the eigengap)", fontsize=8)
    means = heatmap(result.mean_heatmaps())
    for cluster in range(rows):
        axis = figure.add_subplot(grid[cluster, 1])
        axis.imshow(means[cluster])
        axis.set_title(f"mean of {cluster}", fontsize=7, color=colours(cluster % 10))
        members = np.flatnonzero(result.clusters == cluster)[:examples]
        shown = (as_image(np.asarray(images)[result.samples[members]]) if images is not None
                 else heatmap(result.features[members]))
        for column, picture in enumerate(shown):
            axis = figure.add_subplot(grid[cluster, 2 + column])
            axis.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            axis.set_axis_off()
    for axis in figure.axes[1:]:
        axis.set_xticks([])
        axis.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


__all__ = ["EMBEDDINGS", "SprayResult", "save_spray_figure", "spray"]
