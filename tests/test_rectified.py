"""A layer explained together with the ReLU after it: same relevance as layer and ReLU apart, fewer saved tensors."""
import pytest
import torch
import torchvision

import torchlrp as lrp
from torchlrp.functional import sum_relevance

from .layer_configs import CONFIGS, make_case
from .reference import reference_relevance
from .test_rules_reference import REFERENCE_NAMES, RULES

FOLDING = {"epsilon", "zero", "gamma", "alpha1beta0_nobias", "zplus", "zbox"}


@pytest.mark.parametrize("nonnegative", [False, True], ids=["mixed_input", "nonnegative_input"])
@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_layer_and_relu_match_formula(config, rule_name, nonnegative):
    """Relevance of ``relu(layer(x))`` = the rule's formula on the ReLU-masked relevance, folded or not."""
    torch_layer, layer, x, relevance = make_case(config, nonnegative)
    layer.input_nonnegative = nonnegative
    make_rule, params = RULES[rule_name]
    model = lrp.Sequential(layer, lrp.ReLU())
    carrier = x.clone().requires_grad_(True)
    output = model(carrier, explain=True, rule=make_rule())
    folded = getattr(output.grad_fn, "output_rectified", False)
    assert folded == (rule_name in FOLDING)
    pre_activation = torch_layer(x)
    assert torch.equal(output, pre_activation.relu())
    output.backward(relevance)  # random relevance, also where the ReLU is off: the mask must drop it
    masked = relevance * (pre_activation > 0)
    expected = reference_relevance(torch_layer, REFERENCE_NAMES.get(rule_name, rule_name), x, masked, **params)
    torch.testing.assert_close(carrier.grad, expected, rtol=1e-7, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.parametrize("rule", [lrp.rules.Epsilon(), lrp.rules.Zero(), lrp.rules.Gamma(0.5, 0.0), lrp.rules.ZPlus(),
                                  lrp.rules.ZBox(0.0, 1.0, stabilizer=0.0)])
def test_folded_equals_unfolded_with_dead_units(rule, device):
    """Units whose pre-activation is exactly zero (dead, or zero input) pass no relevance and no NaN, also with
    a zero stabilizer."""
    layer = lrp.Conv2d(2, 3, 3, padding=1, bias=False).to(device)
    x = torch.rand(2, 2, 5, 5, device=device)
    x[0] = 0.0  # a whole sample of zero pre-activations
    layer.input_nonnegative = True
    grads = []
    for fold in (True, False):
        model = lrp.Sequential(layer, lrp.ReLU() if fold else torch.nn.ReLU())
        carrier = x.clone().requires_grad_(True)
        output = model(carrier, explain=True, rule=rule)
        assert getattr(output.grad_fn, "output_rectified", False) == fold
        output.backward(torch.ones_like(output))
        grads.append(carrier.grad)
    assert torch.isfinite(grads[0]).all()
    assert grads[0][0].abs().sum() == 0
    torch.testing.assert_close(grads[0], grads[1])


def test_relu_twin_passes_rectified_output_unchanged():
    layer = lrp.Linear(4, 3)
    relu = lrp.ReLU()
    x = torch.randn(5, 4, requires_grad=True)
    with lrp.rules_applied(lrp.Sequential(layer, relu), "epsilon"):
        rectified = layer(x)
        assert relu(rectified) is rectified
    plain = torch.randn(5, 3)
    assert torch.equal(relu(plain), plain.relu()) and relu(plain) is not plain


def test_layer_called_directly_is_not_rectified():
    """Outside an explanation of a model, ``layer(x, explain=True)`` returns the unrectified output."""
    model = lrp.convert(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)))
    x = torch.randn(5, 4, requires_grad=True)
    with lrp.rules_applied(model, "epsilon"):  # explained by position: the layer feeds the ReLU
        assert torch.equal(model[0](x), model[0](x, explain=False).relu())
    output = model[0](x, explain=True)
    assert torch.equal(output, torch.nn.functional.linear(x, model[0].weight, model[0].bias))


