"""One row per torchvision CNN family: does torchlrp keep the outputs, conserve relevance, and at what cost?

For the smallest model of each family (random weights, randomized batch-norm statistics):

* outputs: largest relative difference between the converted and the original model (float64);
* conservation: LRP-0 on a bias-free copy (biases and batch-norm shifts zero), ``|sum of input relevance / target
  logit - 1|``, worst over the batch (float64);
* time: median seconds of ``lrp.explain`` with Epsilon and with EpsilonPlus over the median of the plain input
  gradient, interleaved (float32).

Writes ``benchmarks/results/families.md``. Usage: ``python benchmarks/families.py [--size 128] [--repeats 5]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import torchlrp as lrp  # noqa: E402
from test_torchvision_models import SMALLEST, build  # noqa: E402


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, size: int, repeats: int) -> dict:
    """Measure one model (see the module docstring)."""
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    model = build(name)
    converted = lrp.convert(model)
    with torch.no_grad():
        expected = model(x)
        error = float((converted(x) - expected).abs().max() / expected.abs().max())
    plain = build(name, bias_free=True)
    with torch.no_grad():
        logits = plain(x).max(1).values
    relevance = lrp.explain(lrp.convert(plain), x, rule="zero", start="logit")
    conservation = float((relevance.flatten(1).sum(1) / logits - 1).abs().max())

    model32, converted32 = model.float(), converted.float()
    x32 = x.float()

    def gradient() -> None:
        carrier = x32.clone().requires_grad_(True)
        output = model32(carrier)
        torch.autograd.grad(output[:, 0].sum(), carrier)

    runs = {"gradient": gradient,
            "Epsilon": lambda: lrp.explain(converted32, x32, target=0, rule="epsilon"),
            "EpsilonPlus": lambda: lrp.explain(converted32, x32, target=0, rule=lrp.EpsilonPlus())}
    times: dict[str, list[float]] = {key: [] for key in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for key, fn in runs.items():
            times[key].append(_seconds(fn))
    floor = statistics.median(times["gradient"])
    return {"model": name, "output error": error, "conservation error": conservation,
            "Epsilon": statistics.median(times["Epsilon"]) / floor,
            "EpsilonPlus": statistics.median(times["EpsilonPlus"]) / floor}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "families.md"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 2, {args.size} px", "",
             "| model | outputs (max rel. diff, float64) | LRP-0 conservation error (float64) "
             "| Epsilon x gradient | EpsilonPlus x gradient |", "|---|---|---|---|---|"]
    for name in SMALLEST:
        row = measure(name, args.size, args.repeats)
        line = (f"| {name} | {row['output error']:.1e} | {row['conservation error']:.1e} | {row['Epsilon']:.2f} | "
                f"{row['EpsilonPlus']:.2f} |")
        print(line, flush=True)
        lines.append(line)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
