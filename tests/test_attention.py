"""Attention (issue 13): nn.MultiheadAttention's twin, scaled_dot_product_attention, ViT; formulas and conservation."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

from torchvision.models.swin_transformer import shifted_window_attention

import torchlrp as lrp

torch.fx.wrap("shifted_window_attention")  # a leaf call of the traced graph here too, as in torchvision's module


def _attention_model(batch_first=True, kdim=None, bias=True):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim,
                                                         bias=bias)

        def forward(self, x):
            return self.attention(x, x, x)[0].sum(-1)

    torch.manual_seed(0)
    return Model().double().eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "padding", "causal"])
def test_multihead_attention_twin_computes_what_torch_computes(batch_first, masks):
    model = _attention_model(batch_first)
    converted = lrp.convert(model)
    assert isinstance(converted.attention, lrp.modules.MultiheadAttention)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    kwargs = {}
    if masks == "bool":
        kwargs["attn_mask"] = torch.rand(5, 5) > 0.7
        kwargs["attn_mask"].fill_diagonal_(False)
    elif masks == "float":
        kwargs["attn_mask"] = torch.randn(2 * 2, 5, 5, dtype=torch.float64)
    elif masks == "padding":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 5, [False, False, False, True, True]])
    elif masks == "causal":
        kwargs["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
        kwargs["is_causal"] = True
    expected, expected_weights = model.attention(x, x, x, **kwargs)
    carrier = x.clone().requires_grad_(True)
    with lrp.rules_applied(converted, "epsilon"):
        ours, weights = converted.attention(carrier, carrier, carrier, **kwargs)
        per_head = converted.attention(x, x, x, average_attn_weights=False, **kwargs)[1]
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(per_head, model.attention(x, x, x, average_attn_weights=False, **kwargs)[1])
    (relevance,) = torch.autograd.grad(ours, carrier, torch.ones_like(ours))
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    torch.testing.assert_close(converted(x), model(x))


def _reference_attention_relevance(module, x, relevance_out, mode):
    """Relevance of ``x`` (B, L, E) through self-attention with LRP-0 projections, from the formulas."""
    E, H = module.embed_dim, module.num_heads
    wq, wk, wv = module.in_proj_weight.detach().chunk(3)
    bq, bk, bv = module.in_proj_bias.detach().chunk(3)
    wo, bo = module.out_proj.weight.detach(), module.out_proj.bias.detach()
    q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    split = lambda t: t.unflatten(-1, (H, -1)).transpose(1, 2)  # noqa: E731
    qh, kh, vh = split(q), split(k), split(v)
    d = E // H
    scores = torch.einsum("bhie,bhje->bhij", qh, kh) / d ** 0.5
    a = scores.softmax(-1)
    o = torch.einsum("bhij,bhjf->bhif", a, vh)
    merged = o.transpose(1, 2).flatten(2)
    y = merged @ wo.T + bo
    # out projection, LRP-0: R_m = m * W^T (R / y)
    r_merged = merged * ((relevance_out / y) @ wo)
    r_o = r_merged.unflatten(-1, (H, -1)).transpose(1, 2)
    s = r_o / o
    share = 0.5 if mode == "attnlrp" else 1.0
    r_v = share * torch.einsum("bhij,bhjf,bhif->bhjf", a, vh, s)
    r_q = torch.zeros_like(qh)
    r_k = torch.zeros_like(kh)
    if mode == "attnlrp":
        r_a = 0.5 * torch.einsum("bhij,bhjf,bhif->bhij", a, vh, s)
        r_scores = scores * (r_a - a * r_a.sum(-1, keepdim=True))  # AttnLRP softmax rule
        t = r_scores / scores
        r_q = 0.5 * torch.einsum("bhie,bhje,bhij->bhie", qh, kh, t) / d ** 0.5
        r_k = 0.5 * torch.einsum("bhie,bhje,bhij->bhje", qh, kh, t) / d ** 0.5
    merge = lambda t: t.transpose(1, 2).flatten(2)  # noqa: E731
    total = torch.zeros_like(x)
    for r, w, z in ((merge(r_q), wq, q), (merge(r_k), wk, k), (merge(r_v), wv, v)):
        total = total + x * ((r / z) @ w)
    return total


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_multihead_attention_relevance_matches_the_formulas(mode):
    model = _attention_model()
    converted = lrp.convert(model)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    start = torch.randn(2, 4, 8, dtype=torch.float64)

    class Attend(torch.nn.Module):
        def __init__(self, attention):
            super().__init__()
            self.attention = attention

        def forward(self, x):
            return self.attention(x, x, x, need_weights=False)[0]

    wrapped = Attend(converted.attention)
    ours = lrp.explain(wrapped, x, output_relevance=start, rule=lrp.Composite(default="zero", attention=mode))
    expected = _reference_attention_relevance(model.attention, x, start, mode)
    torch.testing.assert_close(ours, expected)


def _tiny_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5)
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision initializes the head to zero (every logit 0)
    return model.double().eval()


def test_vit_converts_keeps_outputs_and_conserves_with_cp_lrp():
    model = _tiny_vit()
    converted = lrp.convert(model)
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(converted(x), model(x))
    # every bias and the position embedding zero: LRP-0 with CP-LRP conserves the logit between the pixels and the
    # class token (the documented absorbing terms)
    with torch.no_grad():
        for name, parameter in converted.named_parameters():
            if name.endswith("bias") or name.endswith("pos_embedding"):
                parameter.zero_()
    logits = converted(x)
    target = logits.argmax(1)
    carrier = x.clone().requires_grad_(True)
    with lrp.rules_applied(converted, lrp.Composite(default="zero", attention="cp")) as state:
        output = converted(carrier)
    start = torch.zeros_like(output).scatter_(1, target[:, None], logits.gather(1, target[:, None]))
    leaves = [leaf for name, leaf in state.absorbed if name == "class_token"]  # taken where it is concatenated
    pixels, *tokens = torch.autograd.grad(output, (carrier, *leaves), start, allow_unused=True)
    token = sum(t.sum() for t in tokens if t is not None)
    assert leaves and any(t is not None for t in tokens)
    torch.testing.assert_close(pixels.sum() + token.sum(), start.sum(), rtol=1e-6, atol=1e-8)
    assert pixels.sum().abs() > 0.05 * start.sum().abs()  # the pixels get a real share, not all left on the token
    # with the position embedding back, its share is reported by explain (under the name of the sum adding it)
    with torch.no_grad():
        converted.encoder.pos_embedding.normal_(std=0.1)
    logits = converted(x)
    start = torch.zeros_like(logits).scatter_(1, target[:, None], logits.gather(1, target[:, None]))
    relevance, absorbed = lrp.explain(converted, x, output_relevance=start, return_absorbed=True,
                                      rule=lrp.Composite(default="zero", attention="cp"))
    assert set(absorbed) == {"class_token", "encoder.add"}
    torch.testing.assert_close(relevance.sum() + sum(absorbed.values()), start.sum(), rtol=1e-6, atol=1e-8)
    assert absorbed["encoder.add"].abs() > 0
    # AttnLRP's softmax rule does not conserve by itself (the softmax's implicit bias), but stays finite
    attnlrp = lrp.explain(converted, x, rule=lrp.Composite(default="epsilon"))
    assert torch.isfinite(attnlrp).all() and not torch.allclose(attnlrp, pixels)


def test_scaled_dot_product_attention_converts_and_matches_the_twin():
    class Model(torch.nn.Module):  # the Hugging Face style: three projections, then the fused attention call
        def __init__(self, attention):
            super().__init__()
            self.heads = attention.num_heads
            self.projections = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
            with torch.no_grad():
                for projection, weight, bias in zip(self.projections, attention.in_proj_weight.chunk(3),
                                                    attention.in_proj_bias.chunk(3)):
                    projection.weight.copy_(weight)
                    projection.bias.copy_(bias)
            self.out_proj = torch.nn.Linear(8, 8)
            self.out_proj.load_state_dict(attention.out_proj.state_dict())

        def forward(self, x):
            q, k, v = (projection(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                       for projection in self.projections)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out_proj(out.transpose(1, 2).flatten(2))

    reference = _attention_model()
    model = Model(reference.attention).double().eval()
    converted = lrp.convert(model)
    assert any(isinstance(m, lrp.modules.ScaledDotProductAttention) for m in converted.modules())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(converted(x), model(x))
    start = torch.randn(2, 5, 8, dtype=torch.float64)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)

    class Twin(torch.nn.Module):
        def __init__(self, attention):
            super().__init__()
            self.attention = attention

        def forward(self, x):
            return self.attention(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]

    twin = lrp.convert(Twin(reference.attention))
    for mode in ("attnlrp", "cp"):
        composite = lrp.Composite(default="epsilon", attention=mode)
        torch.testing.assert_close(lrp.explain(converted, x, output_relevance=start, rule=composite),
                                   lrp.explain(twin, x, output_relevance=start, rule=composite))


def test_attention_errors():
    with pytest.raises(ValueError, match="attention must be one of"):
        lrp.Composite(attention="rollout")
    model = torch.nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True).eval()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = model

        def forward(self, x):
            return self.attention(x, x, x)[0].sum(-1)

    converted = lrp.convert(Model())
    with pytest.raises(ValueError, match="add_bias_kv"):
        lrp.explain(converted, torch.randn(1, 3, 8), output_relevance=torch.ones(1, 3))


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_shifted_window_attention_on_one_window_matches_the_formulas(mode):
    """One window covering the image, no shift, relative position bias zero: Swin's attention is plain
    self-attention, so its relevance is the formula reference's for a multi-head attention with the same weights."""
    reference = _attention_model()
    attention = reference.attention

    class Window(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_weight = attention.in_proj_weight
            self.qkv_bias = attention.in_proj_bias
            self.proj = attention.out_proj
            self.register_buffer("bias", torch.zeros(1, 2, 4, 4, dtype=torch.float64))

        def forward(self, x):
            return shifted_window_attention(x, self.qkv_weight, self.proj.weight, self.bias, [2, 2], 2, [0, 0],
                                            qkv_bias=self.qkv_bias, proj_bias=self.proj.bias, training=False)

    model = Window().eval()
    converted = lrp.convert(model)
    assert any(isinstance(m, lrp.modules.attention.ShiftedWindowAttention) for m in converted.modules())
    x = torch.randn(2, 2, 2, 8, dtype=torch.float64)
    torch.testing.assert_close(converted(x), model(x))
    start = torch.randn(2, 2, 2, 8, dtype=torch.float64)
    ours = lrp.explain(converted, x, output_relevance=start, rule=lrp.Composite(default="zero", attention=mode))
    expected = _reference_attention_relevance(attention, x.reshape(2, 4, 8), start.reshape(2, 4, 8), mode)
    torch.testing.assert_close(ours, expected.reshape(2, 2, 2, 8))


def test_shifted_windows_conserve_under_cp_lrp():
    """Padding, cyclic shifts, the window mask and the bias are index maps or constants: with CP-LRP and zero
    projection biases, relevance is conserved through a shifted, padded window attention."""
    torch.manual_seed(0)

    class Window(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24, bias=False)
            self.proj = torch.nn.Linear(8, 8, bias=False)
            self.register_buffer("bias", torch.randn(1, 2, 9, 9))

        def forward(self, x):
            return shifted_window_attention(x, self.qkv.weight, self.proj.weight, self.bias, [3, 3], 2, [1, 1],
                                            training=False)

    model = Window().double().eval()
    converted = lrp.convert(model)
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(converted(x), model(x))
    start = torch.randn(2, 5, 7, 8, dtype=torch.float64)
    relevance = lrp.explain(converted, x, output_relevance=start, rule=lrp.Composite(default="zero", attention="cp"))
    torch.testing.assert_close(relevance.sum(), start.sum())
    attnlrp = lrp.explain(converted, x, output_relevance=start, rule=lrp.Composite(default="zero"))
    assert torch.isfinite(attnlrp).all()


def test_einsum_products_take_the_uniform_rule():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))

        def forward(self, a, b):
            return torch.einsum("bij,bjk->bik", torch.einsum("bij,jk->bik", a, self.weight), b)

    model = Model().eval()

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.linear = torch.nn.Linear(4, 4).double()

        def forward(self, x):
            return self.model(self.linear(x), x.transpose(1, 2))

    converted = lrp.convert(Pair().eval())
    kinds = [m for m in converted.modules() if isinstance(m, lrp.modules.Einsum)]
    assert sorted(m.shares for m in kinds) == [(0.5, 0.5), (1.0, 0.0)]
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(converted(x), Pair.forward(converted, x))
    relevance = lrp.explain(converted, x, output_relevance=torch.ones(2, 3, 3, dtype=torch.float64))
    assert torch.isfinite(relevance).all()



