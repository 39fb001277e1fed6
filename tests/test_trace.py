"""Trace collection: per-layer relevances, conservation report, no global state, flat memory."""
import gc
import threading

import pytest
import torch
import torchvision

import torchlrp as lrp
from torchlrp import trace

from .test_layers import relu_network, torchlrp_readme_model


def test_collect_sequential_in_forward_order():
    model = relu_network(bias=False)
    x = torch.rand(3, 2, 16, 16, dtype=torch.float64)
    with trace.collect(model) as recorded:
        relevance = lrp.explain(model, x, rule="zero", start="logit")
    assert list(recorded) == ["input", "0", "3", "5", "7", "10"]
    torch.testing.assert_close(recorded["input"], relevance)
    assert [r.shape for r in recorded.layerwise()][-1] == x.shape
    report = recorded.conservation()
    for name, ratio in report.ratios.items():  # LRP-0, no bias: 100% everywhere
        torch.testing.assert_close(ratio, torch.ones(3, dtype=torch.float64), msg=name)
    table = str(report)
    assert "ratio to start" in table and "100.00%" in table


def test_conservation_shows_where_relevance_is_lost():
    model = relu_network(bias=True)
    x = torch.rand(3, 2, 16, 16, dtype=torch.float64)
    with trace.collect(model, layers=[lrp.Linear, "0"]) as recorded:
        lrp.explain(model, x, rule=lrp.rules.Epsilon(0.5), start="logit")
    assert list(recorded) == ["input", "0", "7", "10"]
    ratios = lrp.conservation(recorded).ratios
    assert (ratios["input"] < 1).all() and (ratios["10"] <= 1 + 1e-12).all()


def test_collect_with_model_call_and_resnet(tmp_path):
    model = torchlrp_readme_model()
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    with trace.collect(model, to="cpu") as recorded:
        y = model(x, explain=True, rule="epsilon")
        y[:, 0].sum().backward()
    assert list(recorded) == ["input", "0", "4"]
    torch.testing.assert_close(recorded["input"], x.grad)
    resnet = lrp.convert(torchvision.models.resnet18(num_classes=10).eval())
    with trace.collect(resnet, layers=["layer1.0.*", "fc"]) as recorded:
        lrp.explain(resnet, torch.rand(1, 3, 32, 32), rule=lrp.EpsilonPlus())
    assert "layer1.0.add" in recorded and "layer1.0.add[1]" in recorded and "fc" in recorded
    assert recorded["layer1.0.conv1"].shape == (1, 64, 8, 8)


def test_hooks_removed_also_on_error():
    model = relu_network(bias=True)
    with pytest.raises(RuntimeError, match="boom"):
        with trace.collect(model):
            raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="no module"):
        with trace.collect(model, layers=["nothing.*"]):
            pass


def test_nested_and_threaded_traces_never_mix():
    first, second = relu_network(bias=True), relu_network(bias=True)
    x = torch.rand(2, 2, 16, 16, dtype=torch.float64)
    with trace.collect(first) as outer, trace.collect(second) as inner:
        lrp.explain(first, x)
    assert "0" in outer and len(inner) == 0

    results = {}

    def worker(index, rule):
        with trace.collect(first) as recorded:
            for _ in range(5):
                results[index] = lrp.explain(first, x, rule=rule)
        results[f"trace{index}"] = recorded

    threads = [threading.Thread(target=worker, args=(i, rule)) for i, rule in enumerate(["zero", "zero"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        torch.testing.assert_close(results[f"trace{i}"]["input"], 5 * results[i])  # only its own 5 calls


def test_legacy_torchlrp_trace_api():
    model = torchlrp_readme_model()
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    trace.enable_and_clean()
    y = model(x, explain=True, rule="alpha2beta1")
    y[:, 1].sum().backward()
    recorded = trace.collect_and_disable()
    assert [tuple(r.shape) for r in recorded] == [(2, 6272), (2, 1, 28, 28)]
    torch.testing.assert_close(recorded[-1], x.grad)
    y = model(x, explain=True)
    y[:, 1].sum().backward()
    assert trace.collect_and_disable() == []


def test_legacy_trace_enabled_after_the_forward_records():
    """TorchLRP's documented order: forward, enable_and_clean(), backward(), collect_and_disable()."""
    model = torchlrp_readme_model()
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    y = model(x, explain=True, rule="epsilon")
    trace.enable_and_clean()
    y[:, 3].sum().backward()
    after = trace.collect_and_disable()
    x.grad = None
    trace.enable_and_clean()
    y = model(x, explain=True, rule="epsilon")
    y[:, 3].sum().backward()
    before = trace.collect_and_disable()
    assert len(after) == len(before) == 2
    for late, early in zip(after, before):
        torch.testing.assert_close(late, early)
    torch.testing.assert_close(after[-1], x.grad)


def test_legacy_trace_is_per_thread():
    import threading

    model = torchlrp_readme_model()
    recorded = {}

    def run(name, enable):
        x = torch.rand(1, 1, 28, 28, requires_grad=True)
        y = model(x, explain=True)
        if enable:
            trace.enable_and_clean()
        y[:, 0].sum().backward()
        recorded[name] = trace.collect_and_disable()

    threads = [threading.Thread(target=run, args=(name, name == "on")) for name in ("on", "off")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(recorded["on"]) == 2 and recorded["off"] == []


def count_tensors():
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) in (torch.Tensor, torch.nn.Parameter))


def test_memory_stays_flat_over_hundreds_of_explanations():
    model = relu_network(bias=True)
    x = torch.rand(2, 2, 16, 16, dtype=torch.float64)
    lrp.explain(model, x)
    baseline = count_tensors()
    for i in range(300):
        if i % 2:
            with trace.collect(model):
                lrp.explain(model, x, rule="gamma")
        else:
            lrp.explain(model, x, rule="epsilon")
    assert count_tensors() <= baseline
