"""One use of every call in the operation table, for the two-engine test (``test_engines.py``).

``USES[label]`` is ``use(h, m)``: ``h`` an activation of shape (2, 4, 6, 6) (a convolution of the input), ``m`` the
model (its ``mods`` hold the modules a use needs, made by ``MODULES[label]``); it returns a tensor whose first
dimension is the batch. The labels are :func:`torchlrp.operations.registry.call_label`'s.
"""
import operator

import torch
import torch.nn.functional as F
import torchvision

import torchlrp as lrp

torch.fx.wrap("len")  # (fx records len() of a traced value only where it is wrapped)


def seq(h):
    """(2, 36, 4): the spatial positions as tokens."""
    return h.flatten(2).transpose(1, 2)


def gate(h):
    """A squeeze-excitation product: the sigmoid of the channel means scales the features."""
    return h * torch.sigmoid(h.mean((2, 3), keepdim=True))


IDS = torch.tensor([[0, 1], [1, 0]])
MASK = torch.arange(144).reshape(1, 4, 6, 6) % 3 == 0
INDEX = torch.arange(143, -1, -1).reshape(1, 4, 6, 6).expand(2, -1, -1, -1) % 36


def _sdpa(h):
    s = seq(h)
    return F.scaled_dot_product_attention(s.unsqueeze(1), s.unsqueeze(1), s.unsqueeze(1)).squeeze(1)


def _attention(h, softmax):
    s = seq(h)
    return softmax(s @ s.transpose(1, 2) / 2.0) @ s