@pytest.mark.parametrize("product", ["bmm", "matmul", "operator", "einsum", "method"])
def test_products_of_two_activations_match_the_uniform_rule_formula(product):
    """``a @ b`` with both factors depending on the input, however the model writes it: each factor takes half of
    the epsilon rule's relevance with the other held constant (AttnLRP's uniform rule), checked against the formula
    written out here, through a linear layer on one side and a transpose on the other."""
    products = {"bmm": torch.bmm, "matmul": torch.matmul, "operator": lambda a, b: a @ b,
                "einsum": lambda a, b: torch.einsum("bij,bjk->bik", a, b), "method": lambda a, b: a.bmm(b)}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4, bias=False).double()

        def forward(self, x):
            return products[product](self.linear(x), x.transpose(1, 2))

    torch.manual_seed(0)
    model = Model().eval()
    converted = lrp.convert(model)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    start = torch.randn(2, 3, 3, dtype=torch.float64)

    def stab(v, epsilon):
        return v + torch.where(v >= 0, torch.full_like(v, epsilon), torch.full_like(v, -epsilon))

    weight = model.linear.weight.detach()
    a = x @ weight.T
    signal = start / stab(a @ x.transpose(1, 2), 1e-6)  # a parameter-free operation: the composite's 1e-6
    relevance_a = a * (signal @ x) / 2
    relevance_b = x.transpose(1, 2) * (a.transpose(1, 2) @ signal) / 2
    expected = x * ((relevance_a / stab(a, 0.1)) @ weight) + relevance_b.transpose(1, 2)
    relevance = lrp.explain(converted, x, output_relevance=start, rule=lrp.rules.Epsilon(0.1))
    torch.testing.assert_close(relevance, expected, rtol=1e-10, atol=1e-12)

