"""The seed systems' rule names and pooling choices (issue 17): each against a reference written from its formula."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import torchlrp as lrp
from torchlrp import rules

from .reference import reference_relevance


def _mlp():
    torch.manual_seed(0)
    return lrp.Sequential(lrp.Linear(12, 10), torch.nn.ReLU(), lrp.Linear(10, 8), torch.nn.ReLU(),
                          lrp.Linear(8, 4)).double().eval()


def _layerwise_reference(model, x, target, first, above):
    """Relevance of ``x`` layer by layer with the reference: ``first`` = (name, params) on the first layer,
    ``above`` on the others."""
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    inputs, h = [], x
    for module in model:
        if isinstance(module, torch.nn.Linear):
            inputs.append(h)
        h = module(h)
    # the ReLU between layers passes relevance where it is active (its gradient)
    masks = [torch.ones_like(inputs[0])] + [(a > 0).to(a) for a in inputs[1:]]
    relevance = torch.zeros_like(h)
    relevance[torch.arange(len(x)), target] = 1.0
    for index in reversed(range(len(layers))):
        name, params = first if index == 0 else above
        relevance = reference_relevance(layers[index], name, inputs[index].detach(), relevance, **params)
        relevance = relevance * masks[index]
    return relevance


@pytest.mark.parametrize("key,first,above", [
    ("simple", ("zero", {"epsilon": 0.0}), ("zero", {"epsilon": 0.0})),
    ("ww", ("wsquare", {}), ("wsquare", {})),
    ("alphabeta", ("alphabeta", {"alpha": 2.0, "beta": 1.0}), ("alphabeta", {"alpha": 2.0, "beta": 1.0})),
    (("alphabeta", 3), ("alphabeta", {"alpha": 3.0, "beta": 2.0}), ("alphabeta", {"alpha": 3.0, "beta": 2.0})),
    (("epsilon", 0.01), ("epsilon", {"epsilon": 0.01}), ("epsilon", {"epsilon": 0.01})),
    (("gamma", 0.5), ("gamma", {"gamma": 0.5}), ("gamma", {"gamma": 0.5})),
    ("wwab", ("wsquare", {}), ("alphabeta", {"alpha": 2.0, "beta": 1.0})),
])
def test_seed_rule_names_match_their_formulas(key, first, above):
    model = _mlp()
    x = torch.rand(3, 12, dtype=torch.float64) * 2 - 0.5
    target = model(x).argmax(1)
    expected = _layerwise_reference(model, x, target, first, above)
    torch.testing.assert_close(lrp.explain(model, x, target, rule=key), expected)
    torch.testing.assert_close(model.forward(x, explain=True, rule=key), model(x))


@pytest.mark.parametrize("key,above", [("deeptaylor", ("zplus", {})),
                                       ("zbab", ("alphabeta", {"alpha": 2.0, "beta": 1.0}))])
def test_seed_zbox_composites_use_each_samples_range(key, above):
    model = _mlp()
    x = torch.rand(3, 12, dtype=torch.float64) * torch.tensor([[1.0], [2.0], [0.5]]) - 0.2
    target = model(x).argmax(1)
    results = []
    for sample, t in zip(x, target):  # the bounds are each sample's own minimum and maximum
        first = ("zbox", {"low": sample.min().item(), "high": sample.max().item()})
        results.append(_layerwise_reference(model, sample[None], t[None], first, above))
    torch.testing.assert_close(lrp.explain(model, x, target, rule=key), torch.cat(results))


def test_zbox_without_bounds_equals_zbox_with_the_samples_range():
    layer = lrp.Conv2d(3, 5, 3, padding=1).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    low, high = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    model = lrp.Sequential(layer)
    start = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    ours = lrp.explain(model, x, rule=rules.ZBox(None, None), output_relevance=start)
    torch.testing.assert_close(ours, lrp.explain(model, x, rule=rules.ZBox(low, high), output_relevance=start))
    expected = torch.cat([reference_relevance(layer, "zbox", x[i:i + 1], start[i:i + 1], low=low[i].item(),
                                              high=high[i].item()) for i in range(2)])
    torch.testing.assert_close(ours, expected)


def test_rule_keys_errors_name_every_key():
    model = _mlp()
    x = torch.rand(1, 12, dtype=torch.float64)
    with pytest.raises(ValueError) as error:
        lrp.explain(model, x, rule="alfabeta")
    for key in ("'simple'", "'ww'", "'deeptaylor'", "'zbab'", "'wwab'", "('alphabeta', number)",
                "('epsilon', number)"):
        assert key in str(error.value)
    with pytest.raises(ValueError, match="unknown rule"):
        lrp.explain(model, x, rule=("flat", 2))
    with pytest.raises(ValueError, match="alpha must be a finite number >= 1"):
        lrp.explain(model, x, rule=("alphabeta", 0.5))
    with pytest.raises(ValueError, match="is a composite"):
        lrp.Composite(by_type={torch.nn.Linear: "zbab"})
    assert rules.AlphaBeta(alpha=2).beta == 1.0 and rules.AlphaBeta(alpha=1).beta == 0.0


def test_cli_accepts_the_seed_composites():
    from torchlrp.cli import _rule

    assert isinstance(_rule("zbab"), lrp.composites.ZBoxAlpha2Beta1)
    assert _rule("simple") == "simple"


# -- max pooling: winner takes all or proportional -------------------------------------------------------------

def _windows(size, kernel, stride, padding, dilation, ceil_mode, out):
    """Index lists of each output position's window along one axis (padding excluded)."""
    return [[start + d * dilation for d in range(kernel) if 0 <= start + d * dilation < size]
            for start in (o * stride - padding for o in range(out))]


