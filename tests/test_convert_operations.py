"""The operation-level conversion: per-call marks, weight tying, the first layer, operations, errors, registry."""
import copy
import io
import math
import operator

import pytest
import torch
import torch.nn.functional as F

import torchlrp as lrp
from torchlrp.operations.registry import OperationEntry

from .reference import reference_relevance


class Tied(torch.nn.Module):
    """One conv called twice: once on a possibly negative input feeding a ReLU, once on a non-negative input."""

    def __init__(self, tied=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.second = self.conv if tied else copy.deepcopy(self.conv)
        self.head = torch.nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = self.second(h) + x
        return self.head(torch.relu(h).flatten(1))


@pytest.mark.parametrize("rule", ["epsilon", "zplus", "gamma", "alpha2beta1", "eps-gamma-box"])
def test_tied_layer_explained_as_its_untied_copy(rule):
    rule_object = lrp.EpsilonGammaBox(-3.0, 3.0) if rule == "eps-gamma-box" else rule
    tied = Tied().double().eval()
    untied = Tied(tied=False).double().eval()
    untied.load_state_dict(tied.state_dict(), strict=False)
    untied.second.load_state_dict(tied.conv.state_dict())
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    converted_tied, converted_untied = lrp.convert(tied), lrp.convert(untied)
    with torch.no_grad():
        torch.testing.assert_close(converted_tied(x), tied(x), rtol=1e-12, atol=1e-12)
    ours = lrp.explain(converted_tied, x, target=1, rule=rule_object)
    expected = lrp.explain(converted_untied, x, target=1, rule=rule_object)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    # the two calls carry their own marks
    calls = [n.kwargs for n in converted_tied.graph.nodes if n.op == "call_module" and n.target == "conv"]
    assert [c["input_nonnegative"] for c in calls] == [False, True]
    assert [c["feeds_rectifier"] for c in calls] == [True, False]
    assert [c["first"] for c in calls] == [True, False]


class HeadFirst(torch.nn.Module):
    """The head is registered before the first conv."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(2 * 4 * 4, 3)
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_first_layer_is_the_first_one_called():
    model = HeadFirst().double().eval()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    converted = lrp.convert(model)
    ours = lrp.explain(converted, x, target=0, rule=lrp.EpsilonGammaBox(0.0, 1.0), start="logit")
    # the reference: z^B on the conv (first layer met), epsilon on the head
    conv_out = torch.relu(model.conv(x))
    head_in = conv_out.flatten(1).detach()
    start = torch.zeros(2, 3, dtype=torch.float64)
    start[:, 0] = model(x)[:, 0].detach()
    relevance_head = reference_relevance(model.head, "epsilon", head_in, start, epsilon=1e-6)
    expected = reference_relevance(model.conv, "zbox", x, relevance_head.view_as(conv_out) * (conv_out > 0),
                                   low=0.0, high=1.0)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-12)


class Gated(torch.nn.Module):
    """Squeeze-excitation-like gate, layer scale, SiLU, a mean and a subtraction."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.squeeze = torch.nn.Conv2d(4, 4, 1)
        self.scale = torch.nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.head = torch.nn.Linear(4, 3, bias=False)

    def forward(self, x):
        h = F.silu(self.conv(x))
        gate = torch.sigmoid(self.squeeze(h.mean((2, 3), keepdim=True)))
        h = self.scale * (h * gate)
        h = h - 0.0 * h.detach()
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def test_gate_layer_scale_and_activation_conserve_and_give_the_gate_nothing():
    model = Gated().double().eval()
    converted = lrp.convert(model)
    names = {name for name, _ in converted.named_modules()}
    assert {"silu", "mean", "sigmoid", "mul", "mul_1", "adaptive_avg_pool2d"} <= names
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-12, atol=1e-12)
    relevance = lrp.explain(converted, x, rule="zero", start="logit")
    torch.testing.assert_close(relevance.flatten(1).sum(1), model(x).max(1).values.detach(), rtol=1e-9, atol=0)
    # the gate branch receives nothing: it is detached, so its layers do not even run a backward
    with lrp.trace.collect(converted, layers=["squeeze", "conv"]) as recorded:
        lrp.explain(converted, x, rule="zero", start="logit")
    assert recorded.get("squeeze") is None and recorded["conv"].abs().sum() > 0


class EncoderDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.down = torch.nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False)
        self.up = torch.nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.out = torch.nn.Conv2d(3, 1, 1, bias=False)

    def forward(self, x):
        h = torch.relu(self.down(x))
        skip = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
        return self.out(torch.cat([torch.relu(self.up(h)), skip], 1))


def test_encoder_decoder_with_output_relevance_conserves():
    model = EncoderDecoder().double().eval()
    converted = lrp.convert(model)
    assert isinstance(converted.up, lrp.ConvTranspose2d)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    output = model(x).detach()
    relevance = lrp.explain(converted, x, rule="zero", output_relevance=output)
    torch.testing.assert_close(relevance.flatten(1).sum(1), output.flatten(1).sum(1), rtol=1e-9, atol=0)


def test_standalone_batch_norm_and_layer_norm_conserve():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.Conv2d(2, 3, 3, bias=False),
                                torch.nn.GroupNorm(1, 3, affine=False), torch.nn.Flatten(),
                                torch.nn.LayerNorm(27, bias=False), torch.nn.Linear(27, 2, bias=False)).double()
    model[0].running_var.uniform_(0.5, 2)
    model[0].weight.data.uniform_(0.5, 1.5)
    model[0].bias.data.zero_()
    model.eval()
    converted = lrp.convert(model)
    assert isinstance(converted, torch.nn.Sequential) and isinstance(converted[0], lrp.modules.BatchNorm2d)
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    relevance = lrp.explain(converted, x, rule="zero", start="logit")
    torch.testing.assert_close(relevance.flatten(1).sum(1), model(x).max(1).values.detach(), rtol=1e-9, atol=0)