USES = {
    # index maps
    **{f"Tensor.{name}": use for name, use in {
        "view": lambda h, m: h.view(2, -1), "view_as": lambda h, m: h.view_as(h), "reshape": lambda h, m: h.reshape(2, -1),
        "reshape_as": lambda h, m: h.reshape_as(h), "flatten": lambda h, m: h.flatten(1),
        "unflatten": lambda h, m: h.unflatten(1, (2, 2)), "permute": lambda h, m: h.permute(0, 2, 3, 1),
        "transpose": lambda h, m: h.transpose(1, 2), "swapaxes": lambda h, m: h.swapaxes(1, 3),
        "swapdims": lambda h, m: h.swapdims(1, 2), "movedim": lambda h, m: h.movedim(1, 3),
        "moveaxis": lambda h, m: h.moveaxis(1, 2), "t": lambda h, m: h.flatten(1).t().t(),
        "contiguous": lambda h, m: h.transpose(2, 3).contiguous(), "squeeze": lambda h, m: h[:, :1].squeeze(1),
        "unsqueeze": lambda h, m: h.unsqueeze(1), "expand": lambda h, m: h[:, :1].expand(-1, 3, -1, -1),
        "expand_as": lambda h, m: h[:, :1].expand_as(h), "repeat": lambda h, m: h.repeat(1, 2, 1, 1),
        "chunk": lambda h, m: h.chunk(2, 1)[1], "split": lambda h, m: h.split(3, 2)[0],
        "tensor_split": lambda h, m: h.tensor_split(2, 1)[0], "unbind": lambda h, m: h.unbind(1)[2],
        "narrow": lambda h, m: h.narrow(2, 1, 3), "select": lambda h, m: h.select(1, 2), "flip": lambda h, m: h.flip(2),
        "roll": lambda h, m: h.roll(1, 3), "clone": lambda h, m: h.clone(), "to": lambda h, m: h.to(torch.float64),
        "float": lambda h, m: h.float().double(), "double": lambda h, m: h.double(),
        "half": lambda h, m: h.half().double(), "bfloat16": lambda h, m: h.bfloat16().double(),
        "type": lambda h, m: h.type(torch.float64), "type_as": lambda h, m: h.type_as(h),
        "__getitem__": lambda h, m: h[:, 1:3, ::2], "cpu": lambda h, m: h.cpu(), "cuda": lambda h, m: h.cuda().cpu(),
        "requires_grad_": lambda h, m: h.requires_grad_(), "repeat_interleave": lambda h, m: h.repeat_interleave(2, 1),
        "gather": lambda h, m: h.flatten(2).gather(2, INDEX.flatten(2)), "index_select": lambda h, m: h.index_select(
            1, torch.tensor([3, 0, 0])), "take_along_dim": lambda h, m: h.flatten(2).take_along_dim(INDEX.flatten(2), 2),
        "scatter": lambda h, m: torch.zeros(2, 4, 40, dtype=h.dtype).scatter(2, INDEX.flatten(2)[..., :36] * 0 +
                                                                               torch.arange(36), h.flatten(2)),
        "masked_fill": lambda h, m: h.masked_fill(MASK, 0.0), "where": lambda h, m: h.where(MASK, 0.0),
        "unfold": lambda h, m: h.unfold(2, 3, 1),
    }.items()},
    "torch.flatten": lambda h, m: torch.flatten(h, 1), "torch.reshape": lambda h, m: torch.reshape(h, (2, -1)),
    "torch.permute": lambda h, m: torch.permute(h, (0, 3, 1, 2)), "torch.transpose": lambda h, m: torch.transpose(h, 1, 3),
    "torch.swapaxes": lambda h, m: torch.swapaxes(h, 2, 3), "torch.movedim": lambda h, m: torch.movedim(h, 1, 2),
    "torch.t": lambda h, m: torch.t(torch.t(h.flatten(1))), "torch.squeeze": lambda h, m: torch.squeeze(h[:, :1], 1),
    "torch.unsqueeze": lambda h, m: torch.unsqueeze(h, 2), "torch.stack": lambda h, m: torch.stack([h, 2 * h], 1),
    "torch.hstack": lambda h, m: torch.hstack([h, h]), "torch.vstack": lambda h, m: torch.vstack([h, h])[:2] + torch.vstack([h, h])[2:],
    "torch.chunk": lambda h, m: torch.chunk(h, 2, 2)[0], "torch.split": lambda h, m: torch.split(h, 2, 1)[1],
    "torch.tensor_split": lambda h, m: torch.tensor_split(h, 3, 3)[2], "torch.unbind": lambda h, m: torch.unbind(h, 1)[0],
    "torch.narrow": lambda h, m: torch.narrow(h, 3, 2, 3), "torch.select": lambda h, m: torch.select(h, 2, 1),
    "torch.flip": lambda h, m: torch.flip(h, (1,)), "torch.roll": lambda h, m: torch.roll(h, 2, 2),
    "torch.rot90": lambda h, m: torch.rot90(h, 1, (2, 3)), "torch.clone": lambda h, m: torch.clone(h),
    "operator.getitem": lambda h, m: h[:, 0], "F.pad": lambda h, m: F.pad(h, (1, 1, 0, 2)),
    "F.channel_shuffle": lambda h, m: F.channel_shuffle(h, 2), "F.pixel_shuffle": lambda h, m: F.pixel_shuffle(h, 2),
    "F.pixel_unshuffle": lambda h, m: F.pixel_unshuffle(h, 2),
    "torch.repeat_interleave": lambda h, m: torch.repeat_interleave(h, 2, 3),
    "torch.gather": lambda h, m: torch.gather(h.flatten(2), 2, INDEX.flatten(2)),
    "torch.index_select": lambda h, m: torch.index_select(h, 2, torch.tensor([5, 1])),
    "torch.take_along_dim": lambda h, m: torch.take_along_dim(h.flatten(2), INDEX.flatten(2), 2),
    "torch.scatter": lambda h, m: torch.scatter(torch.zeros(2, 4, 40, dtype=h.dtype), 2,
                                                torch.arange(36).expand(2, 4, 36), h.flatten(2)),
    "torch.where": lambda h, m: torch.where(MASK, h, 0.0), "torch.masked_fill": lambda h, m: torch.masked_fill(h, MASK, 0.0),
    "F.embedding": lambda h, m: F.embedding(IDS, h.flatten(1)),
    "torchvision.models.swin_transformer._patch_merging_pad": lambda h, m: m.mods["merging"](h.permute(0, 2, 3, 1)),
    "torch.cat": lambda h, m: torch.cat([h, m.token.expand(2, -1, -1, -1)], 1),
    "torch.concat": lambda h, m: torch.concat([h, h], 2), "torch.concatenate": lambda h, m: torch.concatenate([h, 2 * h], 3),
    # sizes and constants
    "Tensor.size": lambda h, m: h.view(h.size(0), -1), "Tensor.dim": lambda h, m: h.flatten(h.dim() - 2),
    "Tensor.numel": lambda h, m: h.reshape(2, h.numel() // 2), "Tensor.ndimension": lambda h, m: h.flatten(h.ndimension() - 3),
    "Tensor.nelement": lambda h, m: h.reshape(2, h.nelement() // 2), "Tensor.stride": lambda h, m: h.flatten(h.stride(3)),
    "Tensor.element_size": lambda h, m: h * (h.element_size() / 8), 
    "getattr": lambda h, m: h.view(h.shape[0], -1), "len": lambda h, m: h.view(len(h), -1),
    **{f"Tensor.{name}": (lambda name, args: lambda h, m: h + getattr(h, name)(*args))(name, args) for name, args in {
        "new_zeros": ((2, 4, 6, 6),), "new_ones": ((1,),), "new_full": ((1,), 2.0), "new_empty": ((0,),),
        "new_tensor": ([1.0],)}.items()},
    "Tensor.is_contiguous": lambda h, m: h * h.new_tensor(h.is_contiguous(), dtype=h.dtype),
    "Tensor.new_empty": lambda h, m: h + h.new_empty((2, 4, 6, 6)).fill_(1.0),
    "Tensor.detach": lambda h, m: h * h.detach(), "torch.detach": lambda h, m: h * torch.detach(h),
    "torch.zeros_like": lambda h, m: h + torch.zeros_like(h), "torch.ones_like": lambda h, m: h * torch.ones_like(h),
    "torch.full_like": lambda h, m: h + torch.full_like(h, 0.5), "torch.empty_like": lambda h, m: h + torch.empty_like(h).fill_(0.25),
    "torch.rand_like": lambda h, m: h * 0 + torch.rand_like(h).fill_(1.0) * h,
    "torch.randn_like": lambda h, m: h * torch.randn_like(h).fill_(2.0),
    "F.unfold": lambda h, m: F.unfold(h, 3), 
    # pooling and reductions
    "F.max_pool1d": lambda h, m: F.max_pool1d(h.flatten(2), 3), "F.max_pool2d": lambda h, m: F.max_pool2d(h, 2),
    "F.max_pool3d": lambda h, m: F.max_pool3d(h.unsqueeze(1), 2),
    "F.adaptive_max_pool1d": lambda h, m: F.adaptive_max_pool1d(h.flatten(2), 5),
    "F.adaptive_max_pool2d": lambda h, m: F.adaptive_max_pool2d(h, (2, 3)),
    "F.adaptive_max_pool3d": lambda h, m: F.adaptive_max_pool3d(h.unsqueeze(1), 2),
    "F.avg_pool1d": lambda h, m: F.avg_pool1d(h.flatten(2), 4), "F.avg_pool2d": lambda h, m: F.avg_pool2d(h, 3),
    "F.avg_pool3d": lambda h, m: F.avg_pool3d(h.unsqueeze(1), 2),
    "F.adaptive_avg_pool1d": lambda h, m: F.adaptive_avg_pool1d(h.flatten(2), 5),
    "F.adaptive_avg_pool2d": lambda h, m: F.adaptive_avg_pool2d(h, 4),
    "F.adaptive_avg_pool3d": lambda h, m: F.adaptive_avg_pool3d(h.unsqueeze(1), 3),
    "torch.mean": lambda h, m: torch.mean(h, 1), "torch.sum": lambda h, m: torch.sum(h, (2, 3)),
    "F.fold": lambda h, m: F.fold(F.unfold(h, 2), (6, 6), 2), "torch.cumsum": lambda h, m: torch.cumsum(h, 1),
    "F.interpolate": lambda h, m: F.interpolate(h, scale_factor=2, mode="bilinear"),
    "Tensor.mean": lambda h, m: h.mean(3), "Tensor.sum": lambda h, m: h.sum(1, keepdim=True),
    "Tensor.cumsum": lambda h, m: h.cumsum(3),
    # identity in eval mode
    **{f"F.{name}": (lambda name: lambda h, m: getattr(F, name)(h, 0.5, training=False))(name)
       for name in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")},
    "F.dropout1d": lambda h, m: F.dropout1d(h.flatten(2), 0.5, training=False),
    "F.dropout3d": lambda h, m: F.dropout3d(h.unsqueeze(1), 0.5, training=False),
    "torchvision.ops.stochastic_depth.stochastic_depth": lambda h, m: torchvision.ops.stochastic_depth(h, 0.5, "row", False),
    # sums and products
    "operator.add": lambda h, m: h + h.flip(2), "torch.add": lambda h, m: torch.add(h, m.scale),
    "Tensor.add": lambda h, m: h.add(h.roll(1, 1)), "operator.sub": lambda h, m: h - 0.5 * h.flip(3),
    "torch.sub": lambda h, m: torch.sub(h, 1.0), "torch.subtract": lambda h, m: torch.subtract(2 * h, h.flip(1)),
    "Tensor.sub": lambda h, m: h.sub(m.scale), "operator.iadd": lambda h, m: _iadd(h),
    "Tensor.add_": lambda h, m: h.clone().add_(h.flip(2)), "operator.isub": lambda h, m: _isub(h),
    "Tensor.sub_": lambda h, m: (2 * h).sub_(h.flip(3)),
    "Tensor.__iadd__": lambda h, m: (h + 0).__iadd__(h.flip(2)), "Tensor.__isub__": lambda h, m: (2 * h).__isub__(h),
    "Tensor.__imul__": lambda h, m: (h + 0).__imul__(m.scale), "Tensor.__itruediv__": lambda h, m: (h + 0).__itruediv__(2.0),
    "operator.setitem": lambda h, m: _setitem(h), "Tensor.__setitem__": lambda h, m: _setitem(h, method=True),
    "Tensor.masked_fill_": lambda h, m: (h + 0).masked_fill_(MASK, 0.0),
    "Tensor.index_put_": lambda h, m: (h + 0).index_put_((torch.tensor([1]),), h[:1].flip(1)),
    "Tensor.scatter_": lambda h, m: torch.zeros(2, 4, 40, dtype=h.dtype).scatter_(2, torch.arange(36).expand(2, 4, 36),
                                                                                   h.flatten(2)),
    "Tensor.index_fill_": lambda h, m: (h + 0).index_fill_(1, torch.tensor([2]), 0.0),
    "Tensor.index_put": lambda h, m: h.index_put((torch.tensor([1]),), h[:1].flip(1)),
    "Tensor.index_fill": lambda h, m: h.index_fill(1, torch.tensor([0, 3]), 0.0),
    # comparisons: masks, no relevance
    **{f"torch.{name}": (lambda name: lambda h, m: h * getattr(torch, name)(h, 0.1).to(h.dtype))(name)
       for name in ("gt", "lt", "ge", "le", "eq", "ne")},
    **{f"Tensor.{name}": (lambda name: lambda h, m: h * getattr(h, name)(0.1).to(h.dtype))(name)
       for name in ("gt", "lt", "ge", "le", "eq", "ne")},
    **{f"operator.{name}": (lambda compare: lambda h, m: h * compare(h, 0.1).to(h.dtype))(getattr(operator, name))
       for name in ("gt", "lt", "ge", "le", "eq", "ne")},
    **{f"torch.{name}": (lambda name: lambda h, m: h * getattr(torch, name)(h).to(h.dtype))(name)
       for name in ("isnan", "isinf", "isfinite", "sign")},
    **{f"Tensor.{name}": (lambda name: lambda h, m: h * getattr(h, name)().to(h.dtype))(name)
       for name in ("isnan", "isinf", "isfinite", "sign")},
    "torch.logical_not": lambda h, m: h * torch.logical_not(h > 0).to(h.dtype),
    "Tensor.logical_not": lambda h, m: h * (h > 0).logical_not().to(h.dtype),
    "Tensor.bool": lambda h, m: h * h.bool().to(h.dtype),
    "torch.argmax": lambda h, m: h.flatten(2).gather(2, torch.argmax(h.flatten(2), 2, keepdim=True)),
    "Tensor.argmax": lambda h, m: h.flatten(2).gather(2, h.flatten(2).argmax(2, keepdim=True)),
    "torch.argmin": lambda h, m: h.flatten(2).gather(2, torch.argmin(h.flatten(2), 2, keepdim=True)),
    "Tensor.argmin": lambda h, m: h.flatten(2).gather(2, h.flatten(2).argmin(2, keepdim=True)),
    "operator.mul": lambda h, m: h * m.scale, "torch.mul": lambda h, m: gate(h), "torch.multiply": lambda h, m: torch.multiply(h, h.flip(1)),
    "Tensor.mul": lambda h, m: h.mul(torch.sigmoid(h)), "operator.truediv": lambda h, m: h / 3.0,
    "torch.div": lambda h, m: torch.div(h, h.abs().sum(1, keepdim=True) + 1.0),
    "torch.true_divide": lambda h, m: torch.true_divide(h, m.scale),
    "torch.divide": lambda h, m: torch.divide(h, 2.0), "Tensor.div": lambda h, m: h.div(4.0),
    "operator.imul": lambda h, m: _imul(h, m.scale), "Tensor.mul_": lambda h, m: (h + 0).mul_(m.scale),
    "operator.itruediv": lambda h, m: _idiv(h), "Tensor.div_": lambda h, m: (h + 0).div_(2.0),
    "torch.index_add": lambda h, m: torch.index_add(torch.zeros(2, 3, 36, dtype=h.dtype), 1, torch.tensor([0, 2, 2, 1]), h.flatten(2)),
    "Tensor.index_add": lambda h, m: h.index_add(1, torch.tensor([1, 0]), h[:, :2]),
    "Tensor.index_add_": lambda h, m: (h + 0).index_add_(1, torch.tensor([3, 3]), h[:, 1:3]),
    "torch.addcmul": lambda h, m: torch.addcmul(h, m.scale, h.flip(2), value=0.5),
    "Tensor.addcmul": lambda h, m: h.addcmul(h.flip(3), m.scale),
    "torch.addcdiv": lambda h, m: torch.addcdiv(h, h.flip(1), m.scale + 2.0, value=2.0),
    "Tensor.addcdiv": lambda h, m: h.addcdiv(h.flip(2), m.scale + 2.0),
    # activations
    "F.relu": lambda h, m: F.relu(h), "torch.relu": lambda h, m: torch.relu(h), "Tensor.relu": lambda h, m: h.relu(),
    "F.relu_": lambda h, m: F.relu_(h + 0), "torch.relu_": lambda h, m: torch.relu_(h + 0), "Tensor.relu_": lambda h, m: (h + 0).relu_(),
    "F.relu6": lambda h, m: F.relu6(h), **{f"F.{name}": (lambda name: lambda h, m: getattr(F, name)(h))(name) for name in (
        "silu", "gelu", "hardswish", "elu", "celu", "selu", "leaky_relu", "softplus", "mish", "tanh", "hardtanh",
        "sigmoid", "hardsigmoid", "normalize")},
    "torch.tanh": lambda h, m: torch.tanh(h), "torch.erf": lambda h, m: torch.erf(h), "torch.clamp": lambda h, m: torch.clamp(h, -0.5, 0.5),
    "torch.clip": lambda h, m: torch.clip(h, min=-1.0), "Tensor.clamp": lambda h, m: h.clamp(max=0.3),
    "Tensor.clip": lambda h, m: h.clip(-0.2, 0.4), "Tensor.tanh": lambda h, m: h.tanh(), "Tensor.erf": lambda h, m: h.erf(),
    "torch.sigmoid": lambda h, m: torch.sigmoid(h), "Tensor.sigmoid": lambda h, m: h.sigmoid(),
    "operator.neg": lambda h, m: -h, "torch.neg": lambda h, m: torch.neg(h), "Tensor.neg": lambda h, m: h.neg(),
    # normalization and statistics
    "F.layer_norm": lambda h, m: F.layer_norm(seq(h), (4,)),
    "F.batch_norm": lambda h, m: F.batch_norm(h, m.mean, m.var, m.scale.flatten(), None, False),
    "F.group_norm": lambda h, m: F.group_norm(h, 2), "F.rms_norm": lambda h, m: F.rms_norm(seq(h), (4,)),
    **{name: (lambda statistic: lambda h, m: h / (statistic(h) + 1.0))(statistic) for name, statistic in {
        "torch.var": lambda h: torch.var(h, 1, keepdim=True), "torch.std": lambda h: torch.std(h, (2, 3), keepdim=True),
        "torch.norm": lambda h: torch.norm(h, dim=1, keepdim=True),
        "torch.linalg.vector_norm": lambda h: torch.linalg.vector_norm(h, dim=1, keepdim=True),
        "torch.linalg.norm": lambda h: torch.linalg.norm(h, dim=1, keepdim=True),
        "Tensor.var": lambda h: h.var(1, keepdim=True), "Tensor.std": lambda h: h.std(1, keepdim=True),
        "Tensor.norm": lambda h: h.norm(dim=1, keepdim=True),
        "torch.amax": lambda h: torch.amax(h.abs(), 1, keepdim=True), "Tensor.amax": lambda h: h.abs().amax((2, 3), keepdim=True),
        "torch.max": lambda h: torch.max(h.abs(), 1, keepdim=True)[0], "Tensor.max": lambda h: h.abs().max(1, keepdim=True).values,
    }.items()},
    "torch.amin": lambda h, m: h + torch.amin(h, 1, keepdim=True), "Tensor.amin": lambda h, m: h.amin(1),
    "torch.min": lambda h, m: torch.min(h, 1)[0], "Tensor.min": lambda h, m: h.min(2).values,
    "torch.rsqrt": lambda h, m: h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + 1e-6),
    "Tensor.rsqrt": lambda h, m: h * (h * h).mean(1, keepdim=True).add(1e-6).rsqrt(),
    "torch.sqrt": lambda h, m: h / torch.sqrt(torch.pow(h, 2).sum(1, keepdim=True) + 1.0),
    "Tensor.sqrt": lambda h, m: h / (h ** 2).mean((2, 3), keepdim=True).add(1.0).sqrt(),
    "torch.pow": lambda h, m: h * torch.rsqrt(torch.pow(h, 2).mean(-1, keepdim=True) + 1e-6),
    "operator.pow": lambda h, m: 0.5 * h * (1.0 + torch.tanh(0.79788 * (h + 0.044715 * h ** 3))),
    "Tensor.pow": lambda h, m: h.pow(2),
    "torch.square": lambda h, m: h / torch.square(h).mean(1, keepdim=True).add(1.0).sqrt_(),
    "Tensor.square": lambda h, m: h.square(),
    "Tensor.sqrt_": lambda h, m: h * h.square().mean((2, 3), keepdim=True).add(1.0).sqrt_(),
    "Tensor.rsqrt_": lambda h, m: h * (h * h).mean(1, keepdim=True).add(1.0).rsqrt_(),
    "torch.topk": lambda h, m: seq(h) * torch.topk(seq(h).softmax(-1), 2, -1).values.sum(-1, keepdim=True),
    "Tensor.topk": lambda h, m: seq(h) * seq(h).softmax(-1).topk(1, -1).values,
    # softmax and attention
    "F.softmax": lambda h, m: _attention(h, lambda s: F.softmax(s, -1)),
    "torch.softmax": lambda h, m: _attention(h, lambda s: torch.softmax(s, -1)),
    "Tensor.softmax": lambda h, m: _attention(h, lambda s: s.softmax(-1)),
    "F.log_softmax": lambda h, m: F.log_softmax(h, 1), "torch.log_softmax": lambda h, m: torch.log_softmax(h, 1),
    "Tensor.log_softmax": lambda h, m: h.log_softmax(1),
    "F.scaled_dot_product_attention": lambda h, m: _sdpa(h),
    "F.multi_head_attention_forward": lambda h, m: F.multi_head_attention_forward(
        seq(h).transpose(0, 1), seq(h).transpose(0, 1), seq(h).transpose(0, 1), 4, 2, None, None, None, None, False,
        0.0, m.square, None, training=False, need_weights=False, use_separate_proj_weight=True,
        q_proj_weight=m.square, k_proj_weight=m.square.t(), v_proj_weight=m.square)[0].transpose(0, 1),
    "torchvision.models.swin_transformer.shifted_window_attention": lambda h, m: m.mods["swin"](h.permute(0, 2, 3, 1)),
    # linear maps and products
    "F.linear": lambda h, m: F.linear(h, m.layers["linear"].weight),
    "F.conv1d": lambda h, m: F.conv1d(h.flatten(2), m.layers["conv1d"].weight),
    "F.conv2d": lambda h, m: F.conv2d(F.pad(h, (1, 1, 1, 1)), m.layers["conv2d"].weight),
    "F.conv3d": lambda h, m: F.conv3d(h.unsqueeze(1), m.layers["conv3d"].weight),
    "F.conv_transpose1d": lambda h, m: F.conv_transpose1d(h.flatten(2), m.layers["conv_transpose1d"].weight),
    "F.conv_transpose2d": lambda h, m: F.conv_transpose2d(h, m.layers["conv_transpose2d"].weight, stride=2),
    "F.conv_transpose3d": lambda h, m: F.conv_transpose3d(h.unsqueeze(1), m.layers["conv_transpose3d"].weight),
    "torch.addmm": lambda h, m: torch.addmm(m.row, h.flatten(1), m.matrix), "Tensor.addmm": lambda h, m: m.row.addmm(h.flatten(1), m.matrix),
    "torch.baddbmm": lambda h, m: torch.baddbmm(seq(h) @ seq(h).transpose(1, 2), seq(h), seq(h).transpose(1, 2), alpha=0.5),
    "Tensor.baddbmm": lambda h, m: (seq(h) @ seq(h).transpose(1, 2)).baddbmm(seq(h), seq(h).transpose(1, 2)),
    "operator.matmul": lambda h, m: seq(h) @ seq(h).transpose(1, 2), "torch.matmul": lambda h, m: torch.matmul(seq(h), m.square),
    "Tensor.matmul": lambda h, m: seq(h).matmul(seq(h).transpose(1, 2)), "torch.bmm": lambda h, m: torch.bmm(seq(h), seq(h).transpose(1, 2)),
    "Tensor.bmm": lambda h, m: seq(h).bmm(m.square.expand(2, 4, 4)),
    "torch.einsum": lambda h, m: torch.einsum("bid,bjd->bij", seq(h), seq(h)),
    "F.grouped_mm": lambda h, m: F.grouped_mm(seq(h)[0], m.experts, offs=m.offsets),
    "torch._grouped_mm": lambda h, m: torch._grouped_mm(seq(h)[0], m.experts, offs=m.offsets),
}
del USES["F.grouped_mm"], USES["torch._grouped_mm"]
for _name in ("F.grouped_mm", "torch._grouped_mm"):
    USES[_name] = (lambda name: lambda h, m: _grouped(name)(seq(h).reshape(72, 4), m.experts, offs=m.offsets
                                                            ).reshape(2, 36, -1))(_name)


def _grouped(name):
    return F.grouped_mm if name == "F.grouped_mm" else torch._grouped_mm


def _setitem(h, method=False):
    h = h + 0
    if method:
        h.__setitem__((slice(None), 1), h[:, 2] * 2)
    else:
        h[:, 1] = h[:, 2] * 2
    return h


def _iadd(h):
    h = h.clone()
    h += h.flip(2)
    return h


def _isub(h):
    h = 2 * h
    h -= h.flip(1)
    return h


def _imul(h, scale):
    h = h + 0
    h *= scale
    return h


def _idiv(h):
    h = h + 0
    h /= 4.0
    return h


def one_d(h):
    return h.flatten(2)


def three_d(h):
    return h.unsqueeze(1)


def same(h):
    return h


#: module label -> (make the module, how its input is made from h)
MODULES = {
    **{f"torch.nn.{kind}{dims}d": (lambda kind, dims: (lambda: getattr(torch.nn, f"{kind}{dims}d")(
        2 if "Adaptive" not in kind else 3), (one_d, same, three_d)[dims - 1]))(kind, dims)
       for kind in ("AvgPool", "MaxPool", "AdaptiveAvgPool", "AdaptiveMaxPool") for dims in (1, 2, 3)},
    **{f"torch.nn.{kind}{dims}d": (lambda kind, dims: (lambda: getattr(torch.nn, f"{kind}{dims}d")(
        1, *((0.0,) if kind == "ConstantPad" else ())), (one_d, same, three_d)[dims - 1]))(kind, dims)
       for kind in ("ConstantPad", "ZeroPad", "ReflectionPad", "ReplicationPad", "CircularPad") for dims in (1, 2, 3)},
    **{f"torch.nn.{kind}": (lambda kind: (lambda: getattr(torch.nn, kind)(0.5), same))(kind)
       for kind in ("Dropout", "Dropout2d", "AlphaDropout", "FeatureAlphaDropout")},
    "torch.nn.Dropout1d": (lambda: torch.nn.Dropout1d(0.5), one_d), "torch.nn.Dropout3d": (lambda: torch.nn.Dropout3d(0.5), three_d),
    "torch.nn.ChannelShuffle": (lambda: torch.nn.ChannelShuffle(2), same), "torch.nn.Flatten": (torch.nn.Flatten, same),
    "torch.nn.Identity": (torch.nn.Identity, same), "torch.nn.Unflatten": (lambda: torch.nn.Unflatten(1, (2, 2)), same),
    "torch.nn.PixelShuffle": (lambda: torch.nn.PixelShuffle(2), same), "torch.nn.PixelUnshuffle": (lambda: torch.nn.PixelUnshuffle(2), same),
    "torch.nn.Unfold": (lambda: torch.nn.Unfold(3), same), "torch.nn.Upsample": (lambda: torch.nn.Upsample(scale_factor=2), same),
    "torch.nn.ReLU": (torch.nn.ReLU, same), "torchlrp.modules.ReLU": (lrp.ReLU, same),
    "torch.nn.LogSoftmax": (lambda: torch.nn.LogSoftmax(1), same),
    "torch.nn.Embedding": (lambda: torch.nn.Embedding(2, 36), lambda h: h.flatten(2)),
    **{f"torchlrp.modules.{kind}": (lambda kind: (getattr(torch.nn, kind), same))(kind) for kind in (
        "CELU", "ELU", "GELU", "Hardsigmoid", "Hardswish", "Hardtanh", "LeakyReLU", "Mish", "PReLU", "ReLU6", "SELU",
        "SiLU", "Sigmoid", "Softplus", "Tanh")},
    "torchlrp.modules.BatchNorm1d": (lambda: _eval_norm(torch.nn.BatchNorm1d(4)), one_d),
    "torchlrp.modules.BatchNorm2d": (lambda: _eval_norm(torch.nn.BatchNorm2d(4)), same),
    "torchlrp.modules.BatchNorm3d": (lambda: _eval_norm(torch.nn.BatchNorm3d(1)), three_d),
    "torchlrp.modules.GroupNorm": (lambda: torch.nn.GroupNorm(2, 4), same),
    "torchlrp.modules.LayerNorm": (lambda: torch.nn.LayerNorm(4), seq), "torchlrp.modules.RMSNorm": (lambda: torch.nn.RMSNorm(4), seq),
    "torchlrp.modules.ExplainableAffine": (lambda: torch.nn.Conv2d(4, 3, 3, bias=False), same),
    "torchlrp.modules.Add": (lambda: lrp.Add(), lambda h: (h, h.flip(2))),
    "torchlrp.modules.Activation": (lambda: lrp.modules.Activation(torch.tanh), same),
    "torchlrp.modules.CyclicPool": (lambda: lrp.CyclicPool("max"), lambda h: h.repeat(4, 1, 1, 1) * torch.arange(
        1.0, 9.0, dtype=h.dtype).view(8, 1, 1, 1)),
    "torchlrp.modules.Rotate": (lambda: lrp.Rotate(), same),
    "torchlrp.modules.LSTM": (lambda: torch.nn.LSTM(4, 3, batch_first=True, bias=False), seq),
    "torchlrp.modules.GRU": (lambda: torch.nn.GRU(4, 3, batch_first=True, bias=False), seq),
    "torchlrp.modules.MultiheadAttention": (lambda: torch.nn.MultiheadAttention(4, 2, batch_first=True, bias=False),
                                            lambda h: (seq(h), seq(h), seq(h))),
    "torch.nn.Softmax": (lambda: torch.nn.Softmax(-1), lambda h: seq(h) @ seq(h).transpose(1, 2)),
}


def _eval_norm(norm):
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.zero_()
    return norm.eval()


def module_use(label):
    """``use(h, m)`` of a module entry: the module applied to ``h`` in the form it takes."""
    _, prepare = MODULES[label]

    def use(h, m):
        prepared = prepare(h)
        module = m.mods[label.replace(".", "_")]
        if label == "torch.nn.Embedding":
            return prepared + module(IDS[:, :1].expand(2, 4))
        if label == "torch.nn.Softmax":
            return module(prepared) @ seq(h)
        output = module(*prepared) if isinstance(prepared, tuple) else module(prepared)
        if label.rpartition(".")[2] in ("LSTM", "GRU", "MultiheadAttention"):
            return output[0]
        if label == "torchlrp.modules.Rotate":
            return output.reshape(2, -1)
        return output
    return use


class Model(torch.nn.Module):
    """``x -> conv -> use(h, self) -> two sums``; ``untraceable`` adds a data-dependent branch (the run-time
    engine explains it)."""

    def __init__(self, label, untraceable):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.label, self.untraceable = label, untraceable
        self.conv = torch.nn.Conv2d(3, 4, 1, bias=False)
        self.use = USES[label] if label in USES else module_use(label)
        self.mods = torch.nn.ModuleDict()
        if label in MODULES:
            self.mods[label.replace(".", "_")] = MODULES[label][0]()
        self.mods["merging"] = torchvision.models.swin_transformer.PatchMerging(4)
        self.mods["swin"] = torchvision.models.swin_transformer.ShiftedWindowAttention(4, [3, 3], [1, 1], 2, qkv_bias=False, proj_bias=False)
        self.token = torch.nn.Parameter(torch.rand(1, 1, 6, 6, generator=generator))
        self.scale = torch.nn.Parameter(torch.rand(1, 4, 1, 1, generator=generator) + 0.5)
        self.mean = torch.nn.Parameter(torch.rand(4, generator=generator), requires_grad=False)
        self.var = torch.nn.Parameter(torch.rand(4, generator=generator) + 0.5, requires_grad=False)
        self.row = torch.nn.Parameter(torch.zeros(5))
        self.matrix = torch.nn.Parameter(torch.randn(144, 5, generator=generator))
        self.square = torch.nn.Parameter(torch.randn(4, 4, generator=generator))
        self.experts = torch.nn.Parameter(torch.randn(2, 4, 3, generator=generator))
        self.register_buffer("offsets", torch.tensor([36, 72], dtype=torch.int32))
        self.layers = torch.nn.ModuleDict({
            "linear": torch.nn.Linear(6, 5, bias=False), "conv1d": torch.nn.Conv1d(4, 3, 3, bias=False),
            "conv2d": torch.nn.Conv2d(4, 3, 3, padding=1, bias=False), "conv3d": torch.nn.Conv3d(1, 2, 2, bias=False),
            "conv_transpose1d": torch.nn.ConvTranspose1d(4, 2, 3, bias=False),
            "conv_transpose2d": torch.nn.ConvTranspose2d(4, 2, 2, stride=2, bias=False),
            "conv_transpose3d": torch.nn.ConvTranspose3d(1, 2, 2, bias=False)})

    def forward(self, x):
        if self.untraceable and float(x.detach().abs().sum()) < 0:  # never true; torch.fx cannot trace it
            x = -x
        h = self.conv(x)
        t = self.use(h, self).flatten(1)
        return torch.stack([t.sum(1), (t * t.detach().sign()).mean(1)], 1)


def labels(registry):
    """Every call label of ``registry``."""
    from torchlrp.operations.registry import call_label

    return sorted({call_label(key) for table in (registry.functions, registry.methods, registry.modules)
                   for key in table})
