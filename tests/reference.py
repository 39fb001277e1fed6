"""An independent reference: every rule written out from its formula on the dense matrix of the layer.

The layer's map on its *padded* input is turned into a dense matrix ``M`` (out x in) by ``torch.func.jacrev``;
each rule is then the textbook sum over contributions ``z_ij = M_ji x_i`` for one sample, and the padded border
is folded back with the Jacobian of the padding. Nothing here shares code with torchlrp.
"""
import torch
import torch.nn.functional as F


def layer_matrices(module, x):
    """Return (pad, matrix_fn, bias): pad maps x to the padded input, matrix_fn(w) the dense matrix for weight w."""
    if isinstance(module, torch.nn.Linear):
        return (lambda t: t), (lambda w: w), module.bias
    n = len(module.kernel_size)
    if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
        transposed = (None, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n]

        def transposed_matrix(w):
            def apply(inp):
                return transposed(inp[None], w, None, module.stride, module.padding, module.output_padding,
                                  module.groups, module.dilation)[0].flatten()
            return torch.func.jacrev(apply)(x[0]).reshape(-1, x[0].numel())

        return (lambda t: t), transposed_matrix, module.bias
    conv = (None, F.conv1d, F.conv2d, F.conv3d)[n]
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        pads = []
        for p in reversed(module.padding):
            pads += [p, p]
        mode = "constant"
    else:
        pads = list(module._reversed_padding_repeated_twice)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode

    def pad(t):
        return F.pad(t, pads, mode=mode)

    padded = pad(x[:1])

    def matrix(w):
        def apply(inp):
            return conv(inp[None], w, None, module.stride, 0, module.dilation, module.groups)[0].flatten()
        return torch.func.jacrev(apply)(padded[0]).reshape(-1, padded[0].numel())

    return pad, matrix, module.bias


def _stab(z, eps):
    sign = torch.where(z >= 0, 1.0, -1.0).to(z)
    out = z + eps * sign
    return torch.where(out == 0, torch.inf, out)


def reference_relevance(module, rule_name, x, relevance, **params):
    """Input relevance of ``module`` for ``rule_name`` (per sample, from the formula)."""
    pad, matrix, bias = layer_matrices(module, x)
    w = module.weight.detach()
    out_channels = getattr(module, "out_channels", w.shape[0])
    results = []
    for xs, rs in zip(x, relevance):
        xp = pad(xs[None])[0]
        shape = xp.shape
        xv, rv = xp.flatten(), rs.flatten()
        M = matrix(w)
        positions = rv.numel() // out_channels
        b = torch.zeros(out_channels, dtype=x.dtype) if bias is None else bias.detach()
        bv = b.repeat_interleave(positions) if not isinstance(module, torch.nn.Linear) else b
        eps = params.get("stabilizer", params.get("epsilon", 1e-6))
        C = M * xv[None, :]  # contributions z_ji
        if rule_name in ("epsilon", "zero"):
            z = C.sum(1) + bv
            r = (C / _stab(z, eps)[:, None] * rv[:, None]).sum(0)
        elif rule_name == "gradient":
            r = (M * rv[:, None]).sum(0)
        elif rule_name in ("alphabeta", "zplus"):
            alpha, beta = params.get("alpha", 1.0), params.get("beta", 0.0)
            bb = torch.zeros_like(bv) if params.get("ignore_bias") else bv
            Cp, Cn = C.clamp(min=0), C.clamp(max=0)
            zp = Cp.sum(1) + bb.clamp(min=0)
            zn = Cn.sum(1) + bb.clamp(max=0)
            r = alpha * (Cp / _stab(zp, eps)[:, None] * rv[:, None]).sum(0) \
                - beta * (Cn / _stab(zn, eps)[:, None] * rv[:, None]).sum(0)
        elif rule_name == "gamma":
            g = params["gamma"]
            z = C.sum(1) + bv
            Cp, Cn = C.clamp(min=0), C.clamp(max=0)
            up = C + g * Cp  # favours positive contributions
            down = C + g * Cn
            zu = up.sum(1) + bv + g * bv.clamp(min=0)
            zd = down.sum(1) + bv + g * bv.clamp(max=0)
            rpos = (up / _stab(zu, eps)[:, None] * (rv * (z > 0))[:, None]).sum(0)
            rneg = (down / _stab(zd, eps)[:, None] * (rv * (z < 0))[:, None]).sum(0)
            r = rpos + rneg
        elif rule_name == "zbox":
            low = pad(torch.as_tensor(params["low"], dtype=x.dtype).expand_as(xs)[None])[0].flatten()
            high = pad(torch.as_tensor(params["high"], dtype=x.dtype).expand_as(xs)[None])[0].flatten()
            Cb = C - M.clamp(min=0) * low[None, :] - M.clamp(max=0) * high[None, :]
            r = (Cb / _stab(Cb.sum(1), eps)[:, None] * rv[:, None]).sum(0)
        elif rule_name in ("flat", "wsquare", "zplus_ones"):
            transform = {"flat": torch.ones_like, "wsquare": torch.square,
                         "zplus_ones": lambda t: t.clamp(min=0)}[rule_name]
            Mt = matrix(transform(w))
            ones = pad(torch.ones_like(xs)[None])[0].flatten()
            Ct = Mt * ones[None, :]
            z = Ct.sum(1)
            if rule_name == "wsquare":
                z = z + bv.square()
            r = (Ct / _stab(z, eps)[:, None] * rv[:, None]).sum(0)
        else:
            raise KeyError(rule_name)
        padded_r = r.reshape(shape)
        # fold the padded border back: transpose of the padding
        carrier = xs.detach().clone().requires_grad_(True)
        (folded,) = torch.autograd.grad(pad(carrier[None])[0], carrier, padded_r)
        results.append(folded)
    return torch.stack(results)
