"""Operations explained at run time, for models ``torch.fx`` cannot trace (Hugging Face transformers, models with
data-dependent control flow).

:func:`torchlrp.convert` rewrites a traceable model's operations into operation modules once. A model it cannot
trace keeps its Python forward; its layers still become torchlrp twins, and while it is explained,
:class:`RunTimeOperations` -- a :class:`torch.overrides.TorchFunctionMode` -- sees every torch call of that forward
and gives the calls on activations (tensors that carry relevance) the rules the operation registry gives them in a
traced graph:

* ``a + b``, ``a - b`` of two activations: the proportional split; with a constant (a position embedding, a mask):
  the constant takes its proportional share;
* ``a * c``, ``a / c`` with ``c`` a constant: relevance to ``a`` unchanged; ``a * b`` of two activations, ``a @ b``,
  ``bmm``, two-operand ``einsum``: AttnLRP's uniform rule (the epsilon rule when one factor is a constant);
* ``softmax`` on an activation: AttnLRP's rule (CP-LRP: a constant), ``scaled_dot_product_attention``: through its
  math (:func:`~torchlrp.functional.attention.attention_rule`);
* ``gelu``, ``silu``, ``tanh``, ``erf``-based activations and the negation ``-x`` (rotary embeddings'
  ``rotate_half``): the identity rule; ``sum``/``mean``: the proportional split;
  ``layer_norm``: the standard deviation held constant; ``rms_norm``: the root mean square held constant (identity);
* the statistics of hand-written norms -- ``rsqrt``, ``sqrt`` and the square ``x.pow(2)`` / ``x ** 2`` of an
  activation -- are held constant (AttnLRP), so LLaMA's ``x * torch.rsqrt(x.pow(2).mean(-1) + eps)`` passes
  relevance to ``x`` unchanged and ``(x - mean) / torch.sqrt(var + eps)`` is explained as a layer norm;
* ``topk`` of an activation (a mixture-of-experts router's choice and its gate values): held constant, so a
  product of an expert's output with its routing weight is a scale; ``grouped_mm`` / ``bmm`` with expert weights
  selected from a parameter: the epsilon rule of a product with a constant; ``index_add`` (gathering the experts'
  outputs): the proportional split of each row's sum;
* index maps (``view``, ``transpose``, ``cat``, indexing, ...), ``relu``, max pooling, dropout: their gradient.

* ``F.linear``, ``F.conv*``, ``F.conv_transpose*``, ``torch.addmm`` on parameters: the composite's rule for the
  module whose forward made the call (an :class:`~torchlrp.modules.affine_call.AffineCall`, as in a traced graph);
  ``F.batch_norm`` right after such a call or a layer twin is folded into it, elsewhere its per-channel affine rule;
  ``F.group_norm``: the standard deviation held constant; ``norm``/``var``/``std``/``amax``/``amin`` of an
  activation (normalizers): held constant; ``F.normalize``: identity; ``addcmul``/``addcdiv`` with a constant
  factor: the scale, then the sum; a parameter added to an activation (a position embedding) takes its share as
  its gradient, so that ``explain(return_absorbed=True)`` reports it.

Any other call that makes an activation has no rule: the explanation raises a
:class:`~torchlrp.convert.ConversionError` after the forward, listing every such call, unless ``convert``'s
``allow_gradient`` names it (its function name, e.g. ``"erf"``, or the module path of the forward that made it;
``["*"]`` lets every call pass its gradient): then it passes relevance by its gradient and is named in a warning. Calls inside torchlrp's own layers and rules run without the mode (they are under
``torch.no_grad`` inside autograd Functions, or made by the handlers).
"""
from __future__ import annotations

import fnmatch
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .functional.attention import attention_rule
from .batchnorm import fold_batchnorm_tensors
from .accounting import rule_conserves
from .convert import ConversionError, is_written_activation
from .functional.operations import (ChannelAffineRelevance, bilinear_rule, group_norm_rule, identity_rule,
                                    layer_norm_rule, scale_rule, softmax_rule, weighted_sum_rule)
from .functional.relevance import proportional
from .modules.affine import ExplainableAffine
from .modules.affine_call import AFFINE_FUNCTIONS, AffineCall, bind_affine_call
from .modules.operation import ProductSum, ScaledSum
from .registry import (BATCH_NORM_ARGUMENTS, INDEX_FUNCTIONS, OperationRegistry, INDEX_METHODS, SHAPE_METHODS, STATISTIC_FUNCTIONS,
                       STATISTIC_METHODS)
from .rules import Epsilon, Rule
from .state import ExplainState, InPlaceRecord, current

if TYPE_CHECKING:
    from .composites import Composite

Handler = Callable[["RunTimeOperations", tuple, dict], Any]
#: ``fold(weight, bias) -> (weight, bias)``: a batch norm folded into a layer's parameters
Fold = Callable[[Tensor, "Tensor | None"], tuple[Tensor, Tensor]]

#: calls on activations whose gradient is their rule (besides the registry's index maps)
GRADIENT_FUNCTIONS = (
    F.relu_, torch.relu_, F.alpha_dropout, F.feature_alpha_dropout, torch.amax, torch.amin, torch.max, torch.min, F.unfold, torch.repeat_interleave, F.relu, torch.relu, F.relu6, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.embedding,
    F.pad, torch.where, torch.masked_fill,
)
GRADIENT_METHODS = ("relu_", "amax", "amin", "max", "min", "unfold", "repeat_interleave", "relu", "masked_fill", "__getitem__", "__get__", "requires_grad_", "type_as", "float", "half",
                    "bfloat16", "double", "to", "cpu", "cuda", "contiguous", "clone", "detach")


