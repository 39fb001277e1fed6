"""Layers called as functions on parameters, padding, layer subclasses and the small operations of third-party code.

A model written with ``F.conv2d``/``F.linear``/``F.batch_norm``/``F.pad`` on its parameters must be explained exactly
like its twin written with modules (same relevance to 1e-12, every composite), traced and at run time; each new
operation rule is checked against its formula.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchlrp as lrp

COMPOSITES = {
    "epsilon": lambda: "epsilon", "zero": lambda: "zero", "gamma": lambda: lrp.rules.Gamma(0.25),
    "alpha2beta1": lambda: "alpha2beta1", "EpsilonPlus": lrp.EpsilonPlus, "EpsilonPlusFlat": lrp.EpsilonPlusFlat,
    "EpsilonAlpha2Beta1": lrp.EpsilonAlpha2Beta1, "EpsilonGammaBox": lambda: lrp.EpsilonGammaBox(-3.0, 3.0),
    "flat-first": lambda: lrp.Composite(first="flat", by_type={nn.Conv2d: "zplus"}, default="epsilon"),
}


def _randomize(model):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.double().eval()


class ModuleNet(nn.Module):
    """The reference: torch's layers."""

    def __init__(self, padding_mode="zeros"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode=padding_mode)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, dilation=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(x))  # a batch norm after a ReLU: its own affine rule
        return self.fc(x.mean((2, 3)))


