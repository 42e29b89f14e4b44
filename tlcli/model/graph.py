"""Graph: the model traced with fx, split at a freeze boundary into frozen part, frontier and trainable part.

A boundary node and everything it depends on are frozen (DL4J's
setFeatureExtractor). The *frontier* is every frozen node whose output is used
by a trainable node; featurize caches exactly those tensors, and the trainable
subgraph takes them as inputs (DL4J's `unfrozenGraph`). With a skip connection
across the cut, the frontier has more than one tensor.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx, nn

from tlcli.errors import did_you_mean


# Kept whole (one node each) even when a zoo subclasses them. Traced through, a BatchNorm or
# Dropout subclass would have its eval-mode branch baked into the graph (fx reads
# `self.training` once, at trace time), so it could neither be pinned to eval when frozen nor
# train when trainable; a Linear subclass (timm's `Linear`) would no longer be a Linear that
# the head and the probe can find.
MODE_AND_HEAD_LEAVES = (nn.Linear, nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _tracer(zoo: str):
    from torchvision.models.feature_extraction import NodePathTracer

    if zoo == "timm":
        # timm's own leaf modules and functions: its TF-"same" padding convs use
        # data-dependent padding that plain fx cannot trace.
        from timm.layers import get_notrace_functions, get_notrace_modules

        return NodePathTracer(leaf_modules=[*get_notrace_modules(), *MODE_AND_HEAD_LEAVES],
                              autowrap_functions=get_notrace_functions())
    return NodePathTracer(leaf_modules=list(MODE_AND_HEAD_LEAVES))


@dataclass
class ModelGraph:
    """A traced model with stable, human-readable node names."""

    module: fx.GraphModule
    names: dict[fx.Node, str]  # node -> qualified name, as torchvision's get_graph_node_names gives
    by_name: dict[str, fx.Node] = field(init=False)

    def __post_init__(self):
        self.by_name = {name: node for node, name in self.names.items()}

    def refresh(self) -> None:
        """After an edit: forget erased nodes, regenerate the module's code."""
        live = list(self.module.graph.nodes)
        self.names = {n: self.names.get(n, n.name) for n in live if n.op != "output"}
        self.by_name = {name: node for node, name in self.names.items()}
        self.module.graph.lint()
        self.module.recompile()

    def nodes_of(self, name: str) -> list[fx.Node]:
        """The node with this exact name, or every node inside module `name`."""
        if name in self.by_name:
            return [self.by_name[name]]
        return [node for node, n in self.names.items() if n.startswith(name + ".")]

    @classmethod
    def trace(cls, model: nn.Module, zoo: str) -> "ModelGraph":
        # Trace in eval mode: dropout and BN branches differ between modes, and
        # the frozen part always runs in eval.
        was_training = model.training
        model.eval()
        tracer = _tracer(zoo)
        options = _optional_inputs(model)
        graph = tracer.trace(model, concrete_args=options or None)
        model.train(was_training)
        _inline_options(graph, options)
        module = fx.GraphModule(tracer.root, graph, type(model).__name__)
        names = {}
        for node in module.graph.nodes:
            if node.op == "output":
                continue
            names[node] = tracer.node_to_qualname.get(node, node.name)
        return cls(module, names)

    @property
    def node_names(self) -> list[str]:
        """Every named node in execution order, the input placeholder excluded."""
        return [name for node, name in self.names.items() if node.op != "placeholder"]

    def resolve(self, name: str) -> Optional[fx.Node]:
        """An exact node name, or a module name meaning the last node inside it
        (`blocks.5` -> `blocks.5.3.bn3`), as torchvision's return_nodes do."""
        if name in self.by_name:
            return self.by_name[name]
        inside = [node for node, n in self.names.items() if n.startswith(name + ".")]
        return inside[-1] if inside else None

    def suggest(self, name: str) -> str:
        modules = {n.rsplit(".", 1)[0] for n in self.node_names if "." in n}
        return did_you_mean(name, self.node_names + sorted(modules))

    def output_shapes(self, channels: int, size: int) -> dict[fx.Node, tuple]:
        """Per-node output shapes (batch dimension dropped), from a one-image
        dry run in eval mode."""
        shapes: dict[fx.Node, tuple] = {}

        class Recorder(fx.Interpreter):
            # Not torch's ShapeProp: it prints a traceback of its own before re-raising, and a
            # shape that does not fit is the recipe's problem, reported by the caller in one line.
            def run_node(self, n: fx.Node):
                result = super().run_node(n)
                if isinstance(result, torch.Tensor):
                    shapes[n] = tuple(result.shape[1:])
                return result

        was_training = self.module.training
        try:
            with torch.no_grad():
                Recorder(self.module.eval()).run(torch.zeros(1, channels, size, size))
        finally:
            self.module.train(was_training)
        return shapes

    def module_of(self, node: fx.Node) -> Optional[nn.Module]:
        if node.op == "call_module":
            return self.module.get_submodule(node.target)
        return None

    def classifier_layers(self) -> list[str]:
        """Names of the modules that can be a classifier, in execution order (the last is the
        model's): Linear layers, and 1×1 convolutions, which are how BiT (timm's resnetv2) and
        SqueezeNet classify."""
        return [n.target for n in self.module.graph.nodes if n.op == "call_module" and _classifies(self.module_of(n))]

    def final_classifiers(self) -> list[str]:
        """The classifier layers whose outputs reach the model's output through no other layer
        with weights: usually one, two for distilled models (LeViT, DeiT-distilled average a
        class head and a distillation head)."""
        finals = []
        for node in self.module.graph.nodes:
            if node.op != "call_module" or not _classifies(self.module_of(node)):
                continue
            seen, stack = set(), list(node.users)
            while stack:
                user = stack.pop()
                if user in seen:
                    continue
                seen.add(user)
                if user.op == "output":
                    finals.append(node.target)
                    break
                module = self.module_of(user)
                if module is None or not any(True for _ in module.parameters()):
                    stack.extend(user.users)
        return finals

    def param_count(self, node: fx.Node) -> int:
        m = self.module_of(node)
        if m is not None:
            return sum(p.numel() for p in m.parameters())
        if node.op == "get_attr":
            attr = _get_attr(self.module, node.target)
            return attr.numel() if isinstance(attr, torch.Tensor) else 0
        return 0


