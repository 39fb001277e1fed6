"""Find a Clever-Hans strategy with SpRAy: a watermark that predicts one class, found from the heatmaps alone.

The data: scikit-learn's 1797 handwritten digits (8x8, shipped with scikit-learn), enlarged to 24x24 and noisy.
A confounder is planted in class 7, as the copyright tag of PASCAL VOC's horse photos (Lapuschkin et al. 2019): half
of the 7s come "from one archive": faint (a tenth of the contrast) and carrying the archive's tag, a small
hollow square in the bottom-right corner. No other image has the tag. A small CNN trained on this data reaches high
test accuracy, but for the tagged 7s it decides by the tag. Explaining every image with ``explain_dataset`` (into a
Zarr store) and running SpRAy on the heatmaps of class 7 puts the tagged 7s into their own cluster, whose mean
heatmap sits on the tag. Checks printed: the cluster purity (tagged vs untagged 7s) and the accuracy on the tagged
test 7s with and without their tag (the control: the untagged 7s, which lose nothing).

Writes ``clever_hans_spray.png`` to ``--out`` (default ``examples/plots``) and the store ``clever_hans.zarr`` next to
it (``--store``).

    python examples/clever_hans.py            # about half a minute on a laptop CPU
    python examples/clever_hans.py --quick    # a few seconds (CI)
"""
from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F

import torchlrp as lrp
from torchlrp.analysis.spray import save_spray_figure, spray
from torchlrp.data.dataset import explain_dataset, open_relevances

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 24
CONFOUNDED = 7
MODEL_NAME = "clever_hans example CNN"  # recorded in the store: a rerun replaces only a store of this example
FAINT = 0.2
TAG = np.zeros((5, 5), dtype=np.float32)
TAG[[0, -1], :] = TAG[:, [0, -1]] = 1.0  # a hollow square


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits enlarged to 24x24 with noise; half of every class faint, and the faint 7s tagged.
    Returns (images, labels, tagged)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = torch.as_tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    labels = torch.as_tensor(digits.target)
    faint = torch.as_tensor(rng.random(len(labels)) < 0.5)
    tagged = faint & (labels == CONFOUNDED)
    images[faint] *= FAINT  # the archive's photos are faint, of every class ...
    images = images + torch.as_tensor(rng.normal(0, 0.15, images.shape), dtype=torch.float32)
    images[tagged, 0, -6:-1, -6:-1] = torch.as_tensor(TAG)  # ... and its 7s are tagged
    return images, labels, tagged


def remove_tag(images: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """The same images with the tag's corner replaced by the background's noise."""
    rng = np.random.default_rng(seed)
    cleaned = images.clone()
    cleaned[:, 0, -6:-1, -6:-1] = torch.as_tensor(rng.normal(0, 0.15, (len(images), 5, 5)), dtype=torch.float32)
    return cleaned


def make_model() -> torch.nn.Module:
    """A small CNN for 1x24x24 digits."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 6 * 6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int) -> torch.nn.Module:
    """Adam, batch 64."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def made_by(store: str, model_name: str = MODEL_NAME) -> bool:
    """Whether ``store`` is a Zarr store an example wrote (named by ``model_name`` in its settings)."""
    try:
        return open_relevances(store).settings.get("model") == model_name
    except (FileNotFoundError, ValueError):
        return False


def trained_on_the_data(quick: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Module]:
    """The data, its 400 test indices and the CNN trained on the rest (8 epochs with ``quick``, else 20).
    Returns (images, labels, tagged, test, model)."""
    images, labels, tagged = make_data()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, fit = order[:400], order[400:]
    model = train(make_model(), images[fit], labels[fit], epochs=8 if quick else 20)
    return images, labels, tagged, test, model


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "plots"), help="output directory")
    parser.add_argument("--store", help="Zarr store to write (default: OUT/clever_hans.zarr; replaced if it exists)")
    parser.add_argument("--quick", action="store_true", help="shorter training (CI)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)

    images, labels, tagged, test, model = trained_on_the_data(args.quick)
    print(f"test accuracy: {accuracy(model, images[test], labels[test]):.1%} (all digits)")
    test_tagged = test[tagged[test]]
    test_sevens = test[(labels[test] == CONFOUNDED) & ~tagged[test]]
    with_tag = accuracy(model, images[test_tagged], labels[test_tagged])
    without_tag = accuracy(model, remove_tag(images[test_tagged]), labels[test_tagged])
    control = accuracy(model, remove_tag(images[test_sevens]), labels[test_sevens])
    print(f"tagged 7s in the test set ({len(test_tagged)}): accuracy {with_tag:.1%} with the tag, {without_tag:.1%} "
          f"with the tag removed; untagged 7s ({len(test_sevens)}) with the corner re-noised (control): "
          f"{control:.1%}")

    # explain every image (the whole dataset, as one would audit it) into a Zarr store
    store = args.store or os.path.join(args.out, "clever_hans.zarr")
    if made_by(store):
        shutil.rmtree(store)  # this example's store from an earlier run; any other store is refused, not removed
    dataset = torch.utils.data.TensorDataset(images, labels)
    explain_dataset(model, dataset, lrp.EpsilonPlusFlat(), store, target="label", batch_size=128,
                    dtype=torch.float16, quiet=True, model_name=MODEL_NAME)
    relevances = open_relevances(store)

    # SpRAy on the heatmaps of class 7
    sevens = (relevances.labels == CONFOUNDED).numpy()
    result = spray(relevances, samples=sevens, size=(12, 12), n_neighbors=10, max_clusters=8)
    groups = tagged.numpy()[result.samples]
    purity = result.purity(groups)
    tag_cluster = int(np.bincount(result.clusters[groups], minlength=result.n_clusters).argmax())
    members = result.clusters == tag_cluster
    precision, recall = float(groups[members].mean()), float(members[groups].mean())
    corner = np.abs(result.mean_heatmaps()[:, -3:, -3:]).sum((1, 2)) / np.abs(result.mean_heatmaps()).sum((1, 2))
    print(f"SpRAy on {len(result.samples)} heatmaps of class {CONFOUNDED}: eigengap suggests "
          f"{result.suggested_clusters} clusters; cluster sizes {result.sizes().tolist()}")
    print(f"cluster purity (tagged vs untagged 7s): {purity:.3f}; the tag's cluster {tag_cluster}: "
          f"{precision:.1%} of it tagged, {recall:.1%} of the tagged 7s in it")
    print("share of |relevance| in the tag's corner, per cluster's mean heatmap: "
          + ", ".join(f"{k}: {share:.1%}" for k, share in enumerate(corner)))
    random_clusters = np.random.default_rng(0).permutation(result.clusters)
    control_purity = lrp.analysis.SprayResult(random_clusters, result.n_clusters, result.suggested_clusters,
                                              result.eigenvalues, result.features, None, result.samples
                                              ).purity(groups)
    print(f"control: the same cluster sizes at random have purity {control_purity:.3f}")
    figure = os.path.join(args.out, "clever_hans_spray.png")
    save_spray_figure(figure, result, images=images, examples=5,
                      title=f"SpRAy on class {CONFOUNDED}: purity {purity:.2f} (tagged vs untagged 7s)")
    print(f"wrote {figure} and the store {store}")
    return {"purity": purity, "precision": precision, "recall": recall, "with_tag": with_tag,
            "without_tag": without_tag, "control": control, "control_purity": control_purity}


if __name__ == "__main__":
    main()
