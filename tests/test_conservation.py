"""The conservation report (``explain(return_conservation=True)``) and the run-time check: a call without a rule
that changes the relevance is measured and named, a rule that does not fit is noticed, conserving models stay
silent."""
import warnings

import pytest
import torch

import torchlrp as lrp
from torchlrp.explanation.accounting import Conservation, rule_conserves
from torchlrp.core.rules import AlphaBeta, Epsilon, Flat, Gamma, Gradient, Zero


class _Untraceable(torch.nn.Module):
    """``head(f(body(x)))`` with data-dependent control flow (explained at run time); ``f`` the sine (no rule:
    relevance passes by its gradient) or the identity."""

    def __init__(self, cumulative: bool, bias: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(6, 5, bias=bias)
        self.head = torch.nn.Linear(5, 3, bias=bias)
        self.cumulative = cumulative

    def forward(self, x):
        if float(x.detach().abs().sum()) < 0:  # never true; torch.fx cannot trace it
            x = -x
        hidden = self.body(x)
        if self.cumulative:
            hidden = torch.sin(hidden)
        return self.head(hidden)


def _converted(model, **options):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.fx cannot trace")
        return lrp.convert(model.double().eval(), **options)


def test_a_call_without_a_rule_is_measured_and_warned_about():
    converted = _converted(_Untraceable(cumulative=True), allow_gradient=["sin"])
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"changed the relevance as they passed their gradient \(torch.sin: "):
        relevance, report = lrp.explain(converted, x, rule="zero", start="logit", return_conservation=True)
    # the change at the sine, from its formula: LRP-0 through the head gives the hidden units
    # R_h = h * W^T (R / y); the gradient of the sine sends each unit's relevance times cos(z) to its input z
    model = converted
    with torch.no_grad():
        before = model.body(x)
        hidden = torch.sin(before)
        logits = model.head(hidden)
        target = logits.argmax(1)
        selected = torch.zeros_like(logits).scatter_(1, target[:, None], 1.0)
        unit_relevance = hidden * ((selected * logits / logits) @ model.head.weight)
        into_inputs = unit_relevance * torch.cos(before)
    expected_change = (into_inputs.sum() - unit_relevance.sum())
    assert list(report.unruled) == ["torch.sin"]
    torch.testing.assert_close(report.unruled["torch.sin"], expected_change)
    assert abs(float(expected_change)) > 0.1 * float(report.start.abs().sum())  # a change the test can see
    # LRP-0 without biases conserves everywhere else: the residual is exactly what the sine changed
    torch.testing.assert_close(report.residual, -expected_change)
    torch.testing.assert_close(report.start, logits.max(1).values)
    torch.testing.assert_close(report.input, relevance.sum(1))
    assert not report.conserved()
    assert "changed by torch.sin" in str(report)


def test_a_rule_that_does_not_fit_its_call_is_noticed():
    """A registry entry that declares the gradient to be the sine's rule: no call goes without a rule, every rule in
    play conserves, and yet relevance goes missing -- the check says so."""
    registry = lrp.default_registry()
    registry.add_function(torch.sin, lrp.OperationEntry("identity (wrongly: its gradient)"))
    converted = _converted(_Untraceable(cumulative=True), registry=registry)
    with pytest.warns(UserWarning, match="every rule in play conserves, yet"):
        _, report = lrp.explain(converted, torch.randn(4, 6, dtype=torch.float64), rule="zero",
                                return_conservation=True)
    assert report.unruled == {} and report.losses_allowed == ()


