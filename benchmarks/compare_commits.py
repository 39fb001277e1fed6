"""Explanation time of the same models under two versions of torchlrp, in one run: VGG16 (a traced graph) and a
small LLaMA (its forward explained at run time).

Each version runs in its own subprocess from a ``git worktree`` of the commit (``--base``; default: the working
tree is compared with it), alternating, so both see the same machine state; the median of
``--repeats`` explanations per model and version is reported with the ratio new/base. Nothing is downloaded: VGG16
has random weights, the LLaMA is a random 4-layer decoder (``benchmarks/attention.py``'s ``DECODERS``)::

    python benchmarks/compare_commits.py --base 13db5a5 --repeats 5 --rounds 4
    python benchmarks/compare_commits.py --base 13db5a5 --models llama --attention cp

``--out results.json`` also writes the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TIMING = r"""
import json, sys, time, warnings
import torch, torchvision
import torchlrp as lrp
warnings.simplefilter("ignore")
torch.set_num_threads(int(sys.argv[2]))
name, repeats = sys.argv[1], int(sys.argv[3])
torch.manual_seed(0)
if name == "vgg16":
    model = lrp.convert(torchvision.models.vgg16().eval())
    x, rule = torch.randn(1, 3, 224, 224), lrp.EpsilonGammaBox(-3.0, 3.0)
    explain = lambda: lrp.explain(model, x, rule=rule)
else:
    import transformers
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=1024, vocab_size=2000)
    decoder = transformers.LlamaForCausalLM(config).eval()
    converted = lrp.convert(decoder)
    class Last(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
        def forward(self, embeddings):
            return self.model(inputs_embeds=embeddings).logits[:, -1]
    model = Last(converted)
    x = decoder.get_input_embeddings()(torch.randint(0, 2000, (1, 512))).detach()
    rule = lrp.Composite(attention=sys.argv[4])
    explain = lambda: lrp.explain(model, x, rule=rule)
explain()  # warm-up
times = []
for _ in range(repeats):
    start = time.perf_counter()
    explain()
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def _worktree(commit: str, folder: str) -> Path:
    path = Path(folder) / f"torchlrp-{commit}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True,
                   capture_output=True)
    return path


def _times(source: Path, model: str, threads: int, repeats: int, attention: str) -> list[float]:
    environment = {**os.environ, "PYTHONPATH": str(source / "src")}
    done = subprocess.run([sys.executable, "-c", TIMING, model, str(threads), str(repeats), attention], env=environment,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare with (the working tree is 'new')")
    parser.add_argument("--models", nargs="+", default=["vgg16", "llama"], choices=["vgg16", "llama"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of base and new per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", default="attnlrp", choices=["attnlrp", "cp"],
                        help="the LLaMA's attention rule (default: %(default)s)")
    parser.add_argument("--out", help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        base = _worktree(args.base, folder)
        try:
            results = {}
            for model in args.models:
                times: dict[str, list[float]] = {"base": [], "new": []}
                for _ in range(args.rounds):
                    for version, source in (("base", base), ("new", ROOT)):
                        times[version] += _times(source, model, args.threads, args.repeats, args.attention)
                medians = {version: statistics.median(values) for version, values in times.items()}
                results[model] = {**{f"{v}_s": round(m, 4) for v, m in medians.items()},
                                  "ratio_new_over_base": round(medians["new"] / medians["base"], 3)}
                print(f"{model}: base {medians['base']:.3f} s, new {medians['new']:.3f} s, "
                      f"new/base {medians['new'] / medians['base']:.3f}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False,
                           capture_output=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"base": args.base, "threads": args.threads, "attention": args.attention,
                                              **results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
