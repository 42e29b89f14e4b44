"""Freeze: turn a recipe's `freeze:` section into a split of the traced graph.

`until` names the boundary (DL4J's setFeatureExtractor); `all_but_last: N`
leaves the last N weight layers trainable (the Keras idiom); `trainable`
keeps layers inside the frozen part training. Problems raise `SpecError`
at their dotted location under `loc`.
"""

from __future__ import annotations

from torch import fx

from tlcli.errors import SpecError
from tlcli.model.graph import ModelGraph, Split, split_at
from tlcli.config.schema import FreezeSpec


def resolve_split(graph: ModelGraph, freeze: FreezeSpec, loc: tuple = ("freeze",)) -> Split:
    issues: list[tuple[tuple, str]] = []
    boundary: list[fx.Node] = []
    if freeze.all_but_last is not None:
        boundary = _all_but_last(graph, freeze.all_but_last)
    else:
        for i, name in enumerate(freeze.nodes):
            where = (*loc, "until") if isinstance(freeze.until, str) else (*loc, "until", i)
            node = graph.resolve(name)
            if node is None:
                issues.append((where, f"unknown node '{name}'{graph.suggest(name)} (tl inspect lists them)"))
            else:
                boundary.append(node)
    trainable: list[fx.Node] = []
    for i, name in enumerate(freeze.trainable):
        nodes = graph.nodes_of(name)
        if not nodes:
            issues.append(((*loc, "trainable", i), f"unknown layer '{name}'{graph.suggest(name)}"))
        trainable.extend(nodes)
    if issues:
        raise SpecError(issues)
    return split_at(graph, boundary, trainable)


def weight_nodes(graph: ModelGraph) -> list[fx.Node]:
    """Nodes that call a module with parameters of its own, in execution order."""
    out = []
    for node in graph.module.graph.nodes:
        m = graph.module_of(node)
        if m is not None and any(True for _ in m.parameters(recurse=False)):
            out.append(node)
    return out


def _all_but_last(graph: ModelGraph, n: int) -> list[fx.Node]:
    """The boundary that leaves exactly the last n weight layers trainable:
    the inputs of the first of them, with everything upstream."""
    layers = weight_nodes(graph)
    if n == 0:
        out = next(node for node in graph.module.graph.nodes if node.op == "output")
        return list(out.all_input_nodes)
    if n >= len(layers):
        return []
    return [a for a in layers[-n].all_input_nodes if a.op != "get_attr"]
