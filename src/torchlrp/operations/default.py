"""The default operation table: every operation torchlrp explains (:func:`default_registry`).

Each operation is one ``add(entry, *calls)``: the entry, then every call it covers -- functions, tensor method
names (``a + b`` is ``operator.add``; ``x.add(b)`` the method ``"add"``) and module types.
"""
from __future__ import annotations

import builtins
import operator

import torch
import torch.nn.functional as F
import torchvision

from torchlrp.core.kinds import TORCH_AVERAGE_POOLINGS, TORCH_MAX_POOLINGS
from torchlrp.modules.activation import ACTIVATION_TWINS, Hardsigmoid, IdentityRuleActivation, ReLU6, Sigmoid
from torchlrp.modules.affine import ExplainableAffine
from torchlrp.modules.affine_call import AFFINE_FUNCTIONS
from torchlrp.modules.attention import (MultiheadAttention, MultiheadAttentionCall, ScaledDotProductAttention,
                                        ShiftedWindowAttention)
from torchlrp.modules.norm import NORM_TWINS, BatchNormCall, GroupNormCall
from torchlrp.modules.operation import Activation, LayerNormFunction, Proportional
from torchlrp.modules.rectifier import ReLU
from torchlrp.modules.recurrent import GRU, LSTM
from torchlrp.modules.residual import Add
from torchlrp.modules.rotation import CyclicPool, Rotate
from torchlrp.operations import builds
from torchlrp.operations.builds import BATCH_NORM_ARGUMENTS, keep
from torchlrp.operations.registry import OperationRegistry
from torchlrp.operations.spec import OperationEntry, RuleKind

#: tensor methods that only move, copy or select entries: relevance follows the index map (their gradient)
INDEX_METHODS = (
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes",
    "swapdims", "movedim", "moveaxis", "t", "contiguous", "squeeze", "unsqueeze", "expand", "repeat",
    "chunk", "split", "tensor_split", "unbind", "narrow", "select", "flip", "roll", "clone", "to", "float",
    "double", "half", "bfloat16", "type", "__getitem__", "cpu", "cuda", "requires_grad_",
    "repeat_interleave", "gather", "index_select", "take_along_dim", "scatter", "masked_fill", "where", "index_put",
    "index_fill",
)
#: functions that only move, copy or select entries (the indices and masks are constants: they carry no relevance)
INDEX_FUNCTIONS = (
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.t,
    torch.squeeze, torch.unsqueeze, torch.stack, torch.hstack, torch.vstack, torch.chunk, torch.split,
    torch.tensor_split, torch.unbind, torch.narrow, torch.select, torch.flip, torch.roll, torch.rot90, torch.clone,
    operator.getitem, F.pad, F.channel_shuffle, torch.channel_shuffle, F.pixel_shuffle, F.pixel_unshuffle,
    torch.repeat_interleave, torch.gather, torch.index_select, torch.take_along_dim, torch.scatter, torch.where,
    torch.masked_fill, F.embedding, torchvision.models.swin_transformer._patch_merging_pad,
)
#: index maps to the shape or type of another tensor (``x.expand_as(other)``): no relevance flows into ``other``
REFERENCE_METHODS = ("view_as", "reshape_as", "expand_as", "type_as")
#: index maps that write into their first argument in place
INDEX_UPDATES = ("masked_fill_", "index_put_", "scatter_", "index_fill_")
#: comparisons: boolean masks computed from an activation carry no relevance
COMPARISONS = (operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne, torch.gt, torch.lt,
               torch.ge, torch.le, torch.eq, torch.ne, torch.isnan, torch.isinf, torch.isfinite, torch.logical_not,
               "gt", "lt", "ge", "le", "eq", "ne", "isnan", "isinf", "isfinite", "logical_not", "bool", "sign",
               torch.sign, "argmax", "argmin", torch.argmax, torch.argmin)
