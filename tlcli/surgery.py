"""Surgery: from a recipe to the model that trains, DL4J's TransferLearning.GraphBuilder.

The base model (a zoo model, or a saved tl run) is traced into an fx graph.
The recipe's operations then edit that graph in the order written: input
preprocessors, `n_out_replace`, `remove`, `remove_output_layers`, `add`,
`outputs`. The head is replaced to fit the data's classes, and each stage's
`freeze` splits the result into a frozen part and a trainable part.

Modules the recipe does not touch keep their weights: edits replace or add
modules on the traced GraphModule, which holds references to the base
model's own modules. Every replaced or added module is freshly initialised
from a generator seeded by `fine_tune.seed` and the operation's position.

Every name is checked against the graph before any data is read, and each
problem points at the recipe line that holds the name.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from tlcli.errors import Problem, RecipeError, RunError, WeightsError, did_you_mean
from tlcli.graph import ModelGraph, Split, TransferModel, frozen_extractor, split_at, trainable_part
from tlcli.recipe import AddSpec, FreezeSpec, NOutReplace, Recipe, RemoveSpec, Stage, load_recipe
from tlcli.zoo import Preprocess, build_base, init_layer, model_names

CHECKPOINT_META = "checkpoint.json"
CHECKPOINT_WEIGHTS = "model.safetensors"


# --------------------------------------------------------------------------- new modules


class InputAdapter(nn.Module):
    """DL4J's input preprocessors: grey -> RGB, resize to the model's size, normalise.

    The data pipeline then only scales pixels to [0, 1] at `input.size`; the
    model does the rest, so a checkpoint takes the raw images it was trained on.
    """

    def __init__(self, channels: int, size: int, mean, std, interpolation: str):
        super().__init__()
        self.channels = channels
        self.size = size
        self.mode = "bicubic" if interpolation == "bicubic" else "bilinear"
        # Not persistent: constants of the model's preprocessing, not weights.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        # The feature cache's key hashes module reprs: every setting must show here.
        return (f"channels={self.channels}, size={self.size}, mode={self.mode}, "
                f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}")

    def forward(self, x):
        if self.channels == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, align_corners=False, antialias=True)
        return (x - self.mean) / self.std


class Concat(nn.Module):
    """DL4J's MergeVertex: concatenate along channels/features."""

    def forward(self, *xs):
        return torch.cat(xs, dim=1)


class Sum(nn.Module):
    """DL4J's ElementWiseVertex(Add)."""

    def forward(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


_ACTIVATIONS = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "softmax": lambda: nn.Softmax(dim=1), "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "identity": nn.Identity,
}

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


# --------------------------------------------------------------------------- the built model


@dataclass
class Built:
    """The model after surgery, before any stage's freeze."""

    graph: ModelGraph
    preprocess: Preprocess  # what the data pipeline does; an InputAdapter in the model may do more
    head_layer: Optional[str]
    num_classes: int
    source_classes: Optional[list[str]]
    added: set[str] = field(default_factory=set)  # modules the recipe added or re-initialised
    layer_lr: dict[str, float] = field(default_factory=dict)  # from `add: {lr: ...}`

    @property
    def model(self) -> fx.GraphModule:
        return self.graph.module


@dataclass
class Prepared(Built):
    """The built model and one stage's split into frozen and trainable parts."""

    split: Split = None  # type: ignore[assignment]

    def extractor(self) -> fx.GraphModule:
        return frozen_extractor(self.split)

    def trainable(self) -> fx.GraphModule:
        return trainable_part(self.split)

    def transfer_model(self) -> TransferModel:
        return TransferModel(self.model, self.split.frozen_module_names(), self.split.frozen_attr_names())

    def for_freeze(self, recipe: Recipe, freeze: FreezeSpec, loc: tuple = ()) -> "Prepared":
        """The same model (shared modules) under another stage's freeze."""
        return replace(self, split=resolve_split(recipe, self.graph, freeze, loc))


# --------------------------------------------------------------------------- building


def build_model(recipe: Recipe, weights: bool = True):
    """The zoo model with its pretrained weights (or none, when only the
    architecture is needed: a checkpoint supplies every tensor)."""
    # Random inits (weights: none, tl zoo) must be reproducible from the recipe's seed.
    torch.manual_seed(recipe.fine_tune.seed)
    base = recipe.base
    names = model_names(base.zoo)
    if base.model not in names:
        raise RecipeError([recipe.problem(
            ("base", "model"), f"unknown {base.zoo} model '{base.model}'{did_you_mean(base.model, names)}"
        )])
    try:
        return build_base(base, load_weights=weights)
    except WeightsError as err:
        raise RecipeError([recipe.problem(("base", "weights"), str(err))]) from None


