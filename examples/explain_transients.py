"""A rotation-invariant transient detector in the spirit of seed 000's supernova example (Deep-HiTS), explained.

The HiTS survey's image stamps cannot be downloaded here, so this script makes stamps that look like them: 21x21
pixel cut-outs with three channels (science, reference, difference = science - reference). Real transients are
point sources with the survey's seeing (a Gaussian PSF, FWHM 2.5-4.5 px) that appear or brighten in the science
image, sometimes on a host galaxy present in both images. Bogus detections are the artifacts a difference-imaging
pipeline is full of: cosmic-ray hits (sharp, not PSF-shaped, science only), bad columns (a hot CCD column in the
science image) and dipoles of a bad subtraction (a star in both images, misaligned by a pixel or two). A
rotation-invariant CNN (``Rotate -> convs -> CyclicPool -> dense``, Dieleman et al.'s cyclic pooling as in
Deep-HiTS) learns real vs bogus, and LRP shows what it looks at. Checks printed: test accuracy (chance is 50%),
the invariance of the output to 90-degree rotations against an ordinary CNN of the same layers (the control), and
that the heatmap of a rotated stamp is the rotated heatmap.

Writes ``transients.png`` to ``--out`` (default ``examples/plots``).

    python examples/explain_transients.py            # about a minute on a laptop CPU
    python examples/explain_transients.py --quick    # a few seconds (CI)
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import torchlrp as lrp
from torchlrp import image

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 21
CHANNELS = ("science", "reference", "difference")
ARTIFACTS = ("cosmic ray", "bad column", "dipole")


def _psf(rng: np.random.Generator, centre: tuple[float, float], fwhm: float) -> np.ndarray:
    """A unit-flux Gaussian PSF on the stamp grid."""
    sigma = fwhm / 2.355
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    profile = np.exp(-((x - centre[1]) ** 2 + (y - centre[0]) ** 2) / (2 * sigma ** 2))
    return profile / profile.sum()


def _galaxy(rng: np.random.Generator) -> np.ndarray:
    """An extended elliptical host, present in science and reference."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] - SIZE // 2 + rng.normal(0, 2, size=2)[:, None, None]
    angle, ratio, scale = rng.uniform(0, np.pi), rng.uniform(0.4, 1.0), rng.uniform(2.5, 5.0)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = (-x * np.sin(angle) + y * np.cos(angle)) / ratio
    return rng.uniform(20, 60) * np.exp(-np.hypot(u, v) / scale)


