"""lrp.explain, composites and clear errors for bad input."""
import pytest
import torch

import torchlrp as lrp
from torchlrp.core.state import current
from torchlrp import rules

from .test_layers import relu_network


def test_explain_leaves_no_trace_on_model_or_input():
    model = relu_network(bias=True)
    x = torch.rand(3, 2, 16, 16, dtype=torch.float64)
    before = x.clone()
    relevance = lrp.explain(model, x, rule="alpha2beta1")
    assert torch.equal(x, before) and not x.requires_grad and x.grad is None
    assert all(p.grad is None for p in model.parameters())
    assert current() is None
    assert relevance.shape == x.shape
    # a failing explanation also restores the model
    with pytest.raises(ValueError):
        lrp.explain(model, x, target=99)
    assert current() is None
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_targets():
    model = relu_network(bias=True)
    x = torch.rand(4, 2, 16, 16, dtype=torch.float64)
    top = model(x).argmax(1)
    torch.testing.assert_close(lrp.explain(model, x), lrp.explain(model, x, target=top))
    by_int = lrp.explain(model, x, target=2)
    torch.testing.assert_close(by_int, lrp.explain(model, x, target=[2, 2, 2, 2]))
    several = lrp.explain(model, x, target=torch.tensor([[0, 1, 2]] * 4), rule="epsilon")
    assert several.shape == (4, 3, 2, 16, 16)
    for k in range(3):
        torch.testing.assert_close(several[:, k], lrp.explain(model, x, target=k))
    logit = lrp.explain(model, x, target=1, start="logit", rule="zero")
    one = lrp.explain(model, x, target=1, rule="zero")
    torch.testing.assert_close(logit, one * model(x)[:, 1, None, None, None])


@pytest.mark.parametrize("target, message", [
    (10, "out of range"), (-1, "out of range"), ([0, 1], "does not fit a batch of 4"),
    (torch.tensor([0.5] * 4), "integer class indices"), (torch.tensor([0, 1, 2, 7]), "out of range"),
])
def test_bad_targets(target, message):
    model = relu_network(bias=True)
    with pytest.raises(ValueError, match=message):
        lrp.explain(model, torch.rand(4, 2, 16, 16, dtype=torch.float64), target=target)