def _optional_inputs(model: nn.Module) -> dict:
    """The forward's arguments after the image that have defaults (timm's ViT takes
    `attn_mask=None, is_causal=False`). Traced as proxies, `attn_mask is not None` would be
    true and trace the wrong branch; tl always calls the model with the image alone, so
    they are traced at their defaults."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params if p.kind in keyword and p.default is not inspect.Parameter.empty}


def _inline_options(graph: fx.Graph, options: dict) -> None:
    """fx keeps a placeholder for each argument traced at a fixed value, with a check that it
    still has that value: the checks go and the value is written in where it is used, so the
    image is the graph's only input (the frozen part and the cache take nothing else)."""
    images, *extra = [n for n in graph.nodes if n.op == "placeholder"]
    for node in extra:
        name = node.target.removesuffix("_1") if node.target not in options else node.target
        default = options.get(name, node.args[0] if node.args else None)
        for user in list(node.users):
            if user.target in (torch._assert, fx._symbolic_trace._assert_is_none) or (
                    user.target is operator.eq and all(u.target is torch._assert for u in user.users)):
                for check in [*user.users, user]:
                    graph.erase_node(check)
            else:
                user.args = fx.node.map_arg(user.args, lambda n: default if n is node else n)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda n: default if n is node else n)
        graph.erase_node(node)


