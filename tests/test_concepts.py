"""Concept Relevance Propagation: conditional relevance against a reference written from its definition, partitions
that sum to the unconditional heatmap under LRP-0, batched conditions against single ones, exclude_parallel on a
residual network, concept definitions beyond channels, attribution graphs, and bad input."""
import os
import warnings

import numpy as np
import pytest
import torch
import torchvision

import torchlrp as lrp
from torchlrp import concepts as crp


def _zero_biases(model):
    """float64, eval, every bias zero and batch-norm eps 0 / mean 0: LRP-0 conserves exactly."""
    model = model.double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eps = 0.0
                module.running_mean.zero_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return model


def _cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 12, 3, padding=1), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(12, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 5))


@pytest.fixture
def cnn(device):
    return lrp.convert(_zero_biases(_cnn())).to(device)


@pytest.fixture
def resnet(device):
    return lrp.convert(_zero_biases(torchvision.models.resnet18(num_classes=7))).to(device)


def _reference(model, x, target, rule, masks):
    """The definition: propagate, multiply the relevance at each layer by its 0/1 channel mask, propagate on."""
    handles = []

    def masker(mask):
        def hook(module, args, output):
            output.register_hook(lambda relevance: relevance * mask)
        return hook

    for name, mask in masks.items():
        handles.append(model.get_submodule(name).register_forward_hook(masker(mask)))
    try:
        return lrp.explain(model, x, target, rule=rule)
    finally:
        for handle in handles:
            handle.remove()


def _channel_mask(channels, count, like):
    mask = torch.zeros(1, count, 1, 1, dtype=like.dtype, device=like.device)
    mask[0, channels] = 1.0
    return mask


@pytest.mark.parametrize("rule", ["zero", "epsilon", lrp.Composite(default="epsilon", first="flat")])
def test_conditional_heatmap_equals_the_definition(cnn, device, rule):
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64, device=device)
    conditions = [{"2": [1, 4]}, {"2": [0], "5": [3, 7, 9]}, {"5": [2], "y": [4]}]
    result = crp.attribute(cnn, x, conditions, rule, target=1, exclude_parallel=False)
    assert result.heatmaps.shape == (2, 3, 3, 12, 12)
    for index, condition in enumerate(conditions):
        masks = {name: _channel_mask(ids, {"2": 12, "5": 16}[name], x) for name, ids in condition.items()
                 if name != "y"}
        expected = _reference(cnn, x, condition.get("y", [1])[0], rule, masks)
        torch.testing.assert_close(result.heatmaps[:, index], expected, rtol=1e-10, atol=1e-13)
    # on a chain of layers, restarting the backward at each conditioned layer is the same
    chained = crp.attribute(cnn, x, conditions[:2], rule, target=1, exclude_parallel=False)
    torch.testing.assert_close(chained.heatmaps, result.heatmaps[:, :2], rtol=1e-10, atol=1e-13)


def test_channel_partition_sums_to_the_unconditional_heatmap(resnet, device):
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, device=device)
    parts = [{"layer2": list(range(begin, begin + 32))} for begin in range(0, 128, 32)]
    full = lrp.explain(resnet, x, 3, rule="zero")
    for exclude_parallel in (True, False):  # layer2's output is on every path: nothing runs beside it
        result = crp.attribute(resnet, x, parts, "zero", target=3, exclude_parallel=exclude_parallel,
                               record=["layer2", "layer3"])
        torch.testing.assert_close(result.heatmaps.sum(1), full, rtol=1e-9, atol=1e-12)
        per_concept = result.concept_relevances("layer2")  # (2, 4, 128): each condition keeps its own channels
        for index in range(4):
            outside = torch.ones(128, dtype=torch.bool)
            outside[parts[index]["layer2"]] = False
            assert bool((per_concept[:, index, outside] == 0).all())
        # start one, LRP-0, no biases: each condition's concept relevances are what its heatmap holds
        torch.testing.assert_close(per_concept.sum(-1), result.heatmaps.flatten(2).sum(-1), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result.concept_relevances("layer3").sum(-1),
                                   torch.ones(2, 4, dtype=torch.float64, device=device), rtol=1e-9, atol=1e-12)


