"""Conversion of torch models into explainable ones, operation by operation.

:func:`convert` copies a model, swaps its layers for their torchlrp twins (``Linear``, convolutions, transposed
convolutions, ``ReLU``, the other activations, normalizations) and traces it with ``torch.fx``. Every call in the
trace through which relevance flows is looked up in the operation registry (:mod:`torchlrp.registry`): calls whose
gradient already is their relevance rule (``cat``, ``view``, ``permute``, max pooling, dropout) stay; the others
(``x + y``, ``x.mean(...)``, ``F.silu(x)``, ``gate * x``, ``F.layer_norm``) are replaced by operation modules
registered inside the module whose forward made the call (``features.1.add``). The trace also decides, per call:
batch norms fed by a linear/conv layer are folded into it, a layer's input is non-negative (it follows a ReLU), a
layer or sum feeds a ReLU (explained together with it), and which layer the input meets first. The result is a
``torch.fx.GraphModule`` that keeps the model's submodules and ``state_dict`` (folded batch norms aside) and
computes the same outputs; anything unknown is reported in one :class:`ConversionError`.
"""
from __future__ import annotations

import copy
import operator
from collections import Counter
import fnmatch
import inspect
import warnings
from typing import Any, Iterable

import torch
from torch.fx import Graph, GraphModule, Node
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import fold_batchnorm
from .modes import in_training_mode
from .modules.activation import ACTIVATION_TWINS
from .modules.affine import (Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d,
                             ExplainableAffine, Linear)
from .modules.attention import MultiheadAttention
from .modules.recurrent import GRU, LSTM
from .modules.norm import NORM_TWINS
from .modules.rectifier import ReLU
from .modules.operation import Activation, Scale
from .modules.residual import Add
from .modules.sequential import Sequential
from .batchnorm import fold_batchnorm_tensors
from .modules.affine_call import AffineCall, bind_affine_call
from .state import InPlaceRecord
from .registry import BATCH_NORM_ARGUMENTS, PADDING_MODULES, OperationEntry, OperationRegistry, Unsupported, default_registry

#: torch layer class -> torchlrp twin (exact type match: subclasses of the torch layers are left alone)
TWINS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.Linear: Linear, torch.nn.modules.linear.NonDynamicallyQuantizableLinear: Linear, torch.nn.Conv1d: Conv1d, torch.nn.Conv2d: Conv2d, torch.nn.Conv3d: Conv3d,
    torch.nn.ConvTranspose1d: ConvTranspose1d, torch.nn.ConvTranspose2d: ConvTranspose2d,
    torch.nn.ConvTranspose3d: ConvTranspose3d, torch.nn.ReLU: ReLU, torch.nn.MultiheadAttention: MultiheadAttention,
    torch.nn.LSTM: LSTM, torch.nn.GRU: GRU,
    **ACTIVATION_TWINS, **NORM_TWINS,
}

_ACTIVATION, _CONSTANT, _SHAPE = "activation", "constant", "shape"
_MARKS = {"input_nonnegative", "feeds_rectifier", "first"}
_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


class ConversionError(ValueError):
    """A model holds modules or operations whose relevance torchlrp does not know how to propagate.

    Attributes
    ----------
    unsupported : list of tuple of str
        ``(dotted path or fx node name, type or operation)`` for each offending place.
    """

    def __init__(self, unsupported: list[tuple[str, str]]) -> None:
        self.unsupported = unsupported
        lines = "\n".join(f"  {path}: {kind}" for path, kind in unsupported)
        super().__init__(
            f"cannot propagate relevance through {len(unsupported)} part(s) of the model:\n{lines}\n"
            f"Supported: the operations of torchlrp.default_registry() (linear/conv layers, sums, concatenations, "
            f"index maps, pooling, means, gates, element-wise activations, normalizations; see the README's "
            f"operation table). To let a part pass relevance by its plain gradient, name it: "
            f"convert(model, allow_gradient=['path', 'glob.*']); to add an operation, register it: "
            f"convert(model, registry=...)")


def _is_allowed(path: str, allowed: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in allowed)


class _Tracer(torch.fx.Tracer):
    """Keeps as leaves the registered module types and the modules allowed to pass their gradient."""

    def __init__(self, registry: OperationRegistry, allowed: set[str]) -> None:
        super().__init__()
        self.registry, self.allowed = registry, allowed

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:  # noqa: D102
        if self.registry.for_module(module) is not None or _is_allowed(qualified_name, self.allowed):
            return True
        return super().is_leaf_module(module, qualified_name)


def held_constant(value: Any) -> Any:
    """``value`` detached: a tensor, or each tensor of what ``x.max(dim)`` returns (a normalizer held constant).

    Parameters
    ----------
    value : Tensor or tuple
        The call's result.

    Returns
    -------
    Tensor or tuple
        The same structure, its tensors detached.
    """
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        parts = [held_constant(part) for part in value]
        return type(value)(parts) if type(value) is not tuple else tuple(parts)
    return value


