"""Hugging Face architectures explained at run time: small random configs (2 layers, hidden size 32, float64, every
bias zero), CP-LRP + LRP-0: the explanation's output is the model's, and the relevance of the input (token
embeddings, or pixels) plus the shares the constants absorbed (position embeddings, class tokens, ...) is the
explained logit, to 1e-6; no call goes without a rule (nothing is named in a warning).

Encoders, decoders, encoder-decoders, vision transformers and CNNs, CLIP-style dual encoders and mixtures of
experts. Written-out GELU (GPT-2, GPT-Neo, GPT-J, Phi, ALBERT), ``Conv1D``'s ``addmm`` (GPT-2), BLOOM's
``baddbmm``, Gemma's ``x * (1 + weight)``, Falcon's in-place updates, DeBERTa-v2's ``score += ...``, Mixtral's
``router_top_value /= ...`` and CLIP's quick-GELU are all in this list.
"""
import importlib.util
import warnings

import pytest
import torch

import torchlrp as lrp

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs the transformers extra: pip install -e '.[test]'")

SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100)
DECODER = dict(num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2, **SMALL)
VISION = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=8)
EXPERTS = dict(experts_implementation="eager")  # grouped_mm (the default) has no float64 kernel


def _cases():
    """name -> (config class, model class, config arguments, input kind)."""
    causal = {
        "gpt2": ("GPT2", dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100)),
        "gpt_neo": ("GPTNeo", dict(num_layers=2, hidden_size=32, num_heads=2, vocab_size=100,
                                   attention_types=[[["global", "local"], 1]], max_position_embeddings=64)),
        "gptj": ("GPTJ", dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100, rotary_dim=8)),
        "gpt_neox": ("GPTNeoX", SMALL),
        "gpt_bigcode": ("GPTBigCode", dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100)),
        "phi": ("Phi", SMALL),
        "phi3": ("Phi3", DECODER),
        "bloom": ("Bloom", dict(n_layer=2, hidden_size=32, n_head=2, vocab_size=100)),
        "falcon": ("Falcon", {key: value for key, value in SMALL.items() if key != "intermediate_size"}),
        "gemma": ("Gemma", dict(DECODER, head_dim=16)),
        "gemma2": ("Gemma2", dict(DECODER, head_dim=16)),
        "gemma3": ("Gemma3Text", dict(DECODER, head_dim=16, sliding_window=4)),
        "llama": ("Llama", DECODER),
        "mistral": ("Mistral", DECODER),
        "qwen2": ("Qwen2", DECODER),
        "qwen3": ("Qwen3", dict(DECODER, head_dim=16)),
        "stablelm": ("StableLm", DECODER),
        "starcoder2": ("Starcoder2", DECODER),
        "olmo": ("Olmo", DECODER),
        "olmo2": ("Olmo2", DECODER),
        "cohere": ("Cohere", DECODER),
        "granite": ("Granite", DECODER),
        "opt": ("OPT", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, ffn_dim=64, vocab_size=100,
                            word_embed_proj_dim=32)),
        "mixtral": ("Mixtral", dict(DECODER, num_local_experts=4, num_experts_per_tok=2, **EXPERTS)),
        "qwen2_moe": ("Qwen2Moe", dict(DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=32, **EXPERTS)),
        "qwen3_moe": ("Qwen3Moe", dict(DECODER, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=32, **EXPERTS)),
        "olmoe": ("Olmoe", dict(DECODER, num_experts=4, num_experts_per_tok=2, **EXPERTS)),
    }
    classifying = {
        "bert": ("Bert", SMALL),
        "roberta": ("Roberta", SMALL),
        "xlm_roberta": ("XLMRoberta", SMALL),
        "distilbert": ("DistilBert", dict(n_layers=2, dim=32, n_heads=2, hidden_dim=64, vocab_size=100)),
        "electra": ("Electra", dict(SMALL, embedding_size=32)),
        "albert": ("Albert", dict(SMALL, embedding_size=16)),
        "mpnet": ("MPNet", SMALL),
        "mobilebert": ("MobileBert", dict(SMALL, embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32,
                                          num_feedforward_networks=1)),
        "deberta_v2": ("DebertaV2", SMALL),
        "deberta_v2_relative": ("DebertaV2", dict(SMALL, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                  max_relative_positions=16, position_buckets=8)),
        "modernbert": ("ModernBert", dict(SMALL, global_attn_every_n_layers=1, pad_token_id=0, bos_token_id=1,
                                          eos_token_id=2, cls_token_id=1, sep_token_id=2)),
    }
    images = {
        "vit": ("ViT", VISION),
        "deit": ("DeiT", VISION),
        "beit": ("Beit", VISION),
        "dinov2": ("Dinov2", dict(VISION, mlp_ratio=2)),
        "swin": ("Swin", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                              window_size=4)),
        "convnext": ("ConvNext", dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)),
    }
    cases = {name: (f"{prefix}Config", f"{prefix}ForCausalLM", arguments, "causal")
             for name, (prefix, arguments) in causal.items()}
    cases["gpt2"] = ("GPT2Config", "GPT2LMHeadModel", causal["gpt2"][1], "causal")
    cases["gemma3"] = ("Gemma3TextConfig", "Gemma3ForCausalLM", causal["gemma3"][1], "causal")
    cases.update({name: (f"{prefix}Config", f"{prefix}ForSequenceClassification", arguments, "embeddings")
                  for name, (prefix, arguments) in classifying.items()})
    cases.update({name: (f"{prefix}Config", f"{prefix}ForImageClassification", dict(arguments, num_labels=3),
                         "pixels") for name, (prefix, arguments) in images.items()})
    cases["t5"] = ("T5Config", "T5ForConditionalGeneration", dict(
        num_layers=2, num_decoder_layers=2, d_model=32, d_kv=16, num_heads=2, d_ff=64, vocab_size=100,
        decoder_start_token_id=0), "seq2seq")
    cases["bart"] = ("BartConfig", "BartForConditionalGeneration", dict(
        encoder_layers=2, decoder_layers=2, d_model=32, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64), "seq2seq")
    text = dict(SMALL, bos_token_id=0, eos_token_id=99)
    cases["clip_vision"] = ("CLIPVisionConfig", "CLIPVisionModelWithProjection", dict(VISION, projection_dim=8),
                            "image_embeds")
    cases["clip_text"] = ("CLIPTextConfig", "CLIPTextModelWithProjection", dict(text, projection_dim=8),
                          "text_embeds")
    cases["clip"] = ("CLIPConfig", "CLIPModel", dict(projection_dim=8, text_config=text, vision_config=VISION),
                     "dual")
    cases["siglip"] = ("SiglipConfig", "SiglipModel", dict(text_config=SMALL, vision_config=VISION), "dual")
    return cases


