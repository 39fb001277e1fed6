"""Concept benchmarks: torchlrp against zennit-crp 0.6 in the same run.

1. Conditional heatmaps of the top ``--concepts`` channels of VGG-16's ``features.28`` for one image
   (``--size`` px): torchlrp's ``concepts.attribute`` (one batched backward over the expanded batch) against
   zennit-crp's ``CondAttribution.generate`` (its batched loop, ``batch_size`` = the number of concepts), with the
   plain gradient of the same expanded batch as the floor;
2. relevance (and activation) maximization of VGG-16's ``features.21`` and ``features.28`` over ``--images``
   random labelled images (``--dataset-size`` px): ``explain_dataset(..., concepts=...)`` in one process and under
   ``torchrun --nproc-per-node 2`` (one thread each), against zennit-crp's ``FeatureVisualization.run``.

zennit-crp pins ``zennit<=0.4.6`` and runs in its own environment (see ``benchmarks/crp_parity.py``):

    python benchmarks/concepts.py --crp-python crpenv/bin/python

Times are medians of ``--repeats`` runs (the dataset rows: one run each), float32, on this machine's CPU or the
GPU with ``--device cuda``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torchvision

import torchlrp as lrp
from torchlrp import concepts as crp
from torchlrp.data.dataset import explain_dataset

LAYER = "features.28"
DATASET_LAYERS = ["features.21", "features.28"]

CRP_SIDE = r"""
import json, sys, time, shutil, statistics, torch, torchvision
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from crp.visualization import FeatureVisualization
from zennit.composites import EpsilonPlusFlat
folder, device, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
layers = json.loads(sys.argv[4])
model = torchvision.models.vgg16(num_classes=10).eval().to(device)
model.load_state_dict(torch.load(folder + "/weights.pt", weights_only=True))
composite = EpsilonPlusFlat()
attribution = CondAttribution(model, device=device)
x = torch.load(folder + "/input.pt", weights_only=True).to(device).requires_grad_(True)
conditions = torch.load(folder + "/conditions.pt", weights_only=True)
times = []
for _ in range(repeats + 1):
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for result in attribution.generate(x, conditions, composite, batch_size=len(conditions), verbose=False):
        pass
    if device == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - began)
out = {"heatmaps": statistics.median(times[1:])}
images, labels = torch.load(folder + "/dataset.pt", weights_only=True)
dataset = torch.utils.data.TensorDataset(images, labels)
fv = FeatureVisualization(attribution, dataset, {name: ChannelConcept() for name in layers}, path=folder + "/fv",
                          device=device)
