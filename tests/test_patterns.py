"""PatternNet / PatternAttribution: the paper's signal/distractor toy, conv = unfolded linear, save/load, errors."""
import pytest
import torch
import torch.nn.functional as F

import torchlrp as lrp
from torchlrp import patterns


def toy_data(n=4000):
    signal, distractor = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    y = torch.randn(n, 1)
    x = y * signal + torch.randn(n, 1) * distractor
    return x.double(), signal.double()


def test_signal_distractor_toy():
    x, signal = toy_data()
    model = lrp.Sequential(lrp.Linear(2, 1, bias=False)).double()
    model[0].weight.data = torch.tensor([[1.0, -1.0]], dtype=torch.float64)  # cancels the distractor
    fitted = patterns.fit_patternnet(model, [x[i:i + 500] for i in range(0, len(x), 500)])
    torch.testing.assert_close(fitted["0"], signal[None], atol=0.05, rtol=0)
    probe = x[:10]
    gradient = lrp.explain(model, probe, target=0, rule="gradient")
    estimate = lrp.explain(model, probe, target=0, rule="patternnet", pattern=fitted)
    attribution = lrp.explain(model, probe, target=0, rule="patternattribution", pattern=fitted)
    cosine = F.cosine_similarity
    assert (cosine(gradient, signal[None].expand_as(gradient)) < 0.75).all()  # the gradient points away
    assert (cosine(estimate, signal[None].expand_as(estimate)) > 0.99).all()
    assert (attribution[:, 1].abs() < 0.05 * attribution[:, 0].abs()).all()  # attribution on the signal
    # TorchLRP's plain list in layer order works too
    torch.testing.assert_close(lrp.explain(model, probe, target=0, rule="patternnet", pattern=[fitted["0"]]),
                               estimate)


def reference_conv_pattern(conv, batches, positive):
    inputs = torch.cat(batches)
    with torch.no_grad():
        outputs = conv(inputs)
    patches = F.unfold(inputs, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # N, C*k*k, L
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    y = outputs.flatten(2).transpose(1, 2).reshape(-1, outputs.shape[1])
    w = conv.weight.flatten(1)
    result = []
    for j in range(y.shape[1]):
        keep = y[:, j] > 0 if positive else torch.ones_like(y[:, j], dtype=torch.bool)
        xs, ys = patches[keep], y[keep, j]
        cov = ((xs - xs.mean(0)) * (ys - ys.mean())[:, None]).mean(0)
        result.append(cov / (w[j] @ cov))
    return torch.stack(result).reshape(conv.weight.shape)


@pytest.mark.parametrize("positive", [False, True])
def test_conv_patterns_equal_unfolded_linear_patterns(positive):
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1).double()
    model = lrp.Sequential(lrp.Conv2d.from_torch(conv))
    batches = [torch.randn(8, 3, 9, 9, dtype=torch.float64) + 0.3 for _ in range(4)]
    fit = patterns.fit_patternnet_positive if positive else patterns.fit_patternnet
    torch.testing.assert_close(fit(model, batches)["0"], reference_conv_pattern(conv, batches, positive))


def test_positive_patterns_on_trained_net_and_save_load(tmp_path):
    model = lrp.Sequential(lrp.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                           torch.nn.Flatten(), lrp.Linear(4 * 4 * 4, 3))
    x = torch.rand(64, 1, 8, 8)
    labels = (x[:, 0, :4].mean((1, 2)) * 6).long().clamp(0, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=16)
    positive = patterns.fit_patternnet_positive(model, loader)
    linear = patterns.fit_patternnet(model, loader)
    assert positive.names == ["0", "4"] and positive["0"].shape == model[0].weight.shape
    assert isinstance(positive, list) and positive[0] is positive["0"] and positive.keys() == ["0", "4"]
    assert all(torch.isfinite(p).all() for p in positive)
    assert not torch.allclose(positive["0"], linear["0"])
    path = tmp_path / "patterns.pt"
    patterns.save(positive, str(path))
    loaded = patterns.load(str(path))
    assert loaded.names == positive.names and all(torch.equal(loaded[k], positive[k]) for k in positive.names)
    relevance = lrp.explain(model, x[:4], rule="patternattribution", pattern=loaded)
    assert relevance.shape == (4, 1, 8, 8) and torch.isfinite(relevance).all()


