"""Every torchvision classifier converts, keeps its outputs, explains, and conserves relevance under LRP-0.

The smallest model of each family runs by default; the others are marked ``slow`` (``pytest -m slow``). The
transformers (ViT, Swin, Swin V2, MaxViT) conserve under LRP-0 with CP-LRP's constant attention weights (AttnLRP's
softmax rule absorbs relevance, as a bias does); ViT's class token takes its documented share.
"""
import re

import pytest
import torch
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

import torchlrp as lrp

TRANSFORMERS = ("vit_", "swin_", "maxvit_")
SMALLEST = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet", "inception_v3",
    "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18",
    "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "vgg11", "wide_resnet50_2",
]
CNNS = [name for name in torchvision.models.list_models(module=torchvision.models) if not name.startswith(TRANSFORMERS)]
TRANSFORMER_MODELS = [name for name in torchvision.models.list_models(module=torchvision.models)
                      if name.startswith(TRANSFORMERS)]
SMALLEST_TRANSFORMERS = ["vit_b_32", "swin_t", "swin_v2_t", "maxvit_t"]
TRANSFORMER_SIZE = {"maxvit_t": 224, "vit_h_14": 56}  # ViT is built for 64 px (patch 14: 56), Swin takes any
SIZE = {"inception_v3": 80, "alexnet": 64, "googlenet": 48, "squeezenet1_0": 48, "squeezenet1_1": 48}  # else 32 px


def cases():
    for name in CNNS:
        marks = () if name in SMALLEST else (pytest.mark.slow,)
        yield pytest.param(name, marks=marks, id=name)


def build(name, bias_free=False):
    torch.manual_seed(0)
    kwargs = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
    if name.startswith("vit_"):
        kwargs["image_size"] = TRANSFORMER_SIZE.get(name, 64)
    model = torchvision.models.get_model(name, num_classes=10, **kwargs).double().eval()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
        if bias_free:
            if isinstance(module, _BatchNorm):
                module.running_mean.zero_()
            if isinstance(getattr(module, "bias", None), torch.nn.Parameter):
                module.bias.data.zero_()
    if name.startswith("vit_"):  # torchvision initializes ViT's head to zero: every logit would be 0
        torch.nn.init.normal_(model.heads.head.weight, std=0.1)
    if bias_free:
        for parameter_name, parameter in model.named_parameters():
            if "bias" in parameter_name or parameter_name.endswith("pos_embedding"):
                parameter.data.zero_()
    return model


def family(name):
    return re.match(r"[a-z]+", name).group(0)


def test_every_cnn_family_has_a_default_case():
    families = {family(name) for name in CNNS}
    covered = {family(name) for name in SMALLEST}
    assert families == covered, families ^ covered
    assert set(SMALLEST) <= set(CNNS) and len(CNNS) >= 60


@pytest.mark.parametrize("name", list(cases()))
def test_torchvision_cnn(name):
    size = SIZE.get(name, 32)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    model = build(name)
    converted = lrp.convert(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(converted(x), expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))
    composites = {"epsilon": "epsilon", "EpsilonPlus": lrp.EpsilonPlus(),
                  "EpsilonGammaBox": lrp.EpsilonGammaBox(-3.0, 3.0)}
    for label, rule in composites.items():
        relevance = lrp.explain(converted, x, rule=rule)
        assert relevance.shape == x.shape and torch.isfinite(relevance).all(), label
        assert relevance.abs().sum() > 0, label

    # LRP-0 on a bias-free copy: the input relevance sums to the target logit
    model = build(name, bias_free=True)
    converted = lrp.convert(model)
    with torch.no_grad():
        logits = model(x)
    relevance = lrp.explain(converted, x, rule="zero", start="logit")
    torch.testing.assert_close(relevance.flatten(1).sum(1), logits.max(1).values, rtol=1e-6, atol=0)


def transformer_cases():
    for name in TRANSFORMER_MODELS:
        marks = () if name in SMALLEST_TRANSFORMERS else (pytest.mark.slow,)
        yield pytest.param(name, marks=marks, id=name)


def test_every_transformer_family_has_a_default_case():
    assert {family(name) for name in TRANSFORMER_MODELS} == {family(name) for name in SMALLEST_TRANSFORMERS}


@pytest.mark.parametrize("name", list(transformer_cases()))
def test_torchvision_transformer(name):
    size = TRANSFORMER_SIZE.get(name, 64)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    model = build(name)
    converted = lrp.convert(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(converted(x), expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))
    for label, rule in {"AttnLRP": lrp.Composite(), "CP-LRP": lrp.Composite(attention="cp")}.items():
        relevance = lrp.explain(converted, x, rule=rule)
        assert relevance.shape == x.shape and torch.isfinite(relevance).all(), label
        assert relevance.abs().sum() > 0, label

    # LRP-0 with constant attention weights on a bias-free copy: pixels (+ ViT's class token) keep the logit
    model = build(name, bias_free=True)
    converted = lrp.convert(model)
    carrier = x.clone().requires_grad_(True)
    with lrp.rules_applied(converted, lrp.Composite(default="zero", attention="cp")) as state:
        output = converted(carrier)
    start = torch.zeros_like(output)
    start[0, output.argmax()] = output.max().detach()
    absorbing = [leaf for leaf_name, leaf in state.absorbed if leaf_name == "class_token"]  # taken at the concatenation
    pixels, *token = torch.autograd.grad(output, [carrier, *absorbing], start)
    total = pixels.sum() + sum(t.sum() for t in token)
    torch.testing.assert_close(total, start.sum(), rtol=1e-6, atol=0)