def _classifies(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def classifier_width(module: nn.Module) -> int:
    """How many outputs (classes) a classifier layer gives."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def format_shape(shape) -> str:
    """`(8, 32, 32)` -> `8×32×32`, as inspect tables and error messages show shapes."""
    return "×".join(str(d) for d in shape) if shape else "(unknown)"


def _get_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the model input. The others (constants,
    get_attr) are recomputed wherever they are needed, never cached."""
    dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _constant_consumers(graph: fx.Graph) -> dict[fx.Node, set[fx.Node]]:
    """For each node that does not depend on the input, the input-dependent nodes its value
    reaches. A parameter is often used through a chain of such nodes (ConvNeXt's layer scale
    `gamma.reshape(1, -1, 1, 1)`, Swin's relative-position table `table[index].view(...)`):
    which part the parameter belongs to is decided by where the chain ends, not by its first
    user."""
    dependent = _input_dependent(graph)
    consumers: dict[fx.Node, set[fx.Node]] = {}
    for node in reversed(graph.nodes):
        if node in dependent:
            continue
        reached: set[fx.Node] = set()
        for user in node.users:
            reached |= {user} if user in dependent else consumers.get(user, set())
        consumers[node] = reached
    return consumers


@dataclass
class Split:
    """The frozen/trainable partition of a traced model.

    `frozen` is the part that runs once and is cached (closed under
    ancestors). `pinned` nodes are frozen too (eval mode, no updates) but lie
    downstream of a layer that `freeze.trainable` keeps trainable, so they are
    computed in the trainable part.
    """

    graph: ModelGraph
    frozen: set[fx.Node]
    frontier: list[fx.Node]  # in execution order
    pinned: set[fx.Node] = field(default_factory=set)

    @property
    def frontier_names(self) -> list[str]:
        return [self.graph.names[n] for n in self.frontier]

    def frozen_module_names(self) -> list[str]:
        """Modules called only by frozen nodes: they run in eval mode and get no updates."""
        used_by_trainable = set()
        frozen_targets = []
        for node in self.graph.module.graph.nodes:
            if node.op != "call_module":
                continue
            if node in self.frozen or node in self.pinned:
                frozen_targets.append(node.target)
            else:
                used_by_trainable.add(node.target)
        # A module called in both parts (weight sharing) stays trainable.
        return [t for t in dict.fromkeys(frozen_targets) if t not in used_by_trainable]

    def frozen_attr_names(self) -> list[str]:
        """Parameters fetched directly (get_attr) and used only by frozen nodes."""
        users: dict[str, set[bool]] = {}
        consumers = _constant_consumers(self.graph.module.graph)
        for node in self.graph.module.graph.nodes:
            if node.op == "get_attr":
                users.setdefault(node.target, set()).update(u in self.frozen or u in self.pinned for u in consumers[node])
        # Buffers and fx's tensor constants (`_tensor_constant0`) are fetched the same way but
        # are not trained: only parameters are listed.
        parameters = dict(self.graph.module.named_parameters())
        return [t for t, seen in users.items() if seen == {True} and t in parameters]

    def frozen_state_names(self, model: nn.Module) -> list[str]:
        """Names in `model`'s state dict (parameters and buffers) that are frozen."""
        prefixes = tuple(n + "." for n in self.frozen_module_names())
        attrs = set(self.frozen_attr_names())
        return [k for k in model.state_dict() if k.startswith(prefixes) or k in attrs]


def split_at(graph: ModelGraph, boundary: list[fx.Node], trainable: list[fx.Node] = ()) -> Split:
    """Freeze the boundary nodes and all their input-dependent ancestors,
    except the `trainable` nodes; the cached part stops above those."""
    dependent = _input_dependent(graph.module.graph)
    frozen: set[fx.Node] = set()
    stack = list(boundary)
    while stack:
        node = stack.pop()
        if node in frozen or node not in dependent:
            continue
        frozen.add(node)
        stack.extend(node.all_input_nodes)
    pinned: set[fx.Node] = set()
    if trainable:
        # Everything downstream of a trainable layer must be computed in the
        # trainable part; the frozen modules among them stay frozen ("pinned").
        downstream, stack = set(), list(trainable)
        while stack:
            node = stack.pop()
            if node not in downstream:
                downstream.add(node)
                stack.extend(node.users)
        pinned = (frozen & downstream) - set(trainable)
        frozen = frozen - downstream
        if not frozen:
            boundary = []
    if not boundary or not frozen:
        # Nothing frozen: the frontier is the input itself (end-to-end training).
        frozen = {n for n in graph.module.graph.nodes if n.op == "placeholder"}
    else:
        frozen |= _checks_on(graph.module.graph, frozen)
    frontier = [
        n for n in graph.module.graph.nodes
        if n in frozen and any(u not in frozen and u.op != "output" for u in n.users)
    ]
    # A boundary that is the model's output feeds nothing trainable: it is the
    # frontier itself (everything is frozen).
    for n in graph.module.graph.nodes:
        if n.op == "output":
            for value in n.all_input_nodes:
                if value in frozen and value not in frontier:
                    frontier.append(value)
    return Split(graph, frozen, frontier, pinned)


def _checks_on(graph: fx.Graph, frozen: set[fx.Node]) -> set[fx.Node]:
    """Nodes that lead nowhere but check or unpack frozen values (timm's `_assert(H ==
    img_size[0])` on the input, the unused C of `B, N, C = x.shape`): they run with the
    frozen part. Left to the trainable part, they would make it read the input image, and the
    image would join the cached frontier."""
    feeds_output: set[fx.Node] = set()
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node not in feeds_output:
            feeds_output.add(node)
            stack.extend(node.all_input_nodes)
    dependent = _input_dependent(graph)
    checks: set[fx.Node] = set()
    for node in graph.nodes:
        if node in feeds_output or node in frozen or node not in dependent:
            continue
        if all(a in frozen or a in checks or a not in dependent for a in node.all_input_nodes):
            checks.add(node)
    return checks


def frozen_extractor(split: Split) -> fx.GraphModule:
    """The frozen part alone, returning the frontier tensors as a tuple."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    consumers = _constant_consumers(split.graph.module.graph)
    for node in split.graph.module.graph.nodes:
        if node.op == "output":
            continue
        # The frozen nodes, and the constant chains (parameter -> reshape -> ...) that feed them.
        if node in split.frozen or consumers.get(node, set()) & split.frozen:
            env[node] = g.node_copy(node, lambda n: env[n])
    g.output(tuple(env[n] for n in split.frontier))
    return _pruned(split.graph.module, g, "FrozenPart")


def trainable_part(split: Split) -> fx.GraphModule:
    """The trainable subgraph: one input per frontier tensor, the model's output out.

    `fx.GraphModule(root, ...)` copies *references* to root's submodules, so the
    trainable part shares its parameters with the full model: training it trains
    the full model in place.
    """
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(split.frontier):
        env[node] = g.placeholder(f"frontier_{i}")
    for node in split.graph.module.graph.nodes:
        if node in env or node in split.frozen or node.op == "placeholder":
            continue  # frontier inputs are placeholders already; the rest of the frozen part is gone
        copied = g.node_copy(node, lambda n: env[n])
        if node.op != "output":
            env[node] = copied
    return _pruned(split.graph.module, g, "TrainablePart")


def _pruned(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    # Dead-code elimination needs an owning module; building the GraphModule a
    # second time then drops references to submodules the pruned graph no longer uses.
    gm = fx.GraphModule(root, graph, name)
    gm.graph.eliminate_dead_code()
    return fx.GraphModule(root, gm.graph, name)


class PinnedNet(nn.Module):
    """The full model with its frozen modules pinned to eval mode.

    `model.train()` normally flips every BN and dropout back to training mode,
    which makes "frozen" BN update its running statistics. Overriding `train`
    re-applies eval to the frozen modules every time, so no caller can forget.
    """

    def __init__(self, net: nn.Module, frozen_modules: list[str], frozen_attrs: list[str] = ()):
        super().__init__()
        self.net = net
        self.frozen_modules = list(frozen_modules)
        self.frozen_attrs = list(frozen_attrs)
        # Resolved once: frozen modules are fixed from here on (their parameters' requires_grad is set
        # here, on these objects), and finding each by name again costs as much as setting its mode.
        self._frozen = [net.get_submodule(name) for name in self.frozen_modules]
        for p in net.parameters():
            p.requires_grad_(True)
        for module in self._frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        for name in self.frozen_attrs:
            net.get_parameter(name).requires_grad_(False)

    def train(self, mode: bool = True) -> "PinnedNet":
        super().train(mode)
        if mode:  # (in eval mode everything already is)
            # Lite0 frozen below its head: 264 modules, 2.3 ms found by name, 0.9 ms here; twice
            # an epoch, that was 7% of a head epoch on the cache (62 ms).
            for module in self._frozen:
                module.eval()
        return self

    def forward(self, x):
        return self.net(x)
