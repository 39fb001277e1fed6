"""Explain torchvision's VGG16 on real photographs that ship with scikit-image (no download).

The model is converted with ``torchlrp.convert_vgg`` (TorchLRP's API) and explained with EpsilonGammaBox, its box
bounds derived from the ImageNet normalization. Figures (grayscale relevance and per-channel RGB relevance) go to
``--out`` (default ``examples/plots``).

Weights: torchvision's pretrained VGG16 from the local torch cache, or ``--weights FILE`` (a state_dict). Without
either the script says how to get them and exits. ``--random-weights`` runs the sanity check of seed 004 instead:
an untrained network must give diffuse maps; the script reports a concentration number (the share of absolute
relevance in the top 5% of pixels) for every model it runs.

    python examples/explain_vgg.py                    # pretrained weights from the torch cache
    python examples/explain_vgg.py --random-weights   # offline sanity check
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import torchlrp as lrp
from torchlrp import image, imagenet
from torchlrp.data.models import cached_weights_available, torchvision_model

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def photographs(size: int, count: int) -> torch.Tensor:
    """scikit-image's sample photographs as a (count, 3, size, size) batch in [0, 1]."""
    import skimage.data

    return torch.stack([imagenet.from_array(getattr(skimage.data, name)(), size) for name in PHOTOS[:count]])


def concentration(relevance: torch.Tensor, top: float = 0.05) -> torch.Tensor:
    """Share of the absolute (channel-summed) relevance that lies in the top ``top`` fraction of pixels."""
    magnitude = relevance.sum(1).abs().flatten(1)
    k = max(1, int(top * magnitude.shape[1]))
    return magnitude.topk(k, dim=1).values.sum(1) / magnitude.sum(1).clamp(min=1e-30)


def explain_model(vgg: torch.nn.Module, pictures: torch.Tensor, device: torch.device, label: str, out: str) -> None:
    model = lrp.convert_vgg(vgg).to(device).eval()
    inputs = imagenet.normalize(pictures).to(device)
    names = imagenet.categories()
    with torch.no_grad():
        top = model(inputs).argmax(1).cpu()
    low, high = imagenet.bounds()
    relevance = lrp.explain(model, inputs, rule=lrp.EpsilonGammaBox(low.to(device), high.to(device))).cpu()
    titles = [f"{PHOTOS[i]}: {names[int(c)]}" for i, c in enumerate(top)]
    for channels in ("sum", "rgb"):
        maps = image.heatmap(relevance, channels=channels, percentile=99.5)
        rows = [[image.as_image(pictures[i:i + 1])[0], maps[i]] for i in range(len(pictures))]
        path = os.path.join(out, f"vgg16_{label}_{'grayscale' if channels == 'sum' else 'rgb'}.png")
        image.save_grid(path, rows, ["input", f"EpsilonGammaBox ({'channel sum' if channels == 'sum' else 'RGB'})"],
                        row_titles=titles, cell_size=2.6, title=f"VGG16 ({label} weights)")
        print(f"wrote {path}")
    for title, value in zip(titles, concentration(relevance)):
        print(f"{label} weights, {title}: {value:.1%} of |relevance| in the top 5% pixels")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="VGG16 state_dict file (default: torchvision's pretrained, from the cache)")
    parser.add_argument("--random-weights", action="store_true", help="run the randomized-weights sanity check")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(HERE, "plots"))
    parser.add_argument("--quick", action="store_true", help="2 photographs at 64 px (smoke test)")
    args = parser.parse_args(argv)
    start = time.time()
    torch.manual_seed(0)
    device = torch.device(args.device)
    size, count = (64, 2) if args.quick else (224, len(PHOTOS))
    pictures = photographs(size, count)
    os.makedirs(args.out, exist_ok=True)
    have_trained = args.weights is not None or cached_weights_available("vgg16")
    if not have_trained and not args.random_weights:
        print("VGG16's pretrained weights are not in the torch cache. Get them once (528 MB) with\n"
              "    python -c \"import torchvision; torchvision.models.vgg16(weights='DEFAULT')\"\n"
              "or pass --weights FILE (a VGG16 state_dict); --random-weights runs the sanity check offline.",
              file=sys.stderr)
        return 1
    if have_trained:
        explain_model(torchvision_model("vgg16", args.weights or "DEFAULT"), pictures, device, "trained", args.out)
    if args.random_weights:
        explain_model(torchvision_model("vgg16", None), pictures, device, "random", args.out)
    print(f"done in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
