"""The Python API: what the commands do (load, validate, featurize, fit, evaluate, predict, export), for a notebook.

    from tlcli import api

    recipe = api.load("recipes/quickstart.yaml", ["fine_tune.epochs=5"])
    run = api.fit(recipe)                 # -> api.Run
    best = api.sweep(recipe)              # which layers to freeze, measured -> .recommended
    metrics = run.evaluate()              # eval/metrics.json, as a dict
    top = run.predict(["my-digits/"])     # [Prediction(path, top=[(class, probability), ...])]
    run.export("digits.onnx")             # and digits.onnx.json beside it

The CLI is a thin layer over these functions. Nothing is printed unless `progress=True`; a
setting the recipe's choices make tl ignore is a `TLWarning` (Python's warnings). A problem
with the recipe, the data, a run or the disk raises the `TLError` the CLI prints, with the same
`recipe.yaml:LINE: dotted.path: message` lines (a `RecipeError` also has them as `.problems`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

from tlcli.errors import RecipeError, TLError
from tlcli.progress import Reporter

if TYPE_CHECKING:
    from tlcli.config.schema import Recipe
    from tlcli.engine.predict import Prediction
    from tlcli.engine.sweep import SweepResult
    from tlcli.engine.train import FitResult

__all__ = ["Recipe", "RecipeError", "Run", "TLError", "TLWarning", "evaluate", "export", "featurize", "fit", "load",
           "open_run", "predict", "sweep", "validate"]


class TLWarning(UserWarning):
    """A setting tl ignores, or something else worth knowing that does not stop the work."""


class WarningsReporter(Reporter):
    """No progress, no information; warnings as Python warnings (a notebook shows them once)."""

    def warn(self, message: str) -> None:
        warnings.warn(message, TLWarning, stacklevel=3)


def _reporter(progress: bool, reporter: Optional[Reporter]) -> Reporter:
    if reporter is not None:
        return reporter
    if progress:
        import sys

        from tlcli.progress import LineReporter, RichReporter

        return RichReporter() if sys.stderr.isatty() else LineReporter()
    return WarningsReporter()


PathLike = Union[str, Path]


def load(path: PathLike, overrides: Sequence[str] = (), reporter=None) -> "Recipe":
    """A recipe file, with `KEY=VALUE` overrides, checked against the schema (no torch needed).
    Its warnings (settings it ignores) go to `reporter.warn`, Python warnings by default."""
    from tlcli.config.reading import load_recipe
    from tlcli.config.stages import recipe_warnings

    recipe = load_recipe(Path(path), tuple(overrides))
    told = reporter or WarningsReporter()
    for warning in recipe_warnings(recipe):
        told.warn(warning)
    return recipe


def _recipe(recipe: Union["Recipe", PathLike]) -> "Recipe":
    from tlcli.config.schema import Recipe

    return recipe if isinstance(recipe, Recipe) else load(recipe)


def validate(recipe: Union["Recipe", PathLike]) -> None:
    """Every name in the recipe against the model's graph (builds the architecture, no weights)."""
    from tlcli.engine.inspect import validate_recipe

    validate_recipe(_recipe(recipe))


def featurize(recipe: Union["Recipe", PathLike], force: bool = False, progress: bool = False,
              reporter: Optional[Reporter] = None) -> list:
    """The feature cache of every stage that trains from one (built when missing): FeatureCache objects."""
    from tlcli.engine.features import featurize_recipe

    return featurize_recipe(_recipe(recipe), _reporter(progress, reporter), force=force)


def fit(recipe: Union["Recipe", PathLike], force: bool = False, resume: bool = False, progress: bool = False,
        reporter: Optional[Reporter] = None) -> "Run":
    """Train the recipe's stages into its output_dir; the finished run."""
    from tlcli.engine.train import fit as run_fit

    result = run_fit(_recipe(recipe), _reporter(progress, reporter), force=force, resume=resume)
    return Run(result.run_dir, result)


def sweep(recipe: Union["Recipe", PathLike], force: bool = False, resume: bool = False, progress: bool = False,
          reporter: Optional[Reporter] = None) -> "SweepResult":
    """Which boundary to freeze at, measured on val (`tl sweep`): a SweepResult with its rows, the
    choice, and the path of the recommended recipe."""
    from tlcli.engine.sweep import sweep as run_sweep

    return run_sweep(_recipe(recipe), _reporter(progress, reporter), force=force, resume=resume)


def open_run(path: PathLike) -> "Run":
    """A run directory a fit finished (or a recipe, meaning its output_dir)."""
    return Run(Path(path))


@dataclass
class Run:
    """A finished run: its directory, and what the fit that made it reported (None when opened)."""

    path: Path
    fit_result: Optional["FitResult"] = None

    def evaluate(self, data: Optional[PathLike] = None, device: Optional[str] = None, progress: bool = False,
                 reporter: Optional[Reporter] = None) -> dict:
        """Score the run on its test split (eval/), or on another labelled folder (eval/NAME/): the metrics."""
        return evaluate(self.path, data, device, progress, reporter).metrics

    def predict(self, paths: Sequence[PathLike], top_k: int = 5, device: Optional[str] = None,
                progress: bool = False, reporter: Optional[Reporter] = None) -> list["Prediction"]:
        """The top classes for each image file (folders and globs expand to their images)."""
        return predict(self.path, paths, top_k, device, progress, reporter).predictions

    def export(self, path: Optional[PathLike] = None, format: str = "onnx", force: bool = False) -> Path:
        """The model as ONNX or TorchScript, with its sidecar PATH.json; into the run without `path`."""
        return export(self.path, format, path, force).path


def evaluate(target: Optional[PathLike], data: Optional[PathLike] = None, device: Optional[str] = None,
             progress: bool = False, reporter: Optional[Reporter] = None, overrides: Sequence[str] = ()):
    """`tl evaluate`: an EvalResult (metrics, where they were written, warnings)."""
    from tlcli.engine.evaluate import evaluate as run_evaluate

    result = run_evaluate(Path(target) if target is not None else None, _reporter(progress, reporter), device,
                          Path(data) if data is not None else None, tuple(overrides))
    for warning in result.warnings if reporter is None and not progress else ():
        warnings.warn(warning, TLWarning, stacklevel=2)
    return result


def predict(target: Optional[PathLike], paths: Sequence[PathLike], top_k: int = 5, device: Optional[str] = None,
            progress: bool = False, reporter: Optional[Reporter] = None, overrides: Sequence[str] = (),
            csv: Optional[PathLike] = None, force: bool = False):
    """`tl predict`: a PredictResult (predictions, skipped files); `csv` also writes them as a table."""
    from tlcli.engine.predict import predict as run_predict

    return run_predict(Path(target) if target is not None else None, [str(p) for p in paths], top_k,
                       _reporter(progress, reporter), device, tuple(overrides), Path(csv) if csv else None, force)


def export(target: Optional[PathLike], format: str = "onnx", path: Optional[PathLike] = None, force: bool = False):
    """`tl export`: an ExportResult (the model's path, its sidecar's, the format)."""
    from tlcli.engine.export import export as run_export

    return run_export(Path(target) if target is not None else None, format, Path(path) if path else None, force)
