"""SpRAy: clusters of heatmaps against planted strategies, its eigenvalues against the formula, the example."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from torchlrp.analysis.spray import SprayResult, save_spray_figure, spray

pytest.importorskip("sklearn")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def planted(per_group=40, seed=0):
    """Heatmaps (N, 3, 16, 16) of three strategies: relevance on a blob top-left, in the centre, bottom-right
    (random amplitude, position jitter and noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:16, 0:16]
    maps, groups = [], []
    for group, (cy, cx) in enumerate([(3, 3), (8, 8), (12, 12)]):
        for _ in range(per_group):
            jy, jx = rng.normal(0, 0.7, 2)
            blob = np.exp(-((y - cy - jy) ** 2 + (x - cx - jx) ** 2) / 6.0)
            heat = rng.uniform(0.5, 5.0) * blob + rng.normal(0, 0.05, (16, 16))
            maps.append(np.stack([heat / 3] * 3))
            groups.append(group)
    order = rng.permutation(len(maps))
    return torch.as_tensor(np.array(maps)[order], dtype=torch.float32), np.array(groups)[order]


def reference_eigenvalues(features, n_neighbors, count):
    """kNN connectivity by brute force, symmetrized, and the normalized Laplacian's smallest eigenvalues."""
    flat = features.reshape(len(features), -1).astype(np.float64)
    distances = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    adjacency = np.zeros_like(distances)
    for row, neighbours in enumerate(np.argsort(distances, 1)[:, :n_neighbors]):
        adjacency[row, neighbours] = 1.0
    adjacency = 0.5 * (adjacency + adjacency.T)
    scaling = 1 / np.sqrt(adjacency.sum(1))
    laplacian = np.eye(len(flat)) - scaling[:, None] * adjacency * scaling[None]
    return np.linalg.eigvalsh(laplacian)[:count]


def test_spray_finds_planted_strategies():
    maps, groups = planted()
    result = spray(maps, n_neighbors=15, size=(8, 8))
    assert result.suggested_clusters == 3 and result.n_clusters == 3
    assert result.purity(groups) == 1.0
    # a sparser graph: the three strategies are its three components (three zero eigenvalues), but the largest
    # eigengap lies higher up, as the eigengap heuristic does on weakly connected clusters; given 3, purity is 1
    sparse = spray(maps, 3, n_neighbors=8, size=(8, 8), embedding="none")
    assert np.allclose(sparse.eigenvalues[:3], 0, atol=1e-9) and sparse.eigenvalues[3] > 0.05
    assert sparse.purity(groups) == 1.0
    random = SprayResult(np.random.default_rng(0).permutation(result.clusters), 3, 3, result.eigenvalues,
                         result.features, None, result.samples)
    assert random.purity(groups) < 0.6  # the control: the same cluster sizes at random
    assert result.embedding.shape == (120, 2) and result.features.shape == (120, 8, 8)
    assert result.sizes().tolist() == sorted(result.sizes().tolist(), reverse=True)  # cluster 0 is the largest
    means = result.mean_heatmaps()
    peaks = {np.unravel_index(mean.argmax(), mean.shape) for mean in means}
    assert peaks == {(1, 1), (4, 4), (6, 6)}  # each cluster's mean heatmap sits on its blob


@pytest.mark.parametrize("samples", [60, 600])  # dense eigenvalues, and the sparse solver above 500
def test_eigenvalues_match_the_normalized_laplacian(samples):
    maps, _ = planted(per_group=samples // 3, seed=1)
    result = spray(maps, n_neighbors=6, size=(4, 4), max_clusters=6, embedding="none")
    expected = reference_eigenvalues(result.features, 6, 7)
    np.testing.assert_allclose(result.eigenvalues, expected, atol=1e-6)
    assert result.suggested_clusters == int(np.argmax(np.diff(expected))) + 1


def test_given_cluster_count_samples_and_purity():
    maps, groups = planted()
    chosen = groups != 2
    result = spray(maps, 2, samples=torch.as_tensor(chosen), n_neighbors=8, embedding="none")
    assert result.n_clusters == 2 and np.array_equal(result.samples, np.flatnonzero(chosen))
    assert result.purity(groups[chosen]) == 1.0 and result.embedding is None
    hand = SprayResult(np.array([0, 0, 0, 1, 1, 1]), 2, 2, np.zeros(3), np.zeros((6, 1, 1)), None, np.arange(6))
    assert hand.purity([5, 5, 7, 7, 7, 7]) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="groups has 2 entries"):
        hand.purity([0, 1])


