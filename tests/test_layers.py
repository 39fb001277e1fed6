"""Layer twins, Sequential, pooling, batch norm folding, in-place ReLU, conservation, devices and dtypes."""
import pytest
import torch

import torchlrp as lrp
from torchlrp import rules

from .layer_configs import CONFIGS, make_case


@pytest.mark.parametrize("config", list(CONFIGS))
def test_twin_is_the_torch_layer(config, device):
    make, shape = CONFIGS[config]
    torch_layer = make().to(device)
    layer = getattr(lrp, type(torch_layer).__name__).from_torch(torch_layer)
    assert isinstance(layer, type(torch_layer))
    assert layer.state_dict().keys() == torch_layer.state_dict().keys()
    x = torch.randn(shape, device=device)
    assert torch.equal(layer(x), torch_layer(x))
    assert torch.equal(layer(x, explain=False), torch_layer(x))
    torch.testing.assert_close(layer(x, explain=True, rule="epsilon"), torch_layer(x))


def test_same_constructor_and_state_dict():
    layer = lrp.Conv2d(3, 8, 3, 2, 1, bias=False)
    reference = torch.nn.Conv2d(3, 8, 3, 2, 1, bias=False)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 9, 9)
    assert torch.equal(layer(x), reference(x))
    with pytest.raises(TypeError, match="expects a torch.nn.modules.conv.Conv2d"):
        lrp.Conv2d.from_torch(torch.nn.Linear(2, 2))


def torchlrp_readme_model():
    return lrp.Sequential(lrp.Conv2d(1, 32, 3, 1, 1), torch.nn.ReLU(), torch.nn.MaxPool2d(2, 2),
                          torch.nn.Flatten(), lrp.Linear(14 * 14 * 32, 10))


@pytest.mark.parametrize("rule", ["epsilon", "gamma", "gamma+epsilon", "alpha1beta0", "alpha2beta1", "zero",
                                  "zplus", "flat", "wsquare", "gradient"])
def test_torchlrp_readme_example(rule, device):
    model = torchlrp_readme_model().to(device)
    x = torch.rand(4, 1, 28, 28, device=device, requires_grad=True)
    y = model(x, explain=True, rule=rule)
    torch.testing.assert_close(y, model(x))
    y[torch.arange(len(y)), y.argmax(1)].sum().backward()
    assert x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def relu_network(bias: bool, inplace: bool = False):
    return lrp.Sequential(
        lrp.Conv2d(2, 6, 3, padding=1, bias=bias), torch.nn.ReLU(inplace=inplace), torch.nn.MaxPool2d(2),
        lrp.Conv2d(6, 6, 3, stride=2, padding=1, bias=bias), torch.nn.ReLU(inplace=inplace),
        torch.nn.AvgPool2d(2), torch.nn.Flatten(), lrp.Linear(6 * 2 * 2, 8, bias=bias), torch.nn.ReLU(),
        torch.nn.Dropout(0.5), lrp.Linear(8, 3, bias=bias)).double().eval()


