"""Linear and convolutional layers *called as functions* on parameters, with an explain mode.

Third-party code often holds a layer's parameters in a module but applies them with a function call:
``F.conv2d(x, self.weight, ...)`` after an ``F.pad`` (timm's ``Conv2dSame``, lukemelas' ``Conv2dStaticSamePadding``),
``F.linear(x, self.qkv.weight, torch.cat((q_bias, k_bias, v_bias)))`` (BEiT, EVA), a weight standardized in the
forward (timm's ``StdConv2d``), ``torch.addmm(self.bias, x, self.weight)`` (GPT-2's ``Conv1D``).
:func:`torchlrp.convert` puts an :class:`AffineCall` in place of each such call whose weight and bias depend on
parameters and constants only. It is an :class:`~torchlrp.modules.affine.ExplainableAffine`: the same rules, the
same per-call marks (non-negative input, a ReLU after it, first layer) and the same fast paths as the layer twins.
Composites address it as the layer it is: ``by_type`` matches the torch layer class of the call (``F.conv2d``:
``nn.Conv2d``) and the class of the module whose forward made the call; ``by_name`` matches its own dotted name and
that module's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from torchlrp.modules.affine import ExplainableAffine

if TYPE_CHECKING:
    from torchlrp.core.composites import Composite
    from torchlrp.core.rules import Rule

#: function -> (torch layer class it applies, spatial dimensions, transposed, names of its arguments in order)
AFFINE_FUNCTIONS: dict[Callable[..., Tensor], tuple[type[torch.nn.Module], int, bool, tuple[str, ...]]] = {
    F.linear: (torch.nn.Linear, 0, False, ("input", "weight", "bias")),
    torch.addmm: (torch.nn.Linear, 0, False, ("bias", "input", "weight", "beta", "alpha")),
    **{function: (layer, dims, False, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
       for function, layer, dims in ((F.conv1d, torch.nn.Conv1d, 1), (F.conv2d, torch.nn.Conv2d, 2),
                                     (F.conv3d, torch.nn.Conv3d, 3))},
    **{function: (layer, dims, True, ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
                                      "dilation"))
       for function, layer, dims in ((F.conv_transpose1d, torch.nn.ConvTranspose1d, 1),
                                     (F.conv_transpose2d, torch.nn.ConvTranspose2d, 2),
                                     (F.conv_transpose3d, torch.nn.ConvTranspose3d, 3))},
}


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def bind_affine_call(function: Callable[..., Tensor], args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call of one of :data:`AFFINE_FUNCTIONS`, by name.

    Parameters
    ----------
    function : callable
        ``F.linear``, ``F.conv*d``, ``F.conv_transpose*d`` or ``torch.addmm``.
    args, kwargs
        The call's arguments.

    Returns
    -------
    dict
        Argument name -> value (the defaults filled in).
    """
    names = AFFINE_FUNCTIONS[function][3]
    bound = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0, "beta": 1,
             "alpha": 1}
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