class _Scores(torch.nn.Module):
    """The model as a function of one tensor (token embeddings or pixels) to ``(batch, classes)`` scores: a causal
    LM's or an encoder-decoder's logits at the last position, a dual encoder's image-text similarities (two fixed
    texts), a CLIP tower's projected embedding."""

    def __init__(self, model, kind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, input):
        if self.kind in ("pixels", "image_embeds"):
            output = self.model(pixel_values=input)
        elif self.kind == "dual":
            return self.model(pixel_values=input, input_ids=torch.arange(1, 5).expand(2, -1)).logits_per_image
        elif self.kind == "text_embeds":  # CLIP's text tower needs its token ids (it pools at the end token)
            embedding = self.model.text_model.embeddings.token_embedding
            hook = embedding.register_forward_hook(lambda module, args, output: input)
            try:
                return self.model(input_ids=torch.arange(1, input.shape[1] + 1).expand(input.shape[0], -1)
                                  ).text_embeds
            finally:
                hook.remove()
        elif self.kind == "seq2seq":
            output = self.model(inputs_embeds=input, decoder_inputs_embeds=input)
        else:
            output = self.model(inputs_embeds=input)
        if self.kind == "image_embeds":
            return output.image_embeds
        logits = output.logits
        return logits[:, -1] if logits.dim() == 3 else logits


def _model(name, **overrides):
    import transformers

    config_name, model_name, arguments, kind = _cases()[name]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name} (an older release)")
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**dict(arguments, **overrides))
    model = getattr(transformers, model_name)(config).double().eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("bias"):
                parameter.zero_()
    return model, kind


