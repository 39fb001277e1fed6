"""Concepts (CRP and relevance maximization) on the Clever-Hans digits: which learned channels a decision used,
where each sits in the image, and what each is -- and the planted tag found as a concept.

The data and model are the Clever-Hans example's (``clever_hans.py``: digits, half of the 7s faint and tagged with a
small hollow square in the bottom-right corner; a CNN that learns to use the tag). Every image is explained with
``explain_dataset(..., concepts=[LAYER])``, which records, in the same backward, each channel's relevance for the
label and its activation per image into the Zarr store. Then, for a tagged test 7:

* its most relevant channels of the second convolution (``"3"``), each with its conditional heatmap (one batched
  backward) and its reference samples (relevance maximization over the dataset, cropped to the receptive field by
  the neuron's own heatmap): ``concepts_atlas.png``;
* the attribution graph of its top concept down to the first convolution: ``concepts_graph.png``.

Checks printed (each against a control): the share of tagged images among the top concept's reference samples
(the data holds 5% tagged images; the other channels' reference samples are the control), whether that concept's
conditional heatmap sits in the tag's corner, and how closely the attribution graph's splits add up to their parent.

    python examples/concepts.py            # about half a minute on a laptop CPU
    python examples/concepts.py --quick    # a few seconds (CI)
"""
from __future__ import annotations

import argparse
import os
import shutil

import torch

import torchlrp as lrp
from torchlrp import concepts as crp
from torchlrp.data.dataset import explain_dataset

from clever_hans import CONFOUNDED, made_by, trained_on_the_data

HERE = os.path.dirname(os.path.abspath(__file__))
LAYER, BELOW = "3", "0"
MODEL_NAME = "concepts example CNN"  # recorded in the store: a rerun replaces only a store of this example
RULE = lrp.EpsilonPlusFlat()


def corner_share(heatmap: torch.Tensor) -> float:
    """The share of a heatmap's absolute relevance in the tag's 6x6 corner (the corner is 6% of the image)."""
    magnitude = heatmap.abs().sum(0)
    return float(magnitude[-7:, -7:].sum() / magnitude.sum().clamp_min(1e-12))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "plots"), help="output directory")
    parser.add_argument("--store", help="Zarr store to write (default: OUT/concepts.zarr; replaced if it exists)")
    parser.add_argument("--quick", action="store_true", help="shorter training (CI)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)

    images, labels, tagged, test, model = trained_on_the_data(args.quick)
    explainable = lrp.convert(model)

    store = args.store or os.path.join(args.out, "concepts.zarr")
    if made_by(store, MODEL_NAME):
        shutil.rmtree(store)  # this example's store from an earlier run; any other store is refused, not removed
    dataset = torch.utils.data.TensorDataset(images, labels)
    explain_dataset(explainable, dataset, RULE, store, target="label", start="logit", batch_size=128, quiet=True,
                    model_name=MODEL_NAME, concepts=[LAYER])
    ranked = crp.reference_samples(store, LAYER, n=40)
    tagged_share = tagged[ranked.indices].float().mean(1)  # per concept: the share of tagged reference samples
    print(f"{int(tagged.sum())} of {len(tagged)} images are tagged ({tagged.float().mean():.1%}); per channel of "
          f"layer {LAYER!r}, the share of tagged images among its 40 reference samples (relevance maximization): "
          f"max {tagged_share.max():.1%} (channel {int(tagged_share.argmax())}), median {tagged_share.median():.1%}")

    image_index = int(test[tagged[test]][0])
    image = images[image_index:image_index + 1]
    atlas = crp.concept_atlas(explainable, image, LAYER, store, dataset, RULE, target=CONFOUNDED, top_k=4,
                              references=6)
    top = atlas.concepts[0]
    print(f"tagged test image {image_index}, class {CONFOUNDED}: top concepts of layer {LAYER!r} "
          + ", ".join(f"{concept} ({float(share):.1%})" for concept, share in zip(atlas.concepts, atlas.relevances)))
    top_tagged = float(tagged_share[top])
    others = tagged_share[[c for c in range(len(tagged_share)) if c != top]]
    print(f"the top concept {top}: {top_tagged:.1%} of its reference samples are tagged (the other channels, the "
          f"control: median {others.median():.1%}); its conditional heatmap holds {corner_share(atlas.heatmaps[0]):.1%}"
          f" of its |relevance| in the tag's corner (the whole heatmap: {corner_share(atlas.heatmaps.sum(0)):.1%})")
    crops_in_corner = sum(crop.box[1] > 24 - 7 and crop.box[3] > 24 - 7 for crop in atlas.references[0])
    print(f"its receptive-field crops that reach into the tag's corner: {crops_in_corner} of "
          f"{len(atlas.references[0])}")
    atlas_figure = os.path.join(args.out, "concepts_atlas.png")
    atlas.save(atlas_figure, title=f"concept atlas of a tagged 7: layer {LAYER!r} (row: conditional heatmap, "
                                   f"reference samples)")

    graph = crp.attribution_graph(explainable, image, [LAYER, BELOW], top, RULE, target=CONFOUNDED, top_k=4)
    print(graph)
    splits = max(abs(sum(child.relevance for child in node.children) + node.rest - node.relevance)
                 / abs(node.relevance) for node in graph.nodes() if node.children)
    print(f"a node's children plus the rest hold its relevance up to {splits:.2%} (what the biases and epsilon "
          f"of the rules between the two layers absorb; 0 under LRP-0 without biases)")
    graph_figure = os.path.join(args.out, "concepts_graph.png")
    crp.plot_attribution_graph(graph, graph_figure)
    print(f"wrote {atlas_figure}, {graph_figure} and the store {store}")
    return {"top_tagged": top_tagged, "others_tagged": float(others.median()),
            "corner": corner_share(atlas.heatmaps[0]), "splits": splits, "crops_in_corner": crops_in_corner}


if __name__ == "__main__":
    main()
