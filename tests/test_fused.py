"""The fused (torch.compile'd) elementwise kernels give the eager path's relevances, and each kernel its formula."""
import pytest
import torch
import torchvision

import torchlrp as lrp
from torchlrp.functional import kernels as K
from torchlrp.core.rules.proportional import _stack_with_positive

from .layer_configs import make_case


def _composites(low, high):
    return {
        "epsilon": lrp.rules.Epsilon(),
        "EpsilonPlus": lrp.EpsilonPlus(),
        "EpsilonGammaBox": lrp.EpsilonGammaBox(low, high),
        "EpsilonAlpha2Beta1": lrp.EpsilonAlpha2Beta1(),
        "EpsilonPlusFlat": lrp.EpsilonPlusFlat(),
        "gamma (mixed inputs everywhere)": lrp.rules.Gamma(0.25),
    }


def test_fused_explanations_equal_eager(device):
    model = torchvision.models.resnet18(num_classes=10).eval()
    for module in model.modules():  # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    converted = lrp.convert(model).to(device)
    x = torch.rand(3, 3, 40, 40, device=device)
    low, high = torch.zeros(1, 3, 1, 1, device=device), torch.ones(1, 3, 1, 1, device=device)
    for name, rule in _composites(low, high).items():
        eager = lrp.explain(converted, x, target=[1, 4, 7], rule=rule)
        fused = lrp.explain(converted, x, target=[1, 4, 7], rule=rule, fused=True)
        assert torch.isfinite(fused).all(), name
        scale = eager.abs().amax()
        assert scale > 0, name
        assert ((fused - eager).abs().amax() / scale) < 1e-5, name


@pytest.mark.parametrize("eps", [1e-3, 0.0])
def test_gamma_kernels_formula(device, eps):
    """Eager and fused gamma inverse + signal against the rule's two denominators written out (zeros included)."""
    output = torch.tensor([[2.0, -1.0, 0.0, 0.5], [-3.0, 0.0, 1.0, -0.25]], device=device)
    positive = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.5, 0.0, 4.0, 1.0]], device=device)
    relevance = torch.tensor([[0.3, -2.0, 1.0, 4.0], [1.5, 7.0, -0.5, 2.0]], device=device)
    gamma = 0.5
    up = output + gamma * positive + eps
    down = (1 + gamma) * output - gamma * positive - eps
    coefficients = torch.stack((torch.where(output > 0, 1 / up, torch.where(output < 0, (1 + gamma) / down, 0.0)),
                                torch.where(output > 0, gamma / up, torch.where(output < 0, -gamma / down, 0.0))), 1)
    for fused in (False, True):
        kernel = K.kernels(fused)
        signal = kernel.gamma_signal(relevance, kernel.gamma_inverse(output, positive, gamma, eps), gamma, 1)
        torch.testing.assert_close(signal, relevance.unsqueeze(1) * coefficients)


def test_rectified_quotient_formula(device):
    """Relevance over the stabilized denominator where the rectified output is positive, zero elsewhere."""
    output = torch.tensor([[2.0, 0.0, 0.5, 0.0]], device=device)
    denominator = torch.tensor([[3.0, 0.0, 0.5, -1.0]], device=device)
    relevance = torch.tensor([[1.0, 5.0, -2.0, 3.0]], device=device)
    for fused in (False, True):
        for eps in (1e-2, 0.0):
            got = K.kernels(fused).rectified_quotient(relevance, output, denominator, eps)
            expected = torch.tensor([[1.0 / (3.0 + eps), 0.0, -2.0 / (0.5 + eps), 0.0]], device=device)
            torch.testing.assert_close(got, expected)


def test_sum_kernels(device):
    a, b = torch.randn(2, 5, device=device), torch.randn(2, 5, device=device)
    a[0, 0], b[0, 0] = 1.0, -1.0  # a zero sum
    relevance = torch.randn(2, 5, device=device)
    for fused in (False, True):
        kernel = K.kernels(fused)
        total = kernel.sum_forward(a, b)
        torch.testing.assert_close(total, a + b)
        denominator = torch.where(total >= 0, total + 1e-6, total - 1e-6)
        share_a, share_b = kernel.sum_backward(relevance, total, 1e-6, False, b)
        torch.testing.assert_close(share_a, a * relevance / denominator)
        torch.testing.assert_close(share_b, b * relevance / denominator)
        rectified = total.clamp(min=0)
        share_a, share_b = kernel.sum_backward(relevance, rectified, 1e-6, True, b)
        signal = torch.where(total > 0, relevance / denominator, 0.0)
        torch.testing.assert_close(share_a, a * signal)
        torch.testing.assert_close(share_b, b * signal)


def test_sum_kernels_of_three_summands_leave_their_inputs_alone(device):
    """Three summands: each gets its share; the relevance, the sum and the summands kept are not modified (the
    backward fills its own new tensors in place)."""
    a, b, c = (torch.randn(2, 5, device=device) for _ in range(3))
    relevance = torch.randn(2, 5, device=device)
    for fused in (False, True):
        kernel = K.kernels(fused)
        total = kernel.sum_forward(a, b, c)
        inputs = [tensor.clone() for tensor in (relevance, total, b, c)]
        shares = kernel.sum_backward(relevance, total, 1e-6, False, b, c)
        signal = relevance / torch.where(total >= 0, total + 1e-6, total - 1e-6)
        for share, summand in zip(shares, (a, b, c)):
            torch.testing.assert_close(share, summand * signal)
        assert all(torch.equal(kept, now) for kept, now in zip(inputs, (relevance, total, b, c)))


@pytest.mark.parametrize("config, stacked", [("linear", False), ("conv2d_groups", False), ("conv2d_3x3", True)])
def test_reference_configs_cover_both_gamma_backwards(config, stacked):
    """The formula tests run the stacked [W; W+] backward and the two-map backward (asserted here)."""
    _, layer, x, _ = make_case(config, nonnegative=True)
    with torch.no_grad():  # as inside the rule's forward
        assert (_stack_with_positive(layer.weight, x, layer.affine_op()) is not None) == stacked


def test_fused_kernel_that_cannot_compile_says_what_to_do(monkeypatch):
    """Without a working C++ compiler the fused path raises an error naming the fix, not an inductor trace."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))

    def shifted_cube(tensor):
        return tensor * tensor * tensor + 0.123

    with pytest.raises(RuntimeError, match="fused=True could not compile torchlrp's shifted_cube kernel.*fused=False"):
        K._compiled(shifted_cube)(torch.rand(3))