def _input(model, kind):
    torch.manual_seed(1)
    if kind in ("pixels", "image_embeds", "dual"):
        return torch.randn(1, 3, 32, 32, dtype=torch.float64)
    return model.get_input_embeddings()(torch.randint(3, 100, (1, 6))).detach()


def _explained(model, kind, input, attention="cp"):
    """Convert and explain (CP-LRP + LRP-0): relevance, scores, absorbed shares, and torchlrp's warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.fx cannot trace")  # explained at run time
        converted = lrp.convert(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        relevance, scores, absorbed = lrp.explain(_Scores(converted, kind), input, start="logit",
                                                  return_scores=True, return_absorbed=True,
                                                  rule=lrp.Composite(default="zero", attention=attention))
    return relevance, scores, absorbed, [str(w.message) for w in caught if "torchlrp" in str(w.message)]


@pytest.mark.parametrize("name", sorted(_cases()))
def test_hugging_face_architecture_conserves(name):
    model, kind = _model(name)
    input = _input(model, kind)
    with torch.no_grad():
        expected = _Scores(model, kind)(input)
    relevance, scores, absorbed, warned = _explained(model, kind, input)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)  # an explanation keeps the output
    assert torch.isfinite(relevance).all()
    assert relevance.abs().sum() > 0
    assert not warned, warned  # every call had a rule
    total = relevance.sum() + sum(absorbed.values(), torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(total, expected.max(), rtol=1e-6, atol=0)


_BOTH_ATTENTIONS = ("bert", "roberta", "gpt2", "gptj", "llama", "qwen3", "gemma3", "mistral", "phi",
                    "falcon", "bart", "t5", "vit", "dinov2", "clip_vision")


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
@pytest.mark.parametrize("name", _BOTH_ATTENTIONS)
def test_eager_and_sdpa_attention_explain_alike(name, attention):
    """The eager attention (its softmax and products explained call by call) and SDPA (explained through torch's
    kernel) give the same relevance, under CP-LRP and AttnLRP."""
    relevances = []
    for implementation in ("eager", "sdpa"):
        model, kind = _model(name, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
        relevances.append(_explained(model, kind, _input(model, kind), attention)[0])
    torch.testing.assert_close(relevances[0], relevances[1], rtol=1e-6, atol=1e-6 * relevances[1].abs().max())


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_mixture_of_experts_implementations_explain_alike(implementation):
    """transformers' three ways of running the experts (a loop with index_add_, one bmm over the selected weights,
    grouped_mm) get the same relevance; grouped_mm runs in float32 only, compared at float32's precision."""
    model, kind = _model("mixtral", experts_implementation=implementation)
    input = _input(model, kind)
    reference = _explained(_model("mixtral")[0], kind, input)[0]
    torch.testing.assert_close(_explained(model, kind, input)[0], reference, rtol=1e-8, atol=1e-10)
    if implementation == "batched_mm" and hasattr(torch.nn.functional, "grouped_mm"):
        grouped, _ = _model("mixtral", experts_implementation="grouped_mm")
        relevance = _explained(grouped.float(), kind, input.float())[0]
        torch.testing.assert_close(relevance.double(), reference, rtol=1e-3, atol=1e-4 * reference.abs().max())


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
@pytest.mark.parametrize("name", ["gpt_neo", "gptj", "gpt2", "llama"])
def test_the_explained_forward_computes_what_the_model_computes(name, attention):
    """GPT-Neo and GPT-J upcast their attention scores to float32 and add a float64 mask: explain mode keeps those
    types, so the output is the model's to the last bit (float64)."""
    model, kind = _model(name)
    input = _input(model, kind)
    with torch.no_grad():
        expected = _Scores(model, kind)(input)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.fx cannot trace")
        converted = lrp.convert(model)
    with lrp.rules_applied(converted, lrp.Composite(default="zero", attention=attention)):
        explained = _Scores(converted, kind)(input.clone().requires_grad_(True))
    torch.testing.assert_close(explained.detach(), expected, rtol=1e-13, atol=1e-15)