def test_bad_rules_and_parameters():
    model = relu_network(bias=True)
    x = torch.rand(1, 2, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown rule 'epsilonn'; valid keys are 'gradient', 'epsilon'"):
        lrp.explain(model, x, rule="epsilonn")
    with pytest.raises(ValueError, match="a rule must be"):
        lrp.explain(model, x, rule=3.0)
    with pytest.raises(ValueError, match="alpha - beta == 1"):
        rules.AlphaBeta(3, 1)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        rules.AlphaBeta(0.5, -0.5)
    with pytest.raises(ValueError, match="epsilon must be a finite number"):
        rules.Epsilon(-1)
    with pytest.raises(ValueError, match="gamma must be"):
        rules.Gamma(float("nan"))
    with pytest.raises(ValueError, match="does not broadcast"):
        lrp.explain(model, x, rule=rules.ZBox(torch.zeros(5), 1.0))
    with pytest.raises(ValueError, match="start must be"):
        lrp.explain(model, x, start="half")


def test_model_without_our_layers_and_odd_outputs():
    with pytest.raises(ValueError, match="no torchlrp layer.*torchlrp.convert"):
        lrp.explain(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.rand(2, 3))
    model = lrp.Sequential(lrp.Conv2d(1, 2, 3))
    x = torch.rand(2, 1, 5, 5)
    with pytest.raises(ValueError, match="not \\(batch, classes\\).*output_relevance"):
        lrp.explain(model, x)
    start = torch.ones(2, 2, 3, 3)
    assert lrp.explain(model, x, output_relevance=start).shape == x.shape


@pytest.mark.parametrize("final", [torch.nn.Softmax(dim=1), torch.nn.LogSoftmax(dim=1)])
def test_final_softmax_passes_relevance_to_the_scores(final):
    model = relu_network(bias=True)
    with_softmax = lrp.Sequential(*model, final)
    x = torch.rand(2, 2, 16, 16, dtype=torch.float64)
    # explain mode returns the plain forward's output (TorchLRP's Sequential contract)
    torch.testing.assert_close(with_softmax(x, explain=True, rule="epsilon"), with_softmax(x))
    for start in ("one", "logit", "probability"):
        torch.testing.assert_close(lrp.explain(with_softmax, x, start=start), lrp.explain(model, x, start=start))


def test_start_probability_is_the_softmax_of_the_target():
    model = relu_network(bias=False)
    x = torch.rand(3, 2, 16, 16, dtype=torch.float64)
    logits = model(x)
    probability = logits.softmax(1)[torch.arange(3), logits.argmax(1)]
    relevance = lrp.explain(model, x, rule="zero", start="probability")
    # LRP-0 on a bias-free ReLU network conserves the start relevance: the class probability (seed 004's R = f(x))
    torch.testing.assert_close(relevance.flatten(1).sum(1), probability)
    torch.testing.assert_close(relevance, lrp.explain(model, x, rule="zero") * probability.view(3, 1, 1, 1))
    assert not torch.allclose(relevance, lrp.explain(model, x, rule="zero", start="logit"))


def test_composite_precedence():
    model = relu_network(bias=True)
    composite = lrp.Composite(by_name={"7": "zplus"}, by_type={torch.nn.Linear: "flat", torch.nn.Conv2d: "gamma"},
                              first="wsquare", default="zero")
    assignment = composite.assign(model)
    assert isinstance(assignment[model[0]], rules.WSquare)  # first beats by_type
    assert isinstance(assignment[model[3]], rules.Gamma)  # by_type
    assert isinstance(assignment[model[7]], rules.ZPlus)  # by_name beats by_type
    assert isinstance(assignment[model[10]], rules.Flat)
    assert isinstance(assignment[model[5]], rules.Epsilon)  # avg pool: proportional
    globbed = lrp.Composite(by_name={"1*": "gradient"}, default="epsilon").assign(model)
    assert isinstance(globbed[model[10]], rules.Gradient) and isinstance(globbed[model[0]], rules.Epsilon)
    x = torch.rand(2, 2, 16, 16, dtype=torch.float64)
    assert torch.isfinite(lrp.explain(model, x, rule=composite)).all()
    with pytest.raises(ValueError, match="takes Epsilon"):
        lrp.Composite(by_type={torch.nn.AvgPool2d: "zplus"}).assign(model)
    with pytest.raises(ValueError, match=r"^5 \(AvgPool2d\) has no parameters; it takes Epsilon"):
        lrp.Composite(by_name={"5": "zplus"}).assign(model)  # an exact name: the user meant this module


def test_glob_pattern_gives_its_rule_to_the_modules_it_fits():
    model = relu_network(bias=True)
    assignment = lrp.Composite(by_name={"[3-5]": ("gamma", 0.5)}, default="zero").assign(model)
    assert isinstance(assignment[model[3]], rules.Gamma) and assignment[model[3]].gamma == 0.5
    # the average pooling matched by the glob keeps the proportional rule it takes without the pattern
    assert type(assignment[model[5]]) is rules.Epsilon and assignment[model[5]].epsilon == 0.0
    fitting = lrp.Composite(by_name={"[3-5]": "gradient"}, default="zero").assign(model)
    assert isinstance(fitting[model[5]], rules.Gradient)  # a rule that fits is given to the pooling too


def test_composite_equals_manual_rules():
    model = relu_network(bias=True)
    x = torch.rand(2, 2, 16, 16, dtype=torch.float64, requires_grad=True)
    composite = lrp.EpsilonPlusFlat()
    expected = lrp.explain(model, x, rule=composite)
    with lrp.rules_applied(model, composite) as state:
        assert isinstance(state.rules[model[0]], rules.Flat) and isinstance(state.rules[model[3]], rules.ZPlus)
        assert isinstance(state.rules[model[7]], rules.Epsilon)
        model(x)[:, 0].sum().backward()
    torch.testing.assert_close(x.grad, lrp.explain(model, x, target=0, rule=composite))
    torch.testing.assert_close(lrp.explain(model, x, rule=composite), expected)
