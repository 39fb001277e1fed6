"""Explain what a causal language model looks at while it generates: token-level relevance for every generated
token, checked against what the task requires.

The toy language is copying: ``<s> c a j e b = c a j e b`` -- five random symbols, ``=``, the same symbols again.
A two-layer LLaMA (transformers' ``LlamaForCausalLM`` from a small config) learns it in seconds. To generate the
i-th copied symbol the model must look at the i-th symbol of the prompt, so the relevance of each generated token
should peak there. We count how often it does (the "source hit rate"), for the trained model and for two controls
that must fail: the same architecture untrained, and a random attribution.

Run: ``python examples/explain_generation.py`` (``--quick`` trains fewer steps, ``--out DIR`` writes elsewhere). Writes
``examples/plots/generation_copy.png`` (the relevance matrix) and ``examples/plots/generation_tokens.png`` (the
prompt coloured by relevance for each generated token).
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch

import torchlrp as lrp
from torchlrp.viz.text import save_generation, save_tokens

SYMBOLS = "abcdefghij"
VOCABULARY = ["<s>", "="] + list(SYMBOLS)
LENGTH = 5  # symbols per sequence


def sequences(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` sequences ``<s> s_1..s_5 = s_1..s_5`` as token ids."""
    symbols = torch.randint(2, len(VOCABULARY), (count, LENGTH), generator=generator)
    start, equals = torch.zeros(count, 1, dtype=torch.long), torch.ones(count, 1, dtype=torch.long)
    return torch.cat([start, symbols, equals, symbols], dim=1)


def language_model(seed: int = 0) -> torch.nn.Module:
    """A two-layer LLaMA for the toy vocabulary (random weights)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=4, intermediate_size=128, vocab_size=len(VOCABULARY),
                                      max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def train(model: torch.nn.Module, steps: int, seed: int = 0) -> float:
    """Train on the copy half of random sequences; return the accuracy on fresh ones."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = sequences(64, generator)
        logits = model(input_ids=batch[:, :-1]).logits[:, LENGTH + 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(VOCABULARY)), batch[:, LENGTH + 2:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test = sequences(256, generator)
    with torch.no_grad():
        predicted = model(input_ids=test[:, :-1]).logits[:, LENGTH + 1:].argmax(-1)
    return float((predicted == test[:, LENGTH + 2:]).float().mean())


def source_hit_rate(relevance: torch.Tensor) -> float:
    """How often the prompt symbol a generated token copies has the highest relevance among the prompt symbols.

    ``relevance`` is ``(batch, LENGTH, length)``: row ``i`` is for generating the i-th copied symbol, whose source
    is prompt position ``1 + i``."""
    prompt_symbols = relevance[:, :, 1:LENGTH + 1]
    sources = torch.arange(LENGTH)
    return float((prompt_symbols.argmax(-1) == sources).float().mean())


def explain_copies(model: torch.nn.Module, prompts: torch.Tensor, rule) -> lrp.GenerationRelevance:
    """Convert the model and explain its greedy continuation of ``prompts`` (each ``<s> s_1..s_5 =``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.fx cannot trace")  # a Hugging Face model: run time
        converted = lrp.convert(model)
    return lrp.explain_generation(converted, prompts, max_new_tokens=LENGTH, rule=rule)


def main(quick: bool = False, plots: str = os.path.join(os.path.dirname(__file__), "plots")) -> dict[str, float]:
    """Train, explain, check against the controls, draw the figures; return the figures' numbers."""
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    model = language_model()
    accuracy = train(model, 120 if quick else 300)
    prompts = sequences(64, torch.Generator().manual_seed(1))[:, :LENGTH + 2]
    rule = lrp.Composite(attention="cp")  # CP-LRP: attention weights held constant, epsilon elsewhere
    explained = explain_copies(model, prompts, rule)
    copied = float((explained.generated == prompts[:, 1:LENGTH + 1]).float().mean())
    untrained = explain_copies(language_model(seed=1).eval(), prompts, rule)
    random = torch.rand(explained.relevance.shape, generator=torch.Generator().manual_seed(2))
    results = {"accuracy": accuracy, "copied": copied, "hit_rate": source_hit_rate(explained.relevance),
               "untrained_hit_rate": source_hit_rate(untrained.relevance), "random_hit_rate": source_hit_rate(random)}
    print(f"copy accuracy {accuracy:.3f}; greedy continuations copied {copied:.3f} of the symbols")
    print(f"source hit rate (the copied symbol has the highest relevance among the prompt's symbols): trained "
          f"{results['hit_rate']:.3f}, untrained {results['untrained_hit_rate']:.3f}, random attribution "
          f"{results['random_hit_rate']:.3f} (chance {1 / LENGTH:.2f})")
    os.makedirs(plots, exist_ok=True)
    words = [VOCABULARY[int(t)] for t in explained.tokens[0]]
    save_generation(os.path.join(plots, "generation_copy.png"), words, explained.relevance[0],
                    explained.prompt_length, title="relevance for each generated token (CP-LRP), trained model")
    prompt_length = explained.prompt_length
    rows = [words[:prompt_length + step] for step in range(LENGTH)]
    values = [explained.relevance[0, step, :prompt_length + step] for step in range(LENGTH)]
    save_tokens(os.path.join(plots, "generation_tokens.png"), rows, values,
                titles=[f"generating '{words[prompt_length + step]}'" for step in range(LENGTH)])
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="train 120 steps instead of 300")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "plots"), help="output directory")
    arguments = parser.parse_args()
    main(arguments.quick, arguments.out)