def test_vit_trace_records_each_block_output_and_conserves_per_block():
    model = _tiny_vit()
    converted = lrp.convert(model)
    with torch.no_grad():
        for name, parameter in converted.named_parameters():
            if name.endswith("bias") or name.endswith("pos_embedding"):
                parameter.zero_()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    logits = converted(x)
    block = torchvision.models.vision_transformer.EncoderBlock
    with lrp.trace.collect(converted, layers=[block]) as trace:
        lrp.explain(converted, x, rule=lrp.Composite(default="zero", attention="cp"), start="logit")
    assert list(trace) == ["input", "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    for name in list(trace)[1:]:  # each block's output keeps the whole logit (biases zero, CP-LRP, LRP-0)
        assert trace[name].shape == (2, 17, 16)
        torch.testing.assert_close(trace[name].flatten(1).sum(1), logits.max(1).values)
    ratios = trace.conservation().ratios
    torch.testing.assert_close(ratios["encoder.layers.encoder_layer_1"], torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("name", ["vit_b_32", "swin_t"])
@pytest.mark.parametrize("attention", ["attnlrp", "cp"])
def test_transformer_under_bfloat16_autocast_loses_no_more_than_the_gradient(name, attention, device):
    """AttnLRP and CP-LRP under bfloat16 autocast: finite, and as close to float32 as gradient x input of the same
    model is to its own float32 value (the control: what bfloat16 itself costs on this random model). Swin: its
    attention's constant (float32 bias) and kept scores (bfloat16) meet in the backward."""
    torch.manual_seed(0)
    if name == "vit_b_32":
        vit = torchvision.models.vit_b_32(image_size=64).eval().to(device)
        torch.nn.init.normal_(vit.heads.head.weight, std=0.1)
    else:
        vit = torchvision.models.swin_t().eval().to(device)
    model = lrp.convert(vit)
    x = torch.rand(2, 3, 64, 64, device=device)
    rule = lrp.Composite(attention=attention)
    target = vit(x).argmax(1)

    def gradient_x_input():
        carrier = x.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(vit(carrier).gather(1, target[:, None]).sum(), carrier)
        return (gradient * carrier).detach().float()

    def cosine(a, b):
        return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))

    reference, plain = lrp.explain(model, x, target, rule=rule), gradient_x_input()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        mixed, plain_mixed = lrp.explain(model, x, target, rule=rule), gradient_x_input()
    assert torch.isfinite(mixed).all() and mixed.dtype == torch.float32
    assert cosine(mixed, reference) > cosine(plain_mixed, plain) - 0.1


