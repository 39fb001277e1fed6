"""The traced engine's pass over a ``torch.fx`` graph: what each value is (an activation, a constant, sizes), its
facts (gate, attention, non-negative), the rewrites the operation table asks for, batch-norm folds and the marks
per call. It is the traced engine's :class:`~torchlrp.operations.spec.CallView`."""
from __future__ import annotations

import builtins
import operator
from collections import Counter
from typing import Any

import torch
from torch.fx import Graph, Node
from torch.nn.modules.batchnorm import _BatchNorm

from torchlrp.conversion.errors import is_allowed
from torchlrp.conversion.fusion import elementwise_region, node_arguments, region_function
from torchlrp.conversion.tracing import held_constant, padding_of
from torchlrp.conversion.twins import TWINS
from torchlrp.functional.folding import fold_batchnorm, fold_batchnorm_tensors
from torchlrp.modules.affine import ExplainableAffine
from torchlrp.modules.affine_call import AffineCall, bind_affine_call
from torchlrp.modules.operation import Activation, Scale
from torchlrp.modules.rectifier import ReLU
from torchlrp.modules.residual import Add
from torchlrp.operations.builds import BATCH_NORM_ARGUMENTS
from torchlrp.operations.registry import OperationRegistry
from torchlrp.operations.spec import Facts, OperationEntry, RuleKind, Unsupported, derive_facts

#: the calls through which a statistic may scale an activation (a normalizer)
SCALING_CALLS = (operator.mul, torch.mul, torch.multiply, operator.truediv, torch.div, torch.true_divide, torch.divide,
                 "mul", "div", torch.addcmul, torch.addcdiv, "addcmul", "addcdiv", operator.imul, operator.itruediv,
                 "mul_", "div_")
#: what ``v += g``, ``v *= g`` ... on a tensor become in a traced graph (the in-place update of ``v`` is lost)
_REBOUND = (operator.add, operator.sub, operator.mul, operator.truediv)
#: what a value of the graph is
ACTIVATION, CONSTANT, SHAPE = "activation", "constant", "shape"
#: the keywords the pass adds to layer calls
MARKS = {"input_nonnegative", "feeds_rectifier", "first"}
#: containers: the module holding an inserted operation module is the first one above them
CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


def functional_form(layer: torch.nn.Module) -> tuple[Any, dict[str, Any]]:
    """The function a linear/conv twin applies, and its arguments after input, weight and bias."""
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.functional.linear, {}
    function = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
                3: torch.nn.functional.conv3d}[len(layer.kernel_size)]
    return function, {"stride": tuple(layer.stride), "padding": layer.padding if isinstance(layer.padding, str)
                      else tuple(layer.padding), "dilation": tuple(layer.dilation), "groups": layer.groups}


