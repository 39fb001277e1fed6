"""Throughput of ``explain_dataset``: against a bare loop of ``lrp.explain``, and on 2 processes (torchrun).

Same model, rule and images for every row (random-weight torchvision model, EpsilonGammaBox, random images in
memory as a ``TensorDataset``):

1. a bare loop of ``lrp.explain`` over the batches (no storing): the floor;
2. ``explain_dataset`` into a new Zarr store (float16), one process: the cost of the data loader and the store;
3. with one thread per process: one process, then ``torchrun --nproc-per-node 2`` (gloo on the CPU, one GPU each
   with CUDA): the speed-up of splitting the dataset.

    python benchmarks/dataset.py                      # resnet18, 128 px, 256 images, batch 32, CPU
    python benchmarks/dataset.py --model vgg16 --size 224 --images 2048 --batch-size 64 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torchvision

import torchlrp as lrp
from torchlrp.data.dataset import explain_dataset


def setup(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.utils.data.Dataset, lrp.Composite]:
    """The model (seeded: every process builds the same), the images and the rule."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    images = torch.rand(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    low, high = lrp.imagenet.bounds()
    images = lrp.imagenet.normalize(images)
    return lrp.convert(model), torch.utils.data.TensorDataset(images), lrp.EpsilonGammaBox(low, high)


def bare_loop(model, dataset, rule, args) -> float:
    """Seconds of lrp.explain over the batches, results kept on the device (nothing stored)."""
    inputs = dataset.tensors[0]
    lrp.explain(model.to(args.device), inputs[:args.batch_size].to(args.device), rule=rule)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for begin in range(0, len(inputs), args.batch_size):
        relevance = lrp.explain(model, inputs[begin:begin + args.batch_size].to(args.device), rule=rule)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    del relevance
    return time.perf_counter() - start


def stored(model, dataset, rule, args, store: str) -> float:
    """Seconds of explain_dataset's loop (the slowest rank's), after a warm-up explain."""
    inputs = dataset.tensors[0]
    lrp.explain(model.to(args.device), inputs[:args.batch_size].to(args.device), rule=rule)  # warm-up
    report = explain_dataset(model, dataset, rule, store, batch_size=args.batch_size, quiet=True,
                             device=args.device, num_workers=args.num_workers)
    return report.seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--worker", metavar="STORE", help=argparse.SUPPRESS)  # one rank of the torchrun row
    args = parser.parse_args(argv)
    model, dataset, rule = setup(args)
    if args.worker:
        seconds = stored(model, dataset, rule, args, args.worker)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({"seconds": seconds}))
        return
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        threads = torch.get_num_threads()
        bare = bare_loop(model, dataset, rule, args)
        store = stored(model, dataset, rule, args, os.path.join(folder, "one.zarr"))
        rows += [(f"bare lrp.explain loop, {threads} threads", bare, ""),
                 (f"explain_dataset, 1 process, {threads} threads", store,
                  f"{store / bare:.3f}x the bare loop's time")]
        torch.set_num_threads(1)
        single = stored(model, dataset, rule, args, os.path.join(folder, "single.zarr"))
        rows.append(("explain_dataset, 1 process, 1 thread", single, ""))
        device = args.device if not args.device.startswith("cuda") else "cuda"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={args.processes}", os.path.abspath(__file__), "--worker",
                   os.path.join(folder, "many.zarr"), "--model", args.model, "--size", str(args.size), "--images",
                   str(args.images), "--batch-size", str(args.batch_size), "--device", device,
                   "--num-workers", str(args.num_workers)]
        finished = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if finished.returncode != 0:
            raise SystemExit(finished.stderr[-3000:])
        many = json.loads(finished.stdout.strip().splitlines()[-1])["seconds"]
        rows.append((f"explain_dataset, torchrun {args.processes} processes, 1 thread each", many,
                     f"{single / many:.2f}x the images/s of 1 process, 1 thread"))
    print(f"{args.model}, {args.size} px, {args.images} images, batch {args.batch_size}, EpsilonGammaBox, "
          f"{args.device}, torch {torch.__version__}")
    print("| run | seconds | images/s | compared |")
    print("|---|---:|---:|---|")
    for name, seconds, comparison in rows:
        print(f"| {name} | {seconds:.2f} | {args.images / seconds:.1f} | {comparison} |")


if __name__ == "__main__":
    main()
