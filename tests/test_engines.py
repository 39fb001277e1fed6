"""One semantics: every call of the operation table gets the same explanation from both engines.

For every call the table declares (function, tensor method, module type), a tiny model uses it twice -- traceable
(``convert`` rewrites its graph) and with a data-dependent branch (the run-time engine explains its forward) -- and
both give the same relevance (1e-8 relative, float64) under LRP-0, EpsilonPlus and AttnLRP, or the same refusal.
A new entry without a use in ``engine_catalogue.py`` fails ``test_every_call_of_the_table_has_a_use``.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import torchlrp as lrp

from .engine_catalogue import MODULES, USES, Model, labels

RULES = {"lrp0": "zero", "epsilon_plus": lrp.EpsilonPlus(), "attnlrp": lrp.Composite(default="zero")}
#: calls whose use needs a device this machine may not have
NEEDS_CUDA = {"Tensor.cuda"}
#: Python functions of other libraries: torch's function mode does not see them, so at run time their torch calls
#: are explained one by one, which stabilizes the additive mask's share where the traced module stabilizes the
#: softmax (equal without a stabilizer: LRP-0, AttnLRP; within 1e-4 under the composites' epsilon 1e-6)
PYTHON_FUNCTIONS = {"torchvision.models.swin_transformer.shifted_window_attention"}
#: ``x[i] = v`` writes into a tensor that is read again (it returns nothing): ``convert`` explains such a model at run
#: time, where the forward runs as written (a rewrite out of place would change what it computes)
RUN_TIME_ONLY = {"operator.setitem", "Tensor.__setitem__"}
LABELS = labels(lrp.default_registry())


def test_every_call_of_the_table_has_a_use():
    missing = set(LABELS) - set(USES) - set(MODULES)
    assert not missing, sorted(missing)


def _convert(model):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*cannot trace")
        return lrp.convert(model)


@pytest.mark.parametrize("label", LABELS)
def test_both_engines_explain_a_call_alike(label):
    if label in NEEDS_CUDA and not torch.cuda.is_available():
        pytest.skip(f"{label} needs a CUDA device")
    if "grouped_mm" in label:  # (float32 on the CPU: tests/test_huggingface_models.py's grouped_mm experts)
        try:
            torch._grouped_mm(torch.ones(2, 2, dtype=torch.float64), torch.ones(1, 2, 2, dtype=torch.float64),
                              offs=torch.tensor([2], dtype=torch.int32))
        except (RuntimeError, NotImplementedError) as error:
            pytest.skip(f"{label} has no float64 kernel on this device ({type(error).__name__}); its float32 use "
                        f"is tested with the Hugging Face mixtures of experts")
    traceable, untraceable = Model(label, untraceable=False).double().eval(), Model(label, untraceable=True).double()
    untraceable.load_state_dict(traceable.state_dict())
    untraceable.eval()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) - 0.25
    try:
        traced = lrp.convert(traceable)
    except lrp.ConversionError as refusal:
        run_time = _convert(untraceable)
        with pytest.raises(lrp.ConversionError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lrp.explain(run_time, x)
        assert str(refusal)
        return
    assert isinstance(traced, torch.fx.GraphModule) != (label in RUN_TIME_ONLY), "the traceable model must be traced"
    run_time = _convert(untraceable)
    assert not isinstance(run_time, torch.fx.GraphModule)
    with torch.no_grad():
        torch.testing.assert_close(run_time(x), traceable(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(traced(x), traceable(x), rtol=1e-12, atol=1e-12)
    for name, rule in RULES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = lrp.explain(traced, x, target=0, rule=rule)
            ours = lrp.explain(run_time, x, target=0, rule=rule)
        assert torch.isfinite(expected).all()
        scale = float(expected.abs().max()) or 1.0
        tolerance = 1e-4 if label in PYTHON_FUNCTIONS and name == "epsilon_plus" else 1e-8
        torch.testing.assert_close(ours, expected, rtol=tolerance, atol=tolerance * scale,
                                   msg=lambda m: f"{name}: {m}")


class _Gated(torch.nn.Module):
    """A signal times a gate computed from it, the gate broadcast in one of several ways."""

    def __init__(self, gate, untraceable):
        super().__init__()
        self.gate, self.untraceable = gate, untraceable
        self.conv = torch.nn.Conv2d(3, 4, 1, bias=False)
        self.head = torch.nn.Linear(4, 2, bias=False)

    def forward(self, x):
        if self.untraceable and float(x.detach().abs().sum()) < 0:
            x = -x
        h = self.conv(x)
        return self.head((h * self.gate(h)).mean((2, 3)))


GATES = {
    "sigmoid of the mean": lambda h: torch.sigmoid(h.mean((2, 3), keepdim=True)),
    "hardsigmoid, viewed": lambda h: F.hardsigmoid(h.mean((2, 3))).view(2, 4, 1, 1),
    "sigmoid, expanded": lambda h: torch.sigmoid(h.amax((2, 3), keepdim=True) - 1.0).expand_as(h),
    "softmax over channels": lambda h: torch.softmax(h.mean((2, 3)), 1)[:, :, None, None],
}


@pytest.mark.parametrize("gate", GATES)
def test_a_gate_is_a_gate_in_both_engines(gate):
    """A gate's product passes all relevance to the signal (the gate held constant), in both engines."""
    traceable = _Gated(GATES[gate], untraceable=False).double().eval()
    untraceable = _Gated(GATES[gate], untraceable=True).double().eval()
    untraceable.load_state_dict(traceable.state_dict())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    traced, run_time = lrp.convert(traceable), _convert(untraceable)
    for rule in RULES.values():
        expected = lrp.explain(traced, x, target=0, rule=rule)
        torch.testing.assert_close(lrp.explain(run_time, x, target=0, rule=rule), expected, rtol=1e-8, atol=1e-12)
    # the reference: the same model with the gate a constant of the input (detached) -- the signal takes it all
    constant = _Gated(lambda h: GATES[gate](h.detach()), untraceable=False).double().eval()
    constant.load_state_dict(traceable.state_dict())
    torch.testing.assert_close(lrp.explain(traced, x, target=0, rule="zero"),
                               lrp.explain(lrp.convert(constant), x, target=0, rule="zero"), rtol=1e-10, atol=1e-12)


