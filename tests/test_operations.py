"""Each operation rule against an independent reference written from its formula (float64)."""
import pytest
import torch
import torch.nn.functional as F

from torchlrp.functional.operations import (ChannelAffineRelevance, bilinear_rule, group_norm_rule, identity_rule,
                                            layer_norm_rule, softmax_rule,
                                            scale_rule, weighted_sum_rule)
from torchlrp.functional.relevance import proportional

from .reference import _stab


def backward(output, relevance, *inputs):
    return torch.autograd.grad(output, inputs, relevance, allow_unused=True)


def leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_weighted_sum_with_signs_broadcast_and_constant(epsilon):
    a, b = leaf(2, 3, 4), leaf(1, 3, 1)
    relevance = torch.randn(2, 3, 4, dtype=torch.float64)
    output = weighted_sum_rule([a, b], [1.0, -1.0], constant=0.5, epsilon=epsilon)
    torch.testing.assert_close(output, a - b + 0.5)
    ours_a, ours_b = backward(output, relevance, a, b)
    z = (a - b + 0.5).detach()
    expected_a = a.detach() * relevance / _stab(z, epsilon)
    expected_b = (-b.detach() * relevance / _stab(z, epsilon)).sum((0, 2), keepdim=True)
    torch.testing.assert_close(ours_a, expected_a)
    torch.testing.assert_close(ours_b, expected_b)
    if epsilon == 0:  # the constant takes 0.5 R / z, the rest is conserved
        taken = (0.5 * relevance / z).sum()
        torch.testing.assert_close(ours_a.sum() + ours_b.sum() + taken, relevance.sum())


def test_scale_gives_the_signal_all_relevance():
    signal, gate = leaf(2, 3, 4, 4), leaf(2, 3, 1, 1)
    relevance = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    output = scale_rule(signal, gate.sigmoid())
    torch.testing.assert_close(output, signal * gate.sigmoid())
    ours_signal, ours_gate = backward(output, relevance, signal, gate)
    torch.testing.assert_close(ours_signal, relevance)
    assert ours_gate is None
    # a broadcast signal gets its relevance summed over the broadcast dimensions; a quotient keeps the signal first
    small = leaf(2, 3, 1, 1)
    divisor = torch.rand(1, 3, 4, 4, dtype=torch.float64) + 1
    (ours_small,) = backward(scale_rule(small, divisor, torch.div), relevance, small)
    torch.testing.assert_close(ours_small, relevance.sum((2, 3), keepdim=True))
    (ours_right,) = backward(scale_rule(small, divisor, torch.mul, signal_first=False), relevance, small)
    torch.testing.assert_close(ours_right, relevance.sum((2, 3), keepdim=True))


def test_identity_rule_passes_relevance_unchanged():
    x = leaf(3, 5)
    relevance = torch.randn(3, 5, dtype=torch.float64)
    output = identity_rule(x, F.silu)
    torch.testing.assert_close(output, F.silu(x))
    (ours,) = backward(output, relevance, x)
    torch.testing.assert_close(ours, relevance)


@pytest.mark.parametrize("epsilon", [0.0, 1e-3])
def test_batch_norm_as_channel_affine_map(epsilon):
    x = leaf(2, 3, 4, 4)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    weight, bias = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    relevance = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    output = ChannelAffineRelevance.apply(x, mean, var, weight, bias, 1e-5, epsilon)
    (ours,) = backward(output, relevance, x)
    scale = (weight / (var + 1e-5).sqrt()).view(1, 3, 1, 1)
    shift = (bias - mean * weight / (var + 1e-5).sqrt()).view(1, 3, 1, 1)
    contribution = scale * x.detach()
    torch.testing.assert_close(output, contribution + shift)
    torch.testing.assert_close(ours, contribution * relevance / _stab(contribution + shift, epsilon))


def dense_normalization_reference(x, relevance, group_of, weight_of, bias_of, eps, epsilon):
    """Epsilon rule on the dense matrix of the normalization linearized with its std held constant, per sample."""
    results = []
    for xs, rs in zip(x, relevance):
        v, r = xs.flatten(), rs.flatten()
        n = v.numel()
        groups = torch.tensor([group_of(i) for i in range(n)])
        w = torch.tensor([weight_of(i) for i in range(n)], dtype=v.dtype)
        b = torch.tensor([bias_of(i) for i in range(n)], dtype=v.dtype)
        same = (groups[:, None] == groups[None, :]).to(v.dtype)
        size = same.sum(1, keepdim=True)
        centring = torch.eye(n, dtype=v.dtype) - same / size
        std = torch.stack([(v[groups == groups[i]].var(unbiased=False) + eps).sqrt() for i in range(n)])
        matrix = w[:, None] * centring / std[:, None]
        z = matrix @ v + b
        results.append((v * (matrix.T @ (r / _stab(z, epsilon)))).reshape(xs.shape))
    return torch.stack(results)