#: calls that read a tensor's attributes, sizes or memory (``x.shape``, ``x.grad_fn``, ``x.T``, ``x.data_ptr()``):
#: run as they are, first (a layer reads a dozen per call); a tensor they return follows its gradient (``x.T``)
_READS = frozenset({"__get__", "data_ptr", "storage_offset", "element_size", "_is_view", "size", "dim", "numel",
                    "stride", "is_contiguous", "is_floating_point", "is_complex", "get_device", "nelement",
                    "ndimension", "untyped_storage", "__len__"})

#: marks a tensor computed from parameters and constants only (a weight expression, sigmoid(gating_param)): it
#: requires grad but carries no relevance
_PARAMETER_EXPRESSION = "_torchlrp_parameter_expression"


def _is_parameter(tensor: Tensor) -> bool:
    """``isinstance(tensor, nn.Parameter)`` without the metaclass's Python-level instance check (it runs for every
    torch call of an explained forward)."""
    return issubclass(type(tensor), torch.nn.Parameter) or getattr(tensor, "_is_param", False)


def _is_activation(value: Any) -> bool:
    return (isinstance(value, Tensor) and value.requires_grad and not _is_parameter(value)
            and not getattr(value, _PARAMETER_EXPRESSION, False))


def _mark_parameter_expressions(result: Any, args: tuple, kwargs: dict) -> None:
    """Mark the tensors a call computed from parameters and constants only (no activation among its inputs)."""
    if any(_is_activation(a) for a in _tensors(args, kwargs)):
        return
    for tensor in (result if isinstance(result, (tuple, list)) else (result,)):
        if isinstance(tensor, Tensor) and tensor.requires_grad and not _is_parameter(tensor):
            setattr(tensor, _PARAMETER_EXPRESSION, True)


def _is_absorbing(active: Any, other: Any) -> bool:
    """Whether ``other`` is a parameter (or a tensor made from parameters) added to the activation ``active``: it
    takes its share of relevance as its gradient, so that the share is reported (``explain(return_absorbed=True)``)."""
    return _is_activation(active) and isinstance(other, Tensor) and other.requires_grad