def test_timm_evonorms_explain_alike_and_conserve():
    layers = pytest.importorskip("timm.layers")
    names = [name for name in dir(layers) if name.startswith("EvoNorm2d")]
    assert len(names) >= 6
    for name in names:
        kind = getattr(layers, name)

        class Net(torch.nn.Module):
            def __init__(self, untraceable):
                super().__init__()
                self.untraceable = untraceable
                self.conv = torch.nn.Conv2d(3, 16, 3, bias=False)
                self.norm = kind(16, groups=4) if "S" in name else kind(16)
                self.head = torch.nn.Linear(16, 3, bias=False)
                with torch.no_grad():
                    for parameter_name, parameter in self.norm.named_parameters():
                        parameter.zero_() if parameter_name == "bias" else parameter.uniform_(0.5, 1.5)

            def forward(self, x):
                if self.untraceable and float(x.detach().sum()) > 1e9:
                    return x
                return self.head(self.norm(self.conv(x)).mean((2, 3)))

        torch.manual_seed(0)
        traceable, untraceable = Net(False).double().eval(), Net(True).double().eval()
        untraceable.load_state_dict(traceable.state_dict())
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        traced = lrp.convert(traceable)
        assert isinstance(traced, torch.fx.GraphModule), name
        expected, report = lrp.explain(traced, x, rule="zero", start="logit", return_conservation=True)
        ours = lrp.explain(_convert(untraceable), x, rule="zero", start="logit")
        torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-12, msg=name)
        assert report.conserved() and float(expected.abs().sum()) > 0, name


class _Sine(torch.nn.Module):
    def __init__(self, untraceable):
        super().__init__()
        self.untraceable = untraceable
        self.body, self.head = torch.nn.Linear(5, 4, bias=False), torch.nn.Linear(4, 2, bias=False)

    def forward(self, x):
        if self.untraceable and float(x.detach().abs().sum()) < 0:
            x = -x
        return self.head(torch.sin(self.body(x)) + self.body(x).sin())