@pytest.mark.parametrize("epsilon", [0.0, 1e-3])
@pytest.mark.parametrize("shape", [(5,), (2, 3)])
def test_layer_norm_rule_matches_dense_reference(shape, epsilon):
    x = leaf(3, 2, *shape)
    weight, bias = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    relevance = torch.randn_like(x)
    output = layer_norm_rule(x, shape, weight, bias, 1e-5, epsilon)
    torch.testing.assert_close(output, F.layer_norm(x, shape, weight, bias, 1e-5))
    (ours,) = backward(output, relevance, x)
    size = weight.numel()
    expected = dense_normalization_reference(x, relevance, lambda i: i // size, lambda i: weight.flatten()[i % size],
                                             lambda i: bias.flatten()[i % size], 1e-5, epsilon)
    torch.testing.assert_close(ours, expected)


def test_layer_norm_rule_conserves_without_bias():
    x = leaf(4, 7)
    weight = torch.randn(7, dtype=torch.float64)
    relevance = torch.randn_like(x)
    (ours,) = backward(layer_norm_rule(x, (7,), weight, None, 1e-5, 0.0), relevance, x)
    torch.testing.assert_close(ours.sum(1), relevance.sum(1))


def test_group_norm_rule_matches_dense_reference():
    x = leaf(2, 4, 3, 2)
    weight, bias = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    relevance = torch.randn_like(x)
    output = group_norm_rule(x, 2, weight, bias, 1e-5, 1e-4)
    torch.testing.assert_close(output, F.group_norm(x, 2, weight, bias, 1e-5))
    (ours,) = backward(output, relevance, x)
    per_channel = 3 * 2
    expected = dense_normalization_reference(x, relevance, lambda i: i // (2 * per_channel),
                                             lambda i: weight[i // per_channel], lambda i: bias[i // per_channel],
                                             1e-5, 1e-4)
    torch.testing.assert_close(ours, expected)


LINEAR_MAPS = {
    "mean_dims": (lambda t: t.mean((2, 3)), (2, 3, 4, 5)),
    "sum_dim": (lambda t: torch.sum(t, 1, keepdim=True), (2, 3, 4)),
    "adaptive_avg_pool2d": (lambda t: F.adaptive_avg_pool2d(t, (2, 3)), (2, 2, 5, 7)),
    "avg_pool2d_padded": (lambda t: F.avg_pool2d(t, 3, stride=2, padding=1), (2, 2, 6, 5)),
    "interpolate_nearest": (lambda t: F.interpolate(t, scale_factor=2, mode="nearest"), (2, 2, 3, 3)),
    "interpolate_bilinear": (lambda t: F.interpolate(t, size=(5, 7), mode="bilinear", align_corners=False),
                             (2, 2, 3, 4)),
}


@pytest.mark.parametrize("name", list(LINEAR_MAPS))
def test_proportional_rule_matches_dense_reference(name):
    function, shape = LINEAR_MAPS[name]
    x = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    output = proportional(x, function, 1e-6)
    relevance = torch.randn_like(output)
    (ours,) = backward(output, relevance, x)
    for xs, rs, os in zip(x.detach(), relevance, ours):
        jacobian = torch.autograd.functional.jacobian(lambda t: function(t[None])[0], xs).reshape(rs.numel(), -1)
        z = jacobian @ xs.flatten()
        expected = xs.flatten() * (jacobian.T @ (rs.flatten() / _stab(z, 1e-6)))
        torch.testing.assert_close(os.flatten(), expected)


@pytest.mark.parametrize("dim", [-1, 1])
def test_softmax_rule_matches_attnlrp_formula(dim):
    """R_x_i = x_i (R_i - s_i sum_j R_j), written out element by element along ``dim``."""
    x = leaf(2, 3, 5)
    relevance = torch.randn(2, 3, 5, dtype=torch.float64)
    output = softmax_rule(x, dim)
    torch.testing.assert_close(output, torch.softmax(x, dim))
    (ours,) = backward(output, relevance, x)
    moved_x, moved_r = x.detach().movedim(dim, -1), relevance.movedim(dim, -1)
    expected = torch.empty_like(moved_x)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in moved_x.shape[:-1])):
        row_x, row_r = moved_x[tuple(index)], moved_r[tuple(index)]
        s = torch.exp(row_x) / torch.exp(row_x).sum()
        for i in range(row_x.shape[0]):
            expected[tuple(index) + (i,)] = row_x[i] * (row_r[i] - s[i] * row_r.sum())
    torch.testing.assert_close(ours, expected.movedim(-1, dim))


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_uniform_rule_of_a_batched_matrix_product_matches_its_formula(epsilon):
    """R_a[b,i,k] = 1/2 sum_j a[b,i,k] c[b,k,j] R[b,i,j] / stab(y[b,i,j]); R_c likewise; with epsilon 0 and no bias
    both halves add up to the output relevance."""
    a, c = leaf(2, 3, 4), leaf(1, 4, 5)  # c broadcast over the batch
    relevance = torch.randn(2, 3, 5, dtype=torch.float64)
    output = bilinear_rule(torch.matmul, a, c, epsilon=epsilon)
    y = (a @ c).detach()
    torch.testing.assert_close(output, y)
    ours_a, ours_c = backward(output, relevance, a, c)
    share = relevance / _stab(y, epsilon)
    contributions = a.detach()[:, :, :, None] * c.detach()[:, None, :, :]  # [b, i, k, j]
    expected_a = 0.5 * (contributions * share[:, :, None, :]).sum(3)
    expected_c = 0.5 * (contributions * share[:, :, None, :]).sum((0, 1))[None]
    torch.testing.assert_close(ours_a, expected_a)
    torch.testing.assert_close(ours_c, expected_c)
    if epsilon == 0:
        torch.testing.assert_close(ours_a.sum() + ours_c.sum(), relevance.sum())