def test_inplace_operation_on_a_reused_tensor_is_explained_as_it_runs():
    """A traced rewrite out of place would change what the model computes (``h`` is read after ``h.relu_()``):
    ``convert`` says so and explains the model at run time, where its forward runs as written."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)

        def forward(self, x):
            h = self.conv(x)
            y = h.relu_()
            return (y + h).flatten(1)

    model = Model().double()
    with pytest.warns(UserWarning, match="updates tensors in place that it reads again"):
        converted = lrp.convert(model)
    assert not isinstance(converted, torch.fx.GraphModule)
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)
    assert torch.isfinite(lrp.explain(converted, x, rule="zero")).all()


def test_final_functional_softmax_is_skipped_and_registry_extends():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return F.softmax(self.fc(torch.sin(x)), dim=1)

    with pytest.raises(lrp.ConversionError, match="sin"):
        lrp.convert(Model())
    registry = lrp.default_registry()
    registry.add_function(torch.sin, OperationEntry("identity"))
    converted = lrp.convert(Model(), registry=registry)
    x = torch.randn(2, 4)
    relevance = lrp.explain(converted, x, rule="zero", start="logit")
    with lrp.rules_applied(converted, "epsilon") as state:
        probabilities = converted(x)
    torch.testing.assert_close(probabilities, converted(x))  # explain mode gives the plain forward's output
    logits = state.output_scores
    torch.testing.assert_close(logits.softmax(1), probabilities)
    # relevance passes the softmax unchanged; LRP-0 with R = z_t gives a_i w_ti at sin's output a = sin(x), and the
    # entry keeps sin's call, so its gradient carries that to x
    top = logits.argmax(1)
    at_sin = torch.sin(x) * converted.fc.weight.detach()[top]
    expected = at_sin * torch.cos(x)
    torch.testing.assert_close(relevance, expected, rtol=1e-5, atol=1e-6)


def test_converted_model_keeps_structure_state_dict_and_copies():
    import torchvision

    model = torchvision.models.mobilenet_v3_small(num_classes=5).eval()
    converted = lrp.convert(model)
    assert isinstance(converted.features, torch.nn.Sequential) and isinstance(converted.features[0][0], lrp.Conv2d)
    extra = set(converted.state_dict()) - set(model.state_dict())
    assert all(key.endswith(".0.bias") for key in extra)  # biases of the convs that took in their batch norm
    x = torch.randn(1, 3, 32, 32)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(converted), torch.load(buffer, weights_only=False)):
        with torch.no_grad():
            torch.testing.assert_close(other(x), converted(x))
        torch.testing.assert_close(lrp.explain(other, x), lrp.explain(converted, x))


def test_operator_table_entries_are_complete():
    registry = lrp.default_registry()
    for function in (operator.add, torch.cat, F.silu, F.layer_norm, F.adaptive_avg_pool2d, F.max_pool2d):
        assert function in registry.functions
    for name in ("mean", "view", "permute", "chunk", "add_", "mul"):
        assert name in registry.methods


class _ActivationBetweenLayers(torch.nn.Module):
    def __init__(self, view: bool):
        super().__init__()
        self.view = view
        self.first, self.second = torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)

    def forward(self, x):
        hidden = F.gelu(self.first(x))
        if self.view:  # a view between activation and layer: the layer keeps its own input
            hidden = hidden.view(hidden.shape)
        return self.second(hidden)


@pytest.mark.parametrize("second_rule", [lrp.rules.Epsilon(), lrp.rules.ZPlus(), lrp.rules.Flat(),
                                         lrp.rules.Gamma(0.5), lrp.rules.Gradient()])
def test_layer_after_identity_rule_activation_recomputes_its_input_exactly(second_rule):
    """A layer after GELU keeps the GELU's input (already kept by the layer before) and recomputes GELU in the
    backward; relevance equals that of the same model where the layer keeps its own input."""
    torch.manual_seed(0)
    recomputing = _ActivationBetweenLayers(view=False).double().eval()
    keeping = _ActivationBetweenLayers(view=True).double().eval()
    keeping.load_state_dict(recomputing.state_dict())
    x = torch.randn(4, 5, dtype=torch.float64)
    composite = lrp.Composite(by_name={"second": second_rule}, default=lrp.rules.Epsilon())
    expected = lrp.explain(lrp.convert(keeping), x, rule=composite)
    torch.testing.assert_close(lrp.explain(lrp.convert(recomputing), x, rule=composite), expected, rtol=1e-12, atol=0)


class _SelfAttention(torch.nn.Module):
    """One attention head over tokens, a gated linear unit, mean pooling and a head (bias-free)."""

    def __init__(self, softmax: bool = True):
        super().__init__()
        self.softmax = softmax
        self.query, self.key, self.value = (torch.nn.Linear(6, 6, bias=False) for _ in range(3))
        self.gate, self.up = torch.nn.Linear(6, 8, bias=False), torch.nn.Linear(6, 8, bias=False)
        self.head = torch.nn.Linear(8, 3, bias=False)

    def forward(self, x):
        scores = self.query(x) @ self.key(x).transpose(-2, -1) / 6 ** 0.5
        weights = scores.softmax(dim=-1) if self.softmax else scores
        mixed = torch.matmul(weights, self.value(x))
        hidden = self.gate(mixed) * self.up(mixed)  # a product of two activations: the uniform rule
        return self.head(hidden.mean(1))


def test_attention_converts_and_bilinear_products_conserve():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    model = _SelfAttention().double().eval()
    converted = lrp.convert(model)
    kinds = [type(module).__name__ for module in converted.modules()]
    assert kinds.count("Softmax") == 1 and kinds.count("Bilinear") == 3  # q k^T, weights v, the gated unit
    torch.testing.assert_close(converted(x), model(x), rtol=1e-12, atol=1e-12)
    relevance = lrp.explain(converted, x, rule="zero", start="logit")
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()
    # without the softmax every operation is linear or bilinear and bias-free: LRP-0 conserves exactly
    bilinear = _SelfAttention(softmax=False).double().eval()
    bilinear.load_state_dict(model.state_dict())
    relevance = lrp.explain(lrp.convert(bilinear), x, rule="zero", start="logit")
    torch.testing.assert_close(relevance.flatten(1).sum(1), bilinear(x).max(1).values, rtol=1e-9, atol=0)
