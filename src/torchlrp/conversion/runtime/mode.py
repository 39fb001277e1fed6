"""The run-time engine: explains the torch calls of a forward ``torch.fx`` cannot trace, as they happen, from the
same operation table the traced engine reads (:mod:`torchlrp.operations`).

:class:`RunTimeOperations` is a :class:`torch.overrides.TorchFunctionMode`. Each torch call on an activation (a
tensor that carries relevance) is looked up in the table, in the form a traced graph records it
(:class:`~torchlrp.conversion.runtime.calls.LiveCall`). Its entry decides, as in a traced graph: the call keeps its
gradient (index maps, max pooling with indices, dropout), is held constant (``detach``; a statistic that only
scales an activation), or is explained by the operation module its ``build`` makes -- run here, on the spot, with
the composite's rule. What needs the future of a value in a traced graph is decided as the uses come: a statistic
is held constant until a use turns out not to scale an activation (then its computed value is used, explained by
its entry), and element-wise calls on one activation that power it or multiply two of its values are one
activation (the identity rule) where their value is used by anything else, as ``convert`` fuses them.

A call with no entry raises a :class:`~torchlrp.conversion.errors.ConversionError` after the forward, listing every
such call, unless ``convert``'s ``allow_gradient`` names it (its function name, e.g. ``"erf"``, or the module path
of the forward that made it; ``["*"]`` lets every call pass its gradient): then it passes relevance by its
gradient, is measured in the backward and named in a warning.
"""
from __future__ import annotations

import fnmatch
from contextlib import contextmanager
import operator
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from torchlrp.conversion.errors import ConversionError
from torchlrp.conversion.fusion import is_written_activation
from torchlrp.conversion.graph import SCALING_CALLS
from torchlrp.conversion.runtime.calls import LiveCall, is_activation, mark_parameter_expressions, tensors_of
from torchlrp.conversion.runtime.copies import SavedCopies, updated_in_place
from torchlrp.conversion.runtime.pending import Pending
from torchlrp.conversion.runtime.tables import Region, TensorTable
from torchlrp.conversion.runtime.view import LiveView
from torchlrp.conversion.tracing import held_constant
from torchlrp.core.rules import Rule
from torchlrp.core.state import ExplainState, current
from torchlrp.functional.folding import fold_batchnorm_tensors
from torchlrp.functional.operations import identity_rule
from torchlrp.modules.affine import ExplainableAffine
from torchlrp.modules.affine_call import AFFINE_FUNCTIONS, AffineCall, bind_affine_call
from torchlrp.modules.indexing import IndexAdd
from torchlrp.modules.norm import NORM_TWINS, BatchNormCall
from torchlrp.modules.operation import ProductSum, ScaledSum
from torchlrp.operations.builds import BATCH_NORM_ARGUMENTS
from torchlrp.operations.default import default_registry
from torchlrp.operations.registry import OperationRegistry
from torchlrp.operations.spec import NO_FACTS, OperationEntry, RuleKind, Unsupported, derive_facts
from torchlrp.core.rules.conservation import rule_conserves

if TYPE_CHECKING:
    from torchlrp.conversion.convert import RunTimeConversion
    from torchlrp.core.composites import Composite

#: the batch norm twins: their forward is the batch norm alone
BATCH_NORM_TWINS = tuple(twin for twin in NORM_TWINS.values() if issubclass(twin, torch.nn.modules.batchnorm._BatchNorm))
#: ``fold(weight, bias) -> (weight, bias)``: a batch norm folded into a layer's parameters
Fold = Callable[[Tensor, "Tensor | None"], tuple[Tensor, Tensor]]

#: calls that read a tensor's attributes, sizes or memory (``x.shape``, ``x.grad_fn``, ``x.T``, ``x.data_ptr()``):
#: run as they are, first (a layer reads a dozen per call); a tensor they return follows its gradient (``x.T``)
READS = frozenset({"__get__", "data_ptr", "storage_offset", "element_size", "_is_view", "size", "dim", "numel",
                   "stride", "is_contiguous", "is_floating_point", "is_complex", "get_device", "nelement",
                   "ndimension", "untyped_storage", "__len__"})


