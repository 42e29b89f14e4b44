"""tl: transfer learning from declarative YAML recipes."""

__version__ = "0.1.0"