class SamePadConv(nn.Conv2d):
    """timm's Conv2dSame / lukemelas' Conv2dStaticSamePadding: an nn.Conv2d subclass padding first."""

    def __init__(self, *args, pad_mode="constant", **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d(1) if pad_mode == "constant" else None
        self.pad_mode = pad_mode

    def forward(self, x):
        x = self.pad(x) if self.pad is not None else F.pad(x, (1, 1, 1, 1), mode=self.pad_mode)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: F.batch_norm on its parameters, then its activation."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return torch.relu(x)


class FunctionalNet(nn.Module):
    """The same network with functional calls on parameters (a layer subclass, F.pad, F.batch_norm, F.linear)."""

    def __init__(self, pad_mode="constant", untraceable=False):
        super().__init__()
        self.untraceable = untraceable  # data-dependent control flow: torch.fx cannot trace it (the run-time mode)
        self.conv1 = SamePadConv(3, 8, 3, pad_mode=pad_mode)
        self.bn1 = BatchNormAct(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.bn2 = BatchNormAct(8)
        self.bn3 = BatchNormAct(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        if self.untraceable and float(x.sum()) > 1e9:
            return x
        x = self.bn1(self.conv1(x))
        x = self.bn2(self.conv2(x))
        x = self.bn3(x)
        return F.linear(x.mean((2, 3)), self.fc.weight, self.fc.bias)


def _pair(pad_mode="constant", untraceable=False):
    torch.manual_seed(0)
    reference = _randomize(ModuleNet({"constant": "zeros"}.get(pad_mode, pad_mode)))
    functional = FunctionalNet(pad_mode, untraceable).double().eval()
    functional.load_state_dict(reference.state_dict(), strict=False)
    functional.conv1.load_state_dict(reference.conv1.state_dict())
    return reference, functional


@pytest.mark.parametrize("untraceable", [False, True], ids=["traced", "run-time"])
@pytest.mark.parametrize("pad_mode", ["constant", "reflect", "replicate", "circular"])
def test_functional_model_equals_its_module_twin(pad_mode, untraceable):
    reference, functional = _pair(pad_mode, untraceable)
    x = torch.randn(3, 3, 9, 9, dtype=torch.float64)
    expected_model = lrp.convert(reference)
    with pytest.warns(UserWarning, match="cannot trace") if untraceable else _no_warning():
        converted = lrp.convert(functional)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x), rtol=1e-12, atol=1e-12)
    for label, composite in COMPOSITES.items():
        expected = lrp.explain(expected_model, x, rule=composite())
        relevance = lrp.explain(converted, x, rule=composite())
        torch.testing.assert_close(relevance, expected, rtol=1e-10, atol=1e-12, msg=label)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_functional_batch_norm_folds_like_a_module_one():
    reference, functional = _pair()
    converted = lrp.convert(functional)
    code = converted.code
    assert code.count("fold_batchnorm_tensors(") == 2  # bn1, bn2 fold; bn3 (after a ReLU) is its own affine map
    assert "bn3.batch_norm" in code
    assert functional.bn1.running_mean is not None  # nothing in the model was changed
    torch.testing.assert_close(converted.state_dict()["bn1.running_mean"], functional.bn1.running_mean)


def test_composites_address_functional_calls_by_their_owner():
    _, functional = _pair()
    converted = lrp.convert(functional)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    base = lrp.explain(converted, x, rule="epsilon")
    # F.conv2d inside conv1's forward: conv1 (the module whose forward made the call) or the call's own name
    by_owner = lrp.explain(converted, x, rule=lrp.Composite(by_name={"conv1": "zplus"}, default="epsilon"))
    by_call = lrp.explain(converted, x, rule=lrp.Composite(by_name={"conv1.conv2d": "zplus"}, default="epsilon"))
    assert not torch.allclose(by_owner, base)
    torch.testing.assert_close(by_owner, by_call)
    by_type = lrp.explain(converted, x, rule=lrp.Composite(by_type={nn.Conv2d: "zplus"}, default="epsilon"))
    by_subclass = lrp.explain(converted, x, rule=lrp.Composite(by_type={SamePadConv: "zplus"}, default="epsilon"))
    assert not torch.allclose(by_type, by_subclass)  # SamePadConv names conv1 only, nn.Conv2d both convolutions


def test_weight_standardization_and_computed_weights():
    class StdConv(nn.Conv2d):  # timm's StdConv2d: the weight standardized in the forward
        def forward(self, x):
            weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                                  momentum=0.0, eps=1e-6).reshape_as(self.weight)
            return F.conv2d(x, weight, self.bias, self.stride, self.padding)

    class LoRA(nn.Module):  # a re-parameterized weight W + B @ A and a concatenated bias
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 8))
            self.b, self.a = nn.Parameter(torch.randn(6, 2)), nn.Parameter(torch.randn(2, 8))
            self.q, self.v = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))

        def forward(self, x):
            return F.linear(x, self.weight + self.b @ self.a, torch.cat((self.q, self.v)))

    torch.manual_seed(0)
    conv = StdConv(3, 8, 3, padding=1).double().eval()
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), LoRA().double())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        standardized = F.batch_norm(conv.weight.reshape(1, 8, -1), None, None, training=True, momentum=0.0,
                                    eps=1e-6).reshape_as(conv.weight)
        lora = model[4]
        twin = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 6)).double()
        twin[0].weight.copy_(standardized)
        twin[0].bias.copy_(conv.bias)
        twin[4].weight.copy_(lora.weight + lora.b @ lora.a)
        twin[4].bias.copy_(torch.cat((lora.q, lora.v)))
    converted, expected_model = lrp.convert(model), lrp.convert(twin)
    torch.testing.assert_close(converted(x), twin(x), rtol=1e-12, atol=1e-12)
    for label, composite in COMPOSITES.items():
        torch.testing.assert_close(lrp.explain(converted, x, rule=composite()),
                                   lrp.explain(expected_model, x, rule=composite()), rtol=1e-10, atol=1e-12,
                                   msg=label)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_functional_conv_and_transposed_conv_every_hyperparameter(dims):
    torch.manual_seed(0)
    conv_type = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    transposed_type = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
    conv = conv_type(4, 6, 3, stride=2, padding=1, dilation=2, groups=2).double()
    transposed = transposed_type(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1).double()
    same = conv_type(4, 4, 3, padding="same", dilation=2).double()

    function = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]

    class Calls(nn.Module):
        def __init__(self):
            super().__init__()
            self.same, self.conv, self.transposed = same, conv, transposed

        def forward(self, x):
            x = function(x, self.same.weight, self.same.bias, 1, "same", 2)
            x = function(x, self.conv.weight, self.conv.bias, 2, 1, 2, 2)
            return transpose(x, self.transposed.weight, self.transposed.bias, 2, 1, 1, 2, 1).flatten(1)

    class Modules(nn.Module):
        def __init__(self):
            super().__init__()
            self.same, self.conv, self.transposed = same, conv, transposed

        def forward(self, x):
            return self.transposed(self.conv(self.same(x))).flatten(1)

    x = torch.randn(2, 4, *(9,) * dims, dtype=torch.float64)
    calls, modules = lrp.convert(Calls()), lrp.convert(Modules())
    torch.testing.assert_close(calls(x), Modules()(x), rtol=1e-12, atol=1e-12)
    for rule in ("epsilon", "zplus", "alpha2beta1", lrp.rules.Gamma(0.5), "flat", "wsquare"):
        torch.testing.assert_close(lrp.explain(calls, x, target=0, rule=rule),
                                   lrp.explain(modules, x, target=0, rule=rule), rtol=1e-10, atol=1e-12)