def test_pattern_errors(tmp_path):
    model = lrp.Sequential(lrp.Linear(2, 3), torch.nn.ReLU(), lrp.Linear(3, 2))
    with pytest.raises(ValueError, match="yielded no batch"):
        patterns.fit_patternnet(model, [])
    x = torch.rand(2, 2)
    with pytest.raises(ValueError, match="not torchlrp layers"):
        lrp.explain(model, x, rule="patternnet", pattern={"5": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="has shape \\(2, 3\\)"):
        lrp.explain(model, x, rule="patternnet", pattern={"0": torch.zeros(2, 3), "2": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="got 1 patterns for 2"):
        lrp.explain(model, x, rule="patternnet", pattern=[torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="needs a pattern for layer '2'"):
        lrp.explain(model, x, rule="patternnet", pattern={"0": torch.zeros(3, 2)})
    bad = tmp_path / "bad.pt"
    torch.save({"0": [1, 2]}, bad)
    with pytest.raises(ValueError, match="does not hold patterns"):
        patterns.load(str(bad))


def test_torchlrp_pattern_calls(tmp_path):
    """TorchLRP's pattern code as its examples write it: a list back, max_iter, numpy pickles, a copied list."""
    import pickle

    torch.manual_seed(0)
    model = lrp.Sequential(lrp.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                           lrp.Linear(4 * 8 * 8, 3)).eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(64, 1, 8, 8),
                                                                        torch.zeros(64)), batch_size=16)
    counting = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(64, 1, 8, 8),
                                                                          torch.zeros(64)), batch_size=16)
    first_two = patterns.fit_patternnet(model, [batch for batch in counting][:2])
    limited = patterns.fit_patternnet(model, counting, max_iter=2)  # TorchLRP's argument: the first 2 batches
    assert all(torch.equal(a, b) for a, b in zip(first_two, limited))
    fitted = patterns.fit_patternnet_positive(model, loader, None, "cpu")  # TorchLRP's positional order
    path = tmp_path / "pattern_pos.pkl"
    with open(path, "wb") as f:  # TorchLRP's store_patterns
        pickle.dump([p.detach().cpu().numpy() for p in fitted], f)
    with open(path, "rb") as f:
        stored = pickle.load(f)
    as_tensors = [torch.tensor(p, dtype=torch.float32) for p in stored]
    x = torch.rand(3, 1, 8, 8, requires_grad=True)
    y = model.forward(x, explain=True, rule="patternattribution", pattern=as_tensors)
    y[torch.arange(3), y.max(1)[1]].sum().backward()
    expected = lrp.explain(model, x, rule="patternattribution", pattern=fitted)
    torch.testing.assert_close(x.grad, expected)
    torch.testing.assert_close(lrp.explain(model, x, rule="patternattribution", pattern=stored), expected)
    assert len(as_tensors) == 2  # the caller's list is not consumed
    scaled = patterns.normalize_per_sample(expected)
    torch.testing.assert_close(scaled.abs().flatten(1).amax(1), torch.ones(3))
    torch.testing.assert_close(scaled * expected.abs().flatten(1).amax(1).view(3, 1, 1, 1), expected)
    assert torch.equal(patterns.normalize_per_sample(torch.zeros(2, 5)), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="max_iter must be a positive"):
        patterns.fit_patternnet(model, loader, max_iter=0)
    with pytest.raises(KeyError, match="no pattern for layer 'fc'"):
        fitted["fc"]
