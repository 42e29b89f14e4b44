"""Surgery: DL4J's TransferLearning.GraphBuilder on the traced fx graph, and the new head.

The recipe's operations edit the graph in the order written: `n_out_replace`,
`remove`, `remove_output_layers`, `add`, `outputs`; an `input:` section adds
an input preprocessor first. The head is then fitted to the data's classes.

Modules the recipe does not touch keep their weights: edits replace or add
modules on the traced GraphModule, which holds references to the base
model's own modules. Every replaced or added module is freshly initialised
from a generator seeded by `fine_tune.seed` and the operation's position.

Problems are collected as (dotted location, message) pairs; the layer that
holds the recipe turns them into `file:line`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from tlcli.errors import SpecError, did_you_mean
from tlcli.model.graph import classifier_width, format_shape
from tlcli.model.layers import ACTIVATIONS, Concat, InputAdapter, Sum, init_layer
from tlcli.model.preprocess import Preprocess
from tlcli.config.schema import AddSpec, HeadSpec, InputSpec, NOutReplace, Operation, RemoveSpec

if TYPE_CHECKING:
    from tlcli.model.network import Network

# Layers a changed width passes through unchanged (n_out_replace carries it on).
_WIDTH_PASSING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
)
_WIDTH_PASSING_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.dropout,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten, torch.relu,
    torch.sigmoid, torch.tanh,
}
_WIDTH_PASSING_METHODS = {"relu", "sigmoid", "tanh", "flatten", "contiguous"}


def add_input_adapter(built: "Network", spec: InputSpec) -> None:
    """DL4J's input preprocessor as the model's first node."""
    pp = built.preprocess
    adapter = InputAdapter(spec.channels, pp.size, pp.mean, pp.std, pp.interpolation)
    gm, g = built.model, built.model.graph
    placeholder = next(n for n in g.nodes if n.op == "placeholder")
    gm.add_submodule("input_adapter", adapter)
    with g.inserting_after(placeholder):
        node = g.call_module("input_adapter", (placeholder,))
    placeholder.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    built.graph.names[node] = "input_adapter"
    built.graph.refresh()
    built.preprocess = Preprocess(size=spec.size, resize=spec.size, mode="squash", mean=(0.0,) * spec.channels,
                                  std=(1.0,) * spec.channels, interpolation=pp.interpolation, channels=spec.channels)


# A layer bigger than this is a typo, not a model: refuse before allocating it.
MAX_LAYER_PARAMS = 1_000_000_000


class _Failed(Exception):
    """One operation failed at (location within the operation, message)."""

    def __init__(self, loc: tuple, message: str):
        self.loc, self.message = loc, message


class Surgeon:
    """Applies `surgery:` in order. Each operation sees the graph the previous ones left."""

    def __init__(self, built: "Network", operations: list[Operation], seed: int):
        self.built = built
        self.graph = built.graph
        self.operations = operations
        self.seed = seed
        self.index = 0
        self.apply = {
            "n_out_replace": self._n_out_replace,
            "remove": self._remove,
            "remove_output_layers": self._remove_output_layers,
            "add": self._add,
            "outputs": self._outputs,
        }

    def run(self) -> list[tuple[tuple, str]]:
        """Apply every operation; return the problems of those that failed.

        A failed operation is skipped and the rest still run, so one
        validation reports every bad name (later problems may follow from an
        earlier one)."""
        issues: list[tuple[tuple, str]] = []
        for i, op in enumerate(self.operations):
            self.index = i
            try:
                self.apply[op.kind](getattr(op, op.kind))
            except _Failed as err:
                issues.append((("surgery", i, *err.loc), err.message))
                self.graph.refresh()
        if not issues:
            try:
                self._finish()
            except _Failed as err:
                issues.append((("surgery", len(self.operations) - 1, *err.loc), err.message))
        return issues

    # -- helpers

    def fail(self, loc: tuple, message: str):
        raise _Failed(loc, message)

    def generator(self, k: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + self.index * 10 + k + 1)

    def node(self, name: str, loc: tuple) -> fx.Node:
        node = self.graph.resolve(name)
        if node is None:
            self.fail(loc, f"unknown node '{name}'{self.graph.suggest(name)} (tl inspect lists them)")
        return node

    def layer(self, name: str, loc: tuple) -> fx.Node:
        """A node that calls exactly the module `name`."""
        nodes = [n for n in self.graph.module.graph.nodes if n.op == "call_module" and n.target == name]
        if not nodes:
            layers = [n.target for n in self.graph.module.graph.nodes if n.op == "call_module"]
            self.fail(loc, f"unknown layer '{name}'{did_you_mean(name, layers)} (tl inspect lists them)")
        if len(nodes) > 1:
            self.fail(loc, f"layer '{name}' is called {len(nodes)} times (shared weights); tl cannot resize it")
        return nodes[0]

    def shapes(self) -> dict[fx.Node, tuple]:
        self.graph.module.recompile()
        return self.graph.output_shapes(self.built.preprocess.channels, self.built.preprocess.size)

    def set_module(self, name: str, module: nn.Module) -> None:
        self.graph.module.add_submodule(name, module)  # replaces an existing module of that name
        self.built.added.add(name)

    def output_node(self) -> fx.Node:
        return next(n for n in self.graph.module.graph.nodes if n.op == "output")

    def output_values(self) -> list[fx.Node]:
        arg = self.output_node().args[0]
        if arg is None:
            return []
        return list(arg) if isinstance(arg, (tuple, list)) else [arg]

    def set_outputs(self, values: list[fx.Node]) -> None:
        out = self.output_node()
        out.args = ((values[0] if len(values) == 1 else tuple(values)) if values else None,)

    # -- operations

    def check_size(self, loc: tuple, params: int, what: str) -> None:
        if params > MAX_LAYER_PARAMS:
            self.fail(loc, f"{what} would have {params:,} parameters ({params * 4 / 2**30:,.1f} GiB in float32); "
                           f"tl refuses layers over {MAX_LAYER_PARAMS:,}")

    def _n_out_replace(self, spec: NOutReplace) -> None:
        node = self.layer(spec.layer, ("n_out_replace", "layer"))
        old = self.graph.module_of(node)
        if isinstance(old, (nn.Linear, nn.Conv2d)):
            self._check_resize(node, old, spec)
        if isinstance(old, nn.Linear):
            new, old_out = nn.Linear(old.in_features, spec.n_out, bias=old.bias is not None), old.out_features
        elif isinstance(old, nn.Conv2d):
            old_out = old.out_channels
            if old.groups != 1:
                self.fail(("n_out_replace", "layer"), f"'{spec.layer}' is a grouped/depthwise conv; its width is tied to its input")
            new = nn.Conv2d(old.in_channels, spec.n_out, old.kernel_size, old.stride, old.padding, old.dilation,
                            bias=old.bias is not None, padding_mode=old.padding_mode)
        else:
            self.fail(("n_out_replace", "layer"), f"'{spec.layer}' is a {type(old).__name__}; n_out_replace changes a Linear or Conv2d")
        init_layer(new, spec.init, self.generator())
        replacements = {spec.layer: new}
        for k, (consumer, kind) in enumerate(self._carry(node)):
            replacements[consumer.target] = self._resized_consumer(self.graph.module_of(consumer), kind, spec, old_out, k)
        for name, module in replacements.items():
            self.set_module(name, module)

    def _check_resize(self, node: fx.Node, old: nn.Module, spec: NOutReplace) -> None:
        """Refuse a width that would allocate an absurd layer, here or in the layer it feeds."""
        linear = isinstance(old, nn.Linear)
        old_out = old.out_features if linear else old.out_channels
        fan_in = old.in_features if linear else old.in_channels * math.prod(old.kernel_size)
        self.check_size(("n_out_replace", "n_out"), fan_in * spec.n_out, f"'{spec.layer}' at n_out {spec.n_out:,}")
        for consumer, kind in self._carry(node):
            m = self.graph.module_of(consumer)
            if kind == "next":
                per_unit = (m.in_features // old_out * m.out_features if isinstance(m, nn.Linear)
                            else m.out_channels * math.prod(m.kernel_size))
                self.check_size(("n_out_replace", "n_out"), per_unit * spec.n_out, f"'{consumer.target}' after it")

    def _resized_consumer(self, m: nn.Module, kind: str, spec: NOutReplace, old_out: int, k: int) -> nn.Module:
        """A norm the new width passes through, or the next weight layer, at the new width."""
        if kind == "norm":
            return type(m)(spec.n_out, eps=m.eps, momentum=m.momentum, affine=m.affine,
                           track_running_stats=m.track_running_stats)
        if isinstance(m, nn.Linear):
            # Flatten multiplies the width by the spatial size; that factor is unchanged.
            nxt = nn.Linear(m.in_features // old_out * spec.n_out, m.out_features, bias=m.bias is not None)
        else:
            nxt = nn.Conv2d(spec.n_out, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            bias=m.bias is not None, padding_mode=m.padding_mode)
        init_layer(nxt, spec.init_next, self.generator(k + 1))
        return nxt

    def _carry(self, start: fx.Node) -> list[tuple[fx.Node, str]]:
        """Where a new width goes: the norms it passes through ("norm") and the
        weight layers that consume it ("next"). Anything else stops it."""
        found: list[tuple[fx.Node, str]] = []
        stack, seen = [start], set()
        while stack:
            node = stack.pop()
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if user.op == "output":
                    continue
                m = self.graph.module_of(user)
                first = user.args[0] if user.args else None
                other_inputs = [a for a in user.all_input_nodes if a is not node and a.op != "get_attr"]
                if first is not node or other_inputs:
                    self._blocked(user, "it also takes other inputs")
                if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    found.append((user, "norm"))
                    stack.append(user)
                elif isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
                    found.append((user, "next"))
                elif isinstance(m, _WIDTH_PASSING_MODULES) or (
                    user.op == "call_function" and user.target in _WIDTH_PASSING_FUNCTIONS
                ) or (user.op == "call_method" and user.target in _WIDTH_PASSING_METHODS):
                    stack.append(user)
                else:
                    what = type(m).__name__ if m is not None else getattr(user.target, "__name__", str(user.target))
                    reason = ("a grouped/depthwise conv ties its width to its input" if isinstance(m, nn.Conv2d)
                              else f"tl can't carry a width through {what}")
                    self._blocked(user, reason)
        return found

    def _blocked(self, node: fx.Node, reason: str):
        self.fail(("n_out_replace", "layer"), f"the new width can't reach the next weight layer: blocked at "
                  f"'{self.graph.names.get(node, node.name)}' ({reason})")

    def _remove(self, spec: RemoveSpec) -> None:
        node = self.node(spec.layer, ("remove", "layer"))
        if self.graph.names.get(node) != spec.layer:
            # A module name that covers several nodes: say which node is meant.
            self.fail(("remove", "layer"), f"'{spec.layer}' is a group of nodes; name one node (last is '{self.graph.names[node]}')")
        if spec.keep_connections:
            inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
            if len(inputs) != 1:
                self.fail(("remove", "keep_connections"), f"'{spec.layer}' has {len(inputs)} inputs; keep_connections needs exactly one")
            node.replace_all_uses_with(inputs[0])
            self.graph.module.graph.erase_node(node)
        else:
            self._erase_downstream(node)
        self.graph.refresh()

    def _erase_downstream(self, node: fx.Node) -> None:
        doomed, stack = [], [node]
        while stack:
            n = stack.pop()
            if n in doomed:
                continue
            doomed.append(n)
            stack.extend(u for u in n.users if u.op != "output")
        self.set_outputs([v for v in self.output_values() if v not in doomed])
        g = self.graph.module.graph
        for n in reversed([n for n in g.nodes if n in doomed]):
            g.erase_node(n)

    def _remove_output_layers(self, count: int) -> None:
        for _ in range(count):
            values = self.output_values()
            if len(values) != 1:
                self.fail(("remove_output_layers",), f"the model has {len(values)} outputs; set one with outputs: first")
            last = values[0]
            inputs = [a for a in last.all_input_nodes if a.op != "get_attr"]
            if len(inputs) != 1 or inputs[0].op == "placeholder":
                self.fail(("remove_output_layers",), f"can't remove '{self.graph.names.get(last, last.name)}': it has no single input layer")
            self.set_outputs([inputs[0]])
            if not last.users:
                self.graph.module.graph.erase_node(last)
        self.graph.refresh()

    def _add(self, spec: AddSpec) -> None:
        if spec.name in self.graph.by_name or spec.name in dict(self.graph.module.named_modules()):
            self.fail(("add", "name"), f"'{spec.name}' already names a node of the model")
        inputs = [self.node(name, ("add", "inputs", i)) for i, name in enumerate(spec.inputs)]
        shapes = self.shapes()
        module = self._new_module(spec, [shapes.get(n) for n in inputs])
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init_layer(module, spec.init, self.generator())
        order = {n: i for i, n in enumerate(self.graph.module.graph.nodes)}
        node = self._insert(spec.name, module, tuple(inputs), after=max(inputs, key=order.__getitem__))
        if spec.lr is not None:
            self.built.layer_lr[spec.name] = spec.lr
        if spec.activation is not None:
            self._insert(f"{spec.name}_act", ACTIVATIONS[spec.activation](), (node,), after=node)
        self.graph.refresh()
        self._check_runs(spec, [shapes.get(n) for n in inputs])

    def _check_runs(self, spec: AddSpec, in_shapes: list) -> None:
        """A dry run with the new layer: one that cannot run on its input's shape (a pooling
        kernel larger than the feature map) is this operation's problem, named with the shapes."""
        try:
            self.shapes()
        except Exception as err:  # torch raises RuntimeError, ValueError or IndexError for shape problems
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            got = ", ".join(format_shape(s) for s in in_shapes)
            # Taken out again, so that the operations after this one are checked on a graph that runs.
            for name in (f"{spec.name}_act", spec.name):
                node = self.graph.by_name.get(name)
                if node is not None and not node.users:
                    self.graph.module.graph.erase_node(node)
                    self.graph.module.delete_submodule(name)
            self.graph.refresh()
            self.fail(("add",), f"'{spec.name}' ({spec.type}) cannot run on its input of shape {got}: {reason}")

    def _insert(self, name: str, module: nn.Module, inputs: tuple, after: fx.Node) -> fx.Node:
        self.set_module(name, module)
        with self.graph.module.graph.inserting_after(after):
            node = self.graph.module.graph.call_module(name, inputs)
        self.graph.names[node] = name
        return node

    def _new_module(self, spec: AddSpec, in_shapes: list) -> nn.Module:
        """The module an `add` creates, sized from its inputs' shapes."""
        first, t = in_shapes[0] or (), spec.type
        rank = {"linear": (1,), "conv1x1": (3,), "batchnorm": (1, 3), "pooling": (3,)}.get(t)
        if rank and len(first) not in rank:
            need = {"linear": "a flat input", "conv1x1": "a C×H×W input", "batchnorm": "a flat or C×H×W input",
                    "pooling": "a C×H×W input"}[t]
            hint = " (add a flatten or pooling first)" if t == "linear" else ""
            self.fail(("add", "inputs", 0), f"{t} needs {need}; '{spec.inputs[0]}' has shape {format_shape(first)}{hint}")
        if t == "concat" and (len({len(s or ()) for s in in_shapes}) != 1 or len({(s or ())[1:] for s in in_shapes}) != 1):
            self.fail(("add", "inputs"), "concat needs inputs that differ only in width: got "
                      + ", ".join(format_shape(s) for s in in_shapes))
        if t == "add" and len(set(in_shapes)) != 1:
            self.fail(("add", "inputs"), "add needs inputs of one shape: got " + ", ".join(format_shape(s) for s in in_shapes))
        pools = {"avg": lambda: nn.AvgPool2d(spec.kernel, spec.stride), "max": lambda: nn.MaxPool2d(spec.kernel, spec.stride),
                 "adaptive_avg": lambda: nn.AdaptiveAvgPool2d(spec.output_size),
                 "adaptive_max": lambda: nn.AdaptiveMaxPool2d(spec.output_size)}
        if t in ("linear", "conv1x1"):
            self.check_size(("add", "n_out"), first[0] * (spec.n_out or self.built.num_classes), f"'{spec.name}'")
        makers = {
            "linear": lambda: nn.Linear(first[0], spec.n_out or self.built.num_classes, bias=spec.bias),
            "conv1x1": lambda: nn.Conv2d(first[0], spec.n_out, 1, bias=spec.bias),
            "batchnorm": lambda: (nn.BatchNorm1d if len(first) == 1 else nn.BatchNorm2d)(first[0]),
            "dropout": lambda: nn.Dropout(spec.p),
            "activation": lambda: ACTIVATIONS[spec.fn](),
            "pooling": lambda: pools[spec.pool](),
            "flatten": nn.Flatten,
            "concat": Concat,
            "add": Sum,
        }
        return makers[t]()

    def _outputs(self, names: list[str]) -> None:
        nodes = [self.node(name, ("outputs", i)) for i, name in enumerate(names)]
        if len(nodes) != 1:
            self.fail(("outputs",), f"tl trains one output; got {len(nodes)}")
        self.set_outputs(nodes)
        self.graph.refresh()

    def _finish(self) -> None:
        if not self.output_values():
            self.fail((), "after surgery the model has no output: add `outputs: [NODE]`")
        gm = self.graph.module
        # Nodes nothing reads any more (a removed head's old branch, an added
        # layer left out of the outputs) are dropped with their modules.
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        self.graph.refresh()
        if self.operations:
            try:
                self.shapes()
            except Exception as err:  # shape mismatches surface as any of several torch errors
                self.fail((), f"the edited model does not run: {err}")


