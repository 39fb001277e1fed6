"""Every rule against the formula written out on the dense layer matrix, on every conv hyperparameter."""
import pytest
import torch

import torchlrp as lrp
from torchlrp import rules

from .layer_configs import CONFIGS, make_case
from .reference import reference_relevance

RULES = {
    "epsilon": (lambda: rules.Epsilon(0.01), {"epsilon": 0.01}),
    "zero": (rules.Zero, {"epsilon": 0.0}),
    "gamma": (lambda: rules.Gamma(0.25), {"gamma": 0.25}),
    "alpha2beta1": (lambda: rules.AlphaBeta(2, 1), {"alpha": 2.0, "beta": 1.0}),
    "alpha1beta0_nobias": (lambda: rules.AlphaBeta(1, 0, ignore_bias=True), {"alpha": 1.0, "beta": 0.0,
                                                                             "ignore_bias": True}),
    "zplus": (rules.ZPlus, {}),
    "zbox": (lambda: rules.ZBox(-3.0, 2.5), {"low": -3.0, "high": 2.5}),
    "flat": (rules.Flat, {}),
    "wsquare": (rules.WSquare, {}),
    "zplus_ones": (rules.ZPlusOnes, {}),
    "gradient": (rules.Gradient, {}),
}
REFERENCE_NAMES = {"alpha2beta1": "alphabeta", "alpha1beta0_nobias": "alphabeta"}


def explain_layer(layer, rule, x, relevance, nonnegative):
    layer.input_nonnegative = nonnegative
    x = x.clone().requires_grad_(True)
    output = layer(x, explain=True, rule=rule)
    output.backward(relevance)
    return output, x.grad


@pytest.mark.parametrize("nonnegative", [False, True], ids=["mixed_input", "nonnegative_input"])
@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_rule_matches_formula(config, rule_name, nonnegative):
    torch_layer, layer, x, relevance = make_case(config, nonnegative)
    make_rule, params = RULES[rule_name]
    output, ours = explain_layer(layer, make_rule(), x, relevance, nonnegative)
    assert torch.equal(output, torch_layer(x))
    expected = reference_relevance(torch_layer, REFERENCE_NAMES.get(rule_name, rule_name), x, relevance, **params)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-9 * float(expected.abs().max()))


def test_strided_conv_is_not_torchlrp_padding_bug():
    """TorchLRP hard-coded padding=1 and ignored stride; a 5x5 stride-2 conv without padding catches that."""
    torch_layer = torch.nn.Conv2d(1, 2, 5, stride=2).double()
    layer = lrp.Conv2d.from_torch(torch_layer)
    x = torch.rand(1, 1, 14, 14, dtype=torch.float64)
    relevance = torch.rand_like(torch_layer(x))
    _, ours = explain_layer(layer, rules.Epsilon(), x, relevance, True)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, reference_relevance(torch_layer, "epsilon", x, relevance), rtol=1e-9, atol=1e-12)
    # the bottom-right border is outside every receptive field of this stride: it must get no relevance
    assert ours[..., 13, :].abs().sum() == 0 and ours[..., :, 13].abs().sum() == 0
    assert ours[..., :13, :13].abs().sum() > 0


@pytest.mark.parametrize("rule_name", ["gamma", "alpha2beta1", "alpha1beta0_nobias", "zplus"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_mixed_input_rules_in_float32(config, rule_name):
    """On mixed-sign inputs these rules use ``W+- = (W +- |W|) / 2`` (one map of the magnitudes instead of four):
    in float32 they must still match the float64 formula. Alpha-beta's parts are differences, resolved to
    ``sqrt(eps)`` (2.4e-4) of ``|W||x|`` (kernels.part_reciprocal): the tolerance is a few times that."""
    torch_layer, layer, x, relevance = make_case(config, False)
    make_rule, params = RULES[rule_name]
    expected = reference_relevance(torch_layer, REFERENCE_NAMES.get(rule_name, rule_name), x, relevance, **params)
    layer = layer.float()
    _, ours = explain_layer(layer, make_rule(), x.float(), relevance.float(), False)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, rtol=1e-3, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixed_input_part_without_contributions_passes_nothing(dtype):
    """A unit whose contributions are all negative has no positive part: z+ gives it no input (not rounding noise),
    and one whose positive part is tiny against ``|W||x|`` still gives it to that contribution (float64)."""
    weight = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 3.0, -0.5]], dtype=dtype)
    layer = torch.nn.Linear(3, 2, bias=False).to(dtype)
    layer.weight.data.copy_(weight)
    x = torch.tensor([[0.7, 1.3, -1e-6 if dtype == torch.float64 else 0.0]], dtype=dtype)
    relevance = torch.tensor([[1.0, 0.0]], dtype=dtype)
    _, ours = explain_layer(lrp.Linear.from_torch(layer), rules.ZPlus(stabilizer=0.0), x, relevance, False)
    expected = reference_relevance(layer.double(), "zplus", x.double(), relevance.double(), stabilizer=0.0)
    if dtype == torch.float32:
        assert torch.equal(ours, torch.zeros_like(ours))
    else:  # the only positive contribution, 5e-7 against |W||x| = 3.3, takes all relevance
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-8)  # rounding: eps * |W||x| / part
        assert float(ours[0, 2]) == pytest.approx(1.0, rel=1e-6)