@pytest.mark.parametrize("epsilon", [1e-6, 0.0])
def test_rectified_sum_matches_formula(epsilon, device):
    a, b = torch.randn(3, 6, device=device), torch.randn(3, 6, device=device)
    a[0, :2], b[0, :2] = 1.0, -1.0  # zero sums
    relevance = torch.randn(3, 6, device=device)
    carriers = [t.clone().requires_grad_(True) for t in (a, b)]
    output = sum_relevance(carriers, epsilon, rectified=True)
    total = a + b
    assert torch.equal(output, total.relu()) and output.grad_fn.output_rectified
    output.backward(relevance)
    stabilized = total + torch.where(total >= 0, epsilon, -epsilon)
    signal = torch.where(total > 0, relevance / stabilized, 0.0)
    torch.testing.assert_close(carriers[0].grad, a * signal)
    torch.testing.assert_close(carriers[1].grad, b * signal)


def _marked(model):
    """The calls that convert marked as feeding a ReLU (per call, in the converted model's graph)."""
    return {node.target for node in model.graph.nodes if node.kwargs.get("feeds_rectifier")}


def test_convert_marks_vgg_and_resnet():
    vgg = lrp.convert(torchvision.models.vgg11(num_classes=10).eval())
    convs = {f"features.{i}" for i, m in enumerate(vgg.features) if isinstance(m, torch.nn.Conv2d)}
    assert _marked(vgg) == convs | {"classifier.0", "classifier.3"}
    assert all(type(m) is lrp.ReLU for m in vgg.modules() if isinstance(m, torch.nn.ReLU))
    resnet = lrp.convert(torchvision.models.resnet18(num_classes=10).eval())
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert _marked(resnet) == {"conv1"} | {f"{b}.conv1" for b in blocks} | {f"{b}.add" for b in blocks}


class _TwoUses(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.head = torch.nn.Linear(2, 3)

    def forward(self, x):
        z = self.conv(x)
        return self.head((self.relu(z) + z).mean((2, 3)))


def test_convert_does_not_fold_an_output_used_twice():
    """A layer output used besides the ReLU keeps layer and ReLU apart."""
    converted = lrp.convert(_TwoUses().eval(), allow_gradient=["*"])
    assert "conv" not in _marked(converted)
    x = torch.rand(2, 2, 4, 4)
    relevance = lrp.explain(converted, x, target=0)  # runs (no in-place error), finite
    assert torch.isfinite(relevance).all()


def _saved_bytes(function, model):
    """Bytes of the distinct storages, other than ``model``'s parameters, that autograd keeps from the forward for
    the backward during ``function()``."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())


@pytest.mark.parametrize("name, bound", [("vgg11", 1.1), ("resnet18", 1.1), ("efficientnet_b0", 1.1),
                                         ("convnext_tiny", 1.35)])
def test_explanation_keeps_no_more_than_the_gradient(name, bound, device):
    """Layers explained with their ReLU keep from forward to backward about what the plain gradient keeps: the rules
    keep a layer's input and output (often kept by its neighbours anyway) and rebuild denominators in the backward;
    a layer after an identity-rule activation keeps the activation's input instead of its own. ConvNeXt keeps more
    than its gradient: the gradient of a linear layer whose weight needs no gradient keeps nothing, while a rule
    needs the layer's input (measured 1.30 of the gradient)."""
    model = getattr(torchvision.models, name)(num_classes=10).eval().to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    converted = lrp.convert(model)
    x = torch.rand(2, 3, 64, 64, device=device)

    def gradient():
        carrier = x.clone().requires_grad_(True)
        model(carrier)[:, 0].sum().backward()

    floor = _saved_bytes(gradient, model)
    low, high = torch.zeros(1, 3, 1, 1, device=device), torch.ones(1, 3, 1, 1, device=device)
    for rule in (lrp.rules.Epsilon(), lrp.EpsilonPlus(), lrp.EpsilonGammaBox(low, high)):
        kept = _saved_bytes(lambda: lrp.explain(converted, x, target=0, rule=rule), converted)
        assert kept <= bound * floor, (rule, kept / floor)


def test_folded_zbox_checks_bounds_in_the_forward():
    model = lrp.Sequential(lrp.Conv2d(3, 4, 3), lrp.ReLU())
    with pytest.raises(ValueError, match="ZBox bound low of shape"):
        model(torch.rand(2, 3, 6, 6), explain=True, rule=lrp.rules.ZBox(torch.zeros(1, 5, 1, 1), 1.0))
