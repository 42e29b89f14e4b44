"""The `tl` commands: each parses its arguments, calls one engine function, and prints what it returns.

Engine modules (and torch) are imported inside the commands so that
`tl --help` stays fast. Errors are turned into lines by `cli.output`.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from tlcli import __version__
from tlcli.cli.output import EXIT_BELOW_MIN, EXIT_OK, EXIT_USAGE, Out, print_json, say, user_errors
from tlcli.errors import TLError
from tlcli.text import printable

app = typer.Typer(
    help="Transfer learning from YAML recipes: freeze a zoo model, featurize once, fit the head, evaluate, predict, export.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: flags shown without a type, examples kept as written
)
recipes_app = typer.Typer(help="The recipes that ship with tl: list them, copy one to start from.",
                          no_args_is_help=False, invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")

# Flags take no value; without a metavar, Typer's help prints "<bool>" beside them as if they did.
FLAG = ""
RecipeArg = Annotated[Path, typer.Argument(help="Path to the recipe YAML file.", show_default=False)]
Overrides = Annotated[Optional[list[str]], typer.Argument(
    help="Recipe overrides KEY=VALUE (VALUE is YAML), e.g. fine_tune.lr=0.01 data.batch_size=32.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", metavar=FLAG, help="Print one JSON object on stdout; human text goes to stderr.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", metavar=FLAG, help="No progress and no summary; warnings and errors only.")]
OverwriteOpt = Annotated[bool, typer.Option("--force", metavar=FLAG, help="Overwrite the file named with -o (and what is written beside it).")]
def _device_option(value: Optional[str]) -> Optional[str]:
    import re

    from tlcli.config.fields import DEVICE_PATTERN

    if value is not None and not re.fullmatch(DEVICE_PATTERN, value):
        raise typer.BadParameter(f"'{value}' is not one of auto, cpu, cuda, cuda:N, mps")
    return value


DeviceOpt = Annotated[Optional[str], typer.Option(callback=_device_option,
                                                  help="Override the recipe's device (auto, cpu, cuda, cuda:N, mps).")]
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


def _example(*lines: str) -> str:
    # "\b" keeps click from re-wrapping the paragraph that follows it.
    return "\b\nExamples:\n" + "\n".join(f"  $ {line}" for line in lines)


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
    Out.json_printed = False  # a new command (tests run many in one process)


@contextlib.contextmanager
def _session():
    from tlcli.engine.distributed import session

    with session():
        yield


def _relaunch_under_torchrun(nproc: int, out: Out) -> None:
    """`tl fit --nproc N`: the same command line, run by torchrun on N local processes."""
    import os

    if out.dist.enabled:
        out.fail(TLError("--nproc: already running under torchrun (WORLD_SIZE is set)"), EXIT_USAGE)
    argv, words = [], iter(sys.argv[1:])
    for word in words:
        if word == "--nproc":
            next(words, None)  # and its value
        elif not word.startswith("--nproc="):
            argv.append(word)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tlcli", *argv]
    os.execv(sys.executable, command)


def _split_args(args: Optional[list[str]]) -> tuple[list[str], tuple[str, ...]]:
    """Positional words, and the KEY=VALUE overrides among them."""
    args = args or []
    return [a for a in args if not _OVERRIDE.match(a)], tuple(a for a in args if _OVERRIDE.match(a))


def _load(recipe: Path, overrides: Optional[list[str]], out: Out):
    from tlcli import api

    return api.load(recipe, _checked_overrides(overrides), reporter=out)  # its warnings through Out.warn


def _checked_overrides(overrides: Optional[list[str]]) -> tuple[str, ...]:
    words, found = _split_args(overrides)
    if words:
        raise TLError(f"override {printable(words[0])}: expected KEY=VALUE (a recipe override such as fine_tune.lr=0.01)")
    return found


@app.command(epilog=_example("tl validate recipes/quickstart.yaml",
                             "tl validate recipes/quickstart.yaml fine_tune.lr=0.01 --print"))
def validate(
    recipe: RecipeArg,
    overrides: Overrides = None,
    show: Annotated[bool, typer.Option("--print", metavar=FLAG, help="Print the resolved recipe, defaults filled in.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check a recipe: its schema first, in a moment and without loading torch; then every layer
    name against the model's graph, which builds the model (a few seconds)."""
    out = Out(as_json)
    with user_errors(out):
        from tlcli.config.reading import dump_recipe
        from tlcli.config.stages import recipe_warnings

        loaded = _load(recipe, overrides, out)
        from tlcli.engine.inspect import validate_recipe  # the graph check is the first that needs torch

        validate_recipe(loaded)
    if as_json:
        out.result({"ok": True, "recipe": str(recipe), "warnings": recipe_warnings(loaded),
                    **({"resolved": loaded.model_dump(mode="json")} if show else {})})
    elif show:
        typer.echo(dump_recipe(loaded), nl=False)
    else:
        say(f"{recipe}: ok")