class GraphPass:
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
        self.derived: set[Node] = set()
        #: in-place updates of tensors read again (the model is explained at run time instead)
        self.updates_in_place: list[str] = []
        self._held: list[Node] = []  # calls held constant by their entry's constant_when: detached below
        for node in graph.nodes:
            if node.op == "output":
                self.output_values.update(node_arguments(node.args))

    # -- GraphView (for the registry's builders)
    def is_activation(self, argument: Any) -> bool:
        return isinstance(argument, Node) and self.kind.get(argument) == ACTIVATION

    def is_gate(self, argument: Any) -> bool:
        return isinstance(argument, Node) and argument in self.gates

    def is_attention(self, argument: Any) -> bool:
        return isinstance(argument, Node) and argument in self.attention

    def is_output(self, node: Node) -> bool:
        return node in self.output_values

    def is_constant_tensor(self, argument: Any) -> bool:
        return isinstance(argument, Node) and self.kind.get(argument) == CONSTANT

    def constant_name(self, argument: Any) -> str | None:
        while isinstance(argument, Node) and argument.op != "get_attr":  # through views of the constant
            entry = self.registry.lookup(argument, self.modules) if argument.op != "placeholder" else None
            if entry is None or entry.kind is not RuleKind.INDEX_MAP or not argument.args:
                return None
            argument = argument.args[0]
        return argument.target if isinstance(argument, Node) else None

    def additive_constant(self, argument: Any) -> None:
        return None  # a mask added to scores: a sum with a constant summand, which takes its share

    def only_scales(self, node: Node) -> bool:
        """Whether every path from ``node`` through its users ends in a product or quotient with an activation that
        does not come from ``node`` (a normalizer), before the output or a module call."""
        downstream = {node} | self._downstream(node)
        frontier, seen = list(node.users), set()
        while frontier:
            user = frontier.pop()
            if user in seen:
                continue
            seen.add(user)
            if user.op in ("output", "call_module", "placeholder"):
                return False
            scaled = [argument for argument in node_arguments((user.args, user.kwargs))
                      if argument in self.derived and argument not in downstream]
            if user.target not in SCALING_CALLS or not scaled:  # arithmetic on the statistic: follow it
                frontier.extend(user.users)
        return True

    def _downstream(self, node: Node) -> set[Node]:
        """Every value computed from ``node``."""
        found, frontier = set(), list(node.users)
        while frontier:
            user = frontier.pop()
            if user not in found:
                found.add(user)
                frontier.extend(user.users)
        return found

    def owner_type(self, node: Node) -> type | None:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        return type(self.model.get_submodule(path)) if path else None

    def submodule(self, target: str) -> torch.nn.Module:
        return self.modules[target]

    def take_padding(self, node: Node, argument: int, dims: int) -> tuple[tuple[int, ...], str] | None:
        pad_node = node.args[argument] if len(node.args) > argument else None
        if not isinstance(pad_node, Node) or len(pad_node.users) != 1 or self.kind.get(pad_node) != ACTIVATION:
            return None
        found = padding_of(pad_node, self.modules)
        if found is None or len(found[0]) != 2 * dims:
            return None
        node.args = (*node.args[:argument], pad_node.args[0], *node.args[argument + 1:])
        self.graph.erase_node(pad_node)
        return found

    # -- the pass
    def run(self) -> None:
        self.derived = self._derived()
        self.updates_in_place = self._in_place_updates()
        if self.updates_in_place:  # explained at run time instead: nothing of the model is changed
            return
        self._fuse_written_activations()
        self.derived = self._derived()
        for node in list(self.graph.nodes):
            if node.op == "placeholder":
                # an argument with a default (or fixed to it while tracing) is not where relevance lands
                self.kind[node] = CONSTANT if node.args else ACTIVATION
            elif node.op == "get_attr":
                self.kind[node] = CONSTANT
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
        derived = self._derived()
        consumed: set[Node] = set()
        for root in list(self.graph.nodes):
            if root not in derived or root in consumed:
                continue
            region = elementwise_region(root, derived)
            if region is None:
                continue
            output, members, constants = region
            consumed.update(members)
            function = region_function(root, output, members, constants)
            output.args, output.kwargs = (root, *constants), {}
            output.op = "call_function"  # (made a module call by _replace)
            self._replace(output, Activation(function))
            for member in reversed([n for n in self.graph.nodes if n in members and n is not output]):
                self.graph.erase_node(member)

    def _derived(self) -> set[Node]:
        """The values computed from the model's input (sizes and values that carry no relevance aside)."""
        derived = {node for node in self.graph.nodes if node.op == "placeholder" and not node.args}
        for node in self.graph.nodes:
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            entry = self.registry.lookup(node, self.modules)
            arguments = [a for i, a in enumerate(node.args) if entry is None or i not in entry.references]
            if any(a in derived for a in node_arguments((arguments, node.kwargs))) and (
                    entry is None or not (entry.shape or entry.constant)):
                derived.add(node)
        return derived

    def _label(self, node: Node) -> tuple[str, str]:
        if node.op == "call_module":
            return node.target, type(self.modules[node.target]).__name__
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        return node.name, f"operation {name}"

    def _visit(self, node: Node) -> None:
        entry = self.registry.lookup(node, self.modules)
        arguments = node_arguments(([a for i, a in enumerate(node.args) if entry is None or i not in entry.references],
                                    node.kwargs))
        active = [a for a in arguments if self.kind.get(a) == ACTIVATION]
        if node.target is builtins.getattr and active and node.args[1] == "values":
            self.kind[node] = ACTIVATION  # ``x.max(1).values``: fx records a returned tuple's field as getattr
            return
        if entry is not None and entry.constant_when is not None and active and entry.constant_when(node, self):
            self.kind[node] = CONSTANT
            self._held.append(node)
            return
        if entry is not None and (entry.shape or entry.constant):
            self.kind[node] = SHAPE if entry.shape else CONSTANT
            if entry.build is not None and active:  # a constant made from an activation: its entry checks the use
                try:
                    entry.build(node, self)
                except Unsupported as reason:
                    path, label = self._label(node)
                    self.unsupported.append((path, f"{label}: {reason}"))
            return
        if not active:  # nothing derived from the input flows through: a constant or a size computation
            self.kind[node] = CONSTANT if any(self.kind.get(a) == CONSTANT for a in arguments) else SHAPE
            return
        self.kind[node] = ACTIVATION
        path, label = self._label(node)
        if is_allowed(path, self.allowed):
            return
        if entry is None:
            self.unsupported.append((path, label))
            return
        if node.op == "call_module" and isinstance(self.modules[node.target], _BatchNorm) and self._fold(node):
            return
        if entry.folds and self._fold_call(node):
            return
        if entry.build is None and self._inplace(node, entry) and node.op == "call_method" and hasattr(
                torch.Tensor, node.target[:-1]) and node.target.endswith("_") and node.target[:-1] in \
                self.registry.methods:  # ``x.masked_fill_(...)`` of a value read by nothing else: out of place
            node.target = node.target[:-1]
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
        """Whether the tensor ``node`` updates in place, or a tensor sharing its memory (a view of it, or one it is a
        view of: ``h[:, :2].mul_(3)``), is read after ``node``."""
        mutated = node.args[0] if node.args else None
        if not isinstance(mutated, Node):
            return False
        aliases, frontier = set(), [mutated]
        while frontier:
            value = frontier.pop()
            if value in aliases:
                continue
            aliases.add(value)
            if self._is_view(value) and isinstance(value.args[0], Node):
                frontier.append(value.args[0])  # what it is a view of
            frontier.extend(user for user in value.users if self._is_view(user) and user.args[0] is value)
        return any(self.order.get(user, -1) > self.order[node] for alias in aliases for user in alias.users
                   if user is not node)

    def _in_place_updates(self) -> list[str]:
        """The in-place updates of values computed from the input whose memory is read again afterwards: a rewrite
        out of place would change what the model computes."""
        found = []
        for node in self.graph.nodes:
            if node.op not in ("call_function", "call_method", "call_module") or not node.args:
                continue
            entry = self.registry.lookup(node, self.modules)
            if entry is None or node.args[0] not in self.derived:
                continue
            if (self._inplace(node, entry) and self._used_later(node)) or (
                    not node.users and node.target in _REBOUND and isinstance(node.args[0], Node)):
                # ``v = h[:, :2]; v += g`` or ``v = h; v += g``: fx records the update out of place, and drops it
                path, label = self._label(node)
                found.append(f"{path}: {label}")
        return found

    def _is_view(self, node: Node) -> bool:
        """Whether ``node`` may share its input's memory (an index map: views, slices, reshapes)."""
        if node.op not in ("call_function", "call_method") or not node.args:
            return False
        entry = self.registry.lookup(node, self.modules)
        return entry is not None and entry.kind is RuleKind.INDEX_MAP and not entry.inplace

    def _signs(self, node: Node, entry: OperationEntry, active: list[Node]) -> None:
        facts = derive_facts(entry, [Facts(a in self.gates, a in self.attention, a in self.nonnegative)
                                     for a in active])
        if facts.gate:
            self.gates.add(node)
        if facts.attention:
            self.attention.add(node)
        if facts.nonnegative:
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
        while path and isinstance(self.model.get_submodule(path), CONTAINERS):
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
        if getattr(replacement, "label", None) == "":
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
        self.kind[layer_node] = ACTIVATION
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
        users = [user for user in layer_node.users if self.kind.get(user) != SHAPE]  # x.ndim, x.size(): no value
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
            self.kind[new], self.order[new] = CONSTANT, self.order[layer_node]
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
        function, arguments = functional_form(layer)
        with self.graph.inserting_before(layer_node):
            weight = self.graph.get_attr(f"{layer_node.target}.weight")
            bias = None if layer.bias is None else self.graph.get_attr(f"{layer_node.target}.bias")
        for new in (weight, bias):
            if new is not None:
                self.kind[new], self.order[new] = CONSTANT, self.order[layer_node]
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
            if self.kind.get(node) != ACTIVATION:
                continue
            if node.op == "placeholder" and previous is None:
                previous = node
            elif node.op == "call_module" and list(node.args) == [previous] and node.kwargs.keys() <= MARKS:
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


__all__ = ["ACTIVATION", "CONSTANT", "CONTAINERS", "GraphPass", "MARKS", "SHAPE", "functional_form"]
