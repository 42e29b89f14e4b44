"""Source locations: where in the recipe file (or on the command line) a dotted path was written. Imports no torch."""

from __future__ import annotations

from typing import Optional

import yaml

from tlcli.errors import Problem


class RecipeSource:
    """The recipe file and its YAML node tree, to turn a dotted path into a line."""

    def __init__(self, name: str, root: Optional[yaml.Node], overrides: Optional[dict[tuple, str]] = None):
        self.name = name
        self.root = root
        # Paths set on the command line (KEY=VALUE): their problems name the override, not a line.
        self.overrides = overrides or {}
        self._override_keys = {tuple(str(p) for p in path): key for path, key in self.overrides.items()}

    def line_of(self, loc: tuple) -> Optional[int]:
        node = self.root
        line = node.start_mark.line + 1 if node is not None else None
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if key.value == str(part):
                        line, node = key.start_mark.line + 1, value
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line

    def problem(self, loc: tuple, message: str) -> Problem:
        dotted = ".".join(str(p) for p in loc)
        # The most specific override that set this path or a section above it; a dict
        # lookup per prefix, so that thousands of overrides stay linear.
        parts = tuple(str(p) for p in loc)
        for n in range(len(parts), 0, -1):
            key = self._override_keys.get(parts[:n])
            if key is not None:
                return Problem(f"override {key}", None, dotted if len(loc) > n else "", message)
        return Problem(self.name, self.line_of(loc), dotted, message)