@app.command(epilog=_example("tl inspect recipes/quickstart.yaml", "tl inspect recipes/digits-two-stage.yaml --stage 2"))
def inspect(
    recipe: RecipeArg,
    overrides: Overrides = None,
    stage: Annotated[Optional[int], typer.Option(help="Show this stage's freeze (1-based; default the first).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The model after surgery, node by node: op, output shape, parameters, frozen or trainable, the frontier."""
    out = Out(as_json)
    with user_errors(out):
        loaded = _load(recipe, overrides, out)  # schema errors answer before torch is loaded
        from tlcli.engine.inspect import inspect_recipe

        rows, summary = inspect_recipe(loaded, stage)
    if as_json:
        out.result({"ok": True, **summary, "nodes": rows})
        return
    if not sys.stdout.isatty():
        # A pipe or a CI log: plain columns, every cell whole (node names are copied into recipes).
        say(summary["title"])
        for line in _columns([("#", "node", "op", "output", "params", "state"), *(
                (r["index"], r["name"], r["op"], r["shape"], f"{r['params']:,}", _state(r)) for r in rows)]):
            say(line)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=summary["title"])
        for column in ("#", "node", "op", "output", "params", "state"):
            table.add_column(column, justify="right" if column in ("#", "params") else "left", no_wrap=column == "node")
        for r in rows:
            table.add_row(str(r["index"]), r["name"], r["op"], r["shape"], f"{r['params']:,}", _state(r, rich=True))
        Console().print(table)
    say(f"frozen parameters: {summary['frozen_params']:,}   trainable: {summary['trainable_params']:,}   "
        f"frontier: {', '.join(summary['frontier']) or '(input)'}")


def _state(r: dict, rich: bool = False) -> str:
    colour = (lambda text, style: f"[{style}]{text}[/]") if rich else (lambda text, style: text)
    state = colour("frozen", "blue") if r["frozen"] else colour("trainable", "green")
    if r["frontier"]:
        state += " " + colour("◀ frontier", "bold yellow")
    if r["added"]:
        state += " " + colour("new", "magenta")
    return state


@app.command(epilog=_example("tl featurize recipes/quickstart.yaml", "tl featurize recipes/quickstart.yaml --json | jq .caches"))
def featurize(
    recipe: RecipeArg,
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option("--force", metavar=FLAG, help="Rebuild the cache even when a complete one exists.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the frozen part once per split and cache its activations on disk."""
    out = Out(as_json, quiet)
    with user_errors(out), _session():
        from tlcli import api

        caches = api.featurize(_load(recipe, overrides, out), force=force, reporter=out.reporter())
    if not caches:
        out.text("no stage trains from the feature cache (every stage trains on images); nothing to do")
    for cache in caches:
        counts = ", ".join(f"{s} {cache.count(s)}" for s in cache.manifest["splits"])
        out.text(f"cache {cache.key}: {counts} -> {cache.path}")
    out.result({"ok": True, "caches": [{"key": c.key, "path": str(c.path),
                                         "rows": {s: c.count(s) for s in c.manifest["splits"]}} for c in caches]})


@app.command(epilog=_example("tl fit recipes/quickstart.yaml",
                             "tl fit recipes/quickstart.yaml fine_tune.epochs=20 output_dir=runs/longer --force",
                             "tl fit recipes/quickstart.yaml --resume",
                             "tl fit recipes/digits-two-stage.yaml --nproc 2",
                             "torchrun --nproc_per_node 8 -m tlcli fit recipe.yaml"))
def fit(
    recipe: RecipeArg,
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option("--force", metavar=FLAG, help="Start over, overwriting a finished or interrupted run.")] = False,
    resume: Annotated[bool, typer.Option("--resume", metavar=FLAG, help="Continue an interrupted run from its last epoch.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Run under torchrun with this many processes on this machine "
                                       "(one per GPU; gloo on the CPU).")] = 1,
    tracking: Annotated[Optional[str], typer.Option("--tracking", help="Also log to these trackers: tensorboard, mlflow, "
                                                    "csv, comma-separated (the override tracking.to=[...]).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train the recipe's stages: on the feature cache (featurizing first if needed) or on raw images."""
    out = Out(as_json, quiet)
    if force and resume:
        out.fail(TLError("--force starts over and --resume continues; give one"), EXIT_USAGE)
    if nproc > 1:
        _relaunch_under_torchrun(nproc, out)
    with user_errors(out), _session():
        from tlcli.run.rundir import remember_last_run
        from tlcli import api

        if tracking is not None:
            overrides = [*(overrides or []), f"tracking.to=[{tracking}]"]
        result = api.fit(_load(recipe, overrides, out), force=force, resume=resume, reporter=out.reporter()).fit_result
    if out.dist.main:
        try:
            remember_last_run(result.run_dir)
        except OSError as err:  # the run is fine; only a bare `tl evaluate` here will not find it
            out.warn(f"could not note the run in {err.filename or '.tl/'} ({err.strerror}); "
                     f"`tl evaluate` needs its directory: tl evaluate {result.run_dir}")
    if result.skipped:
        out.warn(f"skipped {len(result.skipped)} unreadable image(s) (data.on_bad_image: skip); "
                 f"listed in {result.run_dir}/checkpoint.json")
    final = result.final
    val = f", val_acc {final['val_acc']:.4f}" if "val_acc" in final else ""
    for s in result.stages if len(result.stages) > 1 else []:
        best = f", best epoch {s.best_epoch}" if s.best_epoch else ""
        out.text(f"  {s.name}: {s.epochs_run} epochs on {s.input}, {s.trainable_params:,} trainable parameters{best}")
    kept = f" (kept epoch {final['epoch']}, the best on val)" if result.best_kept else ""
    out.text(f"fit {result.epochs} epochs in {result.seconds:.1f}s: train_loss {final['train_loss']:.4f}{val}{kept} "
             f"-> {result.run_dir}")
    out.result({"ok": True, "run_dir": str(result.run_dir), "epochs": result.epochs, "seconds": round(result.seconds, 3),
                "final": final, "cache_key": result.cache_key, "skipped": result.skipped, "precision": result.precision,
                "stages": [s.model_dump() for s in result.stages]})


@app.command(epilog=_example("tl sweep recipes/quickstart.yaml",
                             "tl sweep recipes/quickstart.yaml 'sweep.boundaries=[blocks.4, blocks.5]' sweep.epochs=2",
                             "tl sweep recipes/quickstart.yaml --json | jq .rows",
                             "tl fit runs/quickstart/sweep/recommended.yaml"))
def sweep(
    recipe: RecipeArg,
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option("--force", metavar=FLAG, help="Start over, overwriting a finished or interrupted sweep.")] = False,
    resume: Annotated[bool, typer.Option("--resume", metavar=FLAG, help="Continue an interrupted sweep; finished measurements are kept.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Which layers to freeze, measured: one featurize pass, then a linear probe and an
    unfreeze-from-here (LP-FT) at each candidate boundary, and one multi-depth probe, all scored
    on the val split. Writes OUTPUT_DIR/sweep/: the table, accuracy_vs_depth.png and
    recommended.yaml, which `tl fit` trains from the sweep's caches."""
    out = Out(as_json, quiet)
    if force and resume:
        out.fail(TLError("--force starts over and --resume continues; give one"), EXIT_USAGE)
    with user_errors(out), _session():
        from tlcli import api
        from tlcli.engine.sweep import table

        result = api.sweep(_load(recipe, overrides, out), force=force, resume=resume, reporter=out.reporter())
    out.text(table(result.rows, result.choice))
    c = result.choice
    out.text(f"recommended: {c.kind} at {c.boundary} (val_acc {c.val_acc:.4f}, {c.trainable_params:,} trainable "
             f"parameters) in {result.seconds:.1f}s -> {result.recommended}")
    out.text(f"  train it: tl fit {result.recommended}")
    out.result({"ok": True, **result.as_json()})


@app.command(epilog=_example("tl evaluate", "tl evaluate runs/quickstart --min-accuracy 0.9",
                             "tl evaluate runs/quickstart --data photos/labelled/ --json | jq .accuracy"))
def evaluate(
    args: Annotated[Optional[list[str]], typer.Argument(
        help="A run directory or a recipe (default: the run the last `tl fit` here finished), then KEY=VALUE "
             "overrides for a recipe.", show_default=False, metavar="TARGET KEY=VALUE")] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="Score another image folder (one subfolder per class) instead of the test split.")] = None,
    min_accuracy: Annotated[Optional[float], typer.Option(
        help=f"Exit with code {EXIT_BELOW_MIN} when test accuracy is below this (a CI gate).", min=0.0, max=1.0)] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score the full model on raw images: accuracy, top-5, per-class P/R/F1, confusion matrix, top losses, report."""
    out = Out(as_json, quiet)
    if out.on_rank_0_only("evaluate"):
        return
    words, overrides = _split_args(args)
    if len(words) > 1:
        out.fail(TLError(f"one TARGET, got {len(words)}: {' '.join(words)}"), EXIT_USAGE)
    with user_errors(out):
        from tlcli import api

        result = api.evaluate(words[0] if words else None, data, device, reporter=out.reporter(), overrides=overrides)
    m = result.metrics
    for w in result.warnings:
        out.warn(w)
    if result.source == "cache":
        out.text("scored from the feature cache's test split (same features as the raw images, computed once)")
    out.text(f"{'class':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for name, c in m["per_class"].items():
        out.text(f"{name:>12} {c['precision']:9.4f} {c['recall']:9.4f} {c['f1']:9.4f} {c['support']:8d}")
    out.text(f"test accuracy {m['accuracy']:.4f}  top5 {m['top5']:.4f}  macro-F1 {m['macro_f1']:.4f}  (n={m['n']})")
    out.text(f"wrote {result.out_dir}/: {', '.join(result.written)}")
    passed = min_accuracy is None or m["accuracy"] >= min_accuracy
    below = [] if passed else [f"accuracy {m['accuracy']:.4f} is below --min-accuracy {min_accuracy}"]
    out.result({"ok": passed, "exit_code": EXIT_OK if passed else EXIT_BELOW_MIN, "errors": below,
                "run_dir": str(result.run_dir), "eval_dir": str(result.out_dir),
                **({"min_accuracy": min_accuracy, "passed": passed} if min_accuracy is not None else {}),
                **{k: v for k, v in m.items() if k != "confusion_matrix"}, "confusion_matrix": m["confusion_matrix"]})
    if not passed:
        say(f"error: {below[0]}", err=True)
        raise typer.Exit(code=EXIT_BELOW_MIN)


@app.command(epilog=_example("tl predict runs/quickstart photo.jpg more/ 'shots/*.png'",
                             "tl predict recipes/quickstart.yaml images/ --top-k 3 --json",
                             "tl predict runs/quickstart images/ --output preds.csv"))
def predict(
    target: Annotated[Path, typer.Argument(help="A run directory or a recipe.", show_default=False)],
    paths: Annotated[list[str], typer.Argument(
        help="Image files, folders (searched recursively) or globs; KEY=VALUE overrides a recipe.",
        show_default=False, metavar="PATHS...")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many classes to show per image.")] = 5,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the predictions as CSV here.")] = None,
    force: OverwriteOpt = False,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Each image's top-k classes with probabilities, through the run's own preprocessing."""
    out = Out(as_json, quiet)
    if out.on_rank_0_only("predict"):
        return
    files, overrides = _split_args(paths)
    if not files:
        out.fail(TLError("give at least one image file, folder or glob"), EXIT_USAGE)
    with user_errors(out):
        from tlcli import api

        result = api.predict(target, files, top_k, device, reporter=out.reporter(), overrides=overrides, csv=output,
                             force=force)
    for path in result.skipped:
        out.warn(f"{path}: could not be decoded; skipped (data.on_bad_image: skip)")
    if as_json:
        out.result({"ok": True, **result.to_json()})
    elif not quiet:
        _prediction_table(result)
    if output is not None:
        out.text(f"wrote {output}")


def _prediction_table(result: Any) -> None:
    header = ("image", *(f"#{i}" for i in range(1, result.top_k + 1)))
    rows = [(printable(p.path), *(f"{printable(c)} {prob:.3f}" for c, prob in p.top)) for p in result.predictions]
    if not sys.stdout.isatty():
        for line in _columns([header, *rows]):  # whole paths, whatever their length, in a pipe or a log
            say(line)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=printable(f"predictions of {result.run_dir}"))
    for column in header:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@app.command(epilog=_example("tl export runs/quickstart --format onnx -o quickstart.onnx",
                             "tl export runs/quickstart --format torchscript"))
def export(
    target: Annotated[Optional[Path], typer.Argument(
        help="A run directory or a recipe (default: the run the last `tl fit` here finished).", show_default=False)] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx or torchscript.")] = "onnx",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where to write (default RUN_DIR/model.onnx|.pt).")] = None,
    force: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """A file that runs without tl: uint8 NCHW images at the input size in, class probabilities out; PATH.json beside it."""
    out = Out(as_json)
    if out.on_rank_0_only("export"):
        return
    with user_errors(out):
        from tlcli import api

        result = api.export(target, fmt, output, force)
    out.text(f"wrote {result.path} ({result.format}) and {result.sidecar}")
    out.result({"ok": True, "path": str(result.path), "sidecar": str(result.sidecar), "format": result.format})


@app.command(epilog=_example("tl models", "tl models 'resnet*' --zoo torchvision", "tl models efficientnet --offline",
                             "tl models vit --pretrained --json | jq .count"))
def models(
    pattern: Annotated[Optional[str], typer.Argument(help="A name or glob (e.g. 'resnet*'); a plain word matches inside names.")] = None,
    zoo: Annotated[Optional[list[str]], typer.Option("--zoo", help="Only this zoo (tl, timm, torchvision); repeatable.")] = None,
    offline: Annotated[bool, typer.Option("--offline", metavar=FLAG, help="Only models whose pretrained weights are here already.")] = False,
    pretrained: Annotated[bool, typer.Option("--pretrained", metavar=FLAG, help="Only models with pretrained weights.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """What the zoos offer (tl, timm, torchvision): a header, one row per model and weights, a count."""
    from tlcli.model.catalog import ZOOS, list_models

    out = Out(as_json)
    unknown = [z for z in zoo or () if z not in ZOOS]
    if unknown:
        out.fail(TLError(f"--zoo {unknown[0]}: not one of {', '.join(ZOOS)}"), EXIT_USAGE)
    rows = list_models(pattern, tuple(zoo or ZOOS), offline, pretrained)
    if as_json:
        print_json({"ok": True, "exit_code": EXIT_OK, "count": len(rows), "models": [r.__dict__ for r in rows]})
        return
    header = ("zoo", "model", "offline", "weights (base.weights)")
    table = [header, *((r.zoo, r.model, "offline" if r.offline else "-", r.weights) for r in rows)]
    for line in _columns(table):
        say(line)
    say(f"{len(rows)} model(s); offline: the weights are here (or embedded) and need no download", err=True)


def _columns(rows: list[tuple]) -> list[str]:
    """Rows as text columns as wide as their widest cell: nothing is cut, in a terminal or a pipe."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


@recipes_app.callback()
def recipes_list(ctx: typer.Context) -> None:
    """List the shipped recipes (`tl recipes`), or copy one (`tl recipes cp NAME DEST`)."""
    if ctx.invoked_subcommand is not None:
        return
    from tlcli.config.shipped import shipped_recipes

    for name, summary in shipped_recipes().items():
        typer.echo(f"{name:<34} {summary}")


@recipes_app.command("cp", epilog=_example("tl recipes cp quickstart my-recipe.yaml"))
def recipes_cp(
    name: Annotated[str, typer.Argument(help="A shipped recipe's name (see `tl recipes`).", show_default=False)],
    dest: Annotated[Path, typer.Argument(help="A file or directory to copy it to.", show_default=False)],
    force: Annotated[bool, typer.Option("--force", metavar=FLAG, help="Overwrite DEST if it exists.")] = False,
) -> None:
    """Copy a shipped recipe, to edit and run."""
    out = Out()
    with user_errors(out):
        from tlcli.config.shipped import copy_recipe

        written = copy_recipe(name, dest, force)
    typer.echo(f"wrote {written}")


