"""Agreement with zennit (the reference PyTorch LRP library) to 1e-6 relative in float64."""
import pytest
import torch
import zennit.rules as zrules

from torchlrp import rules

from .layer_configs import CONFIGS, make_case
from .test_rules_reference import explain_layer

PAIRS = {
    "epsilon": (lambda: rules.Epsilon(1e-3), lambda: zrules.Epsilon(1e-3)),
    "zero": (rules.Zero, lambda: zrules.Epsilon(0.0)),
    "gamma": (lambda: rules.Gamma(0.5), lambda: zrules.Gamma(0.5)),
    "alpha2beta1": (lambda: rules.AlphaBeta(2, 1), lambda: zrules.AlphaBeta(2, 1)),
    "alpha1beta0_nobias": (lambda: rules.AlphaBeta(1, 0, ignore_bias=True),
                           lambda: zrules.AlphaBeta(1, 0, zero_params=["bias"])),
    "zplus": (rules.ZPlus, zrules.ZPlus),
    "zbox": (lambda: rules.ZBox(-2.0, 3.0), lambda: zrules.ZBox(-2.0, 3.0)),
    "flat": (rules.Flat, zrules.Flat),
    "wsquare": (rules.WSquare, zrules.WSquare),
}


def zennit_relevance(layer, hook, x, relevance):
    x = x.clone().requires_grad_(True)
    handle = hook.register(layer)
    try:
        layer(x).backward(relevance)
    finally:
        handle.remove()
    return x.grad


@pytest.mark.parametrize("nonnegative", [False, True], ids=["mixed_input", "nonnegative_input"])
@pytest.mark.parametrize("rule_name", list(PAIRS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_layer_matches_zennit(config, rule_name, nonnegative):
    torch_layer, layer, x, relevance = make_case(config, nonnegative)
    ours_rule, zennit_rule = PAIRS[rule_name]
    _, ours = explain_layer(layer, ours_rule(), x, relevance, nonnegative)
    expected = zennit_relevance(torch_layer, zennit_rule(), x, relevance)
    finite = torch.isfinite(expected)
    if not finite.all():  # zennit's LRP-0 divides by exact zeros (e.g. a transposed conv's unreached outputs)
        assert rule_name == "zero" and torch.isfinite(ours).all()
    torch.testing.assert_close(ours[finite], expected[finite], rtol=1e-6,
                               atol=1e-9 * float(expected[finite].abs().max()))
