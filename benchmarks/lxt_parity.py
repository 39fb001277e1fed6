"""Parity with LXT 2.1 on torchvision's vit_b_16 and the Hugging Face families LXT patches (LLaMA, Qwen2, Qwen3,
GPT-2, BERT, Gemma 3): the same AttnLRP and CP-LRP explanations from both libraries, float64.

LXT's efficient mode patches torchvision's ViT (``lxt.efficient.monkey_patch(vision_transformer)``: identity rule
on GELU, the layer norm's standard deviation held constant, CP-LRP in ``nn.MultiheadAttention``) and reads the
relevance as input x gradient, which is LRP-0 on the linear layers. torchlrp's counterpart is
``Composite(default="zero", attention="cp")`` with relevance starting at the logit. LXT needs transformers 4.x and
patches torch's modules for the whole process, so it runs in a subprocess of its own environment:

    python -m venv lxtenv && lxtenv/bin/pip install "transformers==4.57.6" "lxt==2.1" torch torchvision
    python benchmarks/lxt_parity.py --lxt-python lxtenv/bin/python

Prints the relative L2 difference and the largest absolute difference of the two relevance maps, for random
weights (seeded; the classifier head re-initialized: torchvision's is zero) and ``--images`` random inputs.

The Hugging Face families: small configs (2 layers, hidden size 32, float64, eager attention), random weights made
here with transformers 5 and loaded into LXT's transformers 4.57 classes (the same state dict), relevance of the
token embeddings for the last position's top logit (a causal LM) or the top class (BERT). LXT's patch for each family
(``lxt.efficient.models.<family>.attnLRP`` / ``.cp_LRP``; BERT has no CP-LRP patch) against torchlrp's
``Composite(default="zero")`` and ``Composite(default="zero", attention="cp")`` on the same model converted.
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


LXT_HF_SIDE = r"""
import importlib, json, sys, torch, transformers
from lxt.efficient import monkey_patch
folder, family, mode = sys.argv[1:4]
spec = json.load(open(folder + "/spec.json"))
patches = importlib.import_module("lxt.efficient.models." + family)
monkey_patch(importlib.import_module(spec["modeling"]), getattr(patches, mode), verbose=False)
config = getattr(transformers, spec["config"])(**spec["arguments"], attn_implementation="eager")
model = getattr(transformers, spec["model"])(config).eval().double()
missing, unexpected = model.load_state_dict(torch.load(folder + "/weights.pt", weights_only=True), strict=False)
assert not [k for k in missing if not k.endswith("inv_freq")] and not unexpected, (missing, unexpected)
x = torch.load(folder + "/embeddings.pt", weights_only=True).requires_grad_(True)
logits = model(inputs_embeds=x).logits
logits = logits[:, -1] if logits.dim() == 3 else logits
logits.max(1).values.sum().backward()
torch.save((x * x.grad).detach(), folder + "/lxt.pt")
"""

#: family -> (LXT's patch module name, transformers module, config class, model class, config arguments)
HF_FAMILIES = {
    "llama": ("llama", "transformers.models.llama.modeling_llama", "LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3Config", "Qwen3ForCausalLM",
              {"head_dim": 16}),
    "gemma3": ("gemma3", "transformers.models.gemma3.modeling_gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 16, "sliding_window": 4}),
    "gpt2": ("gpt2", "transformers.models.gpt2.modeling_gpt2", "GPT2Config", "GPT2LMHeadModel",
             {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 100}),
    "bert": ("bert", "transformers.models.bert.modeling_bert", "BertConfig", "BertForSequenceClassification", {}),
}
SMALL = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
         "vocab_size": 100}


class _Scores(torch.nn.Module):
    """A Hugging Face model on token embeddings: the last position's logits (a causal LM) or the class logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs_embeds=embeddings).logits
        return logits[:, -1] if logits.dim() == 3 else logits