def test_batched_conditions_equal_single_calls(resnet, device):
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, device=device)
    conditions = [{"layer3": [c]} for c in (0, 5, 17, 200, 255)]
    rule = lrp.Composite(default="epsilon", by_type={torch.nn.Conv2d: "gamma"})
    batched = crp.attribute(resnet, x, conditions, rule, record=["layer2"], start="logit")
    chunked = crp.attribute(resnet, x, conditions, rule, record=["layer2"], start="logit", batch_size=4)
    for sample in range(3):
        for index, condition in enumerate(conditions):
            single = crp.attribute(resnet, x[sample:sample + 1], [condition], rule, record=["layer2"],
                                   start="logit")
            torch.testing.assert_close(batched.heatmaps[sample, index], single.heatmaps[0, 0], rtol=1e-10,
                                       atol=1e-14)
            torch.testing.assert_close(batched.relevances["layer2"][sample, index], single.relevances["layer2"][0, 0],
                                       rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(chunked.heatmaps, batched.heatmaps, rtol=1e-10, atol=1e-14)


def test_exclude_parallel_drops_the_skip_connection(resnet, device):
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, device=device)
    everything = {"layer1.0.conv2": list(range(64))}  # the residual branch of the first block, every channel
    full = lrp.explain(resnet, x, 2, rule="zero")
    kept = crp.attribute(resnet, x, [everything], "zero", target=2, exclude_parallel=False)
    torch.testing.assert_close(kept.heatmaps[:, 0], full, rtol=1e-9, atol=1e-12)
    only = crp.attribute(resnet, x, [everything], "zero", target=2, record=["layer1.0.conv2"])
    branch = only.concept_relevances("layer1.0.conv2")[:, 0].sum(-1)
    # only the branch's relevance reaches the input: what the branch received, not all of it
    torch.testing.assert_close(only.heatmaps.flatten(1).sum(-1), branch, rtol=1e-9, atol=1e-12)
    assert bool(((branch - 1).abs() > 1e-3).all())
    # the skip's part is the rest: conditioning on the block's input (layer1.0's input = maxpool) gives all
    through_input = crp.attribute(resnet, x, [{"maxpool": list(range(64))}], "zero", target=2)
    torch.testing.assert_close(through_input.heatmaps[:, 0], full, rtol=1e-9, atol=1e-12)


def test_start_layer_explains_the_concept_itself(resnet, device):
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, device=device)
    result = crp.attribute(resnet, x, [{"layer2": [3]}, {"layer2": [3, 9]}], "zero", start_layer="layer2")
    activation = result.activations["layer2"]
    # LRP-0, no biases: the heatmap holds the concept's activation
    torch.testing.assert_close(result.heatmaps.flatten(2).sum(-1)[:, 0], activation[:, 3].sum((1, 2)),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.heatmaps.flatten(2).sum(-1)[:, 1], activation[:, [3, 9]].sum((1, 2, 3)),
                               rtol=1e-9, atol=1e-12)


def test_groups_and_directions_partition(cnn, device):
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64, device=device)
    full = lrp.explain(cnn, x, 0, rule="zero")
    groups = crp.Groups([[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10, 11]], units=12)
    by_group = crp.attribute(cnn, x, [{"2": [g]} for g in range(3)], "zero", target=0, concepts={"2": groups},
                             record=["2"])
    torch.testing.assert_close(by_group.heatmaps.sum(1), full, rtol=1e-9, atol=1e-12)
    channels = crp.attribute(cnn, x, [{}], "zero", target=0, record=["2"]).concept_relevances("2")[:, 0]
    torch.testing.assert_close(by_group.concept_relevances("2")[:, 1, 1], channels[:, 3:7].sum(-1))
    basis = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0].T.to(device)  # rows: orthonormal
    directions = crp.Directions(basis)
    by_direction = crp.attribute(cnn, x, [{"2": [0, 1, 2]}, {"2": list(range(3, 12))}], "zero", target=0,
                                 concepts={"2": directions}, record=["2"])
    torch.testing.assert_close(by_direction.heatmaps.sum(1), full, rtol=1e-9, atol=1e-12)
    # a direction's relevance: LRP-0 through the change of basis, (a . d) (R/a . d) summed over positions
    unconditional = crp.attribute(cnn, x, [{}], "zero", target=0, concepts={"2": directions}, record=["2"])
    a = unconditional.activations["2"]
    relevance = unconditional.relevances["2"][:, 0]
    ratio = torch.where(a.abs() > 1e-12, relevance / a.where(a.abs() > 1e-12, torch.ones_like(a)),
                        torch.zeros_like(a))
    expected = torch.einsum("nchw,kc->nkhw", a, basis) * torch.einsum("nchw,kc->nkhw", ratio, basis)
    torch.testing.assert_close(unconditional.concept_relevances("2")[:, 0], expected.sum((2, 3)), rtol=1e-8,
                               atol=1e-12)


