"""Benchmark torchlrp against the floor (the plain input gradient) and the peers (zennit, Captum).

Times, in one process with interleaved repeats and medians, one explanation (forward + backward) per method on
VGG16 and ResNet-50 at 224 px for several batch sizes, on the CPU and on CUDA when present (synchronized, warmed
up; fp32 and bf16). Reports ratios to the input gradient of the same row, peak memory (CUDA: max allocated;
CPU: tensor allocations recorded by the profiler in a separate, untimed call) and writes a markdown table and a CSV.

    python benchmarks/run.py                       # full run (minutes on a CPU)
    python benchmarks/run.py --smoke               # tiny model, one repeat (CI)
    python benchmarks/run.py --models timm:resnet50 timm:efficientnet_b0 timm:convnext_tiny \
        timm:vit_small_patch16_224                 # timm's models (pip install timm)
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import platform
import statistics
import time
from typing import Callable

import torch
import torchvision

import torchlrp as lrp

HERE = os.path.dirname(os.path.abspath(__file__))


def peak_tensor_bytes(fn: Callable, x: torch.Tensor, target: torch.Tensor, device: torch.device) -> int:
    """Peak growth of tensor memory during one call of ``fn`` (untimed).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocations and frees the profiler records
    (``profile_memory=True``), summed in time order -- the tensor memory the call holds at its peak, independent of
    how the C allocator returns memory to the system.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(x, target)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(x, target)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def input_gradient(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    output = model(x)
    (grad,) = torch.autograd.grad(output.gather(1, target[:, None]).sum(), x)
    return grad


def methods(name: str, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, Callable]:
    """Return name -> function(x, target) for every method of one model."""
    low, high = lrp.imagenet.bounds(dtype)
    low, high = low.to(device), high.to(device)
    converted = lrp.convert(model)
    ours = {
        "Epsilon": lrp.rules.Epsilon(),
        "EpsilonPlus": lrp.EpsilonPlus(),
        "EpsilonGammaBox": lrp.EpsilonGammaBox(low, high),
    }
    table: dict[str, Callable] = {"input gradient": lambda x, t: input_gradient(model, x, t)}
    for fused in (False, True):
        for label, rule in ours.items():
            name = f"torchlrp {label}" + (" (fused)" if fused else "")
            table[name] = lambda x, t, rule=rule, fused=fused: lrp.explain(converted, x, target=t, rule=rule,
                                                                             fused=fused)
    try:
        from zennit import composites as zc
        from zennit.canonizers import SequentialMergeBatchNorm
        from zennit.torchvision import ResNetCanonizer

        # zennit's canonizers are torchvision's: on timm's models (functional batch norms, subclassed layers) its
        # numbers are timings only
        canonizers = [ResNetCanonizer()] if name.startswith("resnet") else [SequentialMergeBatchNorm()]
        zennit_model = copy.deepcopy(model)
        peers = {"zennit EpsilonPlus": lambda: zc.EpsilonPlus(canonizers=canonizers),
                 "zennit EpsilonGammaBox": lambda: zc.EpsilonGammaBox(low, high, canonizers=canonizers)}

        def zennit_run(make, x, t):
            with make().context(zennit_model) as modified:
                x = x.detach().requires_grad_(True)
                output = modified(x)
                (grad,) = torch.autograd.grad(output, x, torch.nn.functional.one_hot(t, output.shape[1]).to(output))
            return grad

        for label, make in peers.items():
            table[label] = lambda x, t, make=make: zennit_run(make, x, t)
    except ImportError:
        pass
    try:
        from captum.attr import LRP

        captum_model = copy.deepcopy(model)
        for module in captum_model.modules():
            if isinstance(module, torch.nn.ReLU):
                module.inplace = False
        table["Captum LRP (epsilon)"] = lambda x, t: LRP(captum_model).attribute(x, target=t)
    except ImportError:
        pass
    return table


def time_call(fn: Callable, x: torch.Tensor, target: torch.Tensor, device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (CUDA: synchronized before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(x, target)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def benchmark(args: argparse.Namespace) -> list[dict]:
    rows = []
    for device_name in args.devices:
        device = torch.device(device_name)
        dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
        for model_name in args.models:
            for dtype in dtypes:
                if args.smoke:
                    model = torchvision.models.resnet18(num_classes=10) if model_name.startswith("resnet") \
                        else torchvision.models.vgg11(num_classes=10)
                elif model_name.startswith("timm:"):  # a timm model (random weights), e.g. timm:convnext_tiny
                    import timm
                    model = timm.create_model(model_name[len("timm:"):], pretrained=False)
                else:
                    model = getattr(torchvision.models, model_name)()
                model = model.eval().to(device, dtype)
                for parameter in model.parameters():
                    parameter.requires_grad_(False)
                table = methods(model_name, model, device, dtype)
                for batch in args.batch_sizes:
                    x = torch.rand(batch, 3, args.size, args.size, device=device, dtype=dtype)
                    target = torch.zeros(batch, dtype=torch.long, device=device)
                    times: dict[str, list[float]] = {k: [] for k in table}
                    memory: dict[str, int] = {k: 0 for k in table}
                    errors: dict[str, str] = {}
                    for label, fn in table.items():  # warm-up (compiles the fused kernels), then memory
                        try:
                            fn(x, target)
                            memory[label] = peak_tensor_bytes(fn, x, target, device)
                        except Exception as error:  # a peer that cannot explain this model
                            errors[label] = f"{type(error).__name__}: {str(error).splitlines()[0][:60]}"
                    floor_estimate = time_call(table["input gradient"], x, target, device)
                    repeats = max(args.repeats, min(args.max_repeats, math.ceil(args.floor_seconds / floor_estimate)))
                    for _ in range(repeats):
                        for label, fn in table.items():
                            if label not in errors:
                                times[label].append(time_call(fn, x, target, device))
                    floor = statistics.median(times["input gradient"])
                    for label in table:
                        median = statistics.median(times[label]) if times[label] else float("nan")
                        rows.append({"device": device_name, "model": model_name, "dtype": str(dtype).split(".")[-1],
                                     "batch": batch, "method": label, "repeats": len(times[label]),
                                     "seconds": median, "images_per_second": batch / median,
                                     "ratio_to_gradient": median / floor,
                                     "peak_memory_mb": memory[label] / 2 ** 20,
                                     "memory_ratio": memory[label] / max(memory["input gradient"], 1),
                                     "error": errors.get(label, "")})
                        print(f"{device_name} {model_name} {rows[-1]['dtype']} b={batch} {label:<26} "
                              f"{median:8.3f} s  {median / floor:5.2f}x  {memory[label] / 2 ** 20:8.0f} MB "
                              f"{errors.get(label, '')}", flush=True)
    return rows


def write(rows: list[dict], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "latest.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    lines = [f"Machine: {machine}", "",
             "| device | model | dtype | batch | method | repeats | seconds | images/s | x gradient | peak MB "
             "| x gradient memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['device']} | {r['model']} | {r['dtype']} | {r['batch']} | {r['method']} | "
                         f"{r['repeats']} | fails: {r['error']} | | | | |")
        else:
            lines.append(f"| {r['device']} | {r['model']} | {r['dtype']} | {r['batch']} | {r['method']} | "
                         f"{r['repeats']} | {r['seconds']:.3f} | {r['images_per_second']:.1f} | "
                         f"{r['ratio_to_gradient']:.2f} | {r['peak_memory_mb']:.0f} | "
                         f"{r['memory_ratio']:.2f} |")
    with open(os.path.join(out, "latest.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {out}/latest.md and latest.csv")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per row (at least)")
    parser.add_argument("--floor-seconds", type=float, default=3.0,
                        help="repeat a row until its input gradients add up to this many seconds ...")
    parser.add_argument("--max-repeats", type=int, default=15, help="... but at most this many times")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny models at 32 px, one repeat (CI)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.size, args.repeats, args.max_repeats, args.batch_sizes = 32, 1, 1, [1]
    write(benchmark(args), args.out)


if __name__ == "__main__":
    main()
