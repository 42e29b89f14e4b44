"""The network: the traced model after surgery and head, and each stage's split of it into frozen and trainable parts.

One object, built once per command (`model.build`): the surgery edits it, the
head is fitted to it, and every stage's freeze is resolved against it. A
view under one stage's split gives the frozen extractor (what featurize
runs), the trainable part (what a cache stage trains) and the full model
with its frozen modules pinned to eval (what image stages, evaluate, predict
and export run). All views share the same modules and parameters.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Optional

from torch import fx

from tlcli.config.schema import FreezeSpec
from tlcli.model.freeze import resolve_split
from tlcli.model.graph import ModelGraph, PinnedNet, Split, frozen_extractor, trainable_part
from tlcli.model.preprocess import Preprocess
from tlcli.model.weights import hash_tensors


@dataclass
class Network:
    graph: ModelGraph
    preprocess: Preprocess  # what the data pipeline does; an InputAdapter in the model may do more
    head_layer: Optional[str]
    num_classes: int
    source_classes: Optional[list[str]]
    model_id: str  # the base model, as the cache key and checkpoint name it
    added: set[str] = field(default_factory=set)  # modules the recipe added or re-initialised
    layer_lr: dict[str, float] = field(default_factory=dict)  # from `add: {lr: ...}`
    stages: list = field(default_factory=list)  # the recipe's planned stages (config.stages.Stage)
    splits: dict[int, Split] = field(default_factory=dict)  # each stage's, by stage index
    split: Optional[Split] = None  # the split this view is under

    @property
    def model(self) -> fx.GraphModule:
        return self.graph.module

    def for_stage(self, stage) -> "Network":
        """The same network (shared modules) under a stage's split, resolved when it was built."""
        return replace(self, split=self.splits[stage.index])

    def with_freeze(self, freeze: FreezeSpec) -> "Network":
        """The same network under any freeze (inspection, tests); problems raise `SpecError`."""
        return replace(self, split=resolve_split(self.graph, freeze))

    def extractor(self) -> fx.GraphModule:
        return frozen_extractor(self.split)

    def frozen_identity(self, extractor: fx.GraphModule) -> dict:
        """Everything about the frozen part (`extractor`, this view's) that determines what it
        computes: the model, the frontier, the frozen graph's code and module configs, the bytes
        of the frozen weights, the preprocessing. A cache keyed on these is never stale."""
        frozen_names = set(self.split.frozen_state_names(self.model))
        frozen_state = {k: v for k, v in self.model.state_dict().items() if k in frozen_names}
        modules = "\n".join(f"{n}: {self.model.get_submodule(n)!r}" for n in self.split.frozen_module_names())
        return {
            "model": self.model_id,
            "frontier": self.split.frontier_names,
            # The frozen graph's code and module configs pin the architecture up to the cut.
            "architecture": hashlib.blake2b((extractor.code + modules).encode(), digest_size=16).hexdigest(),
            "weights": hash_tensors(frozen_state),
            "preprocess": self.preprocess.to_dict(),
        }

    def trainable(self) -> fx.GraphModule:
        return trainable_part(self.split)

    def pinned(self) -> PinnedNet:
        return PinnedNet(self.model, self.split.frozen_module_names(), self.split.frozen_attr_names())
