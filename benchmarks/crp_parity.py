"""Parity with zennit-crp 0.6 on VGG-16 and ResNet-18: conditional heatmaps and reference-sample indices.

zennit-crp pins ``zennit<=0.4.6``, so it runs in a subprocess of its own environment:

    python -m venv crpenv && crpenv/bin/pip install torch torchvision "zennit-crp==0.6.0"
    python benchmarks/crp_parity.py --crp-python crpenv/bin/python

Both libraries get the same random weights (seeded; ResNet-18's batch norms with random statistics and eps 0,
because zennit merges them without their eps) and the same inputs, and use zennit's EpsilonPlusFlat (torchlrp's
``EpsilonPlusFlat``; zennit-crp with ``ResNetCanonizer`` / ``SequentialMergeBatchNorm``). Compared:

1. ``CondAttribution`` heatmaps (channel sum of the input relevance, relevance starting at the logit) for the top
   ``--concepts`` channels of a layer and the explained class, ``exclude_parallel`` True and False, against
   ``torchlrp.concepts.attribute``: relative L2 difference and largest absolute difference;
2. ``FeatureVisualization.run`` (relevance and activation maximization, ``max_target="sum"``, ``abs_norm=True``)
   over ``--samples`` random labelled images against ``explain_dataset(..., concepts=[layer])`` and
   ``reference_samples``: the share of reference-sample indices that agree (ranks whose values are tied at zero,
   channels that are dead for those samples, are compared by value only) and the largest difference of the ranked
   values.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import torchvision

import torchlrp as lrp
from torchlrp import concepts as crp
from torchlrp.data.dataset import explain_dataset

CRP_SIDE = r"""
import sys, torch, numpy as np, torchvision
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from crp.visualization import FeatureVisualization
from zennit.composites import EpsilonPlusFlat
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.torchvision import ResNetCanonizer
folder, architecture, layer, inner = sys.argv[1:5]
model = getattr(torchvision.models, architecture)(num_classes=10).double().eval()
model.load_state_dict(torch.load(folder + "/weights.pt", weights_only=True))
for module in model.modules():  # eps is not in a state dict: the comparison's batch norms have eps 0
    if isinstance(module, torch.nn.BatchNorm2d):
        module.eps = 0.0
canonizers = [ResNetCanonizer()] if architecture.startswith("resnet") else [SequentialMergeBatchNorm()]
composite = EpsilonPlusFlat(canonizers=canonizers)
attribution = CondAttribution(model)
x = torch.load(folder + "/input.pt", weights_only=True)
conditions = torch.load(folder + "/conditions.pt", weights_only=True)
out = {}
for name, chosen in conditions.items():
    for exclude in (True, False):
        result = attribution(x.clone().requires_grad_(True), chosen, composite, exclude_parallel=exclude)
        out[f"heatmaps_{name}_{exclude}"] = result.heatmap.detach()
images, labels = torch.load(folder + "/dataset.pt", weights_only=True)
dataset = torch.utils.data.TensorDataset(images, labels)
fv = FeatureVisualization(attribution, dataset, {layer: ChannelConcept()}, path=folder + "/fv")
fv.run(composite, 0, len(dataset), batch_size=16)
for mode in ("Rel", "Act"):
    out[mode + "_data"] = torch.from_numpy(np.load(folder + f"/fv/{mode}Max_sum_normed/{layer}_data.npy"))
    out[mode + "_values"] = torch.from_numpy(np.load(folder + f"/fv/{mode}Max_sum_normed/{layer}_rel.npy"))
torch.save(out, folder + "/crp.pt")
"""

#: per model: the layer of the reference samples and conditions, and a second layer for conditions (ResNet-18's
#: inside a residual block, where exclude_parallel matters)
LAYERS = {"vgg16": ("features.28", "features.21"), "resnet18": ("layer3", "layer3.0.conv2")}


def _model(architecture: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, architecture)(num_classes=10).double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eps = 0.0
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm().clamp_min(1e-300))


def _index_agreement(ours: torch.Tensor, theirs: torch.Tensor, values: torch.Tensor) -> float:
    """Share of (rank, concept) whose sample agrees, over ranks whose value is not tied with a neighbour's."""
    values = values.double()
    gaps = torch.ones_like(values, dtype=torch.bool)
    gaps[1:] &= (values[1:] - values[:-1]).abs() > 1e-9 * values.abs().amax().clamp_min(1e-300)
    gaps[:-1] &= (values[:-1] - values[1:]).abs() > 1e-9 * values.abs().amax().clamp_min(1e-300)
    return float((ours == theirs)[gaps].double().mean()), int(gaps.sum())


