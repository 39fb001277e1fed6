"""Conversion of torchvision models: outputs unchanged, parity with zennit's composites, errors."""
import pytest
import torch
import torchvision
from zennit import composites as zcomposites
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.torchvision import ResNetCanonizer

import torchlrp as lrp
from torchlrp.data.models import torchvision_model

SIZES = {"alexnet": 64}


def randomize_batchnorm(model):
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
                                  "alexnet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_outputs_unchanged(name):
    model = randomize_batchnorm(getattr(torchvision.models, name)(num_classes=10)).eval()
    converted = lrp.convert(model)
    x = torch.randn(2, 3, SIZES.get(name, 32), SIZES.get(name, 32))
    expected = model(x).detach()
    torch.testing.assert_close(converted(x).detach(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert any(isinstance(m, lrp.Conv2d) for m in converted.modules())
    assert not any(type(m) is torch.nn.Conv2d for m in converted.modules())
    relevance = lrp.explain(converted, x, rule=lrp.EpsilonPlus())
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()


def test_convert_vgg_is_torchlrp_sequential():
    vgg = randomize_batchnorm(torchvision.models.vgg11_bn(num_classes=10)).eval()
    converted = lrp.convert_vgg(vgg)
    assert isinstance(converted, lrp.Sequential)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    torch.testing.assert_close(converted(x), vgg(x), rtol=1e-5, atol=1e-5)
    y = converted(x, explain=True, rule="alpha2beta1")
    y[torch.arange(2), y.argmax(1)].sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    with pytest.raises(TypeError, match="torchvision VGG"):
        lrp.convert_vgg(torchvision.models.resnet18())


COMPOSITES = {
    "EpsilonGammaBox": (lambda: lrp.EpsilonGammaBox(-3.0, 3.0), lambda c: zcomposites.EpsilonGammaBox(-3.0, 3.0, canonizers=c)),
    "EpsilonPlus": (lrp.EpsilonPlus, lambda c: zcomposites.EpsilonPlus(canonizers=c)),
    "EpsilonAlpha2Beta1": (lrp.EpsilonAlpha2Beta1, lambda c: zcomposites.EpsilonAlpha2Beta1(canonizers=c)),
    "EpsilonPlusFlat": (lrp.EpsilonPlusFlat, lambda c: zcomposites.EpsilonPlusFlat(canonizers=c)),
}


@pytest.mark.parametrize("composite", list(COMPOSITES))
@pytest.mark.parametrize("name", ["vgg11_bn", "vgg16", "alexnet", "resnet18", "resnet50"])
def test_models_match_zennit(name, composite):
    torch.manual_seed(0)
    model = randomize_batchnorm(getattr(torchvision.models, name)(num_classes=10)).double().eval()
    for module in model.modules():
        # zennit's canonizer leaves each merged batch norm computing x / sqrt(1 + eps), which is off by 5e-6 per
        # layer with the default eps=1e-5; with eps=0 its canonized model is exact and the comparison is fair
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = 0.0
    size = SIZES.get(name, 32)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    target = torch.tensor([3, 7])
    ours_composite, zennit_composite = COMPOSITES[composite]
    ours = lrp.explain(lrp.convert(model), x, target=target, rule=ours_composite())
    canonizers = [ResNetCanonizer()] if name.startswith("resnet") else [SequentialMergeBatchNorm()]
    xg = x.clone().requires_grad_(True)
    with zennit_composite(canonizers).context(model) as modified:
        output = modified(xg)
        output.backward(torch.nn.functional.one_hot(target, 10).double())
    expected = xg.grad
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7 * float(expected.abs().max()))


def test_residual_blocks_conserve_under_lrp0():
    model = torchvision.models.resnet18(num_classes=10, norm_layer=lambda c: torch.nn.Identity()).double().eval()
    model.fc.bias.data.zero_()
    converted = lrp.convert(model)
    assert sum(isinstance(m, lrp.Add) for m in converted.modules()) == 8
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    relevance = lrp.explain(converted, x, rule="zero", start="logit")
    logits = model(x)
    torch.testing.assert_close(relevance.flatten(1).sum(1), logits.max(1).values, rtol=1e-6, atol=1e-9)


class Unsupported(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Softmin(dim=1))
        self.head = torch.nn.Linear(2, 2)
        self.act = torch.nn.Tanh()

    def forward(self, x):
        features = torch.sin(self.body(x))
        ratio = 1.0 / features
        return self.head(self.act(ratio.log_softmax(1).mean((2, 3))))


def test_conversion_error_lists_every_unsupported_part():
    with pytest.raises(lrp.ConversionError) as error:
        lrp.convert(Unsupported())
    places = dict(error.value.unsupported)
    assert set(places) == {"body.1", "sin", "truediv", "log_softmax"}
    assert places["body.1"] == "Softmin" and "division by an activation" in places["truediv"]
    assert "log-softmax inside the model" in places["log_softmax"]
    assert "allow_gradient" in str(error.value)
    converted = lrp.convert(Unsupported(), allow_gradient=["body.1", "sin", "truediv", "log_softmax"])
    assert torch.isfinite(lrp.explain(converted, torch.rand(2, 1, 5, 5))).all()


def test_local_state_dict_loading(tmp_path):
    model = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)
    loaded = torchvision_model("resnet18", str(path))
    assert torch.equal(loaded.fc.weight, model.fc.weight) and not loaded.training
    with pytest.raises(FileNotFoundError):
        torchvision_model("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown model"):
        torchvision_model("resnet17", None)