def test_addmm_is_a_linear_layer():
    class Conv1D(nn.Module):  # GPT-2's Conv1D: torch.addmm(bias, x, weight) with weight (in, out)
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(3))

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight)

    module = Conv1D().double()
    linear = nn.Linear(5, 3).double()
    with torch.no_grad():
        linear.weight.copy_(module.weight.t())
        linear.bias.copy_(module.bias)
    x = torch.randn(4, 5, dtype=torch.float64)
    converted = lrp.convert(module)
    assert "addmm" in converted.code
    for rule in ("epsilon", "zero", "zplus", "alpha2beta1"):
        torch.testing.assert_close(lrp.explain(converted, x, rule=rule),
                                   lrp.explain(lrp.convert(nn.Sequential(linear)), x, rule=rule))


def test_subclass_with_its_own_forward_is_not_the_plain_layer():
    class Doubled(nn.Conv2d):  # a user's layer subclass: never mistaken for nn.Conv2d
        def forward(self, x):
            return super().forward(x) * 2.0

    class Relu6Clamp(nn.ReLU):  # a registered module type with another forward: traced through
        def forward(self, x):
            return F.relu6(x)

    model = nn.Sequential(Doubled(2, 4, 3), Relu6Clamp(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double().eval()
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    converted = lrp.convert(model)
    torch.testing.assert_close(converted(x), model(x))
    assert "relu6" in converted.code and "conv2d" in converted.code
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.bias.data.zero_()
    model[3].bias.data.zero_()
    converted = lrp.convert(model)
    relevance = lrp.explain(converted, x, rule="zero", start="logit")
    torch.testing.assert_close(relevance.flatten(1).sum(1), model(x).max(1).values)


def test_padding_modules_follow_the_index_map():
    for module in (nn.ZeroPad2d((1, 2, 0, 1)), nn.ConstantPad1d(2, 0.0), nn.ReflectionPad2d(1),
                   nn.ReplicationPad2d((1, 0, 2, 1)), nn.CircularPad2d(1)):
        dims = 1 if isinstance(module, nn.ConstantPad1d) else 2
        shape = (2, 3, 5) if dims == 1 else (2, 3, 5, 5)
        model = nn.Sequential(module, nn.Flatten(), nn.Linear(torch.numel(module(torch.zeros(shape))) // 2, 4))
        model = model.double()
        x = torch.randn(*shape, dtype=torch.float64)
        converted = lrp.convert(model)
        relevance = lrp.explain(converted, x, target=1, rule="epsilon")
        # the reference: the padded input's relevance sent back by the index map (copies summed)
        padded = module(x).requires_grad_(True)
        start = torch.zeros(2, 4, dtype=torch.float64)
        start[:, 1] = 1
        linear = lrp.convert(nn.Sequential(nn.Flatten(), model[2]))
        padded_relevance = lrp.explain(linear, padded.detach(), target=1, rule="epsilon")
        (expected,) = torch.autograd.grad(module(x.requires_grad_(True)), x, padded_relevance)
        torch.testing.assert_close(relevance, expected, msg=type(module).__name__)
        x.requires_grad_(False)


def test_held_constant_statistics_and_normalize():
    class Normalized(nn.Module):  # F.normalize, x / x.norm(...), GRN (norm, quotient, addcmul), amax scaling
        def __init__(self):
            super().__init__()
            self.gamma, self.beta = nn.Parameter(torch.rand(6)), nn.Parameter(torch.zeros(6))
            self.fc = nn.Linear(6, 3, bias=False)

        def forward(self, x):
            x = F.normalize(x, dim=-1) * 3.0
            x = x / x.norm(dim=-1, keepdim=True)
            g = torch.norm(x, p=2, dim=0, keepdim=True)
            n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
            x = x + torch.addcmul(self.beta, self.gamma, x * n)
            x = x / x.amax(dim=-1, keepdim=True).clamp(min=1.0)
            return self.fc(x)

    model = Normalized().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    converted = lrp.convert(model)
    torch.testing.assert_close(converted(x), model(x))
    relevance = lrp.explain(converted, x, rule="zero", start="logit")
    # every statistic is a constant, the maps are diagonal and conserve: the logit arrives at the input
    torch.testing.assert_close(relevance.sum(1), model(x).max(1).values)
    with torch.no_grad():  # the formula: with statistics constant, y = x * c1 + gamma * x * c2 is diagonal
        reference = lrp.explain(lrp.convert(nn.Sequential(model.fc)), _rescaled(model, x), rule="zero",
                                start="logit")
    torch.testing.assert_close(relevance, reference)


def _rescaled(model, x):
    """What the Normalized model feeds its last layer (the diagonal maps' output): relevance there equals the
    input's."""
    with torch.no_grad():
        x = F.normalize(x, dim=-1) * 3.0
        x = x / x.norm(dim=-1, keepdim=True)
        g = torch.norm(x, p=2, dim=0, keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        x = x + torch.addcmul(model.beta, model.gamma, x * n)
        return x / x.amax(dim=-1, keepdim=True).clamp(min=1.0)


def test_a_statistic_used_otherwise_is_refused():
    class Shifted(nn.Module):
        def forward(self, x):
            return x.norm(dim=-1, keepdim=True) + x.mean(dim=-1, keepdim=True)

    with pytest.raises(lrp.ConversionError, match="statistic of an activation"):
        lrp.convert(Shifted())


def test_a_maximum_used_as_data_is_a_max_pooling():
    class Pooled(nn.Module):  # Hiera's pooling of query strides: amax over a dimension, as data
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2, bias=False)

        def forward(self, x):
            return self.fc(x.view(x.shape[0], 3, 4).amax(dim=1))

    model = Pooled().double()
    x = torch.randn(5, 12, dtype=torch.float64)
    converted = lrp.convert(model)
    assert "held_constant" not in converted.code
    relevance = lrp.explain(converted, x, target=0, rule="zero", start="logit")
    # winner takes all: each maximum gets its column's relevance, the others none
    with torch.no_grad():
        pooled = x.view(5, 3, 4).amax(dim=1)
        column = pooled * model.fc.weight[0]
        expected = (x.view(5, 3, 4) == pooled[:, None]) * column[:, None]
    torch.testing.assert_close(relevance, expected.reshape(5, 12))


def test_softmax_module_inside_the_model_takes_attnlrp():
    class Attention(nn.Module):  # timm's Swin: an nn.Softmax module on the scores
        def __init__(self):
            super().__init__()
            self.softmax = nn.Softmax(dim=-1)
            self.proj = nn.Linear(3, 3)

        def forward(self, x):
            return self.proj(self.softmax(x @ x.transpose(-2, -1)) @ x)

    class Functional(Attention):
        def forward(self, x):
            return self.proj((x @ x.transpose(-2, -1)).softmax(-1) @ x)

    x = torch.randn(2, 4, 3, dtype=torch.float64)
    start = torch.randn(2, 4, 3, dtype=torch.float64)
    attention = Attention().double()
    functional = Functional().double()
    functional.load_state_dict(attention.state_dict())
    assert "softmax" in lrp.convert(attention).code
    for rule in (lrp.Composite(), lrp.Composite(attention="cp")):
        module_relevance = lrp.explain(lrp.convert(attention), x, output_relevance=start, rule=rule)
        function_relevance = lrp.explain(lrp.convert(functional), x, output_relevance=start, rule=rule)
        torch.testing.assert_close(module_relevance, function_relevance)


def test_absorbed_shares_are_reported_once():
    class TwoEmbeddings(nn.Module):  # SAM2-Hiera: an interpolated embedding plus a tiled one, added once
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 2, 2, 3))
            self.window = nn.Parameter(torch.randn(1, 1, 2, 3))
            self.fc = nn.Linear(3, 2, bias=False)

        def forward(self, x):
            embedding = F.interpolate(self.pos, size=(4, 3), mode="bicubic") + self.window.tile((1, 2, 1))
            return self.fc((x + embedding).sum((1, 2)))

    model = TwoEmbeddings().double()
    x = torch.randn(2, 1, 4, 3, dtype=torch.float64)
    relevance, absorbed = lrp.explain(lrp.convert(model), x, target=0, rule="zero", start="logit",
                                      return_absorbed=True)
    assert list(absorbed) == ["add"]  # the sum x + embedding (the sum of the two parameters is a constant)
    torch.testing.assert_close(relevance.sum() + absorbed["add"], model(x)[:, 0].sum().detach())


def test_absorbed_shares_are_reported():
    class Tokens(nn.Module):  # a class token concatenated, a position embedding added by broadcasting
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
            self.pos_embed = nn.Parameter(torch.randn(1, 3, 4))
            self.fc = nn.Linear(4, 2, bias=False)

        def forward(self, x):
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
            return self.fc(x.sum(1))

    model = Tokens().double()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    converted = lrp.convert(model)
    relevance, absorbed = lrp.explain(converted, x, target=0, rule="zero", start="logit", return_absorbed=True)
    assert set(absorbed) == {"cls_token", "add"}  # the token by its name, the embedding by the sum that adds it
    logits = model(x)[:, 0].detach()
    torch.testing.assert_close(relevance.sum() + sum(absorbed.values()), logits.sum())
    # the formula (LRP-0): each entry of the sum gets its value times the linear weight, so the position
    # embedding takes sum_{t,k} pos[t, k] w[k] per sample, the class token sum_k cls[k] w[k]
    weight = model.fc.weight[0].detach()
    torch.testing.assert_close(absorbed["add"], 3 * (model.pos_embed[0].detach() * weight).sum())
    torch.testing.assert_close(absorbed["cls_token"], 3 * (model.cls_token[0, 0].detach() * weight).sum())


def test_dynamic_kernels_are_refused():
    class Dynamic(nn.Module):  # a convolution whose weight is computed from the input
        def forward(self, x):
            return F.conv2d(x, x[:1].expand(2, -1, -1, -1))

    with pytest.raises(lrp.ConversionError, match="weight or bias depends on the input"):
        lrp.convert(Dynamic())


def test_a_forward_torch_fx_cannot_trace_is_explained_at_run_time():
    class Creates(nn.Module):  # Cadene's NASNet-A-Mobile: a module made inside the forward (fx: NameError)
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 2, bias=False)

        def forward(self, x):
            return self.fc(nn.ZeroPad1d((1, 1))(x))

    model = Creates().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="NameError"):
        converted = lrp.convert(model)
    relevance = lrp.explain(converted, x, rule="zero", start="logit")
    torch.testing.assert_close(relevance.sum(1), model(x).max(1).values.detach())

    class Unknown(Creates):  # and anything without a rule there raises, naming the call
        def forward(self, x):
            return self.fc(torch.sin(nn.ZeroPad1d((1, 1))(x)))

    with pytest.warns(UserWarning, match="NameError"):
        converted = lrp.convert(Unknown().double())
    with pytest.raises(lrp.ConversionError, match="sin"):
        lrp.explain(converted, x)


