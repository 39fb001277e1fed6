"""Pixel flipping: torchlrp.evaluate against Quantus's PixelFlipping on the same digits, model and relevance.

256 handwritten digits (scikit-learn's, 28x28), the examples' digits CNN, epsilon-rule relevance; pixel level,
28 pixels replaced per step (28 steps, zero as the fill), most relevant first. Prints seconds for both
and the largest difference of the two curves (both follow the target logit; the relevance gets a tiny jitter so that
no two pixels tie and both remove them in the same order).

    python benchmarks/faithfulness.py [--digits 256]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import torchlrp as lrp  # noqa: E402
from explain_mnist import make_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", type=int, default=256)
    args = parser.parse_args(argv)
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    images = torch.tensor(load_digits().images[:args.digits], dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    model = make_model().eval()
    target = model(x).argmax(1)
    relevance = lrp.explain(model, x, target, rule="epsilon")
    # a tiny seeded jitter: no two pixels tie, so both libraries remove the pixels in the same order
    relevance = relevance + 1e-6 * relevance.abs().amax() * torch.rand(relevance.shape, generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    ours = lrp.evaluate.pixel_flipping(model, x, relevance, target, patch=1, steps=28, fill=0.0, order="morf")
    ours_seconds = time.perf_counter() - start

    import quantus

    metric = quantus.PixelFlipping(features_in_step=28, perturb_baseline=0.0, disable_warnings=True,
                                   display_progressbar=False, return_auc_per_sample=False)
    start = time.perf_counter()
    theirs = metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=relevance.detach().numpy(),
                    device="cpu", batch_size=args.digits, softmax=False)
    quantus_seconds = time.perf_counter() - start
    theirs = np.asarray(theirs)
    print(f"pixel flipping, {args.digits} digits x 28 steps: torchlrp {ours_seconds:.2f} s, Quantus "
          f"{quantus_seconds:.2f} s ({quantus_seconds / ours_seconds:.1f}x); curve shapes torchlrp "
          f"{tuple(ours.morf.shape)}, Quantus {theirs.shape}")
    if theirs.ndim == 2 and theirs.shape[1] == ours.morf.shape[1] - 1:
        difference = np.abs(theirs - ours.morf[:, 1:].numpy()).max()
        print(f"largest difference between the curves: {difference:.2e}")


if __name__ == "__main__":
    main()