def make_stamp(rng: np.random.Generator, real: bool) -> tuple[np.ndarray, str]:
    """One (3, 21, 21) stamp (science, reference, difference) in units of the noise, and its kind."""
    noise = 1.0
    science = rng.normal(0, noise, (SIZE, SIZE))
    reference = rng.normal(0, noise * 0.7, (SIZE, SIZE))  # the reference is a deeper stack: less noise
    if rng.random() < 0.4:
        host = _galaxy(rng)
        science, reference = science + host, reference + host
    centre = (SIZE // 2 + rng.normal(0, 1.0), SIZE // 2 + rng.normal(0, 1.0))
    if real:
        fwhm = rng.uniform(2.5, 4.5)
        flux = rng.uniform(60, 400)
        before = flux * rng.uniform(0, 0.5) if rng.random() < 0.3 else 0.0  # a variable source, or a new one
        science = science + flux * _psf(rng, centre, fwhm)
        reference = reference + before * _psf(rng, centre, fwhm)
        kind = "real"
    else:
        kind = ARTIFACTS[rng.integers(len(ARTIFACTS))]
        if kind == "cosmic ray":  # a few sharp pixels, not convolved with the PSF
            row, col = int(round(centre[0])), int(round(centre[1]))
            length = rng.integers(1, 5)
            direction = rng.choice([(0, 1), (1, 0), (1, 1), (1, -1)])
            for step in range(length):
                science[np.clip(row + step * direction[0], 0, SIZE - 1),
                        np.clip(col + step * direction[1], 0, SIZE - 1)] += rng.uniform(15, 60)
        elif kind == "bad column":  # a hot column (or row, after a rotation of the detector) in the science image
            column = int(np.clip(round(centre[1]), 0, SIZE - 1))
            science[:, column] += rng.uniform(4, 15)
            if rng.random() < 0.5:
                science = science.T.copy()
        else:  # a star in both images, misaligned: a positive and a negative lobe in the difference
            fwhm = rng.uniform(2.5, 4.5)
            flux = rng.uniform(150, 600)
            shift = rng.normal(0, 1.0, 2)
            shift = 1.2 * shift / np.linalg.norm(shift)
            science = science + flux * _psf(rng, centre, fwhm)
            reference = reference + flux * _psf(rng, (centre[0] + shift[0], centre[1] + shift[1]), fwhm)
    stamp = np.stack([science, reference, science - reference]).astype(np.float32)
    return stamp, kind


def make_dataset(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``count`` stamps, half real; inputs scaled by an arcsinh stretch (bright sources compressed)."""
    rng = np.random.default_rng(seed)
    stamps, labels, kinds = [], [], []
    for index in range(count):
        real = index % 2 == 0
        stamp, kind = make_stamp(rng, real)
        stamps.append(stamp)
        labels.append(int(real))
        kinds.append(kind)
    x = torch.asinh(torch.from_numpy(np.stack(stamps)) / 3.0)
    return x, torch.tensor(labels), kinds


def make_model(rotation_invariant: bool = True) -> torch.nn.Module:
    """Deep-HiTS-like: conv layers on each rotation, cyclic mean pooling of the dense features, a dense output."""
    features = [lrp.Conv2d(3, 16, 4), torch.nn.ReLU(), lrp.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                torch.nn.MaxPool2d(2), lrp.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                torch.nn.Flatten(), lrp.Linear(32 * 4 * 4, 64), torch.nn.ReLU()]
    if rotation_invariant:
        return lrp.Sequential(lrp.Rotate(), *features, lrp.CyclicPool("mean"), lrp.Linear(64, 2))
    return lrp.Sequential(*features, lrp.Linear(64, 2))


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            index = order[start:start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    model.eval()


def rotation_change(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest change of the logits when the input is rotated by 90, 180 or 270 degrees."""
    with torch.no_grad():
        logits = model(x)
        return max(float((model(torch.rot90(x, k, dims=(2, 3))) - logits).abs().max()) for k in (1, 2, 3))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "plots"), help="output directory")
    parser.add_argument("--quick", action="store_true", help="small data set and short training (CI)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    start = time.time()
    train_count, epochs = (800, 3) if args.quick else (6000, 8)
    train_x, train_y, _ = make_dataset(train_count, seed=1)
    test_x, test_y, test_kinds = make_dataset(1000, seed=2)
    model, control = make_model(), make_model(rotation_invariant=False)
    train(model, train_x, train_y, epochs)
    train(control, train_x, train_y, epochs)
    with torch.no_grad():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
        control_accuracy = float((control(test_x).argmax(1) == test_y).float().mean())
    invariant_change, control_change = rotation_change(model, test_x[:200]), rotation_change(control, test_x[:200])
    print(f"test accuracy: {accuracy:.1%} rotation-invariant CNN, {control_accuracy:.1%} ordinary CNN (chance 50%)")
    print(f"largest logit change under 90-degree rotations: {invariant_change:.2e} (ordinary CNN: "
          f"{control_change:.2e})")

    shown = [i for i, kind in enumerate(test_kinds) if kind == "real"][:2]
    shown += [test_kinds.index(artifact) for artifact in ARTIFACTS]
    stamps = test_x[shown]
    relevance = lrp.explain(model, stamps, target=test_y[shown], rule=lrp.EpsilonPlus())
    rotated = lrp.explain(model, torch.rot90(stamps, 1, dims=(2, 3)), target=test_y[shown], rule=lrp.EpsilonPlus())
    equivariance = float((rotated - torch.rot90(relevance, 1, dims=(2, 3))).abs().max() / relevance.abs().max())
    print(f"heatmap of the rotated stamps vs the rotated heatmaps: largest difference {equivariance:.2e} "
          f"(relative to the largest relevance)")
    channel_share = relevance.clamp(min=0).sum((2, 3)) / relevance.clamp(min=0).sum((1, 2, 3))[:, None]
    for index, kind in zip(range(len(shown)), ["real", "real", *ARTIFACTS]):
        shares = ", ".join(f"{name} {share:.0%}" for name, share in zip(CHANNELS, channel_share[index].tolist()))
        print(f"{kind:>10}: positive relevance by channel: {shares}")

    with torch.no_grad():
        probability = model(stamps).softmax(1)[:, 1]
    rows, titles = [], []
    for index, kind in enumerate(["real", "real", *ARTIFACTS]):
        channels = [image.as_image(stamps[index:index + 1, c:c + 1])[0] for c in range(3)]
        maps = image.heatmap(relevance[index:index + 1].transpose(0, 1), percentile=99.5, shared=True)
        rows.append([*channels, image.heatmap(relevance[index:index + 1], percentile=99.5)[0], *maps])
        titles.append(f"{kind}\np(real)={probability[index]:.2f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "transients.png")
    image.save_grid(path, rows, [*CHANNELS, "relevance (sum)", *(f"R {name}" for name in CHANNELS)],
                    row_titles=titles, title=f"rotation-invariant real/bogus classifier (test accuracy "
                                             f"{accuracy:.1%}), EpsilonPlus; red: evidence for the stamp's class")
    print(f"wrote {path} in {time.time() - start:.1f} s")
    return {"accuracy": accuracy, "control_accuracy": control_accuracy, "rotation_change": invariant_change,
            "control_rotation_change": control_change, "equivariance": equivariance}


if __name__ == "__main__":
    main()