def test_spray_reads_a_store(tmp_path):
    from torchlrp.data.dataset import open_relevances
    sys.path.insert(0, os.path.dirname(__file__))
    from dataset_run import Samples, model

    from torchlrp.data.dataset import explain_dataset

    explain_dataset(model(), Samples(), "epsilon", tmp_path / "r.zarr", batch_size=4, quiet=True,
                    dtype=torch.float32)
    store = open_relevances(tmp_path / "r.zarr")
    mask = (store.labels != 1).numpy()
    from_store = spray(store, 2, samples=mask, n_neighbors=5, size=(4, 4), embedding="none")
    from_tensor = spray(store[:], 2, samples=mask, n_neighbors=5, size=(4, 4), embedding="none")
    np.testing.assert_array_equal(from_store.clusters, from_tensor.clusters)
    np.testing.assert_allclose(from_store.features, from_tensor.features)


def test_bad_input():
    maps, _ = planted(per_group=4)
    with pytest.raises(ValueError, match="at least n_neighbors"):
        spray(maps, n_neighbors=20)
    with pytest.raises(ValueError, match="embedding must be one of"):
        spray(maps, n_neighbors=3, embedding="pca")
    with pytest.raises(ValueError, match="n_clusters must be"):
        spray(maps, 0, n_neighbors=3)
    with pytest.raises(ValueError, match="max_clusters must be"):
        spray(maps, n_neighbors=3, max_clusters=1)
    broken = maps.clone()
    broken[5, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="1 heatmap.*NaN or inf.*sample 5"):
        spray(broken, n_neighbors=3)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) or \(N, H, W\)"):
        spray(torch.zeros(12, 5), n_neighbors=3)


def test_figure(tmp_path):
    from PIL import Image

    maps, _ = planted(per_group=10)
    result = spray(maps, n_neighbors=5, size=(8, 8))
    save_spray_figure(str(tmp_path / "with_images.png"), result, images=torch.rand(30, 1, 16, 16), examples=3)
    save_spray_figure(str(tmp_path / "heatmaps.png"), result, title="planted")
    for name in ("with_images.png", "heatmaps.png"):
        width, height = Image.open(tmp_path / name).size
        assert width > 400 and height > 200
    with pytest.raises(ValueError, match="no embedding"):
        save_spray_figure(str(tmp_path / "x.png"), spray(maps, n_neighbors=5, embedding="none"))


def test_clever_hans_example_finds_the_tag(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "clever_hans.py"), "--quick", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    purity = float(re.search(r"cluster purity \(tagged vs untagged 7s\): ([\d.]+)", result.stdout).group(1))
    control = float(re.search(r"at random have purity ([\d.]+)", result.stdout).group(1))
    with_tag, without_tag, untagged = map(float, re.search(
        r"accuracy ([\d.]+)% with the tag, ([\d.]+)% with the tag removed; .*control\): ([\d.]+)%",
        result.stdout).groups())
    # measured with --quick: purity 1.000 (random 0.55); tagged 7s 100% -> 39% without the tag, control 95%
    assert purity >= 0.9 and control < 0.7
    assert with_tag - without_tag > 30 and untagged > 80
    assert (tmp_path / "clever_hans_spray.png").is_file() and (tmp_path / "clever_hans.zarr" / "zarr.json").is_file()