class NewGELU(nn.Module):
    """transformers' NewGELUActivation, written out."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class StarReLU(nn.Module):
    """PoolFormer v2's StarReLU: s * relu(x) ** 2 + b."""

    def __init__(self):
        super().__init__()
        self.scale, self.bias = nn.Parameter(torch.tensor([0.8])), nn.Parameter(torch.tensor([0.1]))

    def forward(self, x):
        return self.scale * F.relu(x) ** 2 + self.bias


class Twin(nn.Module):
    """The same function as one module call (the identity rule's reference)."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


@pytest.mark.parametrize("written, twin", [
    (NewGELU, lambda: nn.GELU(approximate="tanh")),
    (QuickGELU, lambda: nn.SiLU()),  # another function, the same rule: compared through the identity rule below
    (StarReLU, None),
], ids=["tanh-GELU", "quick-GELU", "StarReLU"])
def test_activations_written_as_formulas_take_the_identity_rule(written, twin):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), written(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    converted = lrp.convert(model)
    assert "Activation" in str(converted) or "activation" in converted.code.lower() or "add" in converted.code
    torch.testing.assert_close(converted(x), model(x), rtol=1e-12, atol=1e-12)
    # the identity rule: the relevance of the second layer's input, passed unchanged to the first layer's output
    with torch.no_grad():
        hidden = model[0](x)
        activated = model[1](hidden)
    for rule in ("epsilon", "zero", lrp.EpsilonPlus()):
        relevance = lrp.explain(converted, x, target=1, rule=rule)
        top = lrp.explain(lrp.convert(nn.Sequential(model[2])), activated, target=1, rule=rule)
        first = nn.Sequential(model[0], Twin(lambda t: t))  # identity, so that its output relevance is `top`
        expected = lrp.explain(lrp.convert(first), x, output_relevance=top, rule=rule)
        torch.testing.assert_close(relevance, expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.bias.zero_()
    if written is StarReLU:
        model[1].bias.data.zero_()
    converted = lrp.convert(model)
    relevance = lrp.explain(converted, x, rule="zero", start="logit")
    torch.testing.assert_close(relevance.sum(1), model(x).max(1).values.detach())


class _Scores(nn.Module):
    """BLOOM's attention scores: alibi.baddbmm(q, k^T, beta=1, alpha=1/sqrt(d)), or the same written out."""

    def __init__(self, fused, untraceable=False):
        super().__init__()
        self.fused, self.untraceable = fused, untraceable
        self.q, self.k = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.register_buffer("alibi", torch.randn(2, 1, 3))

    def forward(self, x):
        if self.untraceable and float(x.sum()) > 1e9:
            return x
        q, k = self.q(x), self.k(x).transpose(1, 2)
        if self.fused:
            return torch.baddbmm(self.alibi, q, k, beta=1.0, alpha=0.5)
        return self.alibi + (q @ k) * 0.5