def read_run(run_dir: Path) -> tuple[Recipe, dict]:
    """A finished run's resolved recipe and checkpoint metadata."""
    meta_path = run_dir / CHECKPOINT_META
    if not meta_path.is_file():
        raise RunError(f"{run_dir}: no finished run here ({CHECKPOINT_META} is missing); run `tl fit` first")
    return load_recipe(run_dir / "recipe.yaml"), json.loads(meta_path.read_text())


def build(recipe: Recipe, class_names: list[str], weights: bool = True, collect: Optional[list] = None) -> Built:
    """The base model, traced, with the recipe's surgery and head applied.

    Problems in the surgery or head raise, or with `collect`, are appended to
    it so that the caller can add its own before raising them all."""
    if recipe.base.checkpoint is not None:
        run_dir = Path(recipe.base.checkpoint).expanduser()
        try:
            base_recipe, meta = read_run(run_dir)
        except RunError as err:
            raise RecipeError([recipe.problem(("base", "checkpoint"), str(err))]) from None
        parent = build(base_recipe, meta["class_names"], weights=False)
        if weights:
            from safetensors.torch import load_file

            parent.model.load_state_dict(load_file(str(run_dir / CHECKPOINT_WEIGHTS)), strict=True)
        graph, preprocess = parent.graph, parent.preprocess
        source_classes = meta["class_names"]
        continuing = source_classes == list(class_names)
    else:
        base = build_model(recipe, weights)
        graph = ModelGraph.trace(base.model, recipe.base.zoo)
        preprocess, source_classes, continuing = base.preprocess, base.source_classes, False
    built = Built(graph, preprocess, None, len(class_names), source_classes)
    if recipe.input is not None:
        _add_input_adapter(built, recipe)
    problems = Surgeon(recipe, built).run()
    if not problems:
        try:
            _apply_head(recipe, built, keep_trained=continuing)
        except RecipeError as err:
            problems = err.problems
    if problems and collect is None:
        raise RecipeError(problems)
    if collect is not None:
        collect.extend(problems)
    return built


def prepare(recipe: Recipe, class_names: list[str], stage: Optional[Stage] = None, weights: bool = True) -> Prepared:
    """Build the model and split it for a stage (the first one by default).

    Every stage's freeze and every per-layer lr is resolved here, so a bad
    name in any stage fails before featurize or fit does any work.
    """
    problems: list[Problem] = []
    built = build(recipe, class_names, weights, collect=problems)
    stages = recipe.stage_plan()
    splits = {}
    for s in stages:
        try:
            splits[s.index] = resolve_split(recipe, built.graph, s.freeze, _freeze_loc(s))
        except RecipeError as err:
            problems.extend(err.problems)
        problems.extend(_check_layer_lr(recipe, built, s))
    if problems:
        raise RecipeError(_unique(problems))
    stage = stage or stages[0]
    return Prepared(**{f: getattr(built, f) for f in Built.__dataclass_fields__}, split=splits[stage.index])