def test_conserving_models_and_models_with_biases_stay_silent():
    x = torch.randn(4, 6, dtype=torch.float64)
    for model, rule in ((_Untraceable(cumulative=False), "zero"), (_Untraceable(cumulative=False, bias=True), "zero"),
                        (_Untraceable(cumulative=False), "epsilon"), (_Untraceable(cumulative=False), "gamma")):
        converted = _converted(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any warning fails the test
            relevance, report = lrp.explain(converted, x, rule=rule, start="logit", return_conservation=True)
        if model.body.bias is None:
            assert report.conserved(), str(report)
            torch.testing.assert_close(relevance.sum(1), converted(x).max(1).values, rtol=1e-4, atol=0)
        else:  # the biases took their share: allowed, and the report shows it as the residual
            assert not report.conserved()


def test_the_report_of_a_traced_model_counts_the_class_token():
    """A traced ViT-like model: the class token concatenated to the patches takes a share (reported)."""

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.token = torch.nn.Parameter(torch.randn(1, 1, 4))
            self.mix = torch.nn.Linear(4, 4, bias=False)
            self.head = torch.nn.Linear(4, 2, bias=False)

        def forward(self, x):
            x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)
            return self.head(self.mix(x).mean(1))

    converted = lrp.convert(Tokens().double().eval())
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    relevance, report = lrp.explain(converted, x, rule="zero", start="logit", return_conservation=True)
    assert set(report.absorbed) == {"token"}
    assert report.conserved() and float(report.absorbed["token"].abs()) > 0
    torch.testing.assert_close(report.input, relevance.flatten(1).sum(1))


def test_multiple_targets_report_per_row():
    converted = _converted(_Untraceable(cumulative=False))
    x = torch.randn(2, 6, dtype=torch.float64)
    relevance, report = lrp.explain(converted, x, target=[[0, 1], [2, 0]], rule="zero", start="logit",
                                    return_conservation=True)
    assert report.start.shape == (2, 2) and report.input.shape == (2, 2)
    torch.testing.assert_close(report.input, relevance.sum(-1))


def test_which_rules_conserve():
    assert rule_conserves(Zero()) and rule_conserves(Epsilon(1e-6)) and rule_conserves(Gamma())
    # alpha-beta and z+ lose a unit's relevance where it has no positive (or negative) contributions, the
    # unit-input rules and z-box lose it on hidden layers: by design, so the check does not cry wolf over them
    assert not rule_conserves(AlphaBeta(2.0)) and not rule_conserves(Flat())
    assert not rule_conserves(Epsilon(0.25)) and not rule_conserves(Gradient())
    report = Conservation(start=torch.tensor([2.0]), input=torch.tensor([1.5]), absorbed={"p": torch.tensor(0.5)})
    assert report.conserved() and float(report.residual) == 0.0


def _readme_block(containing):
    """The README's python block that contains ``containing``."""
    import os
    import re

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(path, encoding="utf-8") as handle:
        blocks = re.findall(r"```python\n(.*?)```", handle.read(), flags=re.S)
    (block,) = [block for block in blocks if containing in block]
    return block


