"""TorchLRP's example scripts' calls (seed 003), as a migrating user runs them after ``import torchlrp as lrp``."""
import pickle

import torch

import torchlrp as lrp
from torchlrp import Conv2d, Linear, MaxPool2d, Sequential
from torchlrp.explanation.patterns import fit_patternnet, fit_patternnet_positive

RULES = ["gradient", "epsilon", "gamma+epsilon", "alpha1beta0", "alpha2beta1", "patternnet", "patternattribution"]


def test_mnist_example_calls(tmp_path):
    torch.manual_seed(0)
    model = Sequential(Conv2d(1, 8, 3, 1, 1), torch.nn.ReLU(), Conv2d(8, 8, 3, 1, 1), torch.nn.ReLU(),
                       MaxPool2d(2, 2), torch.nn.Flatten(), Linear(8 * 7 * 7, 16), torch.nn.ReLU(), Linear(16, 10))
    data = torch.utils.data.TensorDataset(torch.rand(96, 1, 14, 14), torch.randint(0, 10, (96,)))
    train_loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=False)
    patterns_all = fit_patternnet(model, train_loader, device="cpu")
    with open(tmp_path / "pattern_all.pkl", "wb") as f:
        pickle.dump([p.detach().cpu().numpy() for p in patterns_all], f)
    with open(tmp_path / "pattern_all.pkl", "rb") as f:
        patterns_all = [torch.tensor(p, dtype=torch.float32) for p in pickle.load(f)]
    patterns_pos = fit_patternnet_positive(model, train_loader, device="cpu", max_iter=1)
    x = torch.rand(3, 1, 14, 14, requires_grad=True)
    for rule in RULES:
        pattern = patterns_all if rule == "patternnet" else patterns_pos if rule == "patternattribution" else None
        x.grad = None
        y_hat = model.forward(x, explain=True, rule=rule, pattern=pattern)
        torch.testing.assert_close(y_hat, model(x))
        y_hat[torch.arange(x.shape[0]), y_hat.max(1)[1]].sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, rule
        torch.testing.assert_close(x.grad, lrp.explain(model, x, rule=rule, pattern=pattern))
    assert len(patterns_all) == 4  # TorchLRP's list: one pattern per Conv2d/Linear, still all there


def test_vgg_example_calls():
    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg11(num_classes=10).eval()
    lrp_vgg = lrp.convert_vgg(vgg)
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    assert torch.allclose(vgg(x), lrp_vgg.forward(x), atol=1e-4, rtol=1e-4)
    y_hat_lrp = lrp_vgg.forward(x, explain=True, rule="alpha1beta0")
    y_hat_lrp[torch.arange(x.shape[0]), y_hat_lrp.max(1)[1]].sum().backward()
    torch.testing.assert_close(x.grad, lrp.explain(lrp_vgg, x, rule="alpha1beta0"))


def test_final_softmax_and_trace_order():
    model = Sequential(Linear(6, 5), torch.nn.ReLU(), Linear(5, 3), torch.nn.Softmax(dim=1))
    x = torch.rand(4, 6, requires_grad=True)
    y = model.forward(x, explain=True, rule="epsilon")
    torch.testing.assert_close(y, model(x))  # probabilities, as the plain forward
    lrp.trace.enable_and_clean()  # TorchLRP's order: after the forward, before the backward
    y[:, 0].sum().backward()
    recorded = lrp.trace.collect_and_disable()
    assert len(recorded) == 2
    torch.testing.assert_close(recorded[-1], x.grad)
    # relevance passes the softmax unchanged: the score before it is explained
    torch.testing.assert_close(x.grad, lrp.explain(model[:3], x, target=0, rule="epsilon"))