@pytest.mark.parametrize("untraceable", [False, True], ids=["traced", "run-time"])
def test_baddbmm_is_its_written_out_form(untraceable):
    torch.manual_seed(0)
    fused, written = _Scores(True, untraceable).double(), _Scores(False).double()
    written.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    start = torch.randn(2, 3, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="cannot trace") if untraceable else _no_warning():
        converted = lrp.convert(fused)
    reference = lrp.convert(written)
    for rule in ("epsilon", "zero"):
        torch.testing.assert_close(lrp.explain(converted, x, output_relevance=start, rule=rule),
                                   lrp.explain(reference, x, output_relevance=start, rule=rule))


def test_a_quotient_of_activations_holds_the_divisor_constant():
    class Renormalized(nn.Module):  # ConViT: attention renormalized by its own sum
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4, bias=False)
            self.out = nn.Linear(4, 2, bias=False)

        def forward(self, x):
            h = torch.relu(self.fc(x)) + 0.1
            return self.out(h / h.sum(-1, keepdim=True))

    model = Renormalized().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    converted = lrp.convert(model)
    relevance = lrp.explain(converted, x, target=0, rule="zero", start="logit")
    # the formula: with the sum a constant s, the quotient is the diagonal map h -> h / s (relevance unchanged), so
    # the input relevance is that of the layers h = relu(W x) + 0.1 (the constant absorbing its share) below it
    with torch.no_grad():
        h = torch.relu(model.fc(x)) + 0.1
        normalized = h / h.sum(-1, keepdim=True)
        top = normalized * model.out.weight[0] / model(x)[:, :1] * model(x)[:, :1]  # LRP-0 of the last layer
        share = top * (h - 0.1) / h  # the sum with the constant 0.1
        pre = model.fc(x)
        signal = torch.where(pre > 0, share / pre, torch.zeros_like(pre))
        expected = x * (signal @ model.fc.weight)
    torch.testing.assert_close(relevance, expected)