def _name(func: Any) -> str:
    """A call's name as a user writes it: ``torch.cumsum``, ``Tensor.cumsum``, ``F.gelu``'s qualified name."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    for internal, public in (("_VariableFunctionsClass.", "torch."), ("TensorBase.", "Tensor."),
                             ("_TensorBase.", "Tensor.")):
        if name.startswith(internal):
            return public + name[len(internal):]
    return name


class RunTimeOperations(TorchFunctionMode):
    """Explain the torch calls of a forward as they happen (see the module docstring).

    Parameters
    ----------
    state : ExplainState
        The active explanation: its attention mode (AttnLRP or CP-LRP) and its ``fused`` setting.
    epsilon : float
        Stabilizer of the proportional splits and products (the composite's choice for parameter-free
        operations).
    composite : Composite, optional
        The rules of the layers called as functions (``F.linear`` on parameters).
    model : torch.nn.Module, optional
        The explained model (for the module paths of calls).
    allow_gradient : sequence of str
        Calls without a rule that may pass their gradient (``convert``'s ``allow_gradient``).
    registry : OperationRegistry, optional
        A registry given to ``convert``: its gradient entries apply at run time too.
    written_activations : dict, optional
        Module class -> whether it is an activation written as a formula, as ``convert`` judged them (classes
        not in it are judged on their first call).
    in_place : InPlaceRecord, optional
        ``convert``'s record of the model's in-place updates: the saved-tensor copies (:class:`_SavedCopies`) run
        unless an earlier explanation found that the forward updates no tensor that carries relevance in place;
        this explanation adds what it sees.
    """

    def __init__(self, state: ExplainState, epsilon: float, composite: "Composite | None" = None,
                 model: torch.nn.Module | None = None, allow_gradient: Sequence[str] = (),
                 registry: OperationRegistry | None = None,
                 written_activations: dict[type, bool] | None = None,
                 in_place: InPlaceRecord | None = None) -> None:
        super().__init__()
        self.in_place = in_place
        # copy on write of what the backward keeps: unless the model is known to update nothing in place
        self.copies = in_place is None or in_place.updates is not False
        self.updates_seen = False
        self.registry = registry
        self.state = state
        self.epsilon = epsilon
        self.composite = composite
        self.allow_gradient = tuple(allow_gradient)
        self.gradient_only: dict[str, int] = {}
        self.masked: dict[int, tuple[weakref.ref, Tensor, Tensor]] = {}  # scores + constant, by the sum's id
        self.pads: dict[int, tuple[weakref.ref, Tensor, tuple[int, ...], str]] = {}  # padded -> input, pad, mode
        self.layer_outputs: dict[int, tuple[weakref.ref, Callable[[Fold], Tensor]]] = {}
        self.names = {} if model is None else {module: name for name, module in model.named_modules()}
        self.stack: list[torch.nn.Module] = []
        self.calls: dict[tuple[str, Any], AffineCall] = {}
        self.layer_seen = False
        self.inside_activation = 0
        self.site_counts: dict[str, int] = {}
        self.activation_types: dict[type, bool] = dict(written_activations or {})
        self.saved = _SavedCopies()
        self.handlers = _handlers()
        self._hooks: list[Any] = []
        if composite is not None and state.first_layer is not None:
            # the first layer is the first to run in this forward (a layer twin or a call), decided as it runs
            first = state.first_layer
            state.rules[first] = composite.rule_for(self.names.get(first, ""), first, is_first=False)

    def __enter__(self) -> "RunTimeOperations":
        def enter(module: torch.nn.Module, args: tuple) -> None:
            if current() is self.state:
                self.stack.append(module)
                if self._written_activation(module, args):
                    self.inside_activation += 1  # its calls run as they are: the module is one activation
                if isinstance(module, ExplainableAffine) and not self.layer_seen and module in self.state.rules and any(
                        _is_activation(a) for a in _tensors(args, {})):
                    self.layer_seen = True
                    self.state.rules[module] = self.composite.rule_for(self.names.get(module, ""), module,
                                                                       is_first=True)

        def leave(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            if current() is self.state and self.stack and self.stack[-1] is module:
                self.stack.pop()
                if type(module).__module__.startswith("torchlrp.") and not any(
                        _is_activation(a) for a in _tensors(args, {})):
                    _mark_parameter_expressions(output, args, {})  # a twin on constants (CLIP's text tower)
                    return None
                if self._written_activation(module, args):
                    self.inside_activation -= 1
                    if self.inside_activation == 0:
                        value = output.detach()
                        return identity_rule(args[0], lambda _: value)
                if isinstance(module, ExplainableAffine) and not isinstance(module, AffineCall) and isinstance(
                        output, Tensor) and args and isinstance(args[0], Tensor):
                    self._keep_layer(output, _refold_twin(module, args[0]))

        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
                       torch.nn.modules.module.register_module_forward_hook(leave)]
        if self.copies:
            self.saved.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.copies:
            self.saved.__exit__(*exc)
        if self.in_place is not None and exc[0] is None:
            self.in_place.updates = bool(self.in_place.updates) or self.updates_seen
        return super().__exit__(*exc)

    def _written_activation(self, module: torch.nn.Module, args: tuple) -> bool:
        """Whether this call is of a module that is an activation written as a formula of its one activation input
        (recognised once per module class by :func:`torchlrp.convert.is_written_activation`)."""
        if len(args) != 1 or not _is_activation(args[0]) or type(module).__module__.startswith(("torch.",
                                                                                             "torchlrp.")):
            return False  # torch's modules and torchlrp's twins have their rules
        kind = type(module)
        if kind not in self.activation_types:  # a class convert did not judge (a wrapper around the model): one
            # that holds modules is not a formula of its input; the others are traced once per explanation
            self.activation_types[kind] = next(module.children(), None) is None and is_written_activation(module)
        return self.activation_types[kind]

    def _keep_layer(self, output: Tensor, refold: Callable[[Fold], Tensor]) -> None:
        """Remember how to recompute a layer's output with a batch norm folded in (``refold(fold)``)."""
        key, table = id(output), self.layer_outputs
        table[key] = (weakref.ref(output, lambda _: table.pop(key, None)), refold)

    def owner(self) -> tuple[str, torch.nn.Module | None]:
        """The dotted name and module whose forward is running (the innermost), or ``("", None)``."""
        if not self.stack:
            return "", None
        module = self.stack[-1]
        return self.names.get(module, ""), module

    def site_label(self, operation: str) -> str:
        """A name for this call, unique within the forward: ``"<module path>.<operation>"``, then ``_1``, ``_2``."""
        path = self.owner()[0]
        base = f"{path}.{operation}" if path else operation
        count = self.site_counts.get(base, 0)
        self.site_counts[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def allows_gradient(self, name: str) -> bool:
        """Whether ``allow_gradient`` lets a call of ``name`` (in the running module) pass its gradient."""
        path = self.owner()[0]
        return any(fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rpartition(".")[2], pattern)
                   or (path and fnmatch.fnmatchcase(path, pattern)) for pattern in self.allow_gradient)

    def __torch_function__(self, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _READS:  # x.shape, x.grad_fn, x.T, x.data_ptr(): as they are
            result = func(*args, **kwargs)
            if isinstance(result, Tensor) and result.requires_grad:  # (x.T of a weight stays a constant)
                _mark_parameter_expressions(result, args, kwargs)
            return result
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if self.inside_activation:  # inside a written-out activation module: explained as one activation
            return func(*args, **kwargs)
        updated = _updated_in_place(func, args, kwargs)
        if updated is not None:
            if self.copies:
                self.saved.before_update(updated)
            if updated.requires_grad or any(_is_activation(a) for a in _tensors(args, kwargs)):
                self.updates_seen = True  # (without copies, autograd's version check refuses it: explain retries)
        if not any(_is_activation(a) for a in _tensors(args, kwargs)):  # constants only (a text tower of CLIP
            result = func(*args, **kwargs)  # explained on its image): no relevance flows through it
            _mark_parameter_expressions(result, args, kwargs)
            return result
        handler = self.handlers.get(func)
        if handler is not None:
            result = handler(self, args, kwargs)
            if result is not NotImplemented:
                return result
        if _passes_gradient(func, self.registry):
            return func(*args, **kwargs)
        label = _name(func)
        allowed = self.allows_gradient(label)
        path = self.owner()[0]
        key = (f"{path}: " if path else "") + label
        taps: list[Tensor] = []
        if allowed and updated is None:  # measured: the relevance it changes is in the conservation report
            args, kwargs = _tapped(args, taps), {name: _tapped((value,), taps)[0] for name, value in kwargs.items()}
        result = func(*args, **kwargs)
        _mark_parameter_expressions(result, args, kwargs)
        if any(_is_activation(output) for output in (result if isinstance(result, (tuple, list)) else (result,))):
            counted = key + ("" if allowed else " [no rule]")
            self.gradient_only[counted] = self.gradient_only.get(counted, 0) + 1
            if taps:
                self._measure(key, result, taps)
        return result

    def _measure(self, key: str, result: Any, taps: list[Tensor]) -> None:
        """Record, in the backward, the relevance a call without a rule changes: into its inputs minus at its
        outputs (``state.unruled[key]``)."""
        unruled = self.state.unruled

        def add(sign: float) -> Callable[[Tensor], None]:
            def hook(gradient: Tensor) -> None:
                change = sign * gradient.detach().sum()
                unruled[key] = unruled[key] + change if key in unruled else change
            return hook

        for output in (result if isinstance(result, (tuple, list)) else (result,)):
            if _is_activation(output):
                output.register_hook(add(-1.0))
        for tap in taps:
            tap.register_hook(add(1.0))

    def report(self) -> None:
        """Raise for the calls on activations that had no rule; warn about those ``allow_gradient`` let pass;
        note the rules in play that may lose relevance (``state.losses_allowed``).

        Raises
        ------
        ConversionError
            Listing each call (module path: function) without a rule that ``allow_gradient`` does not name.
        """
        refused = [(key.rpartition(": ")[0] or "(model forward)", f"{key.rpartition(': ')[2][:-len(' [no rule]')]} "
                    f"(x{count}): no relevance rule at run time") for key, count in self.gradient_only.items()
                   if key.endswith(" [no rule]")]
        if refused:
            raise ConversionError(refused)
        for module, rule in self.state.rules.items():
            if isinstance(module, ExplainableAffine) and not rule_conserves(rule):
                self.state.losses_allowed.add(f"the layer rule {rule!r}")
            elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                self.state.losses_allowed.add("a batch norm's shift (a bias)")
        if self.gradient_only:
            listed = ", ".join(f"{name} (x{count})" for name, count in self.gradient_only.items())
            warnings.warn(f"torchlrp explained this model's forward at run time (torch.fx cannot trace it); these "
                          f"calls on activations have no relevance rule and passed relevance by their gradient, "
                          f"as allow_gradient allowed: {listed}", stacklevel=3)


def _tapped(args: tuple, taps: list[Tensor]) -> tuple:
    """``args`` with each activation (also inside lists and tuples) replaced by a view of itself, appended to
    ``taps``: its gradient is what one call passes to that input."""
    def tap(value: Any) -> Any:
        if _is_activation(value):
            view = value.view_as(value)
            taps.append(view)
            return view
        if isinstance(value, (list, tuple)) and any(_is_activation(item) for item in value):
            return type(value)(tap(item) for item in value)
        return value
    return tuple(tap(value) for value in args)


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors among a call's arguments (inside lists and tuples too)."""
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(item for item in value if isinstance(item, Tensor))
    return found


def _passes_gradient(func: Any, registry: OperationRegistry | None = None) -> bool:
    """Whether a call's gradient is its rule: the registry's entries without a build (index maps, dropout, ...,
    and what a user registered so), and the calls the run-time mode adds (listed above)."""
    name = getattr(func, "__name__", "")
    is_method = isinstance(func, type(torch.Tensor.add)) or "TensorBase" in repr(func) or "getset" in repr(func) \
        or (bool(name) and getattr(torch.Tensor, name, None) is func)
    if is_method and name in (*INDEX_METHODS, *SHAPE_METHODS, *GRADIENT_METHODS):
        return True
    if func in INDEX_FUNCTIONS or func in GRADIENT_FUNCTIONS:
        return True
    if registry is None:
        return False
    try:
        entry = registry.methods.get(name) if is_method else registry.functions.get(func)
    except TypeError:  # an unhashable callable
        return False
    return entry is not None and entry.build is None


def _sum(signs: tuple[float, float]) -> Handler:
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        if len(args) != 2 or kwargs:
            return NotImplemented  # alpha=, out=: the plain call
        left, right = args
        if _is_absorbing(left, right) or _is_absorbing(right, left):
            # a parameter expression added to an activation (a position embedding): its share is reported
            label = mode.site_label("add")
            left, right = (mode.state.absorb(t, label) if not _is_activation(t) else t for t in (left, right))
            return weighted_sum_rule([left, right], signs, epsilon=mode.epsilon)
        if _is_activation(left) and _is_activation(right):
            return weighted_sum_rule([left, right], signs, epsilon=mode.epsilon)
        if _is_activation(left):  # activation +/- constant
            if isinstance(right, Tensor) or right != 0:
                mode.state.losses_allowed.add("a constant added to an activation (a mask, a buffer, a number)")
            constant = right * signs[1] if isinstance(right, Tensor) else signs[1] * right
            result = weighted_sum_rule([left], [signs[0]], constant=constant, epsilon=mode.epsilon)
            if signs[0] == 1.0 and isinstance(constant, Tensor):  # maybe scores + mask before a softmax
                key, table = id(result), mode.masked
                table[key] = (weakref.ref(result, lambda _: table.pop(key, None)), left, constant)
            return result
        if _is_activation(right):  # constant +/- activation
            mode.state.losses_allowed.add("a constant added to an activation (a mask, a buffer, a number)")
            return weighted_sum_rule([right], [signs[1]], constant=left, epsilon=mode.epsilon)
        return NotImplemented
    return handle


def _product(function: Callable[[Tensor, Tensor], Tensor], elementwise: bool) -> Handler:
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        if len(args) != 2 or kwargs:
            return NotImplemented
        left, right = args
        left_active, right_active = _is_activation(left), _is_activation(right)
        if left_active and right_active:  # CP-LRP's attention weights are constants: they never reach this line
            return bilinear_rule(function, left, right, (0.5, 0.5), mode.epsilon)
        if elementwise:
            if left_active:
                return scale_rule(left, right, function)
            return scale_rule(right, left, function, signal_first=False) if right_active else NotImplemented
        if not isinstance(left, Tensor) or not isinstance(right, Tensor):
            return NotImplemented
        return bilinear_rule(function, left, right, (1.0, 0.0) if left_active else (0.0, 1.0), mode.epsilon)
    return handle


def _in_place(handler: Handler) -> Handler:
    """An in-place update of an activation, explained as its out-of-place form and copied into the tensor."""
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        if not args or not isinstance(args[0], Tensor) or not any(_is_activation(a) for a in args):
            return NotImplemented
        result = handler(mode, args, kwargs)
        if result is NotImplemented:
            return NotImplemented
        mode.saved.before_update(args[0])  # the rule just kept the tensor's old values (a summand, a signal)
        return args[0].copy_(result)
    return handle


def _storage_key(tensor: Tensor) -> int:
    """The address of ``tensor``'s storage (shared by all its views), without making a storage object."""
    return tensor.data_ptr() - tensor.storage_offset() * tensor.element_size()


class _SavedCopies:
    """Saved-tensor hooks that let an in-place update leave what the backward kept intact (copy on write).

    While a run-time explanation's forward runs, every tensor autograd saves for the backward is packed in a slot,
    indexed by its storage; before a call updates a tensor in place, the slots of its storage get a copy of the
    values it is about to lose. Tensors never updated in place are not copied.
    """

    def __init__(self) -> None:
        self.slots: dict[int, list[list[Tensor]]] = {}
        self._context: Any = None

    def pack(self, tensor: Tensor) -> "list[Tensor] | Tensor":
        """Keep ``tensor`` in a slot (autograd's pack hook); a parameter as it is (a forward that updates its own
        parameters in place has no explanation: the layers refuse it)."""
        if _is_parameter(tensor):
            return tensor
        slot = [tensor]
        try:
            key = _storage_key(tensor)
        except (RuntimeError, NotImplementedError):  # no storage (a tensor subclass): kept as it is
            return slot
        slots = self.slots.get(key)
        if slots is None:
            self.slots[key] = [slot]
        else:
            slots.append(slot)
        return slot

    @staticmethod
    def unpack(slot: "list[Tensor] | Tensor") -> Tensor:
        """The kept tensor (autograd's unpack hook)."""
        return slot[0] if type(slot) is list else slot

    def before_update(self, tensor: Tensor) -> None:
        """Copy the values the backward kept of ``tensor``'s storage before it is updated in place."""
        try:
            key = _storage_key(tensor)
        except (RuntimeError, NotImplementedError):
            return
        for slot in self.slots.pop(key, []):
            slot[0] = slot[0].clone()

    def __enter__(self) -> "_SavedCopies":
        self._context = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._context.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)
        self.slots.clear()  # the slots live on in the autograd graph, as long as the backward needs them


def _updated_in_place(func: Any, args: tuple, kwargs: dict) -> Tensor | None:
    """The tensor a call updates in place (``x.add_(y)``, ``x[i] = v``, ``F.relu(x, inplace=True)``, ``out=``)."""
    name = getattr(func, "__name__", "")
    if "out" in kwargs and isinstance(kwargs["out"], Tensor):
        return kwargs["out"]
    if not args or not isinstance(args[0], Tensor):
        return None
    if (name.endswith("_") and not name.endswith("__")) or name in (
            "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__") or kwargs.get("inplace") is True:
        return args[0]
    return None


def _quotient(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
    """``a / b``: the divisor held constant (a number, a parameter, or an activation as a normalizer:
    ``attn / attn.sum(-1)``, linear attention's denominator); a constant divided by an activation has no rule."""
    if len(args) != 2 or kwargs or not _is_activation(args[0]):
        return NotImplemented
    return scale_rule(args[0], args[1], torch.div)


def _softmax(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
    input = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    dtype = kwargs.get("dtype", args[2] if len(args) > 2 else None)
    if not _is_activation(input) or not isinstance(dim, int) or set(kwargs) - {"dim", "dtype", "_stacklevel"}:
        return NotImplemented
    scores, constant = input, None
    masked = mode.masked.get(id(input))
    if masked is not None and masked[0]() is input:  # softmax(scores + mask): the mask is the rule's constant
        _, scores, constant = masked
    if dtype is not None:  # softmax(x, dim, dtype=torch.float32) (LLaMA's eager attention): the cast, then the rule
        input, scores = input.to(dtype), scores.to(dtype)
    if constant is not None:  # a mask's -inf becomes the dtype's minimum: masked logits get zero relevance, not NaN
        constant = constant.to(scores.dtype).clamp(min=torch.finfo(scores.dtype).min)
    if mode.state.attention == "cp":  # CP-LRP: the weights are a constant of the product with the values
        return torch.softmax(input.detach(), dim)
    mode.state.losses_allowed.add("AttnLRP's softmax rule (absorbs like a bias)")
    return softmax_rule(scores, dim, constant, mode.epsilon)


def _attention(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args), **kwargs)
    if bound.get("dropout_p", 0.0):
        return NotImplemented
    if mode.state.attention != "cp":
        mode.state.losses_allowed.add("AttnLRP's softmax rule (absorbs like a bias)")
    output, _ = attention_rule(bound["query"], bound["key"], bound["value"], bound.get("attn_mask"),
                               bool(bound.get("is_causal", False)), bound.get("scale"), mode.state.attention,
                               mode.epsilon, need_weights=False, enable_gqa=bool(bound.get("enable_gqa", False)))
    return output


def _identity(function: Callable) -> Handler:
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        if not args or not _is_activation(args[0]):
            return NotImplemented
        return identity_rule(args[0], lambda tensor: function(tensor, *args[1:], **kwargs))
    return handle


def _reduction(function: Callable) -> Handler:
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        if not args or not _is_activation(args[0]) or kwargs.get("dtype") is not None:
            return NotImplemented
        return proportional(args[0], lambda tensor: function(tensor, *args[1:], **kwargs), mode.epsilon)
    return handle


def _layer_norm(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = dict(zip(names, args), **kwargs)
    if not _is_activation(bound["input"]):
        return NotImplemented
    return layer_norm_rule(bound["input"], bound["normalized_shape"], bound.get("weight"), bound.get("bias"),
                           bound.get("eps", 1e-5), mode.epsilon)


def _held_constant(function: Callable, exponent: float | None = None) -> Handler:
    """A normalizer's statistic of an activation, computed as a constant (no relevance flows into it)."""
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        if not args or not _is_activation(args[0]):
            return NotImplemented
        if exponent is not None and (len(args) < 2 or not isinstance(args[1], (int, float)) or args[1] != exponent):
            return NotImplemented  # x ** 3, x ** tensor: not a norm's square
        return function(args[0].detach(), *args[1:], **kwargs)
    return handle


def _einsum(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
    equation, *operands = args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if kwargs or not isinstance(equation, str) or len(operands) != 2:
        return NotImplemented
    return _product(lambda left, right: torch.einsum(equation, left, right), False)(mode, tuple(operands), {})


def _affine(function: Callable) -> Handler:
    """A linear/conv call on parameters: the composite's rule for the module making it (an AffineCall)."""
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        bound = bind_affine_call(function, args, kwargs)
        if not _is_activation(bound.get("input")) or _is_activation(bound.get("weight")) or _is_activation(
                bound["bias"]) or mode.composite is None:
            return NotImplemented  # a dynamic kernel: no rule (reported)
        if function is torch.addmm and (kwargs or bound["beta"] != 1 or bound["alpha"] != 1):
            return NotImplemented
        path, owner = mode.owner()
        padded = mode.pads.get(id(bound["input"]))
        padding = None
        if padded is not None and padded[0]() is bound["input"] and not AFFINE_FUNCTIONS[function][2] and len(
                padded[2]) == 2 * AFFINE_FUNCTIONS[function][1]:  # a pad right before: part of the convolution
            args = (padded[1], *args[1:]) if args else args
            kwargs = {k: (padded[1] if k == "input" else v) for k, v in kwargs.items()}
            padding = (padded[2], padded[3])
            bound = bind_affine_call(function, args, kwargs)
        key = (path, function, padding)
        call = mode.calls.get(key)
        if call is None:
            call = mode.calls[key] = AffineCall(function, None if owner is None else type(owner),
                                                *(padding or (None,)))
        name = f"{path}.{function.__name__}" if path else function.__name__
        first = not mode.layer_seen
        mode.layer_seen = True
        rule = mode.composite.rule_for(name, call, is_first=first)
        if not rule_conserves(rule):
            mode.state.losses_allowed.add(f"the layer rule {rule!r}")
        output = call(*args, explain=True, rule=rule, **kwargs)
        if not call.transposed and function is not torch.addmm:
            def refold(fold: Fold) -> Tensor:
                weight, bias = fold(bound["weight"], bound["bias"])
                folded = {**bound, "weight": weight, "bias": bias}
                names = AFFINE_FUNCTIONS[function][3]
                return call(*(folded[n] for n in names if n in folded), explain=True, rule=rule)
            mode._keep_layer(output, refold)
        return output
    return handle


def _pad(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
    """``F.pad`` of an activation: its gradient (the index map); remembered, so that a convolution right after it
    takes the padding as part of its map (as in a traced graph)."""
    bound = dict(zip(("input", "pad", "mode", "value"), args), **kwargs)
    output = F.pad(*args, **kwargs)
    pad, pad_mode = bound.get("pad"), bound.get("mode", "constant")
    if _is_activation(bound["input"]) and pad_mode in ("constant", "reflect", "replicate", "circular") and (
            pad_mode != "constant" or bound.get("value") in (None, 0, 0.0)) and all(isinstance(p, int) for p in pad):
        key, table = id(output), mode.pads
        table[key] = (weakref.ref(output, lambda _: table.pop(key, None)), bound["input"], tuple(pad), pad_mode)
    return output


def _refold_twin(layer: ExplainableAffine, input: Tensor) -> Callable[[Fold], Tensor]:
    """Recompute a layer twin's output with a batch norm folded into it (its own rule)."""
    def refold(fold: Fold) -> Tensor:
        weight, bias = fold(layer.weight, layer.bias)
        state = current()
        rule = state.rules.get(layer) if state is not None else None
        return layer._explained(input, {}, True, rule, None, None, None, None, layer._plain_forward,
                                layer._extra_geometry, (weight, bias))
    return refold


def _batch_norm(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
    bound = dict(zip(BATCH_NORM_ARGUMENTS, args), **kwargs)
    input = bound["input"]
    if not _is_activation(input) or bound.get("training", False) or bound.get("running_mean") is None:
        return NotImplemented
    if any(_is_activation(bound.get(name)) for name in BATCH_NORM_ARGUMENTS[1:5]):
        return NotImplemented
    eps = bound.get("eps", 1e-5)
    mode.state.losses_allowed.add("a batch norm's shift (a bias)")
    kept = mode.layer_outputs.get(id(input))
    if kept is not None and kept[0]() is input:  # folded into the layer before it
        statistics = [None if bound.get(name) is None else bound[name].detach() for name in BATCH_NORM_ARGUMENTS[1:5]]
        return kept[1](lambda weight, bias: fold_batchnorm_tensors(weight, bias, *statistics, eps))
    return ChannelAffineRelevance.apply(input, bound["running_mean"], bound["running_var"], bound.get("weight"),
                                        bound.get("bias"), eps, mode.epsilon)


def _group_norm(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
    bound = dict(zip(("input", "num_groups", "weight", "bias", "eps"), args), **kwargs)
    if not _is_activation(bound["input"]):
        return NotImplemented
    return group_norm_rule(bound["input"], bound["num_groups"], bound.get("weight"), bound.get("bias"),
                           bound.get("eps", 1e-5), mode.epsilon)


def _addc(operation: Callable) -> Handler:
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        input, first, second = (list(args) + [None] * 3)[:3]
        value = kwargs.get("value", args[3] if len(args) > 3 else 1)
        if set(kwargs) - {"value"} or not isinstance(value, (int, float)) or second is None:
            return NotImplemented
        active = [_is_activation(first), _is_activation(second)]
        if all(active) or (active[1] and operation is torch.addcdiv):
            return NotImplemented
        if not any(active) and not _is_activation(input):
            return NotImplemented
        if not _is_activation(input):
            mode.state.losses_allowed.add(f"the constant summand of {operation.__name__}")
        module = ScaledSum(operation, float(value), 0 if active[0] else 1 if active[1] else None)
        rule = Epsilon(mode.epsilon)
        token = _bare_state(module, rule)
        try:
            return module(input, first, second)
        finally:
            token()
    return handle


def _product_sum(product: Callable) -> Handler:
    """``addmm``/``baddbmm`` whose factors include an activation and whose weight is not a parameter expression
    (that is a layer: :func:`_affine`)."""
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        names = ("input", "batch1", "batch2") if product is torch.bmm else ("input", "mat1", "mat2")
        bound = dict(zip(names, args), **kwargs)
        input, first, second = (bound.get(name) for name in names)
        if set(bound) - {*names, "beta", "alpha"} or not isinstance(first, Tensor) or not isinstance(second, Tensor):
            return NotImplemented
        active = (_is_activation(first), _is_activation(second))
        if not any(active):
            return NotImplemented
        shares = (0.5, 0.5) if all(active) else (1.0, 0.0) if active[0] else (0.0, 1.0)
        if isinstance(input, Tensor) and not _is_activation(input) and bound.get("beta", 1.0) != 0:
            mode.state.losses_allowed.add(f"the constant summand of {product.__name__} (a bias)")
        module = ProductSum(product, shares, _is_activation(input))
        undo = _bare_state(module, Epsilon(mode.epsilon))
        try:
            return module(input, first, second, beta=bound.get("beta", 1.0), alpha=bound.get("alpha", 1.0))
        finally:
            undo()
    return handle


def _index_add(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
    """``x.index_add(dim, index, source)`` (a mixture of experts gathering its experts' outputs): ``x`` plus the
    sources summed into their rows, each row's relevance split in proportion to ``x`` and the sources added to it."""
    bound = dict(zip(("input", "dim", "index", "source"), args), **kwargs)
    input, source = bound.get("input"), bound.get("source")
    if set(bound) - {"input", "dim", "index", "source", "alpha"} or not _is_activation(source) or not isinstance(
            input, Tensor):
        return NotImplemented
    dim, index, alpha = bound["dim"], bound["index"], bound.get("alpha", 1)
    zeros = torch.zeros_like(input, dtype=torch.result_type(input, source))
    scattered = proportional(source, lambda rows: zeros.index_add(dim, index, rows, alpha=alpha), mode.epsilon)
    if _is_activation(input):
        return weighted_sum_rule([input, scattered], (1.0, 1.0), epsilon=mode.epsilon)
    return weighted_sum_rule([scattered], (1.0,), constant=input, epsilon=mode.epsilon)


def _concatenation(function: Callable) -> Handler:
    """``torch.cat`` of activations and parameters (a class token, registers): an index map, the parameters' share
    reported (``explain(return_absorbed=True)``, by the site's name)."""
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        parts = args[0] if args else kwargs.get("tensors")
        if not isinstance(parts, (list, tuple)) or not any(_is_activation(part) for part in parts) or not any(
                isinstance(part, Tensor) and part.requires_grad and not _is_activation(part) for part in parts):
            return NotImplemented  # no parameter among activations: an index map (its gradient)
        label = mode.site_label("cat")
        parts = [part if _is_activation(part) or not isinstance(part, Tensor) or not part.requires_grad
                 else mode.state.absorb(part, label) for part in parts]
        rest = {name: value for name, value in kwargs.items() if name != "tensors"}
        return function(parts, *args[1:], **rest)
    return handle


def _grouped_product(function: Callable) -> Handler:
    """``grouped_mm(input, weight, offs=...)`` (mixture-of-experts layers: each group of rows times its expert's
    weight): a product with a constant factor (the epsilon rule), or AttnLRP's uniform rule of two activations."""
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        if len(args) < 2:
            return NotImplemented
        rest = args[2:]
        return _product(lambda left, right: function(left, right, *rest, **kwargs), False)(mode, args[:2], {})
    return handle


def _first_of(*candidates: Handler) -> Handler:
    """The first of ``candidates`` that handles the call."""
    def handle(mode: RunTimeOperations, args: tuple, kwargs: dict) -> Any:
        for candidate in candidates:
            result = candidate(mode, args, kwargs)
            if result is not NotImplemented:
                return result
        return NotImplemented
    return handle


def _bare_state(module: torch.nn.Module, rule: Rule) -> Callable[[], None]:
    """Give an operation module made at run time ``rule`` in the active explanation (undone by the result)."""
    state = current()
    state.rules[module] = rule
    return lambda: state.rules.pop(module, None)


def _handlers() -> dict[Any, Handler]:
    """The run-time rules, by torch function (built per explanation; no process-wide state)."""
    handlers: dict[Any, Handler] = {}
    for function in (torch.Tensor.add, torch.add, torch.Tensor.__add__, torch.Tensor.__radd__):
        handlers[function] = _sum((1.0, 1.0))
    # in-place arithmetic on activations (score += bias, attn /= attn.sum(...), x.mul_(g)): the rule of the
    # out-of-place form, copied into the tensor (whose earlier values the backward keeps: see _SavedCopies)
    for name, handler in (("add_", _sum((1.0, 1.0))), ("sub_", _sum((1.0, -1.0))),
                          ("mul_", _product(torch.mul, True)), ("div_", _quotient)):
        handlers[getattr(torch.Tensor, name)] = _in_place(handler)
    for name, handler in (("__iadd__", _sum((1.0, 1.0))), ("__isub__", _sum((1.0, -1.0))),
                          ("__imul__", _product(torch.mul, True)), ("__itruediv__", _quotient)):
        handlers[getattr(torch.Tensor, name)] = _in_place(handler)
    for function in (torch.Tensor.sub, torch.sub, torch.subtract, torch.Tensor.__sub__):
        handlers[function] = _sum((1.0, -1.0))
    for function in (torch.Tensor.mul, torch.mul, torch.multiply, torch.Tensor.__mul__, torch.Tensor.__rmul__):
        handlers[function] = _product(torch.mul, True)
    for function in (torch.Tensor.div, torch.div, torch.true_divide, torch.divide, torch.Tensor.__truediv__):
        handlers[function] = _quotient
    for function in (torch.Tensor.matmul, torch.matmul, torch.Tensor.__matmul__):
        handlers[function] = _product(torch.matmul, False)
    for function in (torch.Tensor.bmm, torch.bmm):
        handlers[function] = _product(torch.bmm, False)
    handlers[torch.einsum] = _einsum
    for function in (torch.Tensor.softmax, torch.softmax, F.softmax):
        handlers[function] = _softmax
    handlers[F.scaled_dot_product_attention] = _attention
    for function in (F.gelu, F.silu, F.mish, F.elu, F.celu, F.selu, F.softplus, F.leaky_relu, F.hardswish, torch.tanh,
                     torch.Tensor.tanh, F.tanh, torch.erf, torch.neg, torch.Tensor.neg, torch.Tensor.__neg__,
                     torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid, F.hardsigmoid, F.hardtanh, torch.clamp,
                     torch.Tensor.clamp, torch.clip, torch.Tensor.clip):
        handlers[function] = _identity(function)
    for function in (torch.Tensor.sum, torch.sum, torch.Tensor.mean, torch.mean):
        handlers[function] = _reduction(function)
    handlers[F.layer_norm] = _layer_norm
    if hasattr(F, "rms_norm"):
        handlers[F.rms_norm] = _identity(F.rms_norm)  # the root mean square held constant: relevance unchanged
    for function in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                     F.adaptive_avg_pool3d, F.interpolate, F.fold):
        handlers[function] = _reduction(function)
    for function in AFFINE_FUNCTIONS:
        handlers[function] = _affine(function)
    for function in (torch.addmm, torch.Tensor.addmm):  # a layer (GPT-2's Conv1D), else a product of activations
        handlers[function] = _first_of(_affine(torch.addmm), _product_sum(torch.mm))
    for function in (torch.baddbmm, torch.Tensor.baddbmm):
        handlers[function] = _product_sum(torch.bmm)
    for function in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)):
        if function is not None:  # torch >= 2.9
            handlers[function] = _grouped_product(function)
    for function in (torch.cat, torch.concat, torch.concatenate):
        handlers[function] = _concatenation(function)
    for function in (torch.index_add, torch.Tensor.index_add):
        handlers[function] = _index_add
    handlers[torch.Tensor.index_add_] = _in_place(_index_add)
    for function in (torch.topk, torch.Tensor.topk):  # a router's choice of experts: the gate held constant
        handlers[function] = _held_constant(function)
    handlers[F.batch_norm] = _batch_norm
    handlers[F.pad] = _pad
    handlers[F.group_norm] = _group_norm
    for function in (*STATISTIC_FUNCTIONS, *(getattr(torch.Tensor, name) for name in STATISTIC_METHODS)):
        handlers[function] = _held_constant(function)
    handlers[F.normalize] = _identity(F.normalize)
    for operation in (torch.addcmul, torch.addcdiv):
        handlers[operation] = handlers[getattr(torch.Tensor, operation.__name__)] = _addc(operation)
    for function in (torch.rsqrt, torch.Tensor.rsqrt, torch.sqrt, torch.Tensor.sqrt):
        handlers[function] = _held_constant(function)
    for function in (torch.pow, torch.Tensor.pow, torch.Tensor.__pow__):
        handlers[function] = _held_constant(function, 2)
    return handlers