def test_product_with_a_constant_factor_is_the_epsilon_rule_of_a_linear_map():
    a, weight = leaf(3, 4), torch.randn(4, 2, dtype=torch.float64)
    relevance = torch.randn(3, 2, dtype=torch.float64)
    output = bilinear_rule(torch.matmul, a, weight, shares=(1.0, 0.0), epsilon=0.0)
    (ours,) = backward(output, relevance, a)
    expected = a.detach() * ((relevance / (a @ weight).detach()) @ weight.T)
    torch.testing.assert_close(ours, expected)


def test_uniform_rule_of_an_elementwise_product():
    a, b = leaf(2, 6), leaf(2, 6)
    relevance = torch.randn(2, 6, dtype=torch.float64)
    ours_a, ours_b = backward(bilinear_rule(torch.mul, a, b, epsilon=0.0), relevance, a, b)
    torch.testing.assert_close(ours_a, relevance / 2)  # a b R / (a b) / 2
    torch.testing.assert_close(ours_b, relevance / 2)


@pytest.mark.parametrize("shares", [(0.5, 0.5), (1.0, 0.0), (0.25, 0.75)])
@pytest.mark.parametrize("epsilon", [0.0, 1e-6, 0.5])
def test_elementwise_product_rule_matches_its_formula_with_a_stabilizer(shares, epsilon):
    """``R_a = w_a a * b R / stab(a b)`` (and ``R_b`` alike), also with zeros in the product, and with broadcasting
    (the general vector-Jacobian path) the same formula summed over the broadcast dimension."""
    from torchlrp.functional.stabilize import stabilize

    a, b = leaf(3, 5), leaf(3, 5)
    with torch.no_grad():
        a[0, 0] = 0.0
    relevance = torch.randn(3, 5, dtype=torch.float64)
    ours_a, ours_b = backward(bilinear_rule(torch.mul, a, b, shares, epsilon=epsilon), relevance, a, b)
    product = (a * b).detach()
    ratio = relevance * product / stabilize(product, epsilon)
    for ours, share in ((ours_a, shares[0]), (ours_b, shares[1])):
        if share:
            torch.testing.assert_close(ours, share * ratio)
        else:
            assert ours is None or not ours.abs().sum()
    row = leaf(1, 5)
    ours_a, ours_row = backward(bilinear_rule(torch.mul, a, row, shares, epsilon=epsilon), relevance, a, row)
    product = (a * row).detach()
    ratio = relevance * product / stabilize(product, epsilon)
    if shares[1]:
        torch.testing.assert_close(ours_row, shares[1] * ratio.sum(0, keepdim=True))
