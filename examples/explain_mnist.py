"""Train a small CNN on handwritten digits and explain it with every rule (the README's main example).

Data: torchvision's MNIST when it is on disk under ``--data-dir``; otherwise the handwritten digits that ship
inside scikit-learn (``sklearn.datasets.load_digits``, 8x8 pixels upsampled to 28x28; no download). Writes
``mnist_explanations.png`` (input digits, one heatmap column per rule; prints pixel flipping and the randomization
check of every rule next to baselines and an untrained network) and ``mnist_classes.png`` (seed 001's
per-class view: the true class, the all-zero class filter and every class with its logit, for two digits) to
``--out`` (default ``examples/plots``).

    python examples/explain_mnist.py            # about a minute on a laptop CPU
    python examples/explain_mnist.py --quick    # a few seconds (CI)
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import torchlrp as lrp
from torchlrp import image

HERE = os.path.dirname(os.path.abspath(__file__))
RULES = [("epsilon", "epsilon"), ("gamma", "gamma"), ("alpha1beta0", "alpha1beta0"), ("alpha2beta1", "alpha2beta1"),
         ("zplus", "zplus"), ("EpsilonPlusFlat", lrp.EpsilonPlusFlat()), ("patternnet", "patternnet"),
         ("patternattribution", "patternattribution")]


def load_digits(data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Return train/test images (N, 1, 28, 28) in [0, 1], labels, and the data set's name."""
    if data_dir is not None:
        try:
            import torchvision

            train = torchvision.datasets.MNIST(data_dir, train=True, download=False)
            test = torchvision.datasets.MNIST(data_dir, train=False, download=False)
            scale = 1 / 255.0
            return (train.data[:, None].float() * scale, train.targets, test.data[:, None].float() * scale,
                    test.targets, f"MNIST from {data_dir}")
        except (RuntimeError, OSError):
            print(f"no MNIST under {data_dir}; using scikit-learn's handwritten digits instead")
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    split = int(0.8 * len(images))
    return images[:split], labels[:split], images[split:], labels[split:], "scikit-learn digits (8x8 -> 28x28)"


def make_model() -> lrp.Sequential:
    """TorchLRP's MNIST network, built from torchlrp layers."""
    return lrp.Sequential(
        lrp.Conv2d(1, 32, 3, 1, 1), lrp.ReLU(), torch.nn.MaxPool2d(2, 2),
        lrp.Conv2d(32, 64, 3, 1, 1), lrp.ReLU(), torch.nn.MaxPool2d(2, 2),
        torch.nn.Flatten(), lrp.Linear(7 * 7 * 64, 128), lrp.ReLU(), lrp.Linear(128, 10))


