"""torchlrp.evaluate: pixel flipping, randomization, mass/rank accuracy and tuning, against references and controls."""
import itertools

import pytest
import torch

import torchlrp as lrp
from torchlrp import evaluate

from .test_layers import relu_network


def _linear_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), lrp.Linear(2 * 8 * 8, 3, bias=False)).double().eval()


def test_exact_contributions_beat_gradient_and_random_at_pixel_flipping():
    model = _linear_model()
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    target = model(x).argmax(1)
    weight = model[1].weight.detach()[target].reshape(6, 2, 8, 8)
    exact = x * weight  # with fill 0, removing a pixel lowers the logit by exactly this
    kwargs = dict(patch=1, steps=16, fill=0.0)
    perfect = evaluate.pixel_flipping(model, x, exact, target, **kwargs)
    gradient = evaluate.pixel_flipping(model, x, weight, target, **kwargs)
    chance = evaluate.pixel_flipping(model, x, evaluate.random_relevance(x), target, **kwargs)
    assert (perfect.aopc > gradient.aopc).all() and (perfect.aopc > chance.aopc).all()
    assert (perfect.abpc > chance.abpc).all() and perfect.abpc.mean() > gradient.abpc.mean()
    torch.testing.assert_close(perfect.morf[:, 0], model(x).gather(1, target[:, None]).squeeze(1))
    torch.testing.assert_close(perfect.morf[:, -1], torch.zeros(6, dtype=torch.float64))  # everything replaced
    # LRP-0 of a bias-free linear model is the exact contribution
    torch.testing.assert_close(lrp.explain(model, x, target, rule="zero", start="logit"), exact)


def test_pixel_flipping_equals_a_loop_over_samples_and_steps():
    torch.manual_seed(1)
    model = relu_network(bias=True)
    x = torch.rand(3, 2, 16, 16, dtype=torch.float64)
    relevance = torch.randn(3, 2, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    result = evaluate.pixel_flipping(model, x, relevance, target, patch=4, steps=5, fill="mean")
    for n, (order, curve) in itertools.product(range(3), (("morf", result.morf), ("lerf", result.lerf))):
        scores = relevance[n].sum(0).reshape(4, 4, 4, 4).sum((1, 3)).flatten()  # 4x4 patches of 4x4 pixels
        ranking = scores.argsort(descending=order == "morf").tolist()
        mean = x[n].mean((1, 2), keepdim=True)
        for step in range(6):
            image = x[n].clone()
            for p in ranking[:round(step * 16 / 5)]:
                row, column = divmod(p, 4)
                image[:, row * 4:(row + 1) * 4, column * 4:(column + 1) * 4] = \
                    mean.expand(2, 4, 4)
            expected = model(image[None])[0, target[n]]
            torch.testing.assert_close(curve[n, step], expected)
    torch.testing.assert_close(result.aopc, (result.morf[:, :1] - result.morf).mean(1))
    torch.testing.assert_close(result.abpc, (result.lerf - result.morf).mean(1))


def test_pixel_flipping_errors():
    model = relu_network(bias=True)
    x = torch.rand(2, 2, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="patch must be a positive int dividing"):
        evaluate.pixel_flipping(model, x, x, [0, 1], patch=5)
    with pytest.raises(ValueError, match="order must be one of"):
        evaluate.pixel_flipping(model, x, x, [0, 1], order="best")
    with pytest.raises(ValueError, match="fill must be one of"):
        evaluate.pixel_flipping(model, x, x, [0, 1], fill="zeros")
    with pytest.raises(ValueError, match="one class per sample"):
        evaluate.pixel_flipping(model, x, x, [0])


def test_randomization_separates_an_explanation_from_one_that_ignores_the_model():
    model = relu_network(bias=True)
    x = torch.rand(4, 2, 16, 16, dtype=torch.float64)
    result = evaluate.randomization(model, x, 0, rule="epsilon")
    layers = [name for name, module in model.named_modules() if isinstance(module, lrp.modules.ExplainableAffine)]
    assert result.layers == layers[::-1]  # top (output side) first
    assert result.correlation.shape == (len(result.layers), 4)
    assert result.correlation[-1].mean() < 0.5  # every layer random: the heatmaps changed
    ignoring = evaluate.randomization(model, x, 0, rule="epsilon", attribution=lambda m, inputs, t: inputs)
    torch.testing.assert_close(ignoring.correlation, torch.ones_like(ignoring.correlation))
    independent = evaluate.randomization(model, x, 0, rule="epsilon", layers="independent")
    assert independent.correlation.shape == result.correlation.shape
    original = [p.clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(original, model.parameters()))  # the model is not modified
    torch.testing.assert_close(evaluate.spearman(x, x * 3 + 1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(evaluate.spearman(x, -x), -torch.ones(4, dtype=torch.float64))


def test_mass_and_rank_accuracy():
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2, :2] = True
    inside = torch.zeros(2, 4, 4, dtype=torch.float64)
    inside[:, :2, :2] = torch.rand(2, 2, 2, dtype=torch.float64) + 0.1
    torch.testing.assert_close(evaluate.relevance_mass_accuracy(inside, mask), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(evaluate.relevance_rank_accuracy(inside, mask), torch.ones(2, dtype=torch.float64))
    relevance = torch.zeros(2, 4, 4, dtype=torch.float64)
    relevance[0, 0, 0], relevance[0, 3, 3], relevance[0, 3, 2] = 3.0, 1.0, -5.0  # 3 of 4 positive units inside
    relevance[1, 0, 0], relevance[1, 0, 1], relevance[1, 3, 3], relevance[1, 2, 3] = 4.0, 3.0, 2.0, 1.0
    torch.testing.assert_close(evaluate.relevance_mass_accuracy(relevance, mask),
                               torch.tensor([0.75, 0.7], dtype=torch.float64))
    # top 4 pixels: sample 1 has 2 of them inside
    assert float(evaluate.relevance_rank_accuracy(relevance, mask)[1]) == 0.5
    quarter = torch.zeros(2, 64, 64, dtype=torch.bool).index_fill_(1, torch.arange(16), True)
    chance = evaluate.relevance_mass_accuracy(evaluate.random_relevance(torch.zeros(2, 64, 64)), quarter)
    assert ((chance - 0.25).abs() < 0.05).all()  # random relevance: the mask's share of the image


def test_tune_ranks_candidates():
    model = _linear_model()
    x = torch.randn(8, 2, 8, 8, dtype=torch.float64)
    target = model(x).argmax(1)
    ranking = evaluate.tune(model, x, target, {
        "random": lambda m, inputs, t: evaluate.random_relevance(inputs),
        "LRP-0": "zero",
        "gradient": "gradient",
    }, metric="abpc", steps=8, fill=0.0)
    assert [row[0] for row in ranking.rows][0] == "LRP-0" and ranking.rows[-1][0] != "LRP-0"
    assert "| LRP-0 |" in ranking.table()
    with pytest.raises(ValueError, match="metric must be one of"):
        evaluate.tune(model, x, target, {"a": "zero"}, metric="auc")