def _adaptive_windows(size, out):
    return [list(range((o * size) // out, -(-((o + 1) * size) // out))) for o in range(out)]


def _proportional_reference(x, relevance, windows_h, windows_w, eps=0.0):
    """R_i = x_i sum_w R_w / stab(sum_{j in w} x_j), window by window (LRP-0's epsilon 0; empty windows pass
    nothing)."""
    result = torch.zeros_like(x)
    for n, c in itertools.product(range(x.shape[0]), range(x.shape[1])):
        for (oh, rows), (ow, cols) in itertools.product(enumerate(windows_h), enumerate(windows_w)):
            patch = x[n, c][rows][:, cols]
            total = patch.sum()
            if total == 0:
                continue
            denominator = total + eps * (1.0 if total >= 0 else -1.0)
            result[n, c, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] += patch / denominator * relevance[n, c, oh, ow]
    return result


@pytest.mark.parametrize("kernel,stride,padding,ceil_mode", [(2, 2, 0, False), (3, 2, 1, False), (3, 1, 1, False),
                                                              (3, 2, 0, True), (2, 3, 1, True)])
def test_proportional_max_pooling_matches_its_formula(kernel, stride, padding, ceil_mode):
    pool = lrp.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
    model = lrp.Sequential(lrp.Linear(7, 7), torch.nn.ReLU(), pool).double()
    x = torch.rand(2, 3, 7, 7, dtype=torch.float64)
    hidden = model[1](model[0](x)).detach()
    output = model(x)
    start = torch.randn_like(output)
    ours = lrp.explain(model, x, output_relevance=start,
                       rule=lrp.Composite(default="zero", max_pooling="proportional"))
    out_h, out_w = output.shape[-2:]
    windows = [_windows(7, kernel, stride, padding, 1, ceil_mode, n) for n in (out_h, out_w)]
    at_hidden = _proportional_reference(hidden, start, *windows)
    expected = reference_relevance(model[0], "zero", x.reshape(-1, 7), at_hidden.reshape(-1, 7), epsilon=0.0)
    expected = expected.reshape_as(x)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(model(x, explain=True, rule=lrp.Composite(max_pooling="proportional")), output)


def test_proportional_adaptive_and_functional_max_pooling_in_converted_models():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False)
            self.pool = torch.nn.AdaptiveMaxPool2d((2, 3))

        def forward(self, x):
            return self.pool(F.max_pool2d(torch.relu(self.conv(x)), 2)).flatten(1)

    model = Net().double().eval()
    converted = lrp.convert(model)
    assert any(isinstance(m, lrp.modules.MaxPool) for m in converted.modules())
    x = torch.rand(2, 2, 10, 10, dtype=torch.float64)
    activation = torch.relu(model.conv(x)).detach()
    pooled = F.max_pool2d(activation, 2)
    start = torch.randn(2, 18, dtype=torch.float64)
    ours = lrp.explain(converted, x, output_relevance=start,
                       rule=lrp.Composite(default="zero", max_pooling="proportional"))
    at_pooled = _proportional_reference(pooled, start.view(2, 3, 2, 3), _adaptive_windows(5, 2),
                                        _adaptive_windows(5, 3))
    at_activation = _proportional_reference(activation, at_pooled, _windows(10, 2, 2, 0, 1, False, 5),
                                            _windows(10, 2, 2, 0, 1, False, 5))
    expected = reference_relevance(model.conv, "zero", x, at_activation, epsilon=0.0)
    torch.testing.assert_close(ours, expected)
    # winner takes all stays the default: the gradient of the max
    winner = lrp.explain(converted, x, output_relevance=start, rule="gradient")
    carrier = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model(carrier), carrier, start)
    torch.testing.assert_close(winner, gradient)


def test_max_pooling_choice_per_layer_and_conservation():
    model = lrp.Sequential(lrp.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                           lrp.Conv2d(4, 4, 3, padding=1, bias=False), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                           torch.nn.Flatten(), lrp.Linear(16, 3, bias=False)).double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    logits = model(x)
    start = logits.max(1).values
    for composite in (lrp.Composite(default="zero", max_pooling="proportional"),
                      lrp.Composite(default="zero", by_name={"2": rules.Epsilon(0)}),
                      lrp.Composite(default="zero", by_type={torch.nn.MaxPool2d: rules.Gradient()},
                                    max_pooling="proportional")):
        relevance = lrp.explain(model, x, rule=composite, start="logit")
        torch.testing.assert_close(relevance.flatten(1).sum(1), start)  # conserved either way
    both = lrp.explain(model, x, rule=lrp.Composite(default="zero", max_pooling="proportional"))
    first = lrp.explain(model, x, rule=lrp.Composite(default="zero", by_name={"2": rules.Epsilon(1e-6)}))
    winner = lrp.explain(model, x, rule="zero")
    assert not torch.allclose(both, winner) and not torch.allclose(first, winner) and not torch.allclose(both, first)


def test_max_pooling_choice_errors():
    with pytest.raises(ValueError, match="max_pooling must be one of"):
        lrp.Composite(max_pooling="average")
    model = lrp.Sequential(lrp.Conv2d(1, 2, 3), torch.nn.MaxPool2d(2, dilation=2), torch.nn.Flatten())
    with pytest.raises(ValueError, match="dilated"):
        lrp.explain(model, torch.rand(1, 1, 9, 9), output_relevance=torch.ones(1, 18),
                    rule=lrp.Composite(max_pooling="proportional"))
    model = lrp.Sequential(lrp.Conv2d(1, 2, 3), torch.nn.MaxPool2d(2), torch.nn.Flatten())
    with pytest.raises(ValueError, match="takes Epsilon"):
        lrp.explain(model, torch.rand(1, 1, 8, 8), output_relevance=torch.ones(1, 18),
                    rule=lrp.Composite(by_type={torch.nn.MaxPool2d: "zplus"}))
