"""The `tl` command line. Thin: parse, call one engine function, print.

This is the only module that prints errors or exits. Engine modules (and
torch) are imported inside the commands so that `tl --help` stays fast.
"""

from __future__ import annotations

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


def _reporter():
    from tlcli.progress import RichReporter

    return RichReporter()


@app.command()
def validate(recipe: RecipeArg) -> None:
    """Check a recipe's schema (no model is built)."""
    from tlcli.recipe import load_recipe

    try:
        load_recipe(recipe)
    except TLError as err:
        _fail(err)
    typer.echo(f"{recipe}: ok")


@app.command()
def inspect(recipe: RecipeArg) -> None:
    """List the model's nodes in order: frozen or trainable, parameters, the frontier."""
    try:
        from tlcli.inspect import inspect_recipe

        rows, summary = inspect_recipe(recipe)
    except TLError as err:
        _fail(err)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=summary["title"])
    for column in ("#", "node", "op", "output", "params", "state"):
        table.add_column(column, justify="right" if column in ("#", "params") else "left", no_wrap=column == "node")
    for r in rows:
        state = "[blue]frozen[/]" if r["frozen"] else "[green]trainable[/]"
        if r["frontier"]:
            state += " [bold yellow]◀ frontier[/]"
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
    try:
        from tlcli.data import plan_data
        from tlcli.features import featurize as run_featurize
        from tlcli.recipe import load_recipe
        from tlcli.surgery import prepare
        from tlcli.zoo import resolve_device

        r = load_recipe(recipe)
        plan = plan_data(r)
        prepared = prepare(r, len(plan.class_names))
        cache = run_featurize(r, prepared, plan, resolve_device(r.device), _reporter(), force=force)
    except TLError as err:
        _fail(err)
    counts = ", ".join(f"{s} {cache.count(s)}" for s in cache.manifest["splits"])
    typer.echo(f"cache {cache.key}: {counts} -> {cache.path}")


@app.command()
def fit(
    recipe: RecipeArg,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a finished run in output_dir.")] = False,
) -> None:
    """Train the trainable part (on the feature cache, featurizing first if needed)."""
    try:
        from tlcli.recipe import load_recipe
        from tlcli.train import fit as run_fit

        result = run_fit(load_recipe(recipe), _reporter(), force=force)
    except TLError as err:
        _fail(err)
    final = result.final
    val = f", val_acc {final['val_acc']:.4f}" if "val_acc" in final else ""
    typer.echo(
        f"fit {result.epochs} epochs in {result.seconds:.1f}s: train_loss {final['train_loss']:.4f}{val} -> {result.run_dir}"
    )


@app.command()
def evaluate(
    target: Annotated[Path, typer.Argument(help="A recipe file or a run directory.", show_default=False)],
    device: Annotated[Optional[str], typer.Option(help="Override the recipe's device (auto, cpu, cuda).")] = None,
) -> None:
    """Score the full model on the raw test images: accuracy, top-5, per-class P/R/F1, confusion matrix."""
    try:
        from tlcli.evaluate import evaluate as run_evaluate

        result = run_evaluate(target, _reporter(), device)
    except TLError as err:
        _fail(err)
    m = result.metrics
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    topk = next(k for k in m if k.startswith("top"))
    typer.echo(f"{'class':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for name, c in m["per_class"].items():
        typer.echo(f"{name:>12} {c['precision']:9.4f} {c['recall']:9.4f} {c['f1']:9.4f} {c['support']:8d}")
    typer.echo(f"test accuracy {m['accuracy']:.4f}  {topk} {m[topk]:.4f}  macro-F1 {m['macro_f1']:.4f}  (n={m['n']})")
    typer.echo(f"wrote {result.run_dir / 'eval'}/metrics.json, confusion_matrix.json, confusion_matrix.png")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
