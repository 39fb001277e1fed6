"""One semantics: every call of the operation table gets the same explanation from both engines.

For every call the table declares (function, tensor method, module type), a tiny model uses it twice -- traceable
(``convert`` rewrites its graph) and with a data-dependent branch (the run-time engine explains its forward) -- and
both give the same relevance (1e-8 relative, float64) under LRP-0, EpsilonPlus and AttnLRP, or the same refusal.
A new entry without a use in ``engine_catalogue.py`` fails ``test_every_call_of_the_table_has_a_use``.
"""
import warnings

import pytest
import torch

import torchlrp as lrp

from .engine_catalogue import MODULES, USES, Model, labels

RULES = {"lrp0": "zero", "epsilon_plus": lrp.EpsilonPlus(), "attnlrp": lrp.Composite(default="zero")}
#: calls whose use needs a device this machine may not have
NEEDS_CUDA = {"Tensor.cuda"}
#: Python functions of other libraries: torch's function mode does not see them, so at run time their torch calls
#: are explained one by one, which stabilizes the additive mask's share where the traced module stabilizes the
#: softmax (equal without a stabilizer: LRP-0, AttnLRP; within 1e-4 under the composites' epsilon 1e-6)
PYTHON_FUNCTIONS = {"torchvision.models.swin_transformer.shifted_window_attention"}
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
    if "grouped_mm" in label:
        try:
            torch._grouped_mm(torch.ones(2, 2), torch.ones(1, 2, 2), offs=torch.tensor([2], dtype=torch.int32))
        except (RuntimeError, NotImplementedError) as error:
            pytest.skip(f"{label} does not run on this device ({type(error).__name__})")
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
    assert isinstance(traced, torch.fx.GraphModule), "the traceable model must be traced"
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