@pytest.mark.parametrize("untraceable", [False, True], ids=["traced", "run-time"])
def test_clamp_of_an_activation_is_an_activation(untraceable):
    class Clipped(nn.Module):  # Gemma 4's ViT clips its projections' activations
        def __init__(self, clip):
            super().__init__()
            self.clip = clip
            self.up, self.down = nn.Linear(4, 6), nn.Linear(6, 2)
            self.hardtanh = nn.Hardtanh(-0.5, 0.5)

        def forward(self, x):
            if untraceable and float(x.sum()) > 1e9:
                return x
            h = self.up(x)
            return self.down(h.clamp(-0.5, 0.5) if self.clip else self.hardtanh(h))

    torch.manual_seed(0)
    clipped, reference = Clipped(True).double(), Clipped(False).double()
    reference.load_state_dict(clipped.state_dict())
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="cannot trace") if untraceable else _no_warning():
        converted = lrp.convert(clipped)
    for rule in ("epsilon", "zero", lrp.EpsilonPlus()):
        torch.testing.assert_close(lrp.explain(converted, x, rule=rule),
                                   lrp.explain(lrp.convert(reference), x, rule=rule))


class _LastState(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, **kwargs)

    def forward(self, x):
        output, _ = self.rnn(x)
        return output[:, -1] if self.rnn.batch_first else output[-1]