def train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            index = order[start:start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
    model.eval()


def faithfulness(models: dict[str, torch.nn.Module], patterns: dict, digits: torch.Tensor, steps: int) -> None:
    """Print pixel flipping (ABPC relative to each digit's logit) and the randomization check for every rule,
    next to gradient x input, Integrated Gradients (Captum, when installed), random attribution and an untrained
    network of the same architecture."""
    flip = {"patch": 2, "steps": steps, "fill": "mean"}
    print(f"faithfulness on {len(digits)} test digits: pixel flipping ({flip['patch']}x{flip['patch']} patches, "
          f"{steps} steps, each image's mean as fill); ABPC = mean gap between the least- and the most-relevant-first "
          f"curves, relative to the digit's logit (larger: the order found what the decision rests on), "
          f"+- standard error; randomization: Spearman correlation with the map after re-drawing the top layer / "
          f"all layers (low: the map depends on the model)")
    print(f"{'attribution':<22} {'trained ABPC':>16} {'untrained ABPC':>16} {'randomization':>16}")

    def score(model: torch.nn.Module, method) -> str:
        target = model(digits).argmax(1).detach()
        relevance = method(model, digits, target)
        result = lrp.evaluate.pixel_flipping(model, digits, relevance, target, **flip)
        relative = result.abpc / result.morf[:, 0].abs().clamp(min=1e-6)
        return f"{float(relative.mean()):.3f} +- {float(relative.std() / len(relative) ** 0.5):.3f}"

    def gradient_input(model, inputs, target):
        carrier = inputs.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(model(carrier).gather(1, target[:, None]).sum(), carrier)
        return gradient * inputs

    methods = {name: (lambda m, x, t, rule=rule, name=name: lrp.explain(
        m, x, t, rule=rule, pattern=patterns.get(m) if name.startswith("pattern") else None))
        for name, rule in RULES if name != "patternnet"}
    composites = {"EpsilonPlus": lrp.EpsilonPlus(), "EpsilonAlpha2Beta1": lrp.EpsilonAlpha2Beta1(),
                  "EpsilonGammaBox": lrp.EpsilonGammaBox(0.0, 1.0)}  # digits lie in [0, 1]
    for name, composite in composites.items():
        methods[name] = lambda m, x, t, composite=composite: lrp.explain(m, x, t, rule=composite)
    methods["gradient x input"] = gradient_input
    try:
        from captum.attr import IntegratedGradients

        methods["integrated gradients"] = lambda m, x, t: IntegratedGradients(m).attribute(x, target=t, n_steps=32)
    except ImportError:
        pass
    methods["random"] = lambda m, x, t: lrp.evaluate.random_relevance(x)
    trained, untrained = models["trained"], models["untrained"]
    for name, method in methods.items():
        check = "--"
        rule = {**dict(RULES), **composites}.get(name)
        if rule is not None and not name.startswith("pattern"):
            target = trained(digits).argmax(1).detach()
            result = lrp.evaluate.randomization(trained, digits[:64], target[:64], rule)
            check = f"{float(result.correlation[0].mean()):.2f} / {float(result.correlation[-1].mean()):.2f}"
        print(f"{name:<22} {score(trained, method):>16} {score(untrained, method):>16} {check:>16}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="directory holding torchvision's MNIST (no download)")
    parser.add_argument("--out", default=os.path.join(HERE, "plots"), help="where to write the figures")
    parser.add_argument("--weights", default=os.path.join(HERE, "models", "mnist_cnn.pt"),
                        help="trained weights: loaded if present, written after training")
    parser.add_argument("--retrain", action="store_true", help="train even if the weights file exists")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="2 epochs, for a smoke test")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    start = time.time()

    train_x, train_y, test_x, test_y, source = load_digits(args.data_dir)
    print(f"data: {source}; {len(train_x)} training and {len(test_x)} test images")
    model = make_model()
    if os.path.isfile(args.weights) and not args.retrain and not args.quick:
        model.load_state_dict(torch.load(args.weights, weights_only=True))
        model.eval()
        print(f"loaded weights from {args.weights} (--retrain to train again)")
    else:
        train(model, train_x, train_y, 2 if args.quick else args.epochs)
        if not args.quick:
            os.makedirs(os.path.dirname(args.weights), exist_ok=True)
            torch.save(model.state_dict(), args.weights)
            print(f"saved weights to {args.weights}")
    with torch.no_grad():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    print(f"test accuracy: {accuracy:.2%}")

    loader = [train_x[i:i + 256] for i in range(0, len(train_x), 256)]
    patterns = lrp.patterns.fit_patternnet_positive(model, loader)
    digits = torch.stack([test_x[(test_y == d).nonzero()[0, 0]] for d in range(0, 10, 2)])
    columns = [image.as_image(digits)]
    for name, rule in RULES:
        pattern = patterns if name.startswith("pattern") else None
        relevance = lrp.explain(model, digits, rule=rule, pattern=pattern)
        columns.append(image.heatmap(relevance, percentile=99.5))
    os.makedirs(args.out, exist_ok=True)
    rows = [[column[i] for column in columns] for i in range(len(digits))]
    explanations = os.path.join(args.out, "mnist_explanations.png")
    image.save_grid(explanations, rows, ["input"] + [name for name, _ in RULES],
                    title=f"torchlrp on {source.split(' (')[0]} (test accuracy {accuracy:.1%}); red: for, blue: against")

    untrained = make_model().eval()  # the control: the same architecture, never trained
    untrained_patterns = lrp.patterns.fit_patternnet_positive(untrained, loader)
    faithfulness({"trained": model, "untrained": untrained}, {model: patterns, untrained: untrained_patterns},
                 test_x[:64 if args.quick else 200], steps=5 if args.quick else 10)

    chosen = torch.stack([(test_y == d).nonzero()[0, 0] for d in (3, 7)])
    classes = os.path.join(args.out, "mnist_classes.png")
    image.save_classes(classes, model, test_x[chosen], labels=test_y[chosen], rule="epsilon")
    print(f"wrote {explanations} and {classes} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
