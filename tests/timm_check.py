"""The checks of one timm model (shared by ``tests/test_timm_models.py`` and ``benchmarks/timm_sweep.py``).

A model is built with random weights (batch-norm statistics randomized), in float64 and eval mode, at a small input
size where its constructor takes one; then: it converts, its outputs are kept (1e-10 relative), epsilon,
EpsilonPlus and EpsilonGammaBox give finite, non-zero relevance, and on a copy with every bias (and batch-norm
mean) zero, LRP-0 with CP-LRP's constant attention weights conserves the target logit between the pixels and the
shares the parameters absorbed (class tokens, position embeddings), to 1e-6.
"""
from __future__ import annotations

import json
import pathlib
import warnings

import torch
from torch.nn.modules.batchnorm import _BatchNorm

import torchlrp as lrp

FAMILIES = json.loads((pathlib.Path(__file__).parent / "data" / "timm_families.json").read_text())
SIZES = (64, None)  # try 64 px first; None: the model's own input size


def _randomize(model: torch.nn.Module, bias_free: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and weight.dim() > 1 and not weight.detach().any():
            # timm initializes some heads (MLP-Mixer, Hiera) to zero: every logit would be 0
            weight.data.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * 0.1)
        if isinstance(module, _BatchNorm) and module.running_mean is not None:
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            if module.affine:
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.5, 0.5)
            if bias_free:
                module.running_mean.zero_()
    if bias_free:
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or name.rpartition(".")[2].startswith("bias"):
                parameter.data.zero_()


def build(name: str, size: int | None, bias_free: bool = False) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """The model (float64, eval) and its input shape."""
    import timm

    torch.manual_seed(0)
    kwargs = {"num_classes": 10}
    model = None
    if size is not None:
        try:
            model = timm.create_model(name, pretrained=False, img_size=size, **kwargs)
        except TypeError:
            model = None
    if model is None:
        model = timm.create_model(name, pretrained=False, **kwargs)
    model = model.double().eval()
    _randomize(model, bias_free)
    channels, height, width = model.pretrained_cfg.get("input_size", (3, 224, 224))
    shape = (1, channels, size or height, size or width)
    return model, shape


def model_input(name: str) -> tuple[torch.nn.Module, torch.Tensor, int | None]:
    """The model and an input it runs on (the first size of :data:`SIZES` that works)."""
    error = None
    for size in SIZES:
        try:
            model, shape = build(name, size)
            x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                model(x)
            return model, x, size
        except Exception as caught:  # noqa: BLE001 (the size does not fit: try the next)
            error = caught
    raise RuntimeError(f"{name} does not run at any of {SIZES}: {error}")


def check(name: str) -> dict:
    """Run every check on one model; raise AssertionError (or the library's error) where one fails.

    Returns
    -------
    dict
        ``{"model", "size", "run_time", "conservation"}`` (``conservation``: relative error of pixels + absorbed
        shares against the logit).
    """
    model, x, size = model_input(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = lrp.convert(model)
    run_time = any("cannot trace" in str(w.message) for w in caught)
    with torch.no_grad():
        expected = model(x)
        got = converted(x)
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * scale)
    for label, rule in {"epsilon": "epsilon", "EpsilonPlus": lrp.EpsilonPlus(),
                        "EpsilonGammaBox": lrp.EpsilonGammaBox(-3.0, 3.0)}.items():
        relevance, scores = lrp.explain(converted, x, rule=rule, return_scores=True)
        # an explanation never changes the model's output
        torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-10 * scale, msg=f"{label}: output")
        assert relevance.shape == x.shape, label
        assert torch.isfinite(relevance).all(), f"{label}: non-finite relevance"
        assert relevance.abs().sum() > 0, f"{label}: zero relevance"

    model, _ = build(name, size, bias_free=True)
    converted = lrp.convert(model)
    with torch.no_grad():
        logit = model(x).max()
    relevance, absorbed = lrp.explain(converted, x, rule=lrp.Composite(default="zero", attention="cp"),
                                      start="logit", return_absorbed=True)
    total = relevance.sum() + sum(absorbed.values(), torch.zeros((), dtype=torch.float64))
    error = float((total - logit).abs() / logit.abs())
    assert error < 1e-6, f"conservation: pixels {float(relevance.sum()):.6g} + absorbed " \
                         f"{float(total - relevance.sum()):.6g} vs logit {float(logit):.6g}"
    return {"model": name, "size": size, "run_time": run_time, "conservation": error}