def test_a_users_entry_with_a_build_is_honoured_by_both_engines():
    """One entry through the public API (a function and a method at once, with an operation module): both engines
    use it, and give the identity rule's relevance (the sine's output relevance passed on unchanged)."""
    registry = lrp.default_registry()
    registry.add(lrp.OperationEntry("identity (a user's entry)", lambda call, view: lrp.modules.Activation(torch.sin)),
                 torch.sin, "sin")
    traceable, untraceable = _Sine(False).double(), _Sine(True).double()
    untraceable.load_state_dict(traceable.state_dict())
    x = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(lrp.ConversionError, match="sin"):  # the control: without the entry, refused
        lrp.convert(traceable)
    traced = lrp.convert(traceable, registry=registry)
    assert sum(isinstance(m, lrp.modules.Activation) for m in traced.modules()) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_time = lrp.convert(untraceable, registry=registry)
    for rule in RULES.values():
        torch.testing.assert_close(lrp.explain(run_time, x, rule=rule), lrp.explain(traced, x, rule=rule),
                                   rtol=1e-10, atol=1e-12)
    # LRP-0 with zero biases and the identity rule conserves: the logit reaches the input
    relevance, report = lrp.explain(run_time, x, rule="zero", start="logit", return_conservation=True)
    assert report.conserved() and report.unruled == {}


class _TalkingHeads(torch.nn.Module):
    """Attention whose weights are mixed across heads after the softmax (CaiT's, EfficientFormerV2's talking
    heads): a linear map over the heads."""

    def __init__(self, untraceable, conv=False):
        super().__init__()
        self.untraceable = untraceable
        self.qkv = torch.nn.Linear(8, 24, bias=False)
        self.mix = torch.nn.Conv2d(2, 2, 1, bias=False) if conv else torch.nn.Linear(2, 2, bias=False)
        self.conv = conv
        self.head = torch.nn.Linear(8, 3, bias=False)

    def forward(self, x):
        if self.untraceable and float(x.detach().abs().sum()) < 0:
            x = -x
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1)).softmax(-1)
        attention = self.mix(attention) if self.conv else self.mix(attention.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head((attention @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], 8).mean(1))


@pytest.mark.parametrize("conv", [False, True])
def test_talking_heads_conserve_under_cp_lrp_in_both_engines(conv):
    traceable, untraceable = _TalkingHeads(False, conv).double().eval(), _TalkingHeads(True, conv).double().eval()
    untraceable.load_state_dict(traceable.state_dict())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    rule = lrp.Composite(default="zero", attention="cp")
    traced = lrp.convert(traceable)
    relevance, report = lrp.explain(traced, x, rule=rule, start="logit", return_conservation=True)
    assert report.conserved(), report
    torch.testing.assert_close(lrp.explain(_convert(untraceable), x, rule=rule, start="logit"), relevance,
                               rtol=1e-8, atol=1e-12)


class _Auxiliary(torch.nn.Module):
    """VOLO's auxiliary head (a maximum over tokens, scaled by a number), an auxiliary head alone, or a constant
    shift of the input (a patch embedding's ``2 * (x - 0.5)``)."""

    def __init__(self, kind, untraceable):
        super().__init__()
        self.kind, self.untraceable = kind, untraceable
        self.body = torch.nn.Linear(4, 6, bias=False)
        self.head, self.aux = torch.nn.Linear(6, 3, bias=False), torch.nn.Linear(6, 3, bias=False)

    def forward(self, x):
        if self.untraceable and float(x.detach().sum()) > 1e9:
            return x[:, 0, :3]
        if self.kind == "shift":
            x = 2 * (x - 0.5)
        h = self.body(x)
        if self.kind == "volo":
            return self.head(h[:, 0]) + 0.5 * self.aux(h[:, 1:]).max(1)[0]
        if self.kind == "auxiliary alone":
            return 0.5 * self.aux(h).amax(1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("kind", ["volo", "auxiliary alone", "shift"])
def test_a_maximum_scaled_by_a_number_is_a_max_pooling_and_a_shift_is_reported(kind):
    """A maximum that does not scale an activation is a max pooling (winner takes all), not a normalizer held
    constant; a constant shift takes its share, reported at run time as in the traced graph; both conserve."""
    torch.manual_seed(0)
    traceable, untraceable = _Auxiliary(kind, False).double().eval(), _Auxiliary(kind, True).double().eval()
    untraceable.load_state_dict(traceable.state_dict())
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    expected, traced_report = lrp.explain(lrp.convert(traceable), x, rule="zero", start="logit",
                                          return_conservation=True)
    ours, report = lrp.explain(_convert(untraceable), x, rule="zero", start="logit", return_conservation=True)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    assert report.conserved() and traced_report.conserved()
    assert (kind == "shift") == bool(report.absorbed) and float(expected.abs().sum()) > 0