def hugging_face(family: str, lxt_python: str, tokens: int = 8) -> dict[str, tuple[float, float, float]]:
    """Compare one family under AttnLRP and CP-LRP: ``{mode: (relative L2, largest difference, magnitude)}``."""
    import json
    import warnings

    import transformers

    patch, modeling, config_name, model_name, extra = HF_FAMILIES[family]
    arguments = dict(extra) if family == "gpt2" else {**SMALL, **extra}
    if config_name.startswith(("Llama", "Qwen", "Gemma")):
        arguments["num_key_value_heads"] = 1
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**arguments, attn_implementation="eager")
    model = getattr(transformers, model_name)(config).double().eval()
    embeddings = model.get_input_embeddings()(torch.randint(0, 100, (2, tokens))).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.fx cannot trace it: explained at run time
        converted = lrp.convert(model)
    results = {}
    modes = {"attnLRP": lrp.Composite(default="zero"), "cp_LRP": lrp.Composite(default="zero", attention="cp")}
    for mode, rule in modes.items():
        if family == "bert" and mode == "cp_LRP":
            continue  # LXT 2.1 patches BERT with AttnLRP only
        with tempfile.TemporaryDirectory() as folder:
            torch.save(model.state_dict(), os.path.join(folder, "weights.pt"))
            torch.save(embeddings, os.path.join(folder, "embeddings.pt"))
            with open(os.path.join(folder, "spec.json"), "w") as handle:
                json.dump({"modeling": modeling, "config": config_name, "model": model_name,
                           "arguments": arguments}, handle)
            result = subprocess.run([lxt_python, "-c", LXT_HF_SIDE, folder, patch, mode], capture_output=True,
                                    text=True)
            if result.returncode != 0:
                sys.exit(f"the LXT side failed on {family} ({mode}):\n{result.stderr}")
            theirs = torch.load(os.path.join(folder, "lxt.pt"), weights_only=True)
        ours = lrp.explain(_Scores(converted), embeddings, rule=rule, start="logit")
        results[mode] = _difference(ours, theirs)
        gated = [module for module in converted.modules() if all(
            hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))]
        if mode == "cp_LRP" and gated:  # LXT's CP-LRP also holds the gated MLP's gate constant: the same rule here
            for module in gated:
                module.forward = _constant_gate(module)
            ours = lrp.explain(_Scores(converted), embeddings, rule=rule, start="logit")
            results["cp_LRP, gate constant"] = _difference(ours, theirs)
            for module in gated:
                del module.forward
    return results


def _difference(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float, float]:
    """Relative L2 difference, largest absolute difference, largest magnitude of LXT's relevance."""
    return (float((ours - theirs).norm() / theirs.norm()), float((ours - theirs).abs().max()),
            float(theirs.abs().max()))


def _constant_gate(mlp: torch.nn.Module):
    """A gated MLP's forward with its gate held constant (LXT's ``cp_gated_mlp_forward``: relevance flows through
    the up projection only)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x).detach()) * mlp.up_proj(x))
    return forward


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lxt-python", required=True, help="python of an environment with lxt 2.1 installed")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--families", nargs="+", default=["vit_b_16", *HF_FAMILIES],
                        help="vit_b_16 and/or Hugging Face families: " + ", ".join(HF_FAMILIES))
    args = parser.parse_args(argv)
    figures: dict[str, float] = {}
    for family in args.families:
        if family == "vit_b_16":
            figures.update(vit(args.lxt_python, args.images))
            continue
        for mode, (relative, largest, magnitude) in hugging_face(family, args.lxt_python).items():
            print(f"{family} {mode}, float64: relative L2 difference {relative:.2e}, largest absolute difference "
                  f"{largest:.2e} (relevance up to {magnitude:.2e})", flush=True)
            figures[f"{family} {mode}"] = relative
    return figures


def vit(lxt_python: str, images: int) -> dict[str, float]:
    """Compare CP-LRP on torchvision's vit_b_16 (LXT's own ViT patch)."""
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.rand(images, 3, 224, 224, dtype=torch.float64)
    model = model.double()
    target = model(x).argmax(1)
    with tempfile.TemporaryDirectory() as folder:
        torch.save(model.state_dict(), os.path.join(folder, "weights.pt"))
        torch.save(x, os.path.join(folder, "input.pt"))
        torch.save(target, os.path.join(folder, "target.pt"))
        result = subprocess.run([lxt_python, "-c", LXT_SIDE, folder], capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"the LXT side failed:\n{result.stderr}")
        theirs = torch.load(os.path.join(folder, "lxt.pt"), weights_only=True)
    ours = lrp.explain(lrp.convert(model), x, target, rule=lrp.Composite(default="zero", attention="cp"),
                       start="logit")
    relative = float((ours - theirs).norm() / theirs.norm())
    largest = float((ours - theirs).abs().max())
    logits = model(x).gather(1, target[:, None]).squeeze(1)
    print(f"vit_b_16, float64, {images} images: relative L2 difference {relative:.2e}, largest absolute "
          f"difference {largest:.2e} (relevance magnitude {float(theirs.abs().max()):.2e}); input relevance / logit: "
          f"torchlrp {(ours.flatten(1).sum(1) / logits).tolist()}, LXT {(theirs.flatten(1).sum(1) / logits).tolist()}")
    return {"vit_b_16 cp_LRP": relative}


if __name__ == "__main__":
    main()
