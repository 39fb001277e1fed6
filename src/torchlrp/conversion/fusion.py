"""Activations written as formulas of their input (``x * sigmoid(1.702 * x)``, a tanh-GELU): the element-wise
region of one activation, found in a traced graph (and by the run-time engine for each module class)."""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node


#: element-wise calls a written-out activation is made of
ELEMENTWISE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.neg,
                          torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.neg, torch.tanh, torch.sigmoid,
                          torch.exp, torch.erf, torch.relu, torch.square, torch.nn.functional.relu,
                          torch.nn.functional.sigmoid, torch.nn.functional.tanh}
ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "pow", "neg", "tanh", "sigmoid", "exp", "erf", "relu", "square"}
NONLINEAR = {operator.pow, torch.pow, "pow", torch.square, "square"}
PRODUCT_CALLS = {operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div"}


def is_elementwise(node: Node) -> bool:
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS and node.kwargs in ({}, {"inplace": False})
    return node.op == "call_method" and node.target in ELEMENTWISE_METHODS and not node.kwargs


def elementwise_region(root: Node, derived: set[Node]) -> tuple[Node, set[Node], list[Node]] | None:
    """The element-wise calls fed by ``root`` and by constants only, if they form a written-out activation: one
    output, and a power of ``root`` or a product of two of its values among them. Returns (output, members,
    constant nodes)."""
    members: set[Node] = set()
    frontier = [user for user in root.users]
    while frontier:
        node = frontier.pop()
        if node in members or not is_elementwise(node):
            continue
        arguments = node_arguments(node.args)
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
            if any(a in derived and a is not root and a not in members for a in node_arguments(node.args)):
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
        stack.extend(a for a in node_arguments(node.args) if a in members)
    if needed != members:
        return None
    nonlinear = any(node.target in NONLINEAR for node in members) or any(
        node.target in PRODUCT_CALLS and sum(a is root or a in members for a in node_arguments(node.args)) == 2
        for node in members)
    if not nonlinear:
        return None
    constants = sorted({a for node in members for a in node_arguments(node.args)
                        if a is not root and a not in members}, key=lambda n: n.name)
    return output, members, constants


def is_written_activation(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward is an activation written as a formula of its one input (transformers'
    ``NewGELUActivation``, a quick-GELU module): traced alone, one element-wise region that powers or multiplies
    its input (see :meth:`GraphPass._fuse_written_activations`). The run-time mode explains such a module's call
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
    region = elementwise_region(placeholders[0], derived)
    output = next(node for node in graph.nodes if node.op == "output").args[0]
    return region is not None and region[0] is output and region[1] == calls


def region_function(root: Node, output: Node, members: set[Node], constants: list[Node]) -> GraphModule:
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


def node_arguments(value: Any) -> list[Node]:
    """Every node inside an argument (lists, tuples, dicts, slices)."""
    found: list[Node] = []
    torch.fx.node.map_arg(value, found.append)
    return found


def written_activation_types(model: torch.nn.Module) -> dict[type, bool]:
    """For each module class of ``model`` that is not torch's or torchlrp's: whether it is an activation written as
    a formula of its input (:func:`is_written_activation`, judged on its first instance)."""
    kinds: dict[type, bool] = {}
    for module in model.modules():
        kind = type(module)
        if kind not in kinds and not kind.__module__.startswith(("torch.", "torchlrp.")):
            kinds[kind] = is_written_activation(module)
    return kinds


__all__ = ["ELEMENTWISE_FUNCTIONS", "ELEMENTWISE_METHODS", "NONLINEAR", "PRODUCT_CALLS", "elementwise_region",
           "is_elementwise", "is_written_activation", "node_arguments", "region_function", "written_activation_types"]