#: padding module class name prefix -> F.pad's mode
_PAD_MODES = {"Zero": "constant", "Constant": "constant", "Reflection": "reflect", "Replication": "replicate",
              "Circular": "circular"}


def _padding_of(node: Node, modules: dict[str, torch.nn.Module]) -> tuple[tuple[int, ...], str] | None:
    """``(pad, mode)`` of a padding call with constant sizes (``F.pad`` with zeros or a copying mode, a padding
    module), in ``F.pad``'s order; None for anything else."""
    if node.op == "call_module":
        module = modules[node.target]
        if not isinstance(module, PADDING_MODULES) or not node.args:
            return None
        mode = next(mode for prefix, mode in _PAD_MODES.items() if type(module).__name__.startswith(prefix))
        if mode == "constant" and getattr(module, "value", 0.0) != 0.0:
            return None
        return tuple(module.padding), mode
    if node.op != "call_function" or node.target is not torch.nn.functional.pad:
        return None
    names = ("input", "pad", "mode", "value")
    bound = dict(zip(names, node.args), **node.kwargs)
    pad, mode, value = bound.get("pad"), bound.get("mode", "constant"), bound.get("value", None)
    if not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad):
        return None
    if mode not in ("constant", "reflect", "replicate", "circular") or (mode == "constant" and value not in (None, 0,
                                                                                                           0.0)):
        return None
    return tuple(pad), mode


#: element-wise calls a written-out activation is made of
_ELEMENTWISE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.neg,
                          torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.neg, torch.tanh, torch.sigmoid,
                          torch.exp, torch.erf, torch.relu, torch.square, torch.nn.functional.relu,
                          torch.nn.functional.sigmoid, torch.nn.functional.tanh}
_ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "pow", "neg", "tanh", "sigmoid", "exp", "erf", "relu", "square"}
_NONLINEAR = {operator.pow, torch.pow, "pow", torch.square, "square"}
_PRODUCT_CALLS = {operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div"}


def _is_elementwise(node: Node) -> bool:
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS and node.kwargs in ({}, {"inplace": False})
    return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS and not node.kwargs


def _elementwise_region(root: Node, derived: set[Node]) -> tuple[Node, set[Node], list[Node]] | None:
    """The element-wise calls fed by ``root`` and by constants only, if they form a written-out activation: one
    output, and a power of ``root`` or a product of two of its values among them. Returns (output, members,
    constant nodes)."""
    members: set[Node] = set()
    frontier = [user for user in root.users]
    while frontier:
        node = frontier.pop()
        if node in members or not _is_elementwise(node):
            continue
        arguments = _node_arguments(node.args)
        if not all(a is root or a in members or a not in derived for a in arguments):
            if any(a in derived and a is not root and a not in members for a in arguments):
                continue  # another activation enters here: revisited once its operands are members
        members.add(node)
        frontier.extend(node.users)
    # drop members whose operands are not all inside (another activation enters there), until stable
    changed = True
    while changed:
        changed = False
        for node in list(members):
            if any(a in derived and a is not root and a not in members for a in _node_arguments(node.args)):
                members.discard(node)
                changed = True
    outputs = [node for node in members if any(user not in members for user in node.users) or not node.users]
    if len(outputs) != 1 or len(members) < 2:
        return None
    output = outputs[0]
    # keep only what the output depends on
    needed, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        stack.extend(a for a in _node_arguments(node.args) if a in members)
    if needed != members:
        return None
    nonlinear = any(node.target in _NONLINEAR for node in members) or any(
        node.target in _PRODUCT_CALLS and sum(a is root or a in members for a in _node_arguments(node.args)) == 2
        for node in members)
    if not nonlinear:
        return None
    constants = sorted({a for node in members for a in _node_arguments(node.args)
                        if a is not root and a not in members}, key=lambda n: n.name)
    return output, members, constants


def is_written_activation(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward is an activation written as a formula of its one input (transformers'
    ``NewGELUActivation``, a quick-GELU module): traced alone, one element-wise region that powers or multiplies
    its input (see :meth:`_Analysis._fuse_written_activations`). The run-time mode explains such a module's call
    as one activation.

    Parameters
    ----------
    module : torch.nn.Module
        A module of its own (torch's modules are not asked).

    Returns
    -------
    bool
        False also where ``torch.fx`` cannot trace the module alone.
    """
    try:
        graph = torch.fx.Tracer().trace(module)
    except Exception:  # noqa: BLE001 (untraceable alone: not recognised)
        return False
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        return False
    calls = {node for node in graph.nodes if node.op in ("call_function", "call_method", "call_module")}
    derived = {node for node in graph.nodes if node.op not in ("get_attr", "output")}
    region = _elementwise_region(placeholders[0], derived)
    output = next(node for node in graph.nodes if node.op == "output").args[0]
    return region is not None and region[0] is output and region[1] == calls


def _region_function(root: Node, output: Node, members: set[Node], constants: list[Node]) -> GraphModule:
    """The region as a function ``f(x, *constants)`` (a GraphModule of its calls, in graph order)."""
    graph = Graph()
    mapping = {root: graph.placeholder("x")}
    for index, constant in enumerate(constants):
        mapping[constant] = graph.placeholder(f"constant_{index}")
    for node in root.graph.nodes:
        if node in members:
            mapping[node] = graph.node_copy(node, lambda n: mapping[n])
    graph.output(mapping[output])
    return GraphModule(torch.nn.Module(), graph, class_name="WrittenActivation")


def _node_arguments(value: Any) -> list[Node]:
    """Every node inside an argument (lists, tuples, dicts, slices)."""
    found: list[Node] = []
    torch.fx.node.map_arg(value, found.append)
    return found


class _Analysis:
    """One pass over a traced graph: kinds, signs and gates of values, rewrites, folds and per-call marks."""

    def __init__(self, model: torch.nn.Module, graph: Graph, registry: OperationRegistry, allowed: set[str]) -> None:
        self.model, self.graph, self.registry, self.allowed = model, graph, registry, allowed
        self.modules = dict(model.named_modules())
        self.kind: dict[Node, str] = {}
        self.nonnegative: set[Node] = set()
        self.gates: set[Node] = set()
        self.attention: set[Node] = set()
        self.unsupported: list[tuple[str, str]] = []
        self.insertions: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
        self.folded: dict[str, str] = {}  # batch norm path -> path of the layer it was folded into
        self.order = {node: index for index, node in enumerate(graph.nodes)}
        self.calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
        self.parameter_uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        self.output_values: set[Node] = set()
        self._held: list[Node] = []  # calls held constant by their entry's constant_when: detached below
        for node in graph.nodes:
            if node.op == "output":
                self.output_values.update(_node_arguments(node.args))

    # -- GraphView (for the registry's builders)
    def is_activation(self, argument: Any) -> bool:
        return isinstance(argument, Node) and self.kind.get(argument) == _ACTIVATION

    def is_gate(self, argument: Any) -> bool:
        return isinstance(argument, Node) and argument in self.gates

    def is_attention(self, argument: Any) -> bool:
        return isinstance(argument, Node) and argument in self.attention

    def is_output(self, node: Node) -> bool:
        return node in self.output_values

    def owner_type(self, node: Node) -> type | None:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        return type(self.model.get_submodule(path)) if path else None

    def submodule(self, target: str) -> torch.nn.Module:
        return self.modules[target]

    def take_padding(self, node: Node, argument: int, dims: int) -> tuple[tuple[int, ...], str] | None:
        pad_node = node.args[argument] if len(node.args) > argument else None
        if not isinstance(pad_node, Node) or len(pad_node.users) != 1 or self.kind.get(pad_node) != _ACTIVATION:
            return None
        found = _padding_of(pad_node, self.modules)
        if found is None or len(found[0]) != 2 * dims:
            return None
        node.args = (*node.args[:argument], pad_node.args[0], *node.args[argument + 1:])
        self.graph.erase_node(pad_node)
        return found

    # -- the pass
    def run(self) -> None:
        self._fuse_written_activations()
        for node in list(self.graph.nodes):
            if node.op == "placeholder":
                # an argument with a default (or fixed to it while tracing) is not where relevance lands
                self.kind[node] = _CONSTANT if node.args else _ACTIVATION
            elif node.op == "get_attr":
                self.kind[node] = _CONSTANT
            elif node.op in ("call_function", "call_method", "call_module"):
                self._visit(node)
        for node in self._held:  # computed from an activation, held constant: no relevance flows into it
            with self.graph.inserting_after(node):
                detached = self.graph.call_function(held_constant, (node,))
            node.replace_all_uses_with(detached, delete_user_cb=lambda user: user is not detached)
        for node in list(self.graph.nodes):  # parameters a fold or a layer call no longer reads
            if node.op == "get_attr" and not node.users:
                self.graph.erase_node(node)
        self._mark_calls()

    def _fuse_written_activations(self) -> None:
        """Activations written as formulas of one activation (``0.5 * x * (1 + tanh(c * (x + 0.044715 * x ** 3)))``,
        ``x * sigmoid(1.702 * x)``, StarReLU's ``s * relu(x) ** 2 + b``): a region of element-wise calls whose only
        activation input is ``x``, with one output, that raises ``x`` to a power or multiplies two of its values,
        becomes one :class:`~torchlrp.modules.operation.Activation` (the identity rule), computing the same."""
        derived = {node for node in self.graph.nodes if node.op == "placeholder" and not node.args}
        for node in self.graph.nodes:
            if node.op in ("call_function", "call_method", "call_module") and any(
                    a in derived for a in _node_arguments((node.args, node.kwargs))):
                entry = self.registry.lookup(node, self.modules)
                if entry is None or not (entry.shape or entry.constant):
                    derived.add(node)
        consumed: set[Node] = set()
        for root in list(self.graph.nodes):
            if root not in derived or root in consumed:
                continue
            region = _elementwise_region(root, derived)
            if region is None:
                continue
            output, members, constants = region
            consumed.update(members)
            function = _region_function(root, output, members, constants)
            output.args, output.kwargs = (root, *constants), {}
            output.op = "call_function"  # (made a module call by _replace)
            self._replace(output, Activation(function))
            for member in reversed([n for n in self.graph.nodes if n in members and n is not output]):
                self.graph.erase_node(member)

    def _label(self, node: Node) -> tuple[str, str]:
        if node.op == "call_module":
            return node.target, type(self.modules[node.target]).__name__
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        return node.name, f"operation {name}"

    def _visit(self, node: Node) -> None:
        arguments = _node_arguments((node.args, node.kwargs))
        active = [a for a in arguments if self.kind.get(a) == _ACTIVATION]
        entry = self.registry.lookup(node, self.modules)
        if entry is not None and entry.constant_when is not None and active and entry.constant_when(node, self):
            self.kind[node] = _CONSTANT
            self._held.append(node)
            return
        if entry is not None and (entry.shape or entry.constant):
            self.kind[node] = _SHAPE if entry.shape else _CONSTANT
            if entry.build is not None and active:  # a constant made from an activation: its entry checks the use
                try:
                    entry.build(node, self)
                except Unsupported as reason:
                    path, label = self._label(node)
                    self.unsupported.append((path, f"{label}: {reason}"))
            return
        if not active:  # nothing derived from the input flows through: a constant or a size computation
            self.kind[node] = _CONSTANT if any(self.kind.get(a) == _CONSTANT for a in arguments) else _SHAPE
            return
        self.kind[node] = _ACTIVATION
        path, label = self._label(node)
        if _is_allowed(path, self.allowed):
            return
        if entry is None:
            self.unsupported.append((path, label))
            return
        if self._inplace(node, entry) and self._used_later(node):
            self.unsupported.append((path, f"{label} in place on a tensor used again"))
            return
        if node.op == "call_module" and isinstance(self.modules[node.target], _BatchNorm) and self._fold(node):
            return
        if entry.folds and self._fold_call(node):
            return
        if entry.build is not None:
            try:
                replacement = entry.build(node, self)
            except Unsupported as reason:
                self.unsupported.append((path, f"{label}: {reason}"))
                return
            if replacement is not None:
                self._replace(node, replacement)
        self._signs(node, entry, active)

    def _inplace(self, node: Node, entry: OperationEntry) -> bool:
        if node.op == "call_module":
            return bool(getattr(self.modules[node.target], "inplace", False))
        return entry.inplace or bool(node.kwargs.get("inplace", False))

    def _used_later(self, node: Node) -> bool:
        mutated = node.args[0] if node.args else None
        if not isinstance(mutated, Node):
            return False
        return any(self.order[user] > self.order[node] for user in mutated.users if user is not node)

    def _signs(self, node: Node, entry: OperationEntry, active: list[Node]) -> None:
        if entry.gate or (entry.rule == "index map" and all(a in self.gates for a in active)):
            self.gates.add(node)  # a reshaped gate is a gate
        if entry.attention or (entry.rule in ("index map", "identity") and all(a in self.attention for a in active)):
            self.attention.add(node)  # reshaped attention weights, or after dropout
        if entry.sign == "nonnegative" or (entry.sign == "preserve" and all(a in self.nonnegative for a in active)):
            self.nonnegative.add(node)
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, Scale):  # non-negative features times a non-negative gate
            signal, factor = node.args[module.signal_index], node.args[1 - module.signal_index]
            if signal in self.nonnegative and factor in self.gates and factor in self.nonnegative:
                self.nonnegative.add(node)
        if module is not None and getattr(module, "inplace", False):
            module.inplace = False  # safe: checked above that its input is not used again

    def _container(self, node: Node) -> str:
        """The dotted path of the module whose forward made the call (not a Sequential/ModuleList: their
        ``forward`` or indexing would see a new child)."""
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        if node.op == "call_module" and path == node.target:  # a leaf module: its parent holds the replacement
            path = node.target.rpartition(".")[0]
        while path and isinstance(self.model.get_submodule(path), _CONTAINERS):
            path = path.rpartition(".")[0]
        return path

    def _replace(self, node: Node, replacement: torch.nn.Module) -> None:
        """Turn the call into a call of ``replacement``, to be registered in the module that made the call."""
        path = self._container(node)
        container = self.model.get_submodule(path) if path else self.model
        base = (node.target if node.op == "call_method" else getattr(node.target, "__name__", "operation")
                if node.op == "call_function" else node.target.rpartition(".")[2] + "_output")
        base = base.strip("_") or "operation"
        name, index = base, 0
        target = f"{path}.{name}" if path else name
        while hasattr(container, name) or target in self.modules:
            index += 1
            name = f"{base}_{index}"
            target = f"{path}.{name}" if path else name
        self.insertions.append((container, name, replacement))
        if isinstance(replacement, Add) and replacement.constant_summands:
            replacement.label = target  # the name its absorbed share is reported under
        self.modules[target] = replacement
        self.calls[target] += 1
        node.op, node.target = "call_module", target
        node.kwargs = {key: value for key, value in node.kwargs.items() if key != "inplace"}  # checked: not reused

    def _fold(self, node: Node) -> bool:
        """Fold an eval-statistics batch norm into the linear/conv layer whose only output it normalizes."""
        batchnorm = self.modules[node.target]
        layer_node = node.args[0] if node.args else None
        if not (isinstance(layer_node, Node) and layer_node.op == "call_module"):
            return False
        layer = self.modules[layer_node.target]
        if isinstance(layer, AffineCall):  # a convolution called as a function: folded in the graph
            if batchnorm.running_mean is None or len(node.args) != 1 or node.kwargs or self.calls[node.target] != 1:
                return False
            names = ("running_mean", "running_var", "weight", "bias")
            tensors = [f"{node.target}.{name}" if getattr(batchnorm, name) is not None else None for name in names]
            return self._fold_into_call(node, layer_node, tensors, batchnorm.eps)
        if not isinstance(layer, ExplainableAffine) or getattr(layer, "transposed", False):
            return False
        if len(layer_node.users) != 1 or batchnorm.running_mean is None or len(node.args) != 1:
            return False
        if self.calls[layer_node.target] != 1 or self.calls[node.target] != 1:
            return False  # a layer or norm called more than once keeps its own parameters
        if self.parameter_uses[id(layer.weight)] != 1:
            return False  # weight tied to another module
        weight, bias = fold_batchnorm(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                                      batchnorm)
        layer.weight = torch.nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        layer.bias = torch.nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
        self.folded[node.target] = layer_node.target
        parent, _, child = node.target.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, torch.nn.Identity())
        node.replace_all_uses_with(layer_node)
        self.graph.erase_node(node)
        self.kind[layer_node] = _ACTIVATION
        return True

    def _fold_call(self, node: Node) -> bool:
        """Fold an eval-mode ``F.batch_norm`` (constant statistics, weight and bias) into the linear/conv layer
        whose only output it normalizes: the call (a layer twin becomes one) gets the folded weight and bias,
        computed in the graph from the same parameters (nothing in the model is changed)."""
        bound = dict(zip(BATCH_NORM_ARGUMENTS, node.args), **node.kwargs)
        layer_node = bound.get("input")
        if bound.get("training", False) or bound.get("running_mean") is None or not isinstance(layer_node, Node):
            return False
        tensors = [bound.get(name) for name in BATCH_NORM_ARGUMENTS[1:5]]
        if not all(t is None or (isinstance(t, Node) and t.op == "get_attr") for t in tensors):
            return False
        return self._fold_into_call(node, layer_node, [None if t is None else t.target for t in tensors],
                                    bound.get("eps", 1e-5))

    def _fold_into_call(self, node: Node, layer_node: Node, tensors: list[str | None], eps: float) -> bool:
        """Fold the batch norm ``node`` (its running mean and variance, weight and bias: the attribute paths
        ``tensors``) into the layer call ``layer_node``, in the graph."""
        users = [user for user in layer_node.users if self.kind.get(user) != _SHAPE]  # x.ndim, x.size(): no value
        if layer_node.op != "call_module" or users != [node] or self.calls[layer_node.target] != 1:
            return False
        layer = self.modules[layer_node.target]
        if isinstance(layer, AffineCall):
            if layer.transposed or layer.function is torch.addmm:
                return False
            arguments = bind_affine_call(layer.function, layer_node.args, layer_node.kwargs)
            weight, bias = arguments["weight"], arguments["bias"]
            if not isinstance(weight, Node) or not (bias is None or isinstance(bias, Node)):
                return False
        elif type(layer) in TWINS.values() and isinstance(layer, ExplainableAffine) and not getattr(
                layer, "transposed", False) and self.parameter_uses[id(layer.weight)] == 1:
            layer_node = self._as_call(layer_node, layer)
            weight, bias = layer_node.args[1], layer_node.args[2]
        else:
            return False
        with self.graph.inserting_before(layer_node):
            copies = [None if t is None else self.graph.get_attr(t) for t in tensors]
            folded = self.graph.call_function(fold_batchnorm_tensors, (weight, bias, *copies, eps))
            new_weight = self.graph.call_function(operator.getitem, (folded, 0))
            new_bias = self.graph.call_function(operator.getitem, (folded, 1))
        for new in (*[c for c in copies if c is not None], folded, new_weight, new_bias):
            self.kind[new], self.order[new] = _CONSTANT, self.order[layer_node]
        arguments = list(layer_node.args)
        arguments[1] = new_weight
        if len(arguments) > 2:
            arguments[2] = new_bias
            layer_node.args = tuple(arguments)
        else:
            layer_node.args = tuple(arguments)
            layer_node.kwargs = {**layer_node.kwargs, "bias": new_bias}
        node.replace_all_uses_with(layer_node)
        self.graph.erase_node(node)
        if node.op == "call_module":  # a batch norm module: it is no longer called
            self.calls[node.target] -= 1
        return True

    def _as_call(self, layer_node: Node, layer: torch.nn.Module) -> Node:
        """A layer twin's call as an :class:`AffineCall` on its own parameters (registered inside the layer, so
        that composites address it by the layer's name and type)."""
        function, arguments = _functional_form(layer)
        with self.graph.inserting_before(layer_node):
            weight = self.graph.get_attr(f"{layer_node.target}.weight")
            bias = None if layer.bias is None else self.graph.get_attr(f"{layer_node.target}.bias")
        for new in (weight, bias):
            if new is not None:
                self.kind[new], self.order[new] = _CONSTANT, self.order[layer_node]
        padding_mode, explicit_padding = getattr(layer, "padding_mode", "zeros"), None
        if not isinstance(layer, torch.nn.Linear) and (isinstance(layer.padding, str) or padding_mode != "zeros"):
            explicit = tuple(layer._reversed_padding_repeated_twice)
            explicit_padding = explicit if any(explicit) else None
            arguments["padding"] = 0
        mode = "constant" if padding_mode == "zeros" else padding_mode
        call = AffineCall(function, type(layer), explicit_padding, mode)
        layer.add_module(function.__name__, call)
        target = f"{layer_node.target}.{function.__name__}"
        self.modules[target] = call
        self.calls[target] = 1
        layer_node.target = target
        layer_node.args = (layer_node.args[0], weight, bias, *arguments.values())
        layer_node.kwargs = {}
        return layer_node

    def is_chain(self) -> bool:
        """Whether relevance flows through a chain of modules, each taking only the previous one's output (a
        Sequential explained by position)."""
        previous = None
        for node in self.graph.nodes:
            if self.kind.get(node) != _ACTIVATION:
                continue
            if node.op == "placeholder" and previous is None:
                previous = node
            elif node.op == "call_module" and list(node.args) == [previous] and node.kwargs.keys() <= _MARKS:
                previous = node
            else:
                return False
        return True

    def _mark_calls(self) -> None:
        """Per call: non-negative input, feeds a ReLU, first layer (as keyword arguments of the call)."""
        first = True
        for node in self.graph.nodes:
            module = self.modules.get(node.target) if node.op == "call_module" else None
            if isinstance(module, ExplainableAffine):
                source = node.args[module.input_argument] if len(node.args) > module.input_argument else None
                node.kwargs = {**node.kwargs, "input_nonnegative": source in self.nonnegative,
                               "feeds_rectifier": self._feeds_rectifier(node), "first": first}
                first = False
            elif isinstance(module, Add):
                node.kwargs = {**node.kwargs, "feeds_rectifier": self._feeds_rectifier(node)}

    def _feeds_rectifier(self, node: Node) -> bool:
        follower = node
        while len(follower.users) == 1:
            user = next(iter(follower.users))
            module = self.modules.get(user.target) if user.op == "call_module" else None
            if type(module) is ReLU:
                return True
            if not isinstance(module, torch.nn.Identity):
                return False
            follower = user
        return False


def _functional_form(layer: torch.nn.Module) -> tuple[Any, dict[str, Any]]:
    """The function a linear/conv twin applies, and its arguments after input, weight and bias."""
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.functional.linear, {}
    function = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
                3: torch.nn.functional.conv3d}[len(layer.kernel_size)]
    return function, {"stride": tuple(layer.stride), "padding": layer.padding if isinstance(layer.padding, str)
                      else tuple(layer.padding), "dilation": tuple(layer.dilation), "groups": layer.groups}


def _graph_module(model: torch.nn.Module, graph: Graph) -> GraphModule:
    """A GraphModule running ``graph`` that keeps the model's submodules (containers included) and attributes."""
    graph.lint()
    module = GraphModule(model, graph, class_name=type(model).__name__)
    for name, child in model.named_children():
        setattr(module, name, child)
    for name, value in vars(model).items():
        if not name.startswith("_") and name not in vars(module) and name != "training":
            setattr(module, name, value)
    module.training = model.training
    module._tracer_cls = None  # unpickling re-traces the generated code with fx's own tracer (every call a leaf)
    return module


def _check_leaves(model: torch.nn.Module, registry: OperationRegistry, allowed: set[str]) -> list[tuple[str, str]]:
    """Module-only check for models that torch.fx cannot trace: torch's own leaf modules need a registry entry;
    other leaf modules run their forward under :class:`torchlrp.runtime.RunTimeOperations`."""
    unsupported, inside_known = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_known):
            continue  # explained by the registered module that holds it (the attention's out_proj)
        if next(module.children(), None) is not None:
            if registry.for_module(module) is not None and name:
                inside_known.append(name)
            continue
        if isinstance(module, _CONTAINERS):
            continue  # an empty ModuleList (a stage without downsampling): holds nothing to explain
        if _is_allowed(name, allowed) or not type(module).__module__.startswith("torch."):
            continue  # a leaf module of its own (GELUActivation): its calls are explained at run time
        if registry.for_module(module) is None:
            unsupported.append((name, type(module).__name__))
        elif hasattr(module, "inplace"):
            module.inplace = False
    return unsupported


def _written_activation_types(model: torch.nn.Module) -> dict[type, bool]:
    """For each module class of ``model`` that is not torch's or torchlrp's: whether it is an activation written as
    a formula of its input (:func:`is_written_activation`, judged on its first instance)."""
    kinds: dict[type, bool] = {}
    for module in model.modules():
        kind = type(module)
        if kind not in kinds and not kind.__module__.startswith(("torch.", "torchlrp.")):
            kinds[kind] = is_written_activation(module)
    return kinds


def _swap_twins(model: torch.nn.Module) -> None:
    for module in model.modules():
        twin = TWINS.get(type(module))
        if twin is not None:
            module.__class__ = twin  # the twins add no state: the (copied) module becomes its twin in place


def convert(model: torch.nn.Module, inplace: bool = False, allow_gradient: Iterable[str] = (),
            registry: OperationRegistry | None = None) -> torch.nn.Module:
    """Return an explainable copy of any model.

    Layers become their torchlrp twins (same parameters); the model is traced with ``torch.fx`` and every
    operation through which relevance flows gets its rule from the operation registry (sums split relevance
    between their summands, means and average pooling proportionally, gates pass it to the features, element-wise
    activations pass it unchanged, normalizations are explained as the affine maps they are; see the README's
    operation table). Batch norms fed by a linear/conv layer are folded into it (eval-mode outputs unchanged:
    convert a trained model in eval mode). Per call, the trace marks layers whose input follows a ReLU
    (non-negative input), layers and sums that feed a ReLU (explained together with it) and the first layer the
    input meets (a composite's ``first`` rule). These marks describe the model as converted: after changing its
    modules, convert it again.

    Parameters
    ----------
    model : torch.nn.Module
        Any model, e.g. any torchvision CNN classifier.
    inplace : bool
        Modify ``model``'s modules instead of those of a deep copy (the returned model shares them).
    allow_gradient : iterable of str
        Dotted module paths or fx node names (globs allowed) that may pass relevance by their plain gradient
        although torchlrp has no rule for them (such modules are not traced into).
    registry : OperationRegistry, optional
        The operations and their rules; default :func:`torchlrp.default_registry`.

    Returns
    -------
    torch.nn.Module
        A ``torch.fx.GraphModule`` with the model's submodules, attributes and outputs; a ``Sequential`` of layers
        stays a ``Sequential`` (explained by position). Where ``torch.fx`` cannot trace the model (data-dependent
        control flow), the model itself with its modules converted, and a warning.

    Raises
    ------
    ConversionError
        Listing every module (dotted path and type) or operation (fx node name) whose relevance cannot be
        propagated.
    TypeError
        If ``model`` is not a module, or is a TorchScript module.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"convert cannot explain a TorchScript model ({type(model).__name__}): scripting compiled its "
                        f"Python forward away, and the rules replace that code. Convert the nn.Module you scripted "
                        f"(before torch.jit.script / torch.jit.trace)")
    training = in_training_mode(model)
    if training:
        warnings.warn(f"{type(model).__name__} is in training mode ({training[0]!r}{', ...' if len(training) > 1 else ''}"
                      f"): convert folds batch norms with their running statistics, and explanations are of the "
                      f"eval-mode model (explaining raises while such modules are in training mode); call "
                      f"model.eval() before converting", stacklevel=2)
    model = model if inplace else copy.deepcopy(model)
    registry_given = registry is not None
    registry = default_registry() if registry is None else registry
    allowed = set(allow_gradient)
    _swap_twins(model)
    try:
        graph = _Tracer(registry, allowed).trace(model, concrete_args=_sequential_options(model))
    except Exception as error:  # noqa: BLE001 -- torch.fx raises many kinds (TraceError, NameError for a module
        # created in the forward, TypeError, ...): the model is explained at run time, where anything without a
        # rule raises a ConversionError
        unsupported = _check_leaves(model, registry, allowed)
        if unsupported:
            raise ConversionError(unsupported) from None
        warnings.warn(f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {error}); its layers "
                      f"were converted and the operations of its forward (sums, products, softmax, attention, "
                      f"means) are explained at run time (torchlrp.runtime)", stacklevel=2)
        model.torchlrp_run_time = True  # read by rules_applied: explain this model's forward call by call
        model.torchlrp_allow_gradient = tuple(sorted(allowed))  # calls that may pass their gradient at run time
        model.torchlrp_written_activations = _written_activation_types(model)  # traced once, not per explanation
        model.torchlrp_in_place = InPlaceRecord()  # learnt by its first explanation (see torchlrp.runtime)
        if registry_given:  # the run-time mode reads the same entries (the default's are built in)
            model.torchlrp_registry = registry
        return model
    analysis = _Analysis(model, graph, registry, allowed)
    analysis.run()
    if analysis.unsupported:
        raise ConversionError(analysis.unsupported)
    if analysis.folded:
        model._register_load_state_dict_pre_hook(FoldedStateDictGuard(analysis.folded))
    if isinstance(model, torch.nn.Sequential) and not analysis.insertions and analysis.is_chain():
        return model
    for container, name, replacement in analysis.insertions:
        container.add_module(name, replacement)
    converted = _graph_module(model, graph)
    if analysis.folded:
        converted._register_load_state_dict_pre_hook(FoldedStateDictGuard(analysis.folded))
    return converted


class FoldedStateDictGuard:
    """Refuses, before any parameter is touched, a state dict of the model as it was before batch norms were folded.

    ``convert`` folds a batch norm into the layer before it: that layer's weight and bias change and the batch
    norm's keys disappear. The original model's state dict then does not fit (with ``strict=False`` it would
    silently load unfolded weights). Load such weights into the original model and convert it again; a converted
    model's own ``state_dict()`` loads as usual.

    Parameters
    ----------
    folded : dict of str to str
        Path of each folded batch norm -> path of the layer it was folded into.
    """

    def __init__(self, folded: dict[str, str]) -> None:
        self.folded = dict(folded)

    def __call__(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Raise ``ValueError`` if ``state_dict`` holds parameters or statistics of a folded batch norm."""
        for norm, layer in self.folded.items():
            stale = [key for key in state_dict if key.startswith(f"{prefix}{norm}.")]
            if stale:
                raise ValueError(f"this state dict holds batch norm {norm!r} ({stale[0]!r}, ...), which "
                                 f"torchlrp.convert folded into layer {layer!r}: it belongs to the unconverted model. "
                                 f"Load it into the original model and convert that again "
                                 f"(lrp.convert(model)); nothing was loaded")


def _sequential_options(model: torch.nn.Module) -> dict[str, Any] | None:
    """For a Sequential (e.g. ``torchlrp.Sequential``, whose forward takes ``explain=``...): its options' defaults,
    so that the trace follows the plain forward."""
    if not isinstance(model, torch.nn.Sequential):
        return None
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty} or None


def convert_vgg(vgg: torch.nn.Module) -> Sequential:
    """Convert a torchvision VGG (vgg11/13/16/19 and the ``_bn`` variants) into a :class:`torchlrp.Sequential`.

    TorchLRP's API: the result is ``Sequential(*features, avgpool, Flatten(), *classifier)`` with the same
    parameters (batch norms folded) and the same outputs, explained by ``model(x, explain=True, rule=...)``.

    Parameters
    ----------
    vgg : torch.nn.Module
        A torchvision VGG (anything with ``features``, ``avgpool`` and ``classifier``).

    Returns
    -------
    Sequential
        The converted model, in ``vgg``'s training mode.

    Raises
    ------
    TypeError
        If ``vgg`` lacks the VGG structure.
    """
    if not all(hasattr(vgg, part) for part in ("features", "avgpool", "classifier")):
        raise TypeError(f"convert_vgg expects a torchvision VGG (features, avgpool, classifier), "
                        f"got {type(vgg).__name__}; use torchlrp.convert for other models")
    parts = copy.deepcopy([*vgg.features, vgg.avgpool, torch.nn.Flatten(), *vgg.classifier])
    sequential = Sequential(*parts)
    sequential.train(vgg.training)
    return convert(sequential, inplace=True)