def _unique(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


def _freeze_loc(stage: Stage) -> tuple:
    # A stage without its own freeze inherits one; point at where it was written.
    return (*stage.loc, "freeze") if stage.loc and stage.freeze is not None else ("freeze",)


def _check_layer_lr(recipe: Recipe, built: Built, stage: Stage) -> list[Problem]:
    modules = [n for n, _ in built.model.named_modules() if n]
    problems = []
    for name in stage.fine_tune.layer_lr:
        if name not in modules:
            loc = (*stage.loc, "fine_tune", "layer_lr", name) if stage.loc else ("fine_tune", "layer_lr", name)
            if stage.loc and name in recipe.fine_tune.layer_lr:
                loc = ("fine_tune", "layer_lr", name)
            problems.append(recipe.problem(loc, f"unknown layer '{name}'{did_you_mean(name, modules)}"))
    return problems


# --------------------------------------------------------------------------- freeze


def resolve_split(recipe: Recipe, graph: ModelGraph, freeze: FreezeSpec, loc: tuple = ("freeze",)) -> Split:
    problems: list[Problem] = []
    boundary: list[fx.Node] = []
    if freeze.all_but_last is not None:
        boundary = _all_but_last(graph, freeze.all_but_last)
    else:
        for i, name in enumerate(freeze.nodes):
            where = (*loc, "until") if isinstance(freeze.until, str) else (*loc, "until", i)
            node = graph.resolve(name)
            if node is None:
                problems.append(recipe.problem(where, f"unknown node '{name}'{graph.suggest(name)} (tl inspect lists them)"))
            else:
                boundary.append(node)
    trainable: list[fx.Node] = []
    for i, name in enumerate(freeze.trainable):
        nodes = graph.nodes_of(name)
        if not nodes:
            problems.append(recipe.problem((*loc, "trainable", i), f"unknown layer '{name}'{graph.suggest(name)}"))
        trainable.extend(nodes)
    if problems:
        raise RecipeError(problems)
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


# --------------------------------------------------------------------------- surgery


def _add_input_adapter(built: Built, recipe: Recipe) -> None:
    spec, pp = recipe.input, built.preprocess
    adapter = InputAdapter(spec.channels, pp.size, pp.mean, pp.std, pp.interpolation)
    gm, g = built.model, built.model.graph
    placeholder = next(n for n in g.nodes if n.op == "placeholder")
    gm.add_submodule("input_adapter", adapter)
    with g.inserting_after(placeholder):
        node = g.call_module("input_adapter", (placeholder,))
    placeholder.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    built.graph.names[node] = "input_adapter"
    built.graph.refresh()
    built.preprocess = Preprocess(spec.size, spec.size, "squash", (0.0,) * spec.channels, (1.0,) * spec.channels,
                                  pp.interpolation, spec.channels)


class Surgeon:
    """Applies `surgery:` in order. Each operation sees the graph the previous ones left."""

    def __init__(self, recipe: Recipe, built: Built):
        self.recipe = recipe
        self.built = built
        self.graph = built.graph

    def run(self) -> list[Problem]:
        """Apply every operation; return the problems of those that failed.

        A failed operation is skipped and the rest still run, so one
        validation reports every bad name (later problems may follow from an
        earlier one)."""
        problems: list[Problem] = []
        for i, op in enumerate(self.recipe.surgery):
            self.index = i
            kind = op.kind
            try:
                getattr(self, f"_{kind}")(getattr(op, kind))
            except RecipeError as err:
                problems.extend(err.problems)
                self.graph.refresh()
        if not problems:
            self._finish()
        return problems

    # -- helpers

    def fail(self, loc: tuple, message: str):
        raise RecipeError([self.recipe.problem(("surgery", self.index, *loc), message)])

    def generator(self, k: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.recipe.fine_tune.seed * 1000 + self.index * 10 + k + 1)

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

    def _n_out_replace(self, spec: NOutReplace) -> None:
        node = self.layer(spec.layer, ("n_out_replace", "layer"))
        old = self.graph.module_of(node)
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
            name = consumer.target
            m = self.graph.module_of(consumer)
            if kind == "norm":
                replacements[name] = type(m)(spec.n_out, eps=m.eps, momentum=m.momentum, affine=m.affine,
                                             track_running_stats=m.track_running_stats)
            elif isinstance(m, nn.Linear):
                # Flatten multiplies the width by the spatial size; that factor is unchanged.
                n_in = m.in_features // old_out * spec.n_out
                nxt = nn.Linear(n_in, m.out_features, bias=m.bias is not None)
                init_layer(nxt, spec.init_next, self.generator(k + 1))
                replacements[name] = nxt
            else:
                nxt = nn.Conv2d(spec.n_out, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                bias=m.bias is not None, padding_mode=m.padding_mode)
                init_layer(nxt, spec.init_next, self.generator(k + 1))
                replacements[name] = nxt
        for name, module in replacements.items():
            self.set_module(name, module)

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
                    reason = "a grouped/depthwise conv ties its width to its input" if isinstance(m, nn.Conv2d) else \
                        f"tl can't carry a width through {what}"
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
        in_shapes = [shapes.get(n) for n in inputs]
        first = in_shapes[0] or ()
        t = spec.type
        if t == "linear":
            if len(first) != 1:
                self.fail(("add", "inputs", 0), f"linear needs a flat input; '{spec.inputs[0]}' has shape {_fmt(first)} "
                          "(add a flatten or pooling first)")
            module = nn.Linear(first[0], spec.n_out or self.built.num_classes, bias=spec.bias)
        elif t == "conv1x1":
            if len(first) != 3:
                self.fail(("add", "inputs", 0), f"conv1x1 needs a C×H×W input; '{spec.inputs[0]}' has shape {_fmt(first)}")
            module = nn.Conv2d(first[0], spec.n_out, 1, bias=spec.bias)
        elif t == "batchnorm":
            if len(first) not in (1, 3):
                self.fail(("add", "inputs", 0), f"batchnorm needs a flat or C×H×W input, got {_fmt(first)}")
            module = (nn.BatchNorm1d if len(first) == 1 else nn.BatchNorm2d)(first[0])
        elif t == "dropout":
            module = nn.Dropout(spec.p)
        elif t == "activation":
            module = _ACTIVATIONS[spec.fn]()
        elif t == "pooling":
            if len(first) != 3:
                self.fail(("add", "inputs", 0), f"pooling needs a C×H×W input, got {_fmt(first)}")
            module = {
                "avg": lambda: nn.AvgPool2d(spec.kernel, spec.stride),
                "max": lambda: nn.MaxPool2d(spec.kernel, spec.stride),
                "adaptive_avg": lambda: nn.AdaptiveAvgPool2d(spec.output_size),
                "adaptive_max": lambda: nn.AdaptiveMaxPool2d(spec.output_size),
            }[spec.pool]()
        elif t == "flatten":
            module = nn.Flatten()
        elif t == "concat":
            ranks = {len(s or ()) for s in in_shapes}
            rest = {(s or ())[1:] for s in in_shapes}
            if len(ranks) != 1 or len(rest) != 1:
                self.fail(("add", "inputs"), "concat needs inputs that differ only in width: got "
                          + ", ".join(_fmt(s) for s in in_shapes))
            module = Concat()
        else:
            if len(set(in_shapes)) != 1:
                self.fail(("add", "inputs"), "add needs inputs of one shape: got " + ", ".join(_fmt(s) for s in in_shapes))
            module = Sum()
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init_layer(module, spec.init, self.generator())
        g = self.graph.module.graph
        order = {n: i for i, n in enumerate(g.nodes)}
        after = max(inputs, key=order.__getitem__)
        self.set_module(spec.name, module)
        with g.inserting_after(after):
            node = g.call_module(spec.name, tuple(inputs))
        self.graph.names[node] = spec.name
        if spec.lr is not None:
            self.built.layer_lr[spec.name] = spec.lr
        if spec.activation is not None:
            act_name = f"{spec.name}_act"
            self.set_module(act_name, _ACTIVATIONS[spec.activation]())
            with g.inserting_after(node):
                act = g.call_module(act_name, (node,))
            self.graph.names[act] = act_name
        self.graph.refresh()

    def _outputs(self, names: list[str]) -> None:
        nodes = [self.node(name, ("outputs", i)) for i, name in enumerate(names)]
        if len(nodes) != 1:
            self.fail(("outputs",), f"tl trains one output; got {len(nodes)}")
        self.set_outputs(nodes)
        self.graph.refresh()

    def _finish(self) -> None:
        if not self.output_values():
            self.index = len(self.recipe.surgery) - 1
            self.fail((), "after surgery the model has no output: add `outputs: [NODE]`")
        gm = self.graph.module
        # Nodes nothing reads any more (a removed head's old branch, an added
        # layer left out of the outputs) are dropped with their modules.
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        self.graph.refresh()
        if self.recipe.surgery:
            try:
                self.shapes()
            except Exception as err:  # shape mismatches surface as any of several torch errors
                self.index = len(self.recipe.surgery) - 1
                self.fail((), f"the edited model does not run: {err}")


def _fmt(shape) -> str:
    return "×".join(str(d) for d in shape) if shape else "(unknown)"


# --------------------------------------------------------------------------- head


def _apply_head(recipe: Recipe, built: Built, keep_trained: bool) -> None:
    """Fit the classifier to the data's classes (DL4J's nOutReplace on the output layer)."""
    head = recipe.head
    if head.layer == "none":
        return
    graph = built.graph
    linears = [n.target for n in graph.module.graph.nodes
               if n.op == "call_module" and isinstance(graph.module_of(n), nn.Linear)]
    if head.layer == "auto":
        if not linears:
            raise RecipeError([recipe.problem(("head", "layer"), "the model has no Linear layer to use as its classifier; "
                                              "name head.layer or use head.layer: none")])
        layer = linears[-1]
    else:
        layer = head.layer
        if layer not in linears:
            raise RecipeError([recipe.problem(("head", "layer"), f"unknown layer '{layer}'{did_you_mean(layer, linears)} (head.layer names a Linear)")])
    built.head_layer = layer
    old = graph.module.get_submodule(layer)
    fits = old.out_features == built.num_classes
    # A layer the recipe just added is already fresh; a continued run on the same
    # classes keeps its trained head.
    if fits and (layer in built.added or keep_trained):
        return
    new = nn.Linear(old.in_features, built.num_classes, bias=old.bias is not None)
    init_layer(new, head.init, torch.Generator().manual_seed(recipe.fine_tune.seed))
    graph.module.add_submodule(layer, new)
    built.added.add(layer)
