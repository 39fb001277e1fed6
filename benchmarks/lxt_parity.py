"""Parity with LXT 2.1 on torchvision's vit_b_16: the same CP-LRP explanation from both libraries, float64.

LXT's efficient mode patches torchvision's ViT (``lxt.efficient.monkey_patch(vision_transformer)``: identity rule
on GELU, the layer norm's standard deviation held constant, CP-LRP in ``nn.MultiheadAttention``) and reads the
relevance as input x gradient, which is LRP-0 on the linear layers. torchlrp's counterpart is
``Composite(default="zero", attention="cp")`` with relevance starting at the logit. LXT needs transformers 4.x and
patches torch's modules for the whole process, so it runs in a subprocess of its own environment:

    python -m venv lxtenv && lxtenv/bin/pip install "transformers==4.57.6" "lxt==2.1" torch torchvision
    python benchmarks/lxt_parity.py --lxt-python lxtenv/bin/python

Prints the relative L2 difference and the largest absolute difference of the two relevance maps, for random
weights (seeded; the classifier head re-initialized: torchvision's is zero) and ``--images`` random inputs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch
import torchvision

import torchlrp as lrp

LXT_SIDE = r"""
import sys, torch
from torchvision.models import vision_transformer
from lxt.efficient import monkey_patch
monkey_patch(vision_transformer, verbose=False)
folder = sys.argv[1]
model = vision_transformer.vit_b_16().eval()
model.load_state_dict(torch.load(folder + "/weights.pt", weights_only=True))
model = model.double()
x = torch.load(folder + "/input.pt", weights_only=True).requires_grad_(True)
target = torch.load(folder + "/target.pt", weights_only=True)
output = model(x)
output.gather(1, target[:, None]).sum().backward()
torch.save((x * x.grad).detach(), folder + "/lxt.pt")
"""


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lxt-python", required=True, help="python of an environment with lxt 2.1 installed")
    parser.add_argument("--images", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.rand(args.images, 3, 224, 224, dtype=torch.float64)
    model = model.double()
    target = model(x).argmax(1)
    with tempfile.TemporaryDirectory() as folder:
        torch.save(model.state_dict(), os.path.join(folder, "weights.pt"))
        torch.save(x, os.path.join(folder, "input.pt"))
        torch.save(target, os.path.join(folder, "target.pt"))
        result = subprocess.run([args.lxt_python, "-c", LXT_SIDE, folder], capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"the LXT side failed:\n{result.stderr}")
        theirs = torch.load(os.path.join(folder, "lxt.pt"), weights_only=True)
    ours = lrp.explain(lrp.convert(model), x, target, rule=lrp.Composite(default="zero", attention="cp"),
                       start="logit")
    relative = float((ours - theirs).norm() / theirs.norm())
    largest = float((ours - theirs).abs().max())
    logits = model(x).gather(1, target[:, None]).squeeze(1)
    print(f"vit_b_16, float64, {args.images} images: relative L2 difference {relative:.2e}, largest absolute "
          f"difference {largest:.2e} (relevance magnitude {float(theirs.abs().max()):.2e}); input relevance / logit: "
          f"torchlrp {(ours.flatten(1).sum(1) / logits).tolist()}, LXT {(theirs.flatten(1).sum(1) / logits).tolist()}")
    return {"relative": relative, "largest": largest}


if __name__ == "__main__":
    main()