def _three_rules(query, key, value, constant, scale, epsilon):
    """The attention written as the three rules one after the other: ``q k^T`` and ``w v`` by the uniform rule,
    the softmax by AttnLRP's rule with the constant as its additive constant."""
    from torchlrp.functional.operations import bilinear_rule, softmax_rule

    scores = bilinear_rule(torch.matmul, query, key.transpose(-2, -1), (0.5, 0.5), epsilon, scale)
    return bilinear_rule(torch.matmul, softmax_rule(scores, -1, constant, epsilon), value, (0.5, 0.5), epsilon)


@pytest.mark.parametrize("epsilon", [1e-6, 0.5, 0.0])
@pytest.mark.parametrize("case", ["plain", "mask", "broadcast-bias", "per-window", "per-head-scale"])
def test_fused_attention_node_equals_the_three_rules(case, epsilon, device):
    """AttentionRelevance (torch's kernel forward, one backward) gives the relevance of the three rules applied one
    after the other, for each kind of constant and scale the callers pass, each stabilizer (0.5: one that changes
    the numbers; 0: LRP-0); and its forward is the attention. A second backward of the same forward (what it keeps
    is not modified) gives the same relevance."""
    from torchlrp.functional.attention import scaled_attention_rule

    torch.manual_seed(0)
    images, windows, heads, length, width = 2, 3, 2, 5, 4
    shape = (images * windows, heads, length, width)
    query, key, value = (torch.randn(shape, dtype=torch.float64, device=device) for _ in range(3))
    constant, scale = None, 0.7
    if case == "mask":
        constant = torch.zeros(length, length, dtype=torch.float64, device=device)
        constant.masked_fill_(torch.ones(length, length, dtype=torch.bool, device=device).triu(1),
                              torch.finfo(torch.float64).min)
    elif case == "broadcast-bias":
        constant = torch.randn(1, heads, length, length, dtype=torch.float64, device=device)
    elif case == "per-window":  # Swin: (1, windows, 1, N, N) per window of each image
        constant = torch.randn(1, windows, 1, length, length, dtype=torch.float64, device=device)
    elif case == "per-head-scale":  # Swin V2's logit scale
        scale = torch.tensor([2.0, 5.0], dtype=torch.float64, device=device).view(heads, 1, 1)
    start = torch.randn(shape, dtype=torch.float64, device=device)
    results = []
    for function in (scaled_attention_rule, _three_rules):
        inputs = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
        output = function(*inputs, constant, scale, epsilon)
        results.append((output.detach(), torch.autograd.grad(output, inputs, start, retain_graph=True)))
        if function is scaled_attention_rule:
            again = torch.autograd.grad(output, inputs, start)
    (fused_output, fused), (output, composed) = results
    torch.testing.assert_close(fused_output, output)
    for fused_relevance, relevance, repeated in zip(fused, composed, again):
        torch.testing.assert_close(fused_relevance, relevance, rtol=1e-9, atol=1e-12)
        assert torch.equal(repeated, fused_relevance)
        assert relevance.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("epsilon", [1e-6, 0.5, 0.0])
