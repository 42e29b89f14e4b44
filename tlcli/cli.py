"""The `tl` command line. Thin: parse, call one engine function, print.

This is the only module that prints errors or exits. Engine modules (and
torch) are imported inside the commands so that `tl --help` stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tlcli import __version__
from tlcli.errors import TLError

app = typer.Typer(
    help="Transfer learning from YAML recipes: freeze a zoo model, featurize once, fit the head, evaluate.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RecipeArg = Annotated[Path, typer.Argument(help="Path to the recipe YAML file.", show_default=False)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
) -> None:
    pass


def _fail(err: TLError) -> None:
    for line in str(err).splitlines():
        typer.echo(f"error: {line}" if not line.startswith(("error", " ")) else line, err=True)
    raise typer.Exit(code=1) from None


# A disk that is full, read-only or not ours is the user's to fix, not a bug in tl.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@contextlib.contextmanager
def _user_errors():
    """The one place that turns the engine's errors into lines and an exit code."""
    try:
        yield
    except TLError as err:
        _fail(err)
    except OSError as err:
        if err.errno not in _DISK_ERRNOS:
            raise  # anything else is our bug: keep the traceback
        _fail(TLError(f"{err.filename or 'a file'}: {err.strerror}"))


def _reporter():
    from tlcli.progress import RichReporter

    return RichReporter()


@app.command()
def validate(recipe: RecipeArg) -> None:
    """Check a recipe: its schema, then every layer name against the model's graph."""
    with _user_errors():
        from tlcli.inspect import validate_recipe

        validate_recipe(recipe)
    typer.echo(f"{recipe}: ok")


@app.command()
def inspect(
    recipe: RecipeArg,
    stage: Annotated[Optional[int], typer.Option(help="Show this stage's freeze (1-based; default the first).")] = None,
) -> None:
    """The model after surgery, node by node: op, output shape, parameters, frozen or trainable, the frontier."""
    with _user_errors():
        from tlcli.inspect import inspect_recipe

        rows, summary = inspect_recipe(recipe, stage)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=summary["title"])
    for column in ("#", "node", "op", "output", "params", "state"):
        table.add_column(column, justify="right" if column in ("#", "params") else "left", no_wrap=column == "node")
    for r in rows:
        state = "[blue]frozen[/]" if r["frozen"] else "[green]trainable[/]"
        if r["frontier"]:
            state += " [bold yellow]◀ frontier[/]"
        if r["added"]:
            state += " [magenta]new[/]"
        table.add_row(str(r["index"]), r["name"], r["op"], r["shape"], f"{r['params']:,}", state)
    # Node names are what users copy into recipes: never truncate them, even in CI logs.
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(table)
    console.print(
        f"frozen parameters: {summary['frozen_params']:,}   trainable: {summary['trainable_params']:,}   "
        f"frontier: {', '.join(summary['frontier']) or '(input)'}"
    )


@app.command()
def featurize(
    recipe: RecipeArg,
    force: Annotated[bool, typer.Option("--force", help="Rebuild the cache even when a complete one exists.")] = False,
) -> None:
    """Run the frozen part once per split and cache its activations on disk."""
    with _user_errors():
        from tlcli.features import featurize_recipe
        from tlcli.recipe import load_recipe

        caches = featurize_recipe(load_recipe(recipe), _reporter(), force=force)
    if not caches:
        typer.echo("no stage trains from the feature cache (every stage trains on images); nothing to do")
    for cache in caches:
        counts = ", ".join(f"{s} {cache.count(s)}" for s in cache.manifest["splits"])
        typer.echo(f"cache {cache.key}: {counts} -> {cache.path}")


@app.command()
def fit(
    recipe: RecipeArg,
    force: Annotated[bool, typer.Option("--force", help="Start over, overwriting a finished or interrupted run.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last epoch.")] = False,
) -> None:
    """Train the recipe's stages: on the feature cache (featurizing first if needed) or on raw images."""
    if force and resume:
        typer.echo("error: --force starts over and --resume continues; give one", err=True)
        raise typer.Exit(code=2)
    with _user_errors():
        from tlcli.recipe import load_recipe
        from tlcli.train import fit as run_fit

        result = run_fit(load_recipe(recipe), _reporter(), force=force, resume=resume)
    if result.skipped:
        typer.echo(f"warning: skipped {len(result.skipped)} unreadable image(s) (data.on_bad_image: skip); "
                   f"listed in {result.run_dir}/checkpoint.json", err=True)
    final = result.final
    val = f", val_acc {final['val_acc']:.4f}" if "val_acc" in final else ""
    for s in result.stages if len(result.stages) > 1 else []:
        best = f", best epoch {s.best_epoch}" if s.best_epoch else ""
        typer.echo(f"  {s.name}: {s.epochs_run} epochs on {s.input}, {s.trainable_params:,} trainable parameters{best}")
    typer.echo(
        f"fit {result.epochs} epochs in {result.seconds:.1f}s: train_loss {final['train_loss']:.4f}{val} -> {result.run_dir}"
    )


@app.command()
def evaluate(
    target: Annotated[Path, typer.Argument(help="A recipe file or a run directory.", show_default=False)],
    device: Annotated[Optional[str], typer.Option(help="Override the recipe's device (auto, cpu, cuda).")] = None,
) -> None:
    """Score the full model on the raw test images: accuracy, top-5, per-class P/R/F1, confusion matrix."""
    with _user_errors():
        from tlcli.evaluate import evaluate as run_evaluate

        result = run_evaluate(target, _reporter(), device)
    m = result.metrics
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    if result.source == "cache":
        typer.echo("scored from the feature cache's test split (same features as the raw images, computed once)", err=True)
    topk = next(k for k in m if k.startswith("top"))
    typer.echo(f"{'class':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for name, c in m["per_class"].items():
        typer.echo(f"{name:>12} {c['precision']:9.4f} {c['recall']:9.4f} {c['f1']:9.4f} {c['support']:8d}")
    typer.echo(f"test accuracy {m['accuracy']:.4f}  {topk} {m[topk]:.4f}  macro-F1 {m['macro_f1']:.4f}  (n={m['n']})")
    from tlcli.rundir import EVAL, EVAL_CONFUSION, EVAL_CONFUSION_PLOT, EVAL_METRICS

    typer.echo(f"wrote {result.run_dir / EVAL}/{EVAL_METRICS}, {EVAL_CONFUSION}, {EVAL_CONFUSION_PLOT}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