began = time.perf_counter()
fv.run(composite, 0, len(dataset), batch_size=int(sys.argv[5]), checkpoint=10**9)
out["dataset"] = time.perf_counter() - began
print("RESULT" + json.dumps(out))
"""


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vgg16(num_classes=10).eval()


def _data(images: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(images, 3, size, size, generator=generator),
            torch.randint(0, 10, (images,), generator=generator))


def _note(figures: dict, name: str, seconds: float) -> None:
    figures[name] = seconds
    print(f"  {name}: {seconds:.2f} s", flush=True)


def _timed(function, device: torch.device, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _dataset_worker(argv: list[str]) -> None:
    """``--worker STORE IMAGES SIZE BATCH``: the torchrun side of the dataset row."""
    store, images, size, batch = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    data, labels = _data(images, size)
    report = explain_dataset(_model(), torch.utils.data.TensorDataset(data, labels), lrp.EpsilonPlusFlat(), store,
                             target="label", start="logit", batch_size=batch, dtype=torch.float16, quiet=True,
                             concepts=DATASET_LAYERS)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT" + json.dumps({"seconds": report.seconds}))


def _result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("RESULT")]
    if not lines:
        raise RuntimeError(f"no result in:\n{output[-3000:]}")
    return json.loads(lines[-1][len("RESULT"):])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crp-python", help="python of an environment with zennit-crp 0.6 (else torchlrp only)")
    parser.add_argument("--concepts", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--dataset-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-torchrun", action="store_true")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _dataset_worker(args.worker)
        return {}
    device = torch.device(args.device)
    model = _model()
    converted = lrp.convert(model).to(device)
    rule = lrp.EpsilonPlusFlat()
    x = _data(1, args.size)[0].to(device)
    target = int(converted(x).argmax(1)[0])
    whole = crp.attribute(converted, x, [{}], rule, record=[LAYER], target=target, start="logit")
    top = whole.concept_relevances(LAYER)[0, 0].topk(args.concepts).indices.tolist()
    conditions = [{LAYER: [c], "y": [target]} for c in top]
    figures = {}
    _note(figures, "heatmaps: torchlrp", _timed(lambda: crp.attribute(converted, x, conditions, rule,
                                                                      start="logit"), device, args.repeats))
    plain = model.to(device)
    expanded = x.repeat(args.concepts, 1, 1, 1)

    def gradient() -> None:
        carrier = expanded.clone().requires_grad_(True)
        output = plain(carrier)
        torch.autograd.grad(output[:, target].sum(), carrier)
    _note(figures, "heatmaps: gradient", _timed(gradient, device, args.repeats))
    data, labels = _data(args.images, args.dataset_size)
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "one.zarr")
        report = explain_dataset(model, torch.utils.data.TensorDataset(data, labels), rule, store, target="label",
                                 start="logit", batch_size=args.batch_size, dtype=torch.float16, quiet=True,
                                 concepts=DATASET_LAYERS, device=device)
        _note(figures, "dataset: torchlrp, 1 process", report.seconds)
        shutil.rmtree(store)
        if not args.skip_torchrun and device.type == "cpu":
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                       os.path.abspath(__file__), "--worker", os.path.join(folder, "two.zarr"), str(args.images),
                       str(args.dataset_size), str(args.batch_size)]
            finished = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                                      text=True)
            _note(figures, "dataset: torchlrp, torchrun x2", _result(finished.stdout + finished.stderr)["seconds"])
        if args.crp_python:
            torch.save(model.cpu().state_dict(), os.path.join(folder, "weights.pt"))
            torch.save(x.cpu(), os.path.join(folder, "input.pt"))
            torch.save(conditions, os.path.join(folder, "conditions.pt"))
            torch.save((data, labels), os.path.join(folder, "dataset.pt"))
            finished = subprocess.run([args.crp_python, "-c", CRP_SIDE, folder, args.device, str(args.repeats),
                                       json.dumps(DATASET_LAYERS), str(args.batch_size)], capture_output=True,
                                      text=True)
            theirs = _result(finished.stdout + finished.stderr)
            figures["heatmaps: zennit-crp"] = theirs["heatmaps"]
            figures["dataset: zennit-crp"] = theirs["dataset"]
    print(f"VGG-16, float32, {device.type}; conditional heatmaps of the top {args.concepts} channels of {LAYER}, one "
          f"{args.size}px image (median of {args.repeats}); maximization of {DATASET_LAYERS} over {args.images} "
          f"images of {args.dataset_size}px, batch {args.batch_size}:")
    for name, seconds in figures.items():
        print(f"  {name}: {seconds:.2f} s")
    if "heatmaps: zennit-crp" in figures:
        print(f"  heatmaps: zennit-crp / torchlrp = {figures['heatmaps: zennit-crp'] / figures['heatmaps: torchlrp']:.2f}"
              f"x; torchlrp / gradient = {figures['heatmaps: torchlrp'] / figures['heatmaps: gradient']:.2f}x")
        print(f"  dataset: zennit-crp / torchlrp 1 process = "
              f"{figures['dataset: zennit-crp'] / figures['dataset: torchlrp, 1 process']:.2f}x")
    return figures


if __name__ == "__main__":
    main()