def compare(architecture: str, crp_python: str, size: int, images: int, concepts: int, samples: int) -> dict:
    """Run both sides on one architecture and print the differences."""
    layer, inner = LAYERS[architecture]
    model = _model(architecture)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(images, 3, size, size, generator=generator, dtype=torch.float64)
    data = torch.rand(samples, 3, size, size, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 10, (samples,), generator=generator)
    converted = lrp.convert(model)
    rule = lrp.EpsilonPlusFlat()
    target = int(converted(x[:1]).argmax(1)[0])
    whole = crp.attribute(converted, x[:1], [{}], rule, record=[layer, inner], target=target, start="logit")
    conditions = {name: [{name: [c], "y": [target]} for c in
                         whole.concept_relevances(name)[0, 0].topk(concepts).indices.tolist()]
                  for name in (layer, inner)}
    with tempfile.TemporaryDirectory() as folder:
        torch.save(model.state_dict(), os.path.join(folder, "weights.pt"))
        torch.save(x, os.path.join(folder, "input.pt"))
        torch.save(conditions, os.path.join(folder, "conditions.pt"))
        torch.save((data, labels), os.path.join(folder, "dataset.pt"))
        result = subprocess.run([crp_python, "-c", CRP_SIDE, folder, architecture, layer, inner], capture_output=True,
                                text=True)
        if result.returncode != 0:
            sys.exit(f"the zennit-crp side failed:\n{result.stderr[-4000:]}")
        theirs = torch.load(os.path.join(folder, "crp.pt"), weights_only=True)
        store = os.path.join(folder, "ours.zarr")
        explain_dataset(converted, torch.utils.data.TensorDataset(data, labels), rule, store, target="label",
                        start="logit", batch_size=16, dtype=torch.float64, quiet=True, concepts=[layer])
        ranked = {mode: crp.reference_samples(store, layer, mode=mode, n=40)
                  for mode in ("relevance", "activation")}
        shutil.rmtree(store)
    figures = {}
    for name, chosen in conditions.items():
        for exclude in (True, False):
            ours = crp.attribute(converted, x, chosen, rule, start="logit", exclude_parallel=exclude).heatmaps
            ours = ours.sum(2).flatten(0, 1)  # (images * conditions, H, W), zennit-crp's order and channel sum
            reference = theirs[f"heatmaps_{name}_{exclude}"]
            figures[f"{name} heatmaps, exclude_parallel={exclude}: relative L2"] = _relative(ours, reference)
            figures[f"{name} heatmaps, exclude_parallel={exclude}: largest |difference| / largest |relevance|"] = \
                float((ours - reference).abs().max() / reference.abs().max())
    for mode, prefix in (("relevance", "Rel"), ("activation", "Act")):
        our_indices, our_values = ranked[mode].indices.T, ranked[mode].values.T.double()  # (40, concepts)
        their_indices, their_values = theirs[prefix + "_data"].long(), theirs[prefix + "_values"].double()
        agreement, compared = _index_agreement(our_indices, their_indices, their_values)
        figures[f"{mode} maximization: indices equal ({compared} untied ranks)"] = agreement
        figures[f"{mode} maximization: largest |value difference| / largest |value|"] = float(
            (our_values - their_values).abs().max() / their_values.abs().max())
    print(f"{architecture} (conditions on {layer} and {inner}; reference samples of {layer}), float64, {size}px; {images} images x {concepts} conditions, reference samples "
          f"of {samples} images:")
    for name, value in figures.items():
        print(f"  {name}: {value:.3g}")
    return figures


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crp-python", required=True, help="python of an environment with zennit-crp 0.6")
    parser.add_argument("--models", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--concepts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args(argv)
    return {name: compare(name, args.crp_python, args.size, args.images, args.concepts, args.samples)
            for name in args.models}


if __name__ == "__main__":
    main()
