"""Token-level attributions for generation: each row of the matrix equals ``lrp.explain`` of that prefix, the
future gets nothing, rows conserve, and on a model trained to copy the relevance finds the copied token."""
import importlib.util
import os
import warnings

import pytest
import torch

import torchlrp as lrp

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs the transformers extra: pip install -e '.[test]'")

CP_ZERO = lrp.Composite(default="zero", attention="cp")


def _llama(zero_biases=True):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config).double().eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.fx cannot trace")
        return model, lrp.convert(model)


class _Last(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, embeddings):
        return self.model(inputs_embeds=embeddings).logits[:, -1]


@pytest.mark.parametrize("rule", [CP_ZERO, lrp.Composite()])
def test_each_row_is_the_explanation_of_its_prefix(rule):
    model, converted = _llama()
    prompt = torch.randint(3, 100, (2, 5))
    result = lrp.explain_generation(converted, prompt, max_new_tokens=4, rule=rule)
    assert result.tokens.shape == (2, 9) and result.relevance.shape == (2, 4, 9) and result.prompt_length == 5
    with torch.no_grad():  # greedy: each generated token is the plain model's argmax
        logits = model(input_ids=result.tokens[:, :-1]).logits
    torch.testing.assert_close(result.generated, logits[:, 4:].argmax(-1))
    torch.testing.assert_close(result.logits, logits[:, 4:].gather(-1, result.generated[..., None])[..., 0])
    for step in range(4):
        length = 5 + step
        embeddings = model.get_input_embeddings()(result.tokens[:, :length]).detach()
        expected = lrp.explain(_Last(converted), embeddings, target=result.tokens[:, length], rule=rule,
                               start="logit").sum(-1)
        torch.testing.assert_close(result.relevance[:, step, :length], expected, rtol=1e-9, atol=1e-12)
        assert (result.relevance[:, step, length:] == 0).all()  # the future is not seen


def test_rows_conserve_with_cp_lrp_and_lrp_zero():
    _, converted = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run-time check stays silent
        result = lrp.explain_generation(converted, torch.randint(3, 100, (1, 4)), max_new_tokens=3, rule=CP_ZERO)
    torch.testing.assert_close(result.relevance.sum(-1), result.logits, rtol=1e-6, atol=0)
    assert result.conservation.conserved(1e-6)


def test_a_given_continuation_and_bad_input():
    _, converted = _llama()
    prompt, continuation = torch.randint(3, 100, (1, 4)), torch.tensor([[7, 8, 9]])
    result = lrp.explain_generation(converted, prompt, continuation=continuation, rule=CP_ZERO, start="one")
    assert result.generated.tolist() == [[7, 8, 9]]
    torch.testing.assert_close(result.relevance.sum(-1), torch.ones(1, 3, dtype=torch.float64), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="exactly one of max_new_tokens"):
        lrp.explain_generation(converted, prompt)
    with pytest.raises(ValueError, match="token ids"):
        lrp.explain_generation(converted, torch.randn(1, 4), max_new_tokens=2)
    with pytest.raises(ValueError, match="continuation must be"):
        lrp.explain_generation(converted, prompt, continuation=torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match="start must be"):
        lrp.explain_generation(converted, prompt, max_new_tokens=1, start="loss")
    with pytest.raises(ValueError, match="get_input_embeddings"):
        lrp.explain_generation(torch.nn.Linear(2, 2), prompt, max_new_tokens=1)


def test_the_copy_example_finds_the_copied_token(tmp_path):
    """The example's model learns to copy; the relevance of each copied token peaks at its source far more often
    than for the untrained model and for a random attribution (both near chance, 0.2)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "explain_generation.py")
    spec = importlib.util.spec_from_file_location("explain_generation_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(quick=True, plots=str(tmp_path))
    assert results["accuracy"] > 0.95 and results["copied"] > 0.95
    assert results["hit_rate"] > 0.9
    assert results["untrained_hit_rate"] < 0.5 and results["random_hit_rate"] < 0.5
    assert (tmp_path / "generation_copy.png").stat().st_size > 0 and (tmp_path / "generation_tokens.png").exists()


def test_generation_refuses_what_it_cannot_explain():
    """Item by item: a non-integer max_new_tokens, continuations that are not integer ids, ids outside the
    vocabulary, sequences past the model's position limit, and a model that is not causal -- one clear error each."""
    import transformers

    _, converted = _llama()
    prompt = torch.randint(3, 100, (1, 4))
    for bad in (2.5, True, "3"):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
            lrp.explain_generation(converted, prompt, max_new_tokens=bad)
    for continuation in (torch.tensor([[7.9, 8.2]]), torch.tensor([[True, False]]), [[7, 8]]):
        with pytest.raises(ValueError, match="continuation must be a tensor of integer token ids"):
            lrp.explain_generation(converted, prompt, continuation=continuation)
    with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
        lrp.explain_generation(converted, prompt, continuation=torch.tensor([[7, 100]]))
    with pytest.raises(ValueError, match=r"input_ids holds token ids outside \[0, 100\)"):
        lrp.explain_generation(converted, torch.tensor([[-1, 5]]), max_new_tokens=1)
    with pytest.raises(ValueError, match="token ids"):
        lrp.explain_generation(converted, torch.tensor([[True, False]]), max_new_tokens=1)
    # the position limit: a GPT-2 with 8 positions
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                                                n_positions=8)).double().eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.fx cannot trace")
        gpt2 = lrp.convert(gpt2)
    with pytest.raises(ValueError, match="takes at most 8"):
        lrp.explain_generation(gpt2, torch.randint(0, 50, (1, 6)), max_new_tokens=4)
    assert lrp.explain_generation(gpt2, torch.randint(0, 50, (1, 6)), max_new_tokens=3).relevance.shape == (1, 3, 9)
    # a bidirectional model (BERT as a masked language model): its logits see the future
    bert = transformers.BertForMaskedLM(transformers.BertConfig(num_hidden_layers=1, hidden_size=16,
                                                                num_attention_heads=2, intermediate_size=32,
                                                                vocab_size=50)).double().eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.fx cannot trace")
        bert = lrp.convert(bert)
    with pytest.raises(ValueError, match="needs a causal language model"):
        lrp.explain_generation(bert, torch.randint(0, 50, (1, 5)), continuation=torch.tensor([[3, 4]]))