SHAPE_METHODS = ("size", "dim", "numel", "ndimension", "nelement", "stride", "element_size", "is_contiguous")
CONSTANT_METHODS = ("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "detach")
CONSTANT_FUNCTIONS = (torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like,
                      torch.randn_like, torch.detach)
#: maxima: a max pooling (winner takes all) where they are data, held constant where they only normalize
EXTREMUMS = (torch.amax, torch.amin, torch.max, torch.min, "amax", "amin", "max", "min")
#: the statistics that may scale an activation (held constant); a use that ends elsewhere has no rule
STATISTICS = (torch.var, torch.std, torch.norm, torch.linalg.vector_norm, torch.linalg.norm, "var", "std", "norm")
#: element-wise activations explained by the identity rule (besides the gates and the rectifiers)
IDENTITY_ACTIVATIONS = (F.silu, F.gelu, F.hardswish, F.elu, F.celu, F.selu, F.leaky_relu, F.softplus, F.mish, F.tanh,
                        torch.tanh, torch.erf, torch.clamp, torch.clip, F.hardtanh)

#: every padding module of torch (zero, constant, reflection, replication, circular; 1-3 d)
PADDING_MODULES = tuple(cls for cls in vars(torch.nn.modules.padding).values()
                        if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__name__.endswith(
                            ("Pad1d", "Pad2d", "Pad3d")) and not cls.__name__.startswith("_"))


def default_registry() -> OperationRegistry:
    """Return a new registry holding every operation torchlrp explains.

    Returns
    -------
    OperationRegistry
        A fresh registry (modify it freely and pass it to :func:`torchlrp.convert`).
    """
    registry = OperationRegistry()
    add = registry.add

    add(keep("index map", RuleKind.INDEX_MAP), *INDEX_METHODS, *INDEX_FUNCTIONS)
    add(keep("index map (written in place: x[i] = v)", RuleKind.INDEX_MAP, inplace=True), operator.setitem, "__setitem__",
        *INDEX_UPDATES)
    add(keep("no relevance (a comparison: a mask)", RuleKind.NO_RELEVANCE, "none", constant=True), *COMPARISONS)
    add(keep("index map (the other tensor gives the shape or type)", RuleKind.INDEX_MAP, references=(1,)),
        *REFERENCE_METHODS)
    for function in (torch.cat, torch.concat, torch.concatenate):
        add(builds.concatenation(function), function)
    add(keep("sizes", RuleKind.SHAPE, "none", shape=True), *SHAPE_METHODS, builtins.getattr, builtins.len)
    add(keep("no relevance", RuleKind.NO_RELEVANCE, "none", constant=True), *CONSTANT_METHODS, *CONSTANT_FUNCTIONS)
    add(keep("index map (copies summed)", RuleKind.INDEX_MAP), "unfold", F.unfold, torch.nn.Unfold)

    # pooling and reductions
    for function in (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                     F.adaptive_max_pool3d):
        add(builds.max_pooling(function), function)
    for function in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                     F.adaptive_avg_pool3d, torch.mean, torch.sum, F.fold):
        add(builds.proportional(function), function)
    add(OperationEntry("proportional", lambda call, view: Proportional(F.interpolate), kind=RuleKind.PROPORTIONAL),
        F.interpolate)  # (bicubic interpolation does not preserve signs)
    for name in ("mean", "sum"):
        add(builds.proportional(getattr(torch.Tensor, name)), name)
    add(builds.proportional(torch.cumsum), torch.cumsum, "cumsum")  # a running sum: each partial sum proportionally

    # identity in eval mode
    add(keep("identity", RuleKind.IDENTITY), F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
        F.feature_alpha_dropout, torchvision.ops.stochastic_depth)

    # sums and products
    add(builds.summation((1.0, 1.0)), operator.add, torch.add, "add")
    add(builds.summation((1.0, -1.0)), operator.sub, torch.sub, torch.subtract, "sub")
    add(builds.summation((1.0, 1.0), inplace=True), operator.iadd, "add_", "__iadd__")
    add(builds.summation((1.0, -1.0), inplace=True), operator.isub, "sub_", "__isub__")
    add(builds.scaling(torch.mul), operator.mul, torch.mul, torch.multiply, "mul")
    add(builds.scaling(torch.div), operator.truediv, torch.div, torch.true_divide, torch.divide, "div")
    add(builds.scaling(torch.mul, inplace=True), operator.imul, "mul_", "__imul__")
    add(builds.scaling(torch.div, inplace=True), operator.itruediv, "div_", "__itruediv__")
    add(builds.index_sum(), torch.index_add, "index_add")
    add(builds.index_sum(inplace=True), "index_add_")
    for operation in (torch.addcmul, torch.addcdiv):
        add(builds.scaled_sum(operation), operation, operation.__name__)

    # element-wise activations: the ReLU passes relevance where active (its gradient); the others unchanged
    add(builds.rectifier(), F.relu, torch.relu, "relu")
    add(builds.rectifier(inplace=True), F.relu_, torch.relu_, "relu_")
    add(builds.activation(F.relu6, "nonnegative"), F.relu6)
    for function in IDENTITY_ACTIVATIONS:
        add(builds.activation(function), function)
    for name in ("clamp", "clip", "tanh", "erf"):  # activation clipping (Gemma 4's ViT): an element-wise activation
        add(builds.activation(getattr(torch.Tensor, name)), name)
    for function in (F.sigmoid, torch.sigmoid, F.hardsigmoid):
        add(builds.activation(function, "nonnegative", gate=True), function)
    add(builds.activation(torch.sigmoid, "nonnegative", gate=True), "sigmoid")
    add(builds.activation(torch.neg), operator.neg, torch.neg, "neg")  # -x: relevance unchanged (its sign kept)
    add(builds.activation(F.normalize), F.normalize)

    # normalization and the output softmax
    add(OperationEntry("layer norm", lambda call, view: LayerNormFunction(), kind=RuleKind.NORMALIZATION),
        F.layer_norm)
    add(OperationEntry("folded into the layer before it, else affine (per channel)",
                       builds.norm_call(BatchNormCall, BATCH_NORM_ARGUMENTS), folds=True,
                       kind=RuleKind.NORMALIZATION), F.batch_norm)
    add(OperationEntry("layer norm (per group)", builds.norm_call(
        GroupNormCall, ("input", "num_groups", "weight", "bias", "eps")), kind=RuleKind.NORMALIZATION), F.group_norm)
    if hasattr(F, "rms_norm"):  # torch >= 2.4
        add(OperationEntry("rms norm (rms held constant: identity)", lambda call, view: Activation(F.rms_norm),
                           kind=RuleKind.IDENTITY), F.rms_norm)
    statistic = builds.held_where_it_scales("held constant (a normalizer)", builds.statistic)
    add(statistic, *STATISTICS, torch.rsqrt, torch.sqrt, "rsqrt", "sqrt", "rsqrt_", "sqrt_")
    add(builds.held_where_it_scales("held constant (a norm's square)", builds.power), torch.pow, operator.pow, "pow",
        torch.square, "square")
    add(builds.held_where_it_scales("winner takes all (a max pooling); held constant where it only normalizes",
                                    None, "preserve"), *EXTREMUMS)
    add(OperationEntry("a router's choice (mixture of experts): values held constant, a gate", None,
                       constant_when=lambda call, view: True, kind=RuleKind.HELD_CONSTANT), torch.topk, "topk")
    for function in (F.softmax, torch.softmax):
        add(builds.softmax(function), function)
    for function in (F.log_softmax, torch.log_softmax):
        add(builds.softmax(function, log=True), function)
    add(builds.softmax(torch.Tensor.softmax), "softmax")
    add(builds.softmax(torch.Tensor.log_softmax, log=True), "log_softmax")

    # linear maps and convolutions called as functions on parameters (timm, GPT-2's Conv1D)
    for function in AFFINE_FUNCTIONS:
        add(builds.affine_call(function), function)
    add(builds.affine_call(torch.addmm), "addmm")
    add(OperationEntry("uniform rule (AttnLRP) on the product, then the sum", builds.product_sum(torch.bmm),
                       kind=RuleKind.BILINEAR), torch.baddbmm, "baddbmm")

    # products of two activations (attention), matrix products with a constant
    add(builds.product(torch.matmul), operator.matmul, torch.matmul, "matmul")
    add(builds.product(torch.bmm), torch.bmm, "bmm")
    add(OperationEntry("uniform rule (AttnLRP); epsilon with a constant factor", builds.einsum,
                       kind=RuleKind.BILINEAR), torch.einsum)
    for function in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)):
        if function is not None:  # torch >= 2.9: experts' weights, grouped
            add(builds.grouped_product(function), function)
    swin = torchvision.models.swin_transformer
    add(OperationEntry("attention: AttnLRP (or CP-LRP), bias and mask constant", lambda call, view:
                       ShiftedWindowAttention(swin.shifted_window_attention), kind=RuleKind.ATTENTION),
        swin.shifted_window_attention)
    add(OperationEntry("attention: AttnLRP (or CP-LRP)", lambda call, view: ScaledDotProductAttention(),
                       kind=RuleKind.ATTENTION), F.scaled_dot_product_attention)
    add(OperationEntry("attention: AttnLRP (or CP-LRP), projections by the layer rule",
                       lambda call, view: MultiheadAttentionCall(), kind=RuleKind.ATTENTION),
        F.multi_head_attention_forward)

    # leaf modules
    add(keep("layer rule (composite)", RuleKind.AFFINE, "none"), ExplainableAffine)
    add(keep("rectifier", RuleKind.RECTIFIER, "nonnegative"), ReLU, torch.nn.ReLU)
    for twin in ACTIVATION_TWINS.values():
        sign = "nonnegative" if twin in (ReLU6, Sigmoid, Hardsigmoid) else "none"
        add(keep("identity", RuleKind.IDENTITY, sign, gate=twin in (Sigmoid, Hardsigmoid)), twin)
    for twin in NORM_TWINS.values():
        if issubclass(twin, torch.nn.modules.batchnorm._BatchNorm):
            add(keep("affine (per channel)", RuleKind.NORMALIZATION, "none"), twin)
        elif issubclass(twin, IdentityRuleActivation):
            add(keep("rms norm (rms held constant: identity)", RuleKind.IDENTITY, "none"), twin)
        else:
            add(keep("layer norm", RuleKind.NORMALIZATION, "none"), twin)
    add(keep("winner takes all, or proportional (composite's max_pooling)", RuleKind.GRADIENT), *TORCH_MAX_POOLINGS)
    add(keep("proportional", RuleKind.PROPORTIONAL), *TORCH_AVERAGE_POOLINGS)
    add(keep("proportional", RuleKind.PROPORTIONAL, "none"), torch.nn.Upsample)
    add(keep("identity", RuleKind.IDENTITY), torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d,
        torch.nn.Dropout3d, torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)
    add(keep("index map", RuleKind.INDEX_MAP), torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten,
        torch.nn.ChannelShuffle, torch.nn.PixelShuffle, torch.nn.PixelUnshuffle)
    add(keep("sum", RuleKind.SUM), Add)
    add(keep("identity (an activation written as a formula of its input)", RuleKind.IDENTITY), Activation)
    add(keep("lookup: explained from its output (inputs_embeds)", RuleKind.INDEX_MAP, "none"), torch.nn.Embedding)
    add(keep("attention: AttnLRP (or CP-LRP), projections by the layer rule", RuleKind.ATTENTION, "none"),
        MultiheadAttention)
    add(keep("LSTM: gates constant, cell sum proportional, candidate by the layer rule", RuleKind.ATTENTION,
             "none"), LSTM)
    add(keep("GRU: gates constant, sums proportional, candidate by the layer rule", RuleKind.ATTENTION, "none"), GRU)
    add(keep("index map (rotations)", RuleKind.INDEX_MAP), Rotate)
    add(keep("proportional (mean, rms), winner takes all (max)", RuleKind.PROPORTIONAL), CyclicPool)
    add(OperationEntry("identity at the output; AttnLRP softmax rule inside the model", builds.softmax_module,
                       "nonnegative", attention=True, gate=True, kind=RuleKind.SOFTMAX), torch.nn.Softmax)
    add(OperationEntry("identity at the output; refused inside the model", builds.softmax_module,
                       "nonnegative", kind=RuleKind.SOFTMAX), torch.nn.LogSoftmax)
    add(keep("index map (padded values absorb; copies summed)", RuleKind.INDEX_MAP, "none"), *PADDING_MODULES)
    return registry


__all__ = ["CONSTANT_FUNCTIONS", "CONSTANT_METHODS", "EXTREMUMS", "IDENTITY_ACTIVATIONS", "INDEX_FUNCTIONS",
           "INDEX_METHODS", "INDEX_UPDATES", "COMPARISONS", "PADDING_MODULES", "REFERENCE_METHODS", "SHAPE_METHODS", "STATISTICS", "default_registry"]
