"""Hugging Face architectures explained at run time: small random configs (2 layers, hidden size 32, float64, every
bias zero), CP-LRP + LRP-0: the explanation's output is the model's, and the relevance of the input embeddings plus
the shares the constants absorbed (position embeddings, ...) is the explained logit, to 1e-6.

Written-out GELU (GPT-2, GPT-Neo, GPT-J, Phi, ALBERT), ``Conv1D``'s ``addmm`` (GPT-2), BLOOM's ``baddbmm``,
Gemma's ``x * (1 + weight)``, Falcon's in-place updates and DeBERTa-v2's ``score += ...`` are all in this list.
"""
import importlib.util
import warnings

import pytest
import torch

import torchlrp as lrp

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs the transformers extra: pip install -e '.[test]'")

SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100)


def _cases():
    return {
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100)),
        "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(num_layers=2, hidden_size=32, num_heads=2,
                                                             vocab_size=100, attention_types=[[["global", "local"],
                                                                                               1]],
                                                             max_position_embeddings=64)),
        "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100, rotary_dim=8)),
        "phi": ("PhiConfig", "PhiForCausalLM", SMALL),
        "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=2, hidden_size=32, n_head=2, vocab_size=100)),
        "falcon": ("FalconConfig", "FalconForCausalLM",
                   {key: value for key, value in SMALL.items() if key != "intermediate_size"}),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=16, **SMALL)),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_key_value_heads=1, head_dim=16, **SMALL)),
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, **SMALL)),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=1, **SMALL)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1, **SMALL)),
        "opt": ("OPTConfig", "OPTForCausalLM", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                   ffn_dim=64, vocab_size=100, word_embed_proj_dim=32)),
        "albert": ("AlbertConfig", "AlbertForSequenceClassification",
                   dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, embedding_size=16)),
        "bert": ("BertConfig", "BertForSequenceClassification", SMALL),
        "deberta_v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", SMALL),
    }


class _Scores(torch.nn.Module):
    """The model on input embeddings; a causal LM's scores for its last position."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, embeddings):
        logits = self.model(inputs_embeds=embeddings).logits
        return logits[:, -1] if logits.dim() == 3 else logits


@pytest.mark.parametrize("name", sorted(_cases()))
def test_hugging_face_architecture_conserves(name):
    import transformers

    config_name, model_name, arguments = _cases()[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**arguments)).double().eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("bias"):
                parameter.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.fx cannot trace it: explained at run time
        converted = lrp.convert(model)
    embeddings = model.get_input_embeddings()(torch.randint(0, 100, (1, 6))).detach()
    with torch.no_grad():
        expected = _Scores(model)(embeddings)
    relevance, scores, absorbed = lrp.explain(_Scores(converted), embeddings, start="logit", return_scores=True,
                                              return_absorbed=True,
                                              rule=lrp.Composite(default="zero", attention="cp"))
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)  # an explanation keeps the output
    assert torch.isfinite(relevance).all()
    total = relevance.sum() + sum(absorbed.values(), torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(total, expected.max(), rtol=1e-6, atol=0)