def test_stabilized_ratio_is_the_quotient_by_the_stabilized_values(dtype, epsilon, device):
    """``mul_stabilized_ratio_`` (|v| / (|v| + eps), no copysign) gives exactly ``t * v / stabilize(v, eps)``,
    at zeros of either sign, tiny and huge values, in each dtype; ``out`` may be the values themselves."""
    from torchlrp.functional.stabilize import mul_stabilized_ratio_, stabilize

    lowest = torch.finfo(dtype).min
    values = torch.tensor([0.0, -0.0, 1e-7, -1e-7, 0.3, -2.0, 1e4, lowest], dtype=dtype, device=device)
    target = torch.linspace(-0.9, 0.9, values.numel(), dtype=dtype, device=device)
    expected = target * values / stabilize(values, epsilon)
    copy = values.clone()
    for source, out in ((values, torch.empty_like(values)), (copy, copy)):
        ratio = mul_stabilized_ratio_(target.clone(), source, epsilon, out=out)
        assert torch.equal(ratio, expected), (ratio, expected)
    assert torch.isfinite(expected).all()


@pytest.mark.parametrize("epsilon", [1e-6, 0.0])
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
@pytest.mark.parametrize("case", ["plain", "causal", "boolean-mask", "additive-bias"])
def test_the_kernel_explains_attention_as_the_rules_do(case, mode, epsilon, device):
    """KernelAttentionRelevance (attention_rule without weights: torch's kernel forward and backward) gives input x
    gradient halved at each product, written here with plain autograd on the attention's math; at epsilon 0 that is
    the relevance of the rules one by one -- AttnLRP's three rules, or under CP-LRP the epsilon rule of the weights
    (held constant) times the values -- and at 1e-6 within 1e-4 (relative L2) of it (the inner stabilizers it
    drops)."""
    from torchlrp.functional.attention import attention_mask, attention_rule, attention_weights

    torch.manual_seed(0)
    shape = (2, 3, 5, 4)
    query, key, value = (torch.randn(shape, dtype=torch.float64, device=device) for _ in range(3))
    mask, is_causal = None, case == "causal"
    if case == "boolean-mask":
        mask = torch.rand(5, 5, device=device) > 0.3
        mask.fill_diagonal_(True)
    elif case == "additive-bias":
        mask = torch.randn(1, 3, 5, 5, dtype=torch.float64, device=device)
    start = torch.randn(shape, dtype=torch.float64, device=device)
    constant = attention_mask(mask, is_causal, query, key)
    inputs = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
    output, _ = attention_rule(*inputs, mask, is_causal, 0.5, mode, epsilon, need_weights=False)
    relevance = torch.autograd.grad(output, inputs, start, allow_unused=True, retain_graph=True)
    again = torch.autograd.grad(output, inputs, start, allow_unused=True)  # a second backward of the same forward
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(relevance, again))
    references = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
    if mode == "cp":
        from torchlrp.functional.operations import bilinear_rule

        weights = attention_weights(query, key, constant, 0.5)
        expected_output = bilinear_rule(torch.matmul, weights, references[2], (0.0, 1.0), epsilon)
    else:
        expected_output = _three_rules(*references, constant, 0.5, epsilon)
    expected = torch.autograd.grad(expected_output, references, start, allow_unused=True)
    torch.testing.assert_close(output, expected_output.detach())
    if epsilon:  # the formula: s = R / stab(o), then q dq / 4, k dk / 4, v dv / 2 (CP: v dv) by plain autograd
        from torchlrp.functional.stabilize import stabilize

        leaves = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
        scores = leaves[0] @ leaves[1].transpose(-2, -1) * 0.5
        math_output = torch.softmax(scores if constant is None else scores + constant, -1) @ leaves[2]
        gradients = torch.autograd.grad(math_output, leaves, start / stabilize(math_output.detach(), epsilon))
        factors = (0.0, 0.0, 1.0) if mode == "cp" else (0.25, 0.25, 0.5)
        formula = [factor * leaf.detach() * gradient for factor, leaf, gradient in zip(factors, leaves, gradients)]
        for ours, theirs, rules in zip(relevance, formula, expected):
            if ours is not None:
                torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
                if rules is not None:  # and the rules one by one, with their inner stabilizers: close
                    assert float((ours - rules).norm() / rules.norm()) < 1e-4, float((ours - rules).norm() / rules.norm())
        return
    torch.testing.assert_close(output, F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                                      is_causal=is_causal))
    for ours, theirs in zip(relevance, expected):
        if theirs is None or mode == "cp" and ours is None:
            assert ours is None or not ours.abs().sum()
            continue
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)
        assert ours.abs().sum() > 0