def test_the_readme_conservation_example_prints_what_the_readme_shows(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_readme_block("return_conservation=True"), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "start 1.29832 = input 0.662901" in printed and "changed by torch.sin (no rule, its gradient): -0.635" in printed


def test_the_readme_generation_example_runs(capsys):
    pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_readme_block("explain_generation("), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([1, 3]) torch.Size([1, 3, 7])"


def test_a_call_without_a_rule_that_returns_a_tuple_is_refused_too():
    """``torch.sort`` of an activation returns (values, indices): without a rule it is a ConversionError, not a
    silent gradient."""

    class Sorted(_Untraceable):
        def forward(self, x):
            if float(x.detach().abs().sum()) < 0:
                x = -x
            return self.head(torch.sort(self.body(x), dim=-1).values)

    converted = _converted(Sorted(cumulative=False))
    with pytest.raises(lrp.ConversionError, match=r"torch.sort \(x1\): no relevance rule"):
        lrp.explain(converted, torch.randn(2, 6, dtype=torch.float64))


def test_a_traced_router_choice_is_a_constant_gate_like_at_run_time():
    """``topk`` in a traced graph is held constant (the registry's entry), as at run time: the product of a layer
    output with its top value is a scale, and LRP-0 without biases conserves through it."""

    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body, self.head = torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(5, 3, bias=False)

        def forward(self, x):
            hidden = self.body(x)
            return self.head(hidden * torch.softmax(hidden, -1).topk(1, dim=-1).values)

    traced = lrp.convert(Gated().double().eval())
    assert isinstance(traced, torch.fx.GraphModule)
    run_time = _converted(type("RunTimeGated", (Gated,), {"forward": lambda self, x: Gated.forward(self, x) if float(
        x.detach().abs().sum()) >= 0 else x})())
    x = torch.randn(4, 6, dtype=torch.float64)
    relevance, report = lrp.explain(traced, x, rule="zero", start="logit", return_conservation=True)
    assert report.conserved(1e-9)
    torch.testing.assert_close(lrp.explain(run_time, x, rule="zero", start="logit"), relevance)


class _Lossy(torch.nn.Module):
    """Run time: a body, then (lossy) a sine whose entry wrongly says its gradient is its rule, and a functional
    head whose bias is named ``offset``; ``unused`` holds a non-zero ``bias`` that never runs."""

    def __init__(self, lossy: bool, offset: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.lossy = lossy
        self.body = torch.nn.Linear(6, 5, bias=False)
        self.weight = torch.nn.Parameter(torch.randn(3, 10))
        self.offset = torch.nn.Parameter(torch.full((3,), offset))
        self.unused = torch.nn.Linear(2, 2)  # a non-zero parameter named bias, in a module that never runs

    def forward(self, x):
        if float(x.detach().abs().sum()) < 0:
            x = -x
        h = self.body(x)
        h = torch.cat([torch.sin(h) if self.lossy else h, h], -1)
        return torch.nn.functional.linear(h, self.weight, self.offset)


def test_the_check_reads_the_biases_that_ran_not_parameter_names():
    x = torch.randn(4, 6, dtype=torch.float64)
    registry = lrp.default_registry()
    registry.add_function(torch.sin, lrp.OperationEntry("identity (wrongly: its gradient)"))
    with pytest.warns(UserWarning, match="every rule in play conserves, yet"):  # the unused bias does not hide it
        lrp.explain(_converted(_Lossy(lossy=True), registry=registry), x, rule="zero")
    for offset in (0.0, 0.3):  # a conserving model stays silent, with its functional bias named offset or zero
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", message=".*cannot trace")
            lrp.explain(_converted(_Lossy(lossy=False, offset=offset)), x, rule="zero")


@pytest.mark.parametrize("rule", [lrp.Composite(default="zplus"), lrp.Composite(default="alpha2beta1"),
                                  lrp.Composite(default="zero", by_type={torch.nn.Linear: Flat()})])
def test_rules_that_lose_relevance_by_design_do_not_cry_wolf(rule):
    model = _converted(_Lossy(lossy=False))
    x = -torch.rand(4, 6, dtype=torch.float64)  # (negative inputs: units without positive contributions)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*cannot trace")
        _, report = lrp.explain(model, x, rule=rule, return_conservation=True)
    assert report.losses_allowed


def test_the_stabilizers_share_is_measured_and_reported_at_run_time():
    """A logit near zero: epsilon's stabilizer takes a visible share; it is measured in the backward and reported,
    so the residual is what no rule accounts for (zero here) and no warning comes; LRP-0 takes none."""
    from torchlrp.modules.affine import LAYER_SHARE

    model = _converted(_Lossy(lossy=False))
    with torch.no_grad():
        model.weight.mul_(1e-6)
    x = torch.randn(4, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*cannot trace")
        _, report = lrp.explain(model, x, rule=lrp.Composite(default=Epsilon(1e-6)), start="logit",
                                return_conservation=True)
        assert float(report.absorbed[LAYER_SHARE].abs()) > 0.01 * float(report.start.abs().sum())
        assert report.conserved()
        _, exact = lrp.explain(model, x, rule="zero", start="logit", return_conservation=True)
    assert LAYER_SHARE not in exact.absorbed and exact.conserved()