class AffineCall(ExplainableAffine, torch.nn.Module):
    """A call of ``F.linear``, ``F.conv1d/2d/3d``, ``F.conv_transpose1d/2d/3d`` or ``torch.addmm`` on parameters.

    Called with the replaced call's own arguments (plus the per-call marks of :func:`torchlrp.convert`), it computes
    exactly that call outside explanations; while explaining, the layer's rule with the weight and bias of this call
    (see :class:`~torchlrp.modules.affine.ExplainableAffine`).

    Parameters
    ----------
    function : callable
        The function the call made (a key of :data:`AFFINE_FUNCTIONS`).
    owner_type : type, optional
        The class of the module whose forward made the call (composites' ``by_type`` matches it too).
    explicit_padding : tuple of int, optional
        Padding applied to the input first (an ``F.pad`` / padding module right before the call, merged into it
        by ``convert``), in :func:`torch.nn.functional.pad`'s order.
    padding_mode : str
        That padding's mode (``"constant"`` for zeros, ``"reflect"``, ``"replicate"``, ``"circular"``).
    """

    #: composites' ``by_name`` also matches the name of the module whose forward made the call
    addressed_by_owner = True

    def __init__(self, function: Callable[..., Tensor], owner_type: type | None = None,
                 explicit_padding: tuple[int, ...] | None = None, padding_mode: str = "constant") -> None:
        super().__init__()
        if function not in AFFINE_FUNCTIONS:
            raise ValueError(f"AffineCall takes one of {[f.__name__ for f in AFFINE_FUNCTIONS]}, got {function!r}")
        self.function = function
        self.layer_type, self.spatial_dims, self.transposed, _ = AFFINE_FUNCTIONS[function]
        self.owner_type = owner_type
        self.explicit_padding = None if explicit_padding is None else tuple(int(p) for p in explicit_padding)
        self.padding_mode = padding_mode
        self.input_argument = 1 if function is torch.addmm else 0

    def matches_type(self, types: type | tuple[type, ...]) -> bool:
        """Whether a composite's ``by_type`` key names this call: its layer class or its owner's class.

        Parameters
        ----------
        types : type or tuple of type
            The key.

        Returns
        -------
        bool
            True if the call's torch layer class or the owning module's class is a subclass of one of ``types``.
        """
        return issubclass(self.layer_type, types) or (self.owner_type is not None and issubclass(self.owner_type,
                                                                                                   types))

    def forward(self, *args: Any, explain: bool | None = None, rule: "str | Rule | Composite | None" = None,
                input_nonnegative: bool | None = None, feeds_rectifier: bool | None = None,
                first: bool | None = None, **kwargs: Any) -> Tensor:
        """Apply the call; in explain mode, attach the rule's relevance backward.

        Parameters
        ----------
        *args, **kwargs
            The replaced call's arguments (``input, weight, bias, stride, ...``; ``bias, input, weight`` for
            ``torch.addmm``).
        explain, rule, input_nonnegative, feeds_rectifier, first
            As for :meth:`torchlrp.modules.affine.ExplainableAffine.forward`.

        Returns
        -------
        Tensor
            The call's output (its ReLU where explained together with the ``torchlrp.ReLU`` after it).
        """
        bound = bind_affine_call(self.function, args, kwargs)
        input, weight, bias = bound["input"], bound["weight"], bound["bias"]
        if self.function is torch.addmm:
            weight = weight.t()
            if bound["beta"] != 1 or bound["alpha"] != 1:
                raise ValueError("an explained torch.addmm takes beta=1 and alpha=1 only")

        def plain(tensor: Tensor) -> Tensor:
            if self.explicit_padding is not None:
                tensor = F.pad(tensor, self.explicit_padding, self.padding_mode)
            call_args, call_kwargs = list(args), dict(kwargs)
            if len(call_args) > self.input_argument:
                call_args[self.input_argument] = tensor
            else:
                call_kwargs["input"] = tensor
            return self.function(*call_args, **call_kwargs)

        def geometry(tensor: Tensor) -> dict[str, Any]:
            return self._call_geometry(bound, weight)

        return self._explained(input, {}, explain, rule, None, input_nonnegative, feeds_rectifier, first, plain,
                               geometry, (weight, bias))

    def _call_geometry(self, bound: dict[str, Any], weight: Tensor) -> dict[str, Any]:
        """:class:`~torchlrp.functional.AffineOp`'s keyword arguments for this call."""
        dims = self.spatial_dims
        if dims == 0:
            return {}
        padding, explicit = bound["padding"], self.explicit_padding
        dilation = _tuple(bound["dilation"], dims)
        if isinstance(padding, str):  # "valid" or "same" (stride 1): the same padding as an explicit pad
            same = []
            if padding == "same":
                for size, rate in zip(reversed(weight.shape[2:]), reversed(dilation)):
                    total = rate * (size - 1)
                    same += [total // 2, total - total // 2]
            if any(same):
                if explicit is not None and self.padding_mode != "constant":
                    raise ValueError("a reflect/replicate/circular pad before a convolution with padding='same'")
                explicit = tuple(same) if explicit is None else tuple(a + b for a, b in zip(explicit, same))
            padding = 0
        geometry = {"spatial_dims": dims, "stride": _tuple(bound["stride"], dims), "padding": _tuple(padding, dims),
                    "dilation": dilation, "groups": int(bound["groups"]), "explicit_padding": explicit,
                    "padding_mode": self.padding_mode}
        if self.transposed:
            geometry.update(explicit_padding=None, transposed=True,
                            output_padding=_tuple(bound["output_padding"], dims))
        return geometry

    def extra_repr(self) -> str:  # noqa: D102
        extra = "" if self.explicit_padding is None else f", padding={self.explicit_padding} ({self.padding_mode})"
        owner = "" if self.owner_type is None else f", in {self.owner_type.__name__}"
        return f"{self.function.__name__}{owner}{extra}"