def test_attention_heads_and_mlp_neurons_of_a_transformer():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100)
    model = _zero_biases(transformers.BertForSequenceClassification(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.fx cannot trace it: explained at run time
        converted = lrp.convert(model)

    class Scores(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, embeddings):
            return self.inner(inputs_embeds=embeddings).logits

    scores = Scores(converted)
    x = model.get_input_embeddings()(torch.randint(0, 100, (2, 7))).detach()
    rule = lrp.Composite(default="zero", attention="cp")
    full = lrp.explain(scores, x, 1, rule=rule)
    # the output of an encoder layer is a cut (all relevance passes it): its channels partition the heatmap
    cut = "inner.bert.encoder.layer.0.output.LayerNorm"
    halves = [{cut: list(range(16))}, {cut: list(range(16, 32))}]
    for exclude_parallel in (True, False):
        by_half = crp.attribute(scores, x, halves, rule, target=1, concepts={cut: crp.Channels(dim=-1)},
                                exclude_parallel=exclude_parallel)
        torch.testing.assert_close(by_half.heatmaps.sum(1), full, rtol=1e-9, atol=1e-12)
    # attention heads (the input of the attention's output projection), against the definition
    dense = "inner.bert.encoder.layer.1.attention.output.dense"
    heads = {dense: crp.Groups.heads(4, 8)}
    by_head = crp.attribute(scores, x, [{dense: [h]} for h in range(4)], rule, target=1, concepts=heads,
                            exclude_parallel=False, record=[dense])
    assert by_head.concept_relevances(dense).shape == (2, 4, 4)
    for head in range(4):
        mask = torch.zeros(32, dtype=torch.float64)
        mask[8 * head:8 * head + 8] = 1.0

        def masked(module, args):
            args[0].register_hook(lambda relevance: relevance * mask)
        handle = scores.get_submodule(dense).register_forward_pre_hook(masked)
        try:
            expected = lrp.explain(scores, x, 1, rule=rule)
        finally:
            handle.remove()
        torch.testing.assert_close(by_head.heatmaps[:, head], expected, rtol=1e-9, atol=1e-12)
    assert bool(((by_head.heatmaps.sum(1) - full).abs() > 1e-3).any())  # the residual carries its share each time
    # only through the heads (exclude_parallel): the heads' heatmaps add up to all heads'
    through = crp.attribute(scores, x, [{dense: [h]} for h in range(4)] + [{dense: [0, 1, 2, 3]}], rule, target=1,
                            concepts=heads)
    torch.testing.assert_close(through.heatmaps[:, :4].sum(1), through.heatmaps[:, 4], rtol=1e-9, atol=1e-12)
    # MLP neurons (the intermediate layer's output, last dimension)
    neurons = "inner.bert.encoder.layer.0.intermediate"
    parts = [{neurons: list(range(0, 20))}, {neurons: list(range(20, 64))}, {neurons: list(range(64))}]
    by_neuron = crp.attribute(scores, x, parts, rule, target=1, concepts={neurons: crp.Channels(dim=-1)})
    torch.testing.assert_close(by_neuron.heatmaps[:, :2].sum(1), by_neuron.heatmaps[:, 2], rtol=1e-9, atol=1e-12)
    assert bool((by_neuron.heatmaps[:, 0] - by_neuron.heatmaps[:, 2]).abs().amax() > 1e-6)


def test_attribution_graph_splits_sum_to_their_parent(resnet, device):
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64, device=device)
    graph = crp.attribution_graph(resnet, x, ["layer3", "layer2", "layer1"], 11, "zero", target=4, top_k=3)
    single = crp.attribute(resnet, x, [{"layer3": [11]}], "zero", target=4, record=["layer3"])
    assert graph.root.relevance == pytest.approx(float(single.concept_relevances("layer3")[0, 0, 11]), rel=1e-9)
    parents = [node for node in graph.nodes() if node.children]
    assert len(parents) == 1 + 3 and len(graph.nodes()) == 1 + 3 + 9
    for node in parents:
        assert len(node.children) == 3
        assert sum(child.relevance for child in node.children) + node.rest == pytest.approx(node.relevance,
                                                                                             rel=1e-9, abs=1e-14)
        shares = [child.relevance for child in node.children]
        assert shares == sorted(shares, reverse=True)
    text = str(graph)
    assert "layer3[11]" in text and "of its parent" in text
    figure = crp.plot_attribution_graph(graph)
    assert len(figure.axes) == 1


def test_bad_input_is_refused(cnn, resnet):
    x = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    cnn, resnet = cnn.cpu(), resnet.cpu()
    with pytest.raises(ValueError, match="not a module"):
        crp.attribute(cnn, x, [{"features.99": [0]}])
    with pytest.raises(ValueError, match="out of range"):
        crp.attribute(cnn, x, [{"2": [12]}])
    with pytest.raises(ValueError, match="not booleans"):
        crp.attribute(cnn, x, [{"2": [True]}])
    with pytest.raises(ValueError, match="same layers"):
        crp.attribute(cnn, x, [{"2": [0]}, {"5": [0]}])
    with pytest.raises(ValueError, match="non-empty list"):
        crp.attribute(cnn, x, [])
    with pytest.raises(ValueError, match="start must be"):
        crp.attribute(cnn, x, [{}], start="probability")
    with pytest.raises(ValueError, match="target holds"):
        crp.attribute(cnn, x, [{}], target=[1, 2])
    with pytest.raises(ValueError, match="not recorded"):
        crp.attribute(cnn, x, [{}]).concept_relevances("2")
    with pytest.raises(ValueError, match="more than once"):
        crp.attribute(resnet, torch.rand(1, 3, 32, 32, dtype=torch.float64), [{"layer1.0.relu": [0]}])
    with pytest.raises(ValueError, match="top_k"):
        crp.attribution_graph(cnn, x, ["5", "2"], 0, top_k=0)
    with pytest.raises(ValueError, match="one sample"):
        crp.attribution_graph(cnn, x.repeat(2, 1, 1, 1), ["5", "2"], 0)
    with pytest.raises(ValueError, match="disjoint"):
        crp.Groups([[0, 1], [1, 2]], units=3)


@pytest.mark.parametrize("condition", ["12", [2.7], torch.tensor([1.6]), 2.0, [], torch.tensor([], dtype=torch.long),
                                       np.array([1.0]), [np.float32(1)], torch.tensor([True]), ["1"]])
def test_a_condition_is_integer_ids_and_not_empty(cnn, condition):
    """No truncation, no splitting of strings, no empty condition: one clear error each."""
    with pytest.raises(ValueError, match="integer ids|empty condition|integer or a sequence"):
        crp.attribute(cnn.cpu(), torch.rand(1, 3, 12, 12, dtype=torch.float64), [{"2": condition}])


def test_numpy_and_tensor_integers_are_ids(cnn):
    x = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    expected = crp.attribute(cnn.cpu(), x, [{"2": [1, 3]}]).heatmaps
    for condition in (np.array([1, 3]), [np.int64(1), np.int32(3)], torch.tensor([1, 3]), (1, torch.tensor(3))):
        torch.testing.assert_close(crp.attribute(cnn.cpu(), x, [{"2": condition}]).heatmaps, expected)
    single = crp.attribute(cnn.cpu(), x, [{"2": np.int64(1)}]).heatmaps
    torch.testing.assert_close(single, crp.attribute(cnn.cpu(), x, [{"2": 1}]).heatmaps)


# -- relevance and activation maximization over a dataset (explain_dataset's store) -------------------------------

def _store_run(store, **options):
    from tests.dataset_run import Samples, model

    from torchlrp.data.dataset import explain_dataset
    settings = dict(batch_size=4, quiet=True, dtype="float32", target="label", concepts=["0", "1"])
    settings.update(options)
    return explain_dataset(model(), Samples(options.pop("crash_at", None)), "epsilon", store,
                           **{k: v for k, v in settings.items() if k != "crash_at"})


def _concept_arrays(store):
    import zarr
    group = zarr.open_group(store, mode="r")
    return {name: np.asarray(group[f"concepts/{layer}/{statistic}"][:]) for layer in ("0", "1")
            for statistic in ("relevance_sum", "relevance_max", "activation_sum", "activation_max")
            for name in [f"{layer}/{statistic}"]}


def test_store_concept_statistics_equal_the_definition(tmp_path):
    pytest.importorskip("zarr")
    from tests.dataset_run import Samples, model

    from torchlrp.data.dataset import open_relevances
    _store_run(tmp_path / "c.zarr")
    relevances = open_relevances(tmp_path / "c.zarr")
    assert relevances.concept_layers == ["0", "1"]
    data = Samples()
    net = lrp.convert(model())
    # the definition: the relevance and activation at the conv output, read by plain hooks on one explain
    kept = {}

    def keep(module, args, output):
        output.register_hook(lambda relevance: kept.__setitem__("relevance", relevance.detach()))
    handle = net[0].register_forward_hook(keep)
    try:
        heatmaps = lrp.explain(net, data.inputs, data.labels, rule="epsilon")
    finally:
        handle.remove()
    # the heatmaps as without concepts (float32: the tapped conv is explained apart from its ReLU, not folded)
    torch.testing.assert_close(relevances[:], heatmaps, rtol=1e-4, atol=1e-5 * float(heatmaps.abs().max()))
    relevance = kept["relevance"]  # (the conv explained with its ReLU folded in: 0 where the ReLU is, as unfolded)
    with torch.no_grad():
        activation = model()[0](data.inputs)  # the plain conv's output
    expected = {"relevance_sum": relevance.sum((2, 3)), "relevance_max": relevance.amax((2, 3)),
                "activation_sum": activation.sum((2, 3)), "activation_max": activation.amax((2, 3))}
    for statistic, values in expected.items():
        torch.testing.assert_close(relevances.concept_values("0", statistic), values.float(), rtol=1e-4,
                                   atol=1e-5 * float(values.abs().max()))
    # the ReLU after it: its activation is the rectified one
    torch.testing.assert_close(relevances.concept_values("1", "activation_sum"),
                               activation.relu().sum((2, 3)).float(), rtol=1e-5, atol=1e-6)
    # relevance maximization, by hand: values / sum |values| per sample, descending
    normalized = expected["relevance_sum"] / (expected["relevance_sum"].abs().sum(1, keepdim=True) + 1e-10)
    ranked = crp.reference_samples(tmp_path / "c.zarr", "0", n=5)
    assert ranked.indices.shape == (4, 5)
    for concept in range(4):
        order = normalized[:, concept].argsort(descending=True)[:5]
        assert ranked.indices[concept].tolist() == order.tolist()
    raw = crp.reference_samples(tmp_path / "c.zarr", "0", mode="activation", reduction="max", n=3, normalize=False)
    assert raw.indices[2].tolist() == expected["activation_max"][:, 2].argsort(descending=True)[:3].tolist()
    with pytest.raises(ValueError, match="no concept statistics"):
        crp.reference_samples(tmp_path / "c.zarr", "2")
    with pytest.raises(ValueError, match="mode must be"):
        crp.reference_samples(tmp_path / "c.zarr", "0", mode="gradient")


def test_concept_store_with_torchrun_and_after_a_crash_equals_one_run(tmp_path):
    pytest.importorskip("zarr")
    from tests.test_dataset import assert_same_store, run_script

    _store_run(tmp_path / "one.zarr")
    run_script(tmp_path / "two.zarr", "--dtype", "float32", "--concepts", "0", "1", nproc=2)
    assert_same_store(tmp_path / "one.zarr", tmp_path / "two.zarr")
    one, two = _concept_arrays(tmp_path / "one.zarr"), _concept_arrays(tmp_path / "two.zarr")
    for name in one:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _store_run(tmp_path / "resumed.zarr", crash_at=9)
    with pytest.raises(ValueError, match="not complete"):
        crp.reference_samples(tmp_path / "resumed.zarr", "0")
    report = _store_run(tmp_path / "resumed.zarr")
    assert report.skipped == 8
    resumed = _concept_arrays(tmp_path / "resumed.zarr")
    for name in one:
        np.testing.assert_array_equal(one[name], resumed[name], err_msg=name)
    # another set of concept layers is another run: refused, nothing written
    with pytest.raises(ValueError, match="concepts"):
        _store_run(tmp_path / "one.zarr", concepts=["0"])
    with pytest.raises(ValueError, match="start 'one' or 'logit'"):
        _store_run(tmp_path / "other.zarr", start="probability")


def test_receptive_field_crops_follow_the_neuron_heatmap():
    # a 1x16x16 image, a 3x3 conv then a 3x3 conv: one neuron of the second layer sees a 5x5 window
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[2].weight.fill_(1.0)
        model[2].bias.zero_()
    net = lrp.convert(model.eval())
    images = torch.zeros(2, 1, 16, 16)
    images[0, 0, 3, 4] = 1.0  # a single bright pixel: the most active neuron of layer "2" sits over it
    images[1, 0, 10:12, 9:11] = 1.0
    data = torch.utils.data.TensorDataset(images, torch.tensor([0, 1]))
    crops = crp.receptive_field_crops(net, data, "2", 1, [0, 1], "zero", mode="activation", threshold=1e-6)
    assert [crop.index for crop in crops] == [0, 1]
    top, bottom, left, right = crops[0].box
    assert bottom - top <= 5 and right - left <= 5 and top <= 3 < bottom and left <= 4 < right
    assert crops[0].image.shape == (1, bottom - top, right - left) and crops[0].heatmap.shape == (bottom - top,
                                                                                                   right - left)
    top, bottom, left, right = crops[1].box
    assert top <= 10 and bottom >= 12 and left <= 9 and right >= 11 and bottom - top <= 6
    with pytest.raises(ValueError, match="threshold"):
        crp.receptive_field_crops(net, data, "2", 1, [0], threshold=0)
    with pytest.raises(ValueError, match="out of range"):
        crp.receptive_field_crops(net, data, "2", 7, [0])


def test_concepts_example_finds_the_planted_tag(tmp_path):
    import re
    import subprocess
    import sys
    pytest.importorskip("sklearn")
    pytest.importorskip("zarr")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "examples", "concepts.py"), "--quick", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    base = float(re.search(r"images are tagged \(([\d.]+)%\)", result.stdout).group(1))
    top, control = map(float, re.search(r"([\d.]+)% of its reference samples are tagged \(the other channels, the "
                                        r"control: median ([\d.]+)%\)", result.stdout).groups())
    splits = float(re.search(r"the rest hold its relevance up to ([\d.]+)%", result.stdout).group(1))
    # measured with --quick: 4.7% of the images tagged; the top concept's references 100% tagged, control 0%
    assert top >= 90 and control <= 20 and base < 10
    assert splits < 5  # percent: EpsilonPlusFlat with biases (exact splits: test_attribution_graph_splits_...)
    for name in ("concepts_atlas.png", "concepts_graph.png"):
        assert (tmp_path / name).is_file()