class RunTimeOperations(TorchFunctionMode):
    """Explain the torch calls of a forward as they happen (see the module docstring).

    Parameters
    ----------
    state : ExplainState
        The active explanation: its attention mode (AttnLRP or CP-LRP) and its ``fused`` setting.
    composite : Composite
        The rules: of the layers called as functions (``F.linear`` on parameters) and of the operation modules.
    model : torch.nn.Module, optional
        The explained model (for the module paths of calls).
    conversion : RunTimeConversion, optional
        What ``convert`` recorded on the model: the calls allowed to pass their gradient, its operation table, the
        module classes that are activations written as formulas, and its in-place record (the saved-tensor copies
        run unless an earlier explanation found that the forward updates no tensor that carries relevance in
        place; this explanation adds what it sees). Default: the default table, nothing allowed.
    """

    def __init__(self, state: ExplainState, composite: "Composite", model: torch.nn.Module | None = None,
                 conversion: "RunTimeConversion | None" = None) -> None:
        super().__init__()
        self.state, self.composite, self.model = state, composite, model
        self.registry: OperationRegistry = default_registry() if conversion is None else conversion.registry
        self.allow_gradient = () if conversion is None else tuple(conversion.allow_gradient)
        self.activation_types: dict[type, bool] = {} if conversion is None else dict(conversion.written_activations)
        self.in_place = None if conversion is None else conversion.in_place
        # copy on write of what the backward keeps: unless the model is known to update nothing in place
        self.copies = self.in_place is None or self.in_place.updates is not False
        self.updates_seen = False
        self.saved = SavedCopies()
        self.names = {} if model is None else {module: name for name, module in model.named_modules()}
        self.parameter_names: dict[int, str] | None = None
        self.view = LiveView(self.owner, self._parameter_names)
        self.pending = Pending(self._refuse)
        self.layer_outputs: TensorTable[Callable[[Fold], Tensor]] = TensorTable()
        self.stack: list[torch.nn.Module] = []
        self.affine_calls: dict[tuple[str, Any, Any], AffineCall] = {}
        self.rules: dict[tuple[str, type], Rule] = {}
        self.gradient_only: dict[str, int] = {}
        self.layer_seen = False
        self.inside_activation = 0
        self.dispatching = 0  # calls being explained now (the mode is off inside them)
        self.site_counts: dict[str, int] = {}
        self._hooks: list[Any] = []
        if state.first_layer is not None:  # the first layer is the first to run in this forward, decided as it runs
            first = state.first_layer
            state.rules[first] = composite.rule_for(self.names.get(first, ""), first, is_first=False)

    # -- module boundaries
    def __enter__(self) -> "RunTimeOperations":
        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._enter_module),
                       torch.nn.modules.module.register_module_forward_hook(self._leave_module)]
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

    def _enter_module(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if current() is not self.state:
            return None
        self.stack.append(module)
        if self._written_activation(module, args):
            self.inside_activation += 1  # its calls run as they are: the module is one activation
        if isinstance(module, ExplainableAffine) and not self.layer_seen and module in self.state.rules and any(
                is_activation(a) for a in tensors_of(args, {})):
            self.layer_seen = True
            self.state.rules[module] = self.composite.rule_for(self.names.get(module, ""), module, is_first=True)
        if any(self.pending.waits(value) for value in args) and (type(module).__module__.startswith(
                "torchlrp.") or self.registry.for_module(module) is not None):
            # a twin or a leaf of a traced graph: what enters it is used (a statistic, a written activation)
            with self._suspended():
                used = tuple(self.pending.used(value) for value in args)
            return used if any(new is not old for new, old in zip(used, args)) else None
        return None

    def _leave_module(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if current() is not self.state or not self.stack or self.stack[-1] is not module:
            return None
        self.stack.pop()
        if type(module).__module__.startswith("torchlrp.") and not any(
                is_activation(a) for a in tensors_of(args, {})):
            mark_parameter_expressions(output, args, {})  # a twin on constants (CLIP's text tower)
            return None
        if self._written_activation(module, args):
            self.inside_activation -= 1
            if self.inside_activation == 0:
                value = output.detach()
                return identity_rule(args[0], lambda _: value)
        if isinstance(module, ExplainableAffine) and not isinstance(module, AffineCall) and not getattr(
                module, "transposed", False) and isinstance(output, Tensor) and args and isinstance(args[0], Tensor):
            self.layer_outputs.put(output, _refold_twin(module, args[0]))
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and type(module) in BATCH_NORM_TWINS and len(
                args) == 1:  # (a subclass with a forward of its own, BatchNormAct2d, calls F.batch_norm: folded there)
            folded = self._fold_statistics(args[0], module.running_mean, module.running_var, module.weight,
                                           module.bias, module.eps, module.training)
            if folded is not None:  # a batch norm right after a layer: folded into it, as in a traced graph
                return folded
        if module is self.model and self.pending.waits(output):  # the model's output is used
            with self._suspended():
                used = self.pending.used(output)
            return used if used is not output else None
        return None

    @contextmanager
    def _suspended(self) -> Iterator[None]:
        """Outside a call (in a module hook): the calls made here are the engine's own, not the forward's."""
        if self.dispatching:  # inside a call: the mode is off already
            yield
            return
        TorchFunctionMode.__exit__(self, None, None, None)
        try:
            yield
        finally:
            TorchFunctionMode.__enter__(self)

    def _written_activation(self, module: torch.nn.Module, args: tuple) -> bool:
        """Whether this call is of a module that is an activation written as a formula of its one activation input
        (recognised once per module class by :func:`~torchlrp.conversion.fusion.is_written_activation`)."""
        if len(args) != 1 or not is_activation(args[0]) or type(module).__module__.startswith(("torch.",
                                                                                            "torchlrp.")):
            return False  # torch's modules and torchlrp's twins have their rules
        kind = type(module)
        if kind not in self.activation_types:  # a class convert did not judge (a wrapper around the model): one
            # that holds modules is not a formula of its input; the others are traced once per explanation
            self.activation_types[kind] = next(module.children(), None) is None and is_written_activation(module)
        return self.activation_types[kind]

    # -- names
    def _parameter_names(self) -> dict[int, str]:
        """The model's parameters and buffers by identity -> their names (made when first asked: a class token's
        share is reported under its name)."""
        if self.parameter_names is None:
            self.parameter_names = {} if self.model is None else {id(tensor): name for name, tensor in (
                *self.model.named_parameters(), *self.model.named_buffers())}
        return self.parameter_names

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

    # -- one call
    def __torch_function__(self, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in READS:  # x.shape, x.grad_fn, x.T, x.data_ptr(): as they are
            result = func(*args, **kwargs)
            if isinstance(result, Tensor) and result.requires_grad:  # (x.T of a weight stays a constant)
                mark_parameter_expressions(result, args, kwargs)
            return result
        if not torch.is_grad_enabled() or self.inside_activation:
            return func(*args, **kwargs)  # (inside a written-out activation module: explained as one activation)
        updated = updated_in_place(func, args, kwargs)
        if updated is not None:
            if self.copies:
                self.saved.before_update(updated)
            if updated.requires_grad or any(is_activation(a) for a in tensors_of(args, kwargs)):
                self.updates_seen = True  # (without copies, autograd's version check refuses it: explain retries)
        self.dispatching += 1
        try:
            return self.explain(func, args, kwargs)
        finally:
            self.dispatching -= 1

    def explain(self, func: Any, args: tuple, kwargs: dict, hold: bool = True) -> Any:
        """Explain one call: by its entry in the operation table (see the module docstring).

        Parameters
        ----------
        func : callable
            The torch function, method or dunder called.
        args, kwargs
            Its arguments.
        hold : bool
            Whether a statistic may be held constant (False where its held value turned out to be used otherwise).

        Returns
        -------
        Any
            The call's result.
        """
        call = LiveCall(func, args, kwargs)
        values = tensors_of(call.args, call.kwargs)
        region = self.pending.region_joined(call, values)
        if self.pending.close_regions(call, region, values):
            values = tensors_of(call.args, call.kwargs)
        func, args, kwargs = call.function, call.original_args, call.original_kwargs
        if self.pending.held.items and any(self.pending.held.get(value) is not None for value in values):
            # a use of a statistic held where it scales an activation: it stays held where this call scales an
            # activation that does not come from it; elsewhere the use is pending as well (held for now, explained
            # with the statistic as computed where a later use turns out not to scale)
            if not (call.target in SCALING_CALLS and any(is_activation(a) and self.pending.held.get(a) is None
                                                         for a in values)):
                if not any(is_activation(a) for a in values):  # arithmetic on the statistic (``v + eps``)
                    return self.pending.hold(call, lambda: self.explain(
                        func, *self.pending.used_arguments(args, kwargs), hold=False))
                result = self._explain_call(call, hold, None, values)
                self.pending.pend(result, lambda: self.explain(func, *self.pending.used_arguments(args, kwargs),
                                                               hold=False))
                return result
        return self._explain_call(call, hold, region, values)

    def _explain_call(self, call: LiveCall, hold: bool, region: Region | None, values: list[Tensor]) -> Any:
        """A call explained by its entry (``region``: the written-activation region it joins; ``values``: its
        tensors), its result recorded."""
        if not any(is_activation(a) for a in values):  # constants only (a text tower
            result = call.run()  # of CLIP explained on its image): no relevance flows through it
            mark_parameter_expressions(result, call.original_args, call.original_kwargs)
            return result
        entry = self.registry.lookup(call)
        if entry is None:
            return self._without_rule(call, updated_in_place(call.function, call.original_args,
                                                             call.original_kwargs) is not None)
        result = self._apply(call, entry, hold, region)
        self._record(call, entry, result, region)
        return result

    def _apply(self, call: LiveCall, entry: OperationEntry, hold: bool, region: Region | None) -> Any:
        """The call explained by its entry (the result, not yet recorded)."""
        if entry.shape:
            return call.run()
        if entry.constant:  # (a comparison's mask, zeros_like: no relevance flows into it)
            return held_constant(call.run())
        if entry.constant_when is not None and hold and region is not None:
            # a power inside element-wise calls of one activation: part of a written activation if they make one,
            # else a statistic (held where it scales, refused elsewhere) -- decided where the region ends
            result = call.run()
            self.pending.statistics.put(result, lambda: self.explain(call.function, call.original_args, call.original_kwargs,
                                                             hold=False))
            return result
        if entry.constant_when is not None and hold:
            self.view.asked_only_scales = False
            if entry.constant_when(call, self.view):
                if not self.view.asked_only_scales:
                    return held_constant(call.run())
                return self.pending.hold(call, lambda: self.explain(call.function, call.original_args,
                                                             call.original_kwargs, hold=False))
        if entry.folds:
            folded = self._fold(call)
            if folded is not None:
                return folded
        if entry.build is None:
            return call.run()
        try:
            module = entry.build(call, self.view)
        except Unsupported as reason:
            if region is not None:  # inside a written activation: refused unless the region is one activation
                region.refusals.append(f"{call.name}: {reason}")
                return call.run()
            return self._without_rule(call, False, str(reason))
        if module is None:
            return call.run()
        return self._run_module(module, call, entry)

    def _run_module(self, module: torch.nn.Module, call: LiveCall, entry: OperationEntry) -> Any:
        """Run the operation module an entry made for the call, with the composite's rule for it."""
        kwargs = {key: value for key, value in call.kwargs.items() if key != "inplace"}
        if isinstance(module, AffineCall):
            result = self._run_affine(module, module.function, call.args, kwargs)
        else:
            if getattr(module, "label", None) == "":
                module.label = self.site_label(call.name.rpartition(".")[2])
            self._note_losses(module, call)
            path = self.owner()[0]
            key = (path, type(module))
            rule = self.rules.get(key)
            if rule is None:
                rule = self.rules[key] = self.composite.rule_for(path, module)
            self.state.rules[module] = rule
            try:
                result = module.forward(*call.args, **kwargs)
            finally:
                self.state.rules.pop(module, None)
        if entry.inplace or call.kwargs.get("inplace") is True:
            target = call.original_args[0]
            self.saved.before_update(target)  # the rule just kept the tensor's old values (a summand, a signal)
            result = target.copy_(result)
        return result

    def _run_affine(self, module: AffineCall, function: Any, args: tuple, kwargs: dict) -> Tensor:
        """A linear/conv call on parameters: the composite's rule for the module making it (one
        :class:`AffineCall` per module, function and padding, as in a traced graph)."""
        path, _ = self.owner()
        key = (path, function, (module.explicit_padding, module.padding_mode))
        call = self.affine_calls.get(key)
        if call is None:
            call = self.affine_calls[key] = module
        name = f"{path}.{function.__name__}" if path else function.__name__
        first = not self.layer_seen
        self.layer_seen = True
        rule = self.composite.rule_for(name, call, is_first=first)
        if not rule_conserves(rule):
            self.state.losses_allowed.add(f"the layer rule {rule!r}")
        output = call(*args, explain=True, rule=rule, **kwargs)
        if not call.transposed and function is not torch.addmm:
            bound = bind_affine_call(function, args, kwargs)

            def refold(fold: Fold) -> Tensor:
                weight, bias = fold(bound["weight"], bound["bias"])
                folded = {**bound, "weight": weight, "bias": bias}
                names = AFFINE_FUNCTIONS[function][3]
                return call(*(folded[n] for n in names if n in folded), explain=True, rule=rule)
            self.layer_outputs.put(output, refold)
        return output

    def _fold(self, call: LiveCall) -> Tensor | None:
        """``F.batch_norm`` right after a layer, on parameters and buffers: folded into that layer."""
        bound = dict(zip(BATCH_NORM_ARGUMENTS, call.args), **call.kwargs)
        return self._fold_statistics(bound.get("input"), *(bound.get(name) for name in BATCH_NORM_ARGUMENTS[1:5]),
                                     bound.get("eps", 1e-5), bound.get("training", False))

    def _fold_statistics(self, input: Any, mean: Any, variance: Any, weight: Any, bias: Any, eps: float,
                         training: bool) -> Tensor | None:
        """An eval-mode batch norm of a layer's output, its statistics, weight and bias parameters or buffers:
        the layer's output recomputed with the batch norm folded into it (None where it cannot be)."""
        refold = self.layer_outputs.get(input)
        statistics = (mean, variance, weight, bias)
        if refold is None or training or mean is None or not all(
                tensor is None or (isinstance(tensor, Tensor) and tensor.is_leaf) for tensor in statistics):
            return None
        self.state.losses_allowed.add("a batch norm's shift (a bias)")
        constants = [None if tensor is None else tensor.detach() for tensor in statistics]
        return refold(lambda layer_weight, layer_bias: fold_batchnorm_tensors(layer_weight, layer_bias, *constants,
                                                                            eps))

    def _note_losses(self, module: torch.nn.Module, call: LiveCall) -> None:
        """Note the relevance a module's rule lets go where it runs (a constant it adds that is not reported)."""
        if isinstance(module, BatchNormCall):
            self.state.losses_allowed.add("a batch norm's shift (a bias)")
        elif isinstance(module, (ScaledSum, ProductSum, IndexAdd)) and not is_activation(call.args[0]) and \
                isinstance(call.args[0], Tensor):
            self.state.losses_allowed.add(f"the constant summand of {call.name} (a bias)")

    # -- what the analysis learns of a result
    def _record(self, call: LiveCall, entry: OperationEntry, result: Any, region: Region | None) -> None:
        if entry.gate or entry.attention or self.view.facts.items:  # (no gate or attention weights: no facts)
            arguments = tuple(a for i, a in enumerate(call.args) if i not in entry.references)
            active = [a for a in tensors_of(arguments, call.kwargs) if is_activation(a)]
            facts = derive_facts(entry, [self.view.facts.get(a) or NO_FACTS for a in active])
            if facts.gate or facts.attention:
                for output in (result if isinstance(result, (tuple, list)) else (result,)):
                    if isinstance(output, Tensor):
                        self.view.facts.put(output, facts)
        if not isinstance(result, Tensor):
            return
        if region is not None:
            self.pending.join(call, region, result)
        if call.target is torch.nn.functional.pad:
            self._record_padding(call, result)
        elif entry.kind is RuleKind.SUM and len(call.args) == 2 and not call.kwargs:
            left, right = call.args
            if is_activation(left) and isinstance(right, Tensor) and not is_activation(right):
                sign = -1.0 if call.target in _SUBTRACTIONS else 1.0
                self.view.masks.put(result, (left, right * sign))  # maybe scores + mask before a softmax

    def _record_padding(self, call: LiveCall, result: Tensor) -> None:
        bound = dict(zip(("input", "pad", "mode", "value"), call.args), **call.kwargs)
        pad, mode = bound.get("pad"), bound.get("mode", "constant")
        if is_activation(bound["input"]) and mode in ("constant", "reflect", "replicate", "circular") and (
                mode != "constant" or bound.get("value") in (None, 0, 0.0)) and all(isinstance(p, int) for p in pad):
            self.view.pads.put(result, (bound["input"], tuple(pad), mode))

    # -- calls without a rule
    def _refuse(self, label: str) -> None:
        """Record a call without a rule (refused after the forward)."""
        key = label + " [no rule]"
        self.gradient_only[key] = self.gradient_only.get(key, 0) + 1

    def _without_rule(self, call: LiveCall, updates: bool, reason: str = "") -> Any:
        """A call on activations with no rule: refused after the forward unless ``allow_gradient`` names it
        (then it passes its gradient and what it changes is measured)."""
        label = call.name
        allowed = self.allows_gradient(label)
        path = self.owner()[0]
        key = (f"{path}: " if path else "") + label + (f" ({reason})" if reason and not allowed else "")
        taps: list[Tensor] = []
        args, kwargs = call.original_args, call.original_kwargs
        if allowed and not updates:  # measured: the relevance it changes is in the conservation report
            args, kwargs = _tapped(args, taps), {name: _tapped((value,), taps)[0] for name, value in kwargs.items()}
        result = call.function(*args, **kwargs)
        mark_parameter_expressions(result, args, kwargs)
        if any(is_activation(output) for output in (result if isinstance(result, (tuple, list)) else (result,))):
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
            if is_activation(output):
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


#: the sums whose second operand is subtracted
_SUBTRACTIONS = (torch.sub, torch.subtract, "sub", "sub_", operator.sub, operator.isub)


def _tapped(args: tuple, taps: list[Tensor]) -> tuple:
    """``args`` with each activation (also inside lists and tuples) replaced by a view of itself, appended to
    ``taps``: its gradient is what one call passes to that input."""
    def tap(value: Any) -> Any:
        if is_activation(value):
            view = value.view_as(value)
            taps.append(view)
            return view
        if isinstance(value, (list, tuple)) and any(is_activation(item) for item in value):
            return type(value)(tap(item) for item in value)
        return value
    return tuple(tap(value) for value in args)


def _refold_twin(layer: ExplainableAffine, input: Tensor) -> Callable[[Fold], Tensor]:
    """Recompute a layer twin's output with a batch norm folded into it (its own rule)."""
    def refold(fold: Fold) -> Tensor:
        weight, bias = fold(layer.weight, layer.bias)
        state = current()
        rule = state.rules.get(layer) if state is not None else None
        return layer.explained_with(input, rule, (weight, bias))
    return refold


__all__ = ["READS", "RunTimeOperations"]