def test_lstm_against_the_formula():
    """Arras et al. 2017: gates constant, c_t = f c + i g split in proportion, tanh identity, z_g by LRP-0."""
    torch.manual_seed(0)
    model = _LastState(bias=False).double().eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    start = torch.randn(2, 4, dtype=torch.float64)
    relevance = lrp.explain(lrp.convert(model), x, output_relevance=start, rule="zero")
    with torch.no_grad():  # the forward, keeping every step's values
        w, u = model.rnn.weight_ih_l0, model.rnn.weight_hh_l0
        h, c = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
        steps = []
        for t in range(5):
            z = x[t] @ w.T + h @ u.T
            i, f, g, o = z[:, :4].sigmoid(), z[:, 4:8].sigmoid(), z[:, 8:12].tanh(), z[:, 12:].sigmoid()
            steps.append((h, c, i, f, g, z[:, 8:12]))
            c = f * c + i * g
            h = o * c.tanh()
        expected = torch.zeros_like(x)
        r_h, r_c = start, torch.zeros(2, 4, dtype=torch.float64)
        for t in reversed(range(5)):
            h_prev, c_prev, i, f, g, z_g = steps[t]
            r_c = r_c + r_h                         # h = o tanh(c): o constant, tanh identity
            c_t = f * c_prev + i * g
            r_prev_c, r_g = f * c_prev / c_t * r_c, i * g / c_t * r_c
            signal = r_g / z_g                      # z_g = W_g x + U_g h_prev, LRP-0
            expected[t] = x[t] * (signal @ w[8:12])
            r_h, r_c = h_prev * (signal @ u[8:12]), r_prev_c
    torch.testing.assert_close(relevance, expected)
    torch.testing.assert_close(relevance.sum(), start.sum())  # conserves (zero biases and initial states)