@pytest.mark.parametrize("first, second", [
    (crp.Groups([[0, 1], [2, 3]], units=4), crp.Groups([[0, 2], [1, 3]], units=4)),
    (crp.Directions(torch.eye(4)[:2]), crp.Directions(torch.eye(4)[[0, 2]])),
    (crp.Channels(), crp.Channels(dim=1, at="input")),
])
def test_a_concept_store_resumes_only_with_the_same_definition(tmp_path, first, second):
    """A store stopped after one chunk is not continued under another grouping or basis of the same size (the
    repr is the same; the definition is hashed exactly), and is continued under an equal one."""
    pytest.importorskip("zarr")
    from tests.dataset_run import Samples, model

    from torchlrp.data.dataset import explain_dataset
    settings = dict(batch_size=4, quiet=True, dtype="float32", target="label")
    store = tmp_path / "stopped.zarr"
    with pytest.raises(RuntimeError, match="simulated crash"):
        explain_dataset(model(), Samples(5), "epsilon", store, concepts={"0": first}, **settings)
    with pytest.raises(ValueError, match="concepts"):
        explain_dataset(model(), Samples(None), "epsilon", store, concepts={"0": second}, **settings)
    report = explain_dataset(model(), Samples(None), "epsilon", store, concepts={"0": first}, **settings)
    assert report.skipped == 4


def test_attention_heads_of_torchvisions_vit_are_concepts():
    """torchvision's ViT: the heads at ``out_proj``'s input (the MultiheadAttention twin calls its output
    projection as a module, so the input can be tapped); the heads' heatmaps add up to both heads' together."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5).double().eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)
    converted = lrp.convert(model)
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    name = "encoder.layers.encoder_layer_1.self_attention.out_proj"
    rule = lrp.Composite(default="zero", attention="cp")
    heads = crp.attribute(converted, x, [{name: [0]}, {name: [1]}], rule=rule,
                          concepts={name: crp.Groups.heads(2, 8)})
    both = crp.attribute(converted, x, [{name: [0, 1]}], rule=rule, concepts={name: crp.Groups.heads(2, 8)})
    assert heads.heatmaps[0, 0].abs().sum() > 0 and heads.heatmaps[0, 1].abs().sum() > 0
    torch.testing.assert_close(heads.heatmaps.sum(1), both.heatmaps[:, 0], rtol=1e-10, atol=1e-12)