@pytest.mark.parametrize("epsilon", [1e-6, 0.5])
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_grouped_query_attention_sums_each_key_value_heads_relevance(mode, epsilon, device):
    """``enable_gqa``: the relevance of a key/value head is the sum over its group of query heads -- the relevance
    of the keys and values repeated for each query head (the reference), summed back; through the kernel (1e-6) and
    through the rules one by one (0.5)."""
    from torchlrp.functional.attention import attention_rule

    torch.manual_seed(0)
    query = torch.randn(2, 4, 5, 8, dtype=torch.float64, device=device)
    key, value = (torch.randn(2, 2, 5, 8, dtype=torch.float64, device=device) for _ in range(2))
    start = torch.randn(2, 4, 5, 8, dtype=torch.float64, device=device)
    inputs = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
    output, _ = attention_rule(*inputs, None, True, None, mode, epsilon, need_weights=False, enable_gqa=True)
    ours = torch.autograd.grad(output, inputs, start, allow_unused=True)
    repeated = [query.clone().requires_grad_()] + [t.repeat_interleave(2, dim=1).requires_grad_() for t in (key, value)]
    expected_output, _ = attention_rule(*repeated, None, True, None, mode, epsilon, need_weights=False)
    expected = torch.autograd.grad(expected_output, repeated, start, allow_unused=True)
    torch.testing.assert_close(output, expected_output)
    torch.testing.assert_close(output, F.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                                      enable_gqa=True))
    for index, (mine, theirs) in enumerate(zip(ours, expected)):
        if theirs is None:
            assert mine is None or not mine.abs().sum()
            continue
        if index:  # keys and values: the group's sum
            theirs = theirs.unflatten(1, (2, 2)).sum(2)
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)


