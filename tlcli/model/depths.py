"""The freeze boundaries a sweep compares: the outputs of the base's top-level blocks, then the head's input.

A *stack* is a top-level module of the traced model holding two or more
children that have weights: timm's EfficientNet and ViT have one (`blocks`),
whose children are the blocks; a ResNet has four (`layer1` ... `layer4`),
which are the blocks themselves. At most `MAX_BLOCKS` are kept, evenly
spaced and ending at the last (Lite0: `blocks.2` ... `blocks.6`; a 12-block
ViT: `blocks.3, 5, 7, 9, 11`), and only those that lie before the head's
input, which is always the last candidate (the boundary of a recipe frozen
"below its head"). Every name is checked as a freeze boundary, with tl's
usual message.
"""

from __future__ import annotations

from typing import Optional

from torch import fx, nn

from tlcli.config.schema import FreezeSpec
from tlcli.errors import SpecError
from tlcli.model.freeze import resolve_split
from tlcli.model.graph import ModelGraph

MAX_BLOCKS = 5


def head_input(graph: ModelGraph, head_layer: Optional[str]) -> str:
    """The name of the node the model's head reads (for Lite0, `global_pool.flatten`)."""
    head = next((n for n in graph.module.graph.nodes if n.op == "call_module" and n.target == head_layer), None)
    if head is None or not head.all_input_nodes:
        raise SpecError([(("sweep",), "the model has no head layer to sweep below (head.layer: none, or no Linear)")])
    node = head.all_input_nodes[0]
    # Dropout before the head is the identity in eval: the boundary is what it reads.
    while isinstance(graph.module_of(node), nn.Dropout) and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return graph.names[node]


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def block_names(graph: ModelGraph) -> list[str]:
    """The base's blocks, in execution order (see the module's docstring)."""
    root = graph.module
    stacks = [name for name, child in root.named_children()
              if sum(_has_weights(c) for c in child.children()) >= 2]
    if len(stacks) == 1:
        stack = root.get_submodule(stacks[0])
        return [f"{stacks[0]}.{name}" for name, child in stack.named_children() if _has_weights(child)]
    return stacks


def default_boundaries(graph: ModelGraph, head_layer: Optional[str]) -> list[str]:
    """Up to MAX_BLOCKS block outputs upstream of the head's input, evenly spaced, then the head's input."""
    last = head_input(graph, head_layer)
    upstream = _ancestors(graph.by_name[last])
    blocks = [b for b in block_names(graph) if (node := graph.resolve(b)) is not None and node in upstream]
    if len(blocks) > MAX_BLOCKS:
        step = len(blocks) // MAX_BLOCKS if len(blocks) > MAX_BLOCKS + 2 else 1
        blocks = [blocks[len(blocks) - 1 - step * i] for i in reversed(range(MAX_BLOCKS))]
    return [*blocks, last]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def checked_boundaries(graph: ModelGraph, names: list[str], loc: tuple = ("sweep", "boundaries")) -> list[str]:
    """The recipe's `sweep.boundaries`, each a valid freeze boundary that leaves something to
    train, in execution order; every problem at once, at its index."""
    issues = []
    for i, name in enumerate(names):
        try:
            resolve_split(graph, FreezeSpec(until=name), (*loc, i))
        except SpecError as err:
            issues += [((*loc, i), message) for _, message in err.issues]
            continue
        if all(user.op == "output" for user in graph.resolve(name).users):
            issues.append(((*loc, i), f"'{name}' is the model's output: nothing above it trains"))
    if len(set(names)) != len(names):
        issues.append((loc, "a boundary is listed twice"))
    if issues:
        raise SpecError(issues)
    order = {name: i for i, name in enumerate(graph.names.values())}
    return sorted(names, key=lambda name: order.get(graph.names[graph.resolve(name)], 0))