def test_lrp0_conserves_without_bias():
    model = relu_network(bias=False)
    x = torch.rand(5, 2, 16, 16, dtype=torch.float64)
    relevance = lrp.explain(model, x, rule="zero", start="logit")
    logits = model(x)
    start = logits.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(relevance.flatten(1).sum(1), start, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("rule", ["epsilon", rules.Epsilon(0.1), "alpha1beta0", "zplus"])
def test_relevance_never_grows_on_positive_nets(rule):
    model = relu_network(bias=True)
    for module in model.modules():  # positive biases: relevance may only be absorbed
        if isinstance(module, (lrp.Conv2d, lrp.Linear)):
            module.bias.data.abs_()
    x = torch.rand(5, 2, 16, 16, dtype=torch.float64)
    relevance = lrp.explain(model, x, rule=rule, start="logit")
    logits = model(x)
    start = logits.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
    assert (relevance.flatten(1).sum(1) <= start * (1 + 1e-9)).all()


def test_inplace_relu_does_not_corrupt_relevance():
    torch.manual_seed(1)
    model = relu_network(bias=True, inplace=False)
    torch.manual_seed(1)
    inplace = relu_network(bias=True, inplace=True)
    x = torch.rand(3, 2, 16, 16, dtype=torch.float64)
    for rule in ("epsilon", "gamma", "alpha2beta1"):
        torch.testing.assert_close(lrp.explain(inplace, x, rule=rule), lrp.explain(model, x, rule=rule))


def test_avgpool_splits_proportionally():
    model = lrp.Sequential(torch.nn.AvgPool2d(2), torch.nn.Flatten(), lrp.Linear(4, 1, bias=False)).double()
    model[2].weight.data.fill_(1.0)
    x = torch.tensor([[[[1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]]]],
                     dtype=torch.float64)
    relevance = lrp.explain(model, x, target=0, rule="zero", start="logit")
    torch.testing.assert_close(relevance, x / 4)  # each pixel keeps its own share of the pooled sum
    gradient = lrp.explain(model, x, target=0, rule="gradient")
    torch.testing.assert_close(gradient, torch.full_like(x, 0.25))


def test_adaptive_avgpool_proportional_and_conservative():
    model = lrp.Sequential(lrp.Conv2d(2, 4, 3, bias=False), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                           torch.nn.Flatten(), lrp.Linear(4, 2, bias=False)).double()
    x = torch.rand(2, 2, 7, 7, dtype=torch.float64)
    relevance = lrp.explain(model, x, rule="zero", start="logit")
    logits = model(x)
    torch.testing.assert_close(relevance.flatten(1).sum(1), logits.max(1).values)


def test_batchnorm_after_layer_is_folded():
    conv = torch.nn.Conv2d(2, 4, 3, padding=1)
    bn = torch.nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    head = torch.nn.Linear(4 * 25, 3)
    model = lrp.Sequential(lrp.Conv2d.from_torch(conv), bn, torch.nn.ReLU(), torch.nn.Flatten(),
                           lrp.Linear.from_torch(head)).double().eval()
    folded_conv = torch.nn.Conv2d(2, 4, 3, padding=1).double()
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    folded_conv.weight.data = conv.weight.double() * scale[:, None, None, None]
    folded_conv.bias.data = (conv.bias.double() - bn.running_mean.double()) * scale + bn.bias.double()
    reference = lrp.Sequential(lrp.Conv2d.from_torch(folded_conv), torch.nn.ReLU(), torch.nn.Flatten(),
                               lrp.Linear.from_torch(head).double()).eval()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    explained = model(x.clone().requires_grad_(), explain=True, rule="alpha2beta1")
    torch.testing.assert_close(explained, model(x))
    torch.testing.assert_close(lrp.explain(model, x, rule="alpha2beta1"), lrp.explain(reference, x, rule="alpha2beta1"))
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        lrp.explain(model, x)


@pytest.mark.parametrize("epsilon", [0.0, 1e-6])
@pytest.mark.parametrize("rule", ["epsilon", "zero", "gamma", "alpha2beta1", "zplus", "flat", "wsquare"])
def test_zero_input_and_dead_relus_give_zero_not_nan(rule, epsilon):
    model = relu_network(bias=False)
    zeros = torch.zeros(2, 2, 16, 16, dtype=torch.float64)
    chosen = rules.Epsilon(epsilon) if rule == "epsilon" else rule
    relevance = lrp.explain(model, zeros, target=0, rule=chosen)
    assert torch.isfinite(relevance).all()
    if rule not in ("flat", "wsquare"):
        assert relevance.abs().sum() == 0
    dead = relu_network(bias=True)
    dead[0].bias.data.fill_(-100.0)  # every first-layer ReLU is off
    relevance = lrp.explain(dead, torch.rand(2, 2, 16, 16, dtype=torch.float64), target=1, rule=chosen)
    assert torch.isfinite(relevance).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite(device, dtype):
    model = relu_network(bias=True).to(device, dtype)
    x = torch.rand(2, 2, 16, 16, device=device, dtype=dtype)
    for rule in ("epsilon", "gamma", "alpha2beta1", lrp.EpsilonGammaBox(0.0, 1.0)):
        relevance = lrp.explain(model, x, rule=rule)
        assert relevance.dtype == dtype and torch.isfinite(relevance).all()


@pytest.mark.parametrize("config", ["linear", "conv2d_3x3", "conv2d_groups", "conv2d_reflect", "conv3d"])
def test_transpose_each_matches_one_map_per_weight(config, device):
    """Stacked (small weights, groups == 1) or not, each result is that weight's own transposed map."""
    _, layer, x, relevance = make_case(config, nonnegative=False)
    layer, x, relevance = layer.to(device), x.to(device), relevance.to(device)
    op = layer.affine_op()
    weights = [op.weight, op.weight.clamp(min=0), op.weight.clamp(max=0)]
    stacked = op.groups == 1 and sum(w.numel() for w in weights) <= relevance.numel()
    assert stacked == (config in ("conv2d_reflect", "conv3d"))
    for got, weight in zip(op.transpose_each(relevance, x.shape, weights), weights):
        torch.testing.assert_close(got, op.transpose(relevance, x.shape, weight))