@pytest.mark.parametrize("kwargs", [{"num_layers": 2, "bidirectional": True, "batch_first": True},
                                    {"num_layers": 1, "bias": True}], ids=["2-layer-bidirectional", "bias"])
def test_lstm_keeps_its_outputs_and_explains(kwargs):
    torch.manual_seed(0)
    model = _LastState(**kwargs).double().eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64) if kwargs.get("batch_first") else torch.randn(5, 2, 3,
                                                                                                 dtype=torch.float64)
    converted = lrp.convert(model)
    start = torch.randn(2, 4 * (2 if kwargs.get("bidirectional") else 1), dtype=torch.float64)
    for rule in ("epsilon", "zplus", lrp.Composite(by_type={nn.LSTM: "zero"})):
        relevance, scores = lrp.explain(converted, x, output_relevance=start, rule=rule, return_scores=True)
        torch.testing.assert_close(scores, model(x).detach(), rtol=1e-12, atol=1e-12)
        assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    if not kwargs.get("bias", True):
        return
    for name, parameter in model.named_parameters():
        if "bias" in name:
            parameter.data.zero_()
    relevance = lrp.explain(lrp.convert(model), x, output_relevance=start, rule="zero")
    torch.testing.assert_close(relevance.sum(), start.sum())


class _LastGRUState(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.rnn = nn.GRU(3, 4, **kwargs)

    def forward(self, x):
        output, _ = self.rnn(x)
        return output[:, -1] if self.rnn.batch_first else output[-1]


def test_gru_against_the_formula():
    """Gates constant: n = tanh(W_n x + r U_n h), h' = (1 - z) n + z h, sums split in proportion, LRP-0."""
    torch.manual_seed(0)
    model = _LastGRUState(bias=False).double().eval()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    start = torch.randn(2, 4, dtype=torch.float64)
    relevance = lrp.explain(lrp.convert(model), x, output_relevance=start, rule="zero")
    with torch.no_grad():
        w, u = model.rnn.weight_ih_l0, model.rnn.weight_hh_l0
        h = torch.zeros(2, 4, dtype=torch.float64)
        steps = []
        for t in range(4):
            gx, gh = x[t] @ w.T, h @ u.T
            r, z = (gx[:, :4] + gh[:, :4]).sigmoid(), (gx[:, 4:8] + gh[:, 4:8]).sigmoid()
            a, b = gx[:, 8:], gh[:, 8:]
            n = (a + r * b).tanh()
            steps.append((h, r, z, a, b, n))
            h = (1 - z) * n + z * h
        expected = torch.zeros_like(x)
        r_h = start
        for t in reversed(range(4)):
            h_prev, r, z, a, b, n = steps[t]
            h_t = (1 - z) * n + z * h_prev
            r_n, r_direct = (1 - z) * n / h_t * r_h, z * h_prev / h_t * r_h
            pre = a + r * b
            r_a, r_b = a / pre * r_n, r * b / pre * r_n
            expected[t] = x[t] * ((r_a / a) @ w[8:])
            r_h = r_direct + h_prev * ((r_b / b) @ u[8:]) if t else r_direct
    torch.testing.assert_close(relevance, expected)
    torch.testing.assert_close(relevance.sum(), start.sum())


def test_gru_keeps_its_outputs_and_explains():
    torch.manual_seed(0)
    model = _LastGRUState(num_layers=2, bidirectional=True, batch_first=True).double().eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    converted = lrp.convert(model)
    start = torch.randn(2, 8, dtype=torch.float64)
    for rule in ("epsilon", "zplus"):
        relevance, scores = lrp.explain(converted, x, output_relevance=start, rule=rule, return_scores=True)
        torch.testing.assert_close(scores, model(x).detach(), rtol=1e-12, atol=1e-12)
        assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