# --------------------------------------------------------------------------- head


def apply_head(built: "Network", head: HeadSpec, seed: int, keep_trained: bool) -> None:
    """Fit the classifier to the data's classes (DL4J's nOutReplace on the output layer)."""
    if head.layer == "none":
        return
    graph = built.graph
    classifiers = graph.classifier_layers()
    if head.layer == "auto":
        if not classifiers:
            raise SpecError([(("head", "layer"), "the model has no Linear (or 1×1 Conv2d) layer to use as its "
                                                 "classifier; name head.layer or use head.layer: none")])
        layer = classifiers[-1]
    else:
        layer = head.layer
        if layer not in classifiers:
            raise SpecError([(("head", "layer"), f"unknown layer '{layer}'{did_you_mean(layer, classifiers)} "
                                                 "(head.layer names a Linear or a 1×1 Conv2d)")])
    built.head_layer = layer
    _fit_classifier(built, layer, head.init, seed, keep_trained)
    if head.layer == "auto":
        # Every other classifier whose output is the model's too (a distilled model's second head).
        others = [n for n in graph.final_classifiers() if n != layer]
        for i, name in enumerate(others, start=1):
            _fit_classifier(built, name, head.init, seed + i, keep_trained)


def _fit_classifier(built: "Network", layer: str, init: str, seed: int, keep_trained: bool) -> None:
    graph = built.graph
    old = graph.module.get_submodule(layer)
    fits = classifier_width(old) == built.num_classes
    # A layer the recipe just added is already fresh; a continued run on the same
    # classes keeps its trained head.
    if fits and (layer in built.added or keep_trained):
        return
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, built.num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, built.num_classes, 1, bias=old.bias is not None)
    init_layer(new, init, torch.Generator().manual_seed(seed))
    graph.module.add_submodule(layer, new)
    built.added.add(layer)
