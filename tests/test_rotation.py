"""Rotation-invariant layers (seed 000): Rotate and CyclicPool, each against a reference from its formula."""
import pytest
import torch

import torchlrp as lrp
from torchlrp import rules


def _network(mode, dtype=torch.float64):
    torch.manual_seed(0)
    return lrp.Sequential(
        lrp.Rotate(), lrp.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        lrp.Conv2d(6, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), lrp.Linear(8 * 2 * 2, 10), torch.nn.ReLU(),
        lrp.CyclicPool(mode), lrp.Linear(10, 2)).to(dtype).eval()


def test_rotate_stacks_rotations_rotation_major():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float64).view(2, 1, 3, 3)
    stacked = lrp.Rotate()(x)
    assert stacked.shape == (8, 1, 3, 3)
    for k in range(4):
        torch.testing.assert_close(stacked[2 * k:2 * k + 2], torch.rot90(x, k, dims=(2, 3)))
    with pytest.raises(ValueError, match="square images"):
        lrp.Rotate()(torch.rand(2, 1, 3, 4))


@pytest.mark.parametrize("mode", ["mean", "max", "rms"])
def test_cyclic_pool_forward(mode):
    x = torch.rand(8, 5, dtype=torch.float64)
    branches = x.view(4, 2, 5)
    expected = {"mean": branches.mean(0), "max": branches.amax(0), "rms": branches.square().mean(0).sqrt()}[mode]
    torch.testing.assert_close(lrp.CyclicPool(mode)(x), expected)
    with pytest.raises(ValueError, match="multiple of 4"):
        lrp.CyclicPool(mode)(torch.rand(6, 5))
    with pytest.raises(ValueError, match="mode must be one of"):
        lrp.CyclicPool("median")


@pytest.mark.parametrize("mode", ["mean", "max", "rms"])
def test_cyclic_pool_relevance_matches_its_formula(mode):
    pool = lrp.CyclicPool(mode)
    model = lrp.Sequential(lrp.Linear(5, 5, bias=False), pool).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    hidden = model[0](x).detach().view(4, 2, 5)
    start = torch.randn(2, 5, dtype=torch.float64)
    with lrp.rules_applied(model, "zero"):
        carrier = x.clone().requires_grad_(True)
        pooled_input = model[0](carrier)
        output = pool(pooled_input)
        (at_hidden,) = torch.autograd.grad(output, pooled_input, start)
    if mode == "mean":
        expected = hidden / hidden.sum(0) * start
    elif mode == "rms":
        expected = hidden.square() / hidden.square().sum(0) * start
    else:
        expected = (hidden == hidden.amax(0)).to(hidden) * start
    torch.testing.assert_close(at_hidden.view(4, 2, 5), expected)
    torch.testing.assert_close(at_hidden.sum(), start.sum())  # conserved


@pytest.mark.parametrize("mode", ["mean", "max", "rms"])
def test_rotation_invariance_equivariant_explanations_and_conservation(mode):
    model = _network(mode)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    rotated = torch.rot90(x, 1, dims=(2, 3))
    torch.testing.assert_close(model(rotated), model(x))  # invariant to 90-degree rotations
    for rule in ("epsilon", "zero", "alpha2beta1", lrp.EpsilonPlus()):
        relevance = lrp.explain(model, x, target=1, rule=rule)
        torch.testing.assert_close(lrp.explain(model, rotated, target=1, rule=rule),
                                   torch.rot90(relevance, 1, dims=(2, 3)))
    # with biases zero, LRP-0 conserves the logit through Rotate and CyclicPool
    for module in model.modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd) or isinstance(module, torch.nn.Linear):
            torch.nn.init.zeros_(module.bias)
    relevance = lrp.explain(model, x, target=1, rule="zero", start="logit")
    torch.testing.assert_close(relevance.flatten(1).sum(1), model(x)[:, 1])


def test_rotate_relevance_is_each_branch_rotated_back():
    rotate = lrp.Rotate()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    branch_relevance = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    (relevance,) = torch.autograd.grad(rotate(x), x, branch_relevance)
    expected = sum(torch.rot90(branch_relevance[2 * k:2 * k + 2], -k, dims=(2, 3)) for k in range(4))
    torch.testing.assert_close(relevance, expected)


def test_rotation_network_converts_and_takes_a_gradient_rule():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rotate = lrp.Rotate()
            self.conv = torch.nn.Conv2d(1, 4, 3)
            self.pool = lrp.CyclicPool("rms")
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.conv(self.rotate(x))).mean((2, 3))
            return self.fc(self.pool(h))

    model = Net().double().eval()
    converted = lrp.convert(model)
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(converted(x), model(x))
    relevance = lrp.explain(converted, x, rule="epsilon")
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    gradient = lrp.explain(converted, x, rule="gradient")
    carrier = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(model(carrier)[torch.arange(2), model(x).argmax(1)].sum(), carrier)
    torch.testing.assert_close(gradient, expected)
    assert rules.resolve("gradient").propagates_gradient