class _Pooling(torch.nn.Module):
    """open_clip's attention pooling: ``F.multi_head_attention_forward`` with separate projections, the mean token
    as the query."""

    def __init__(self, untraceable=False):
        super().__init__()
        self.untraceable = untraceable
        self.attention = torch.nn.MultiheadAttention(8, 2, kdim=8, vdim=8, bias=True)
        self.attention.q_proj_weight, self.attention.k_proj_weight, self.attention.v_proj_weight = (
            torch.nn.Parameter(torch.randn(8, 8) * 0.3) for _ in range(3))
        self.attention._qkv_same_embed_dim = False
        self.attention.in_proj_weight = None
        with torch.no_grad():
            self.attention.in_proj_bias.zero_()
            self.attention.out_proj.bias.zero_()

    def forward(self, x):  # x: (N, L, 8)
        if self.untraceable and float(x.detach().abs().sum()) < 0:
            x = -x
        x = torch.cat([x.mean(1, keepdim=True), x], 1).transpose(0, 1)
        a = self.attention
        output, _ = F.multi_head_attention_forward(
            x[:1], x, x, 8, 2, None, a.in_proj_bias, None, None, False, 0.0, a.out_proj.weight, a.out_proj.bias,
            use_separate_proj_weight=True, q_proj_weight=a.q_proj_weight, k_proj_weight=a.k_proj_weight,
            v_proj_weight=a.v_proj_weight, training=False, need_weights=False)
        return output[0]


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_functional_multi_head_attention_is_explained_as_the_module(attention):
    """``F.multi_head_attention_forward`` (open_clip's ModifiedResNet) gets nn.MultiheadAttention's rules: the same
    relevance as the module twin with the same weights, traced and at run time, and LRP-0 + CP-LRP conserves."""
    torch.manual_seed(0)
    functional = _Pooling().double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = functional.attention

        def forward(self, x):
            x = torch.cat([x.mean(1, keepdim=True), x], 1).transpose(0, 1)
            return self.attention(x[:1], x, x, need_weights=False)[0][0]

    rule = lrp.Composite(default="zero", attention=attention)
    expected = lrp.explain(lrp.convert(Module()), x, target=0, rule=rule)
    traced = lrp.convert(functional)
    assert isinstance(traced, torch.fx.GraphModule)
    torch.testing.assert_close(lrp.explain(traced, x, target=0, rule=rule), expected, rtol=1e-10, atol=1e-12)
    untraceable = _Pooling(untraceable=True).double().eval()
    untraceable.load_state_dict(functional.state_dict())
    with pytest.warns(UserWarning, match="cannot trace"):
        run_time = lrp.convert(untraceable)
    torch.testing.assert_close(lrp.explain(run_time, x, target=0, rule=rule), expected, rtol=1e-10, atol=1e-12)
    if attention == "cp":
        relevance, report = lrp.explain(traced, x, target=0, rule=rule, start="logit", return_conservation=True)
        assert report.conserved()
