"""The `tl` entry point: run one command; every way out gets its exit code and, under --json, its one object."""

from __future__ import annotations

import contextlib
import sys
import traceback
from typing import Optional

import typer

from tlcli.cli.commands import app
from tlcli.cli.output import EXIT_BUG, EXIT_INTERRUPTED, EXIT_OK, Out, error_object, print_json
from tlcli.errors import TLError
from tlcli.text import printable


def _wants_json(argv: list[str]) -> bool:
    words = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in words


def main(argv: Optional[list[str]] = None) -> None:
    """Run one command; every way out has its exit code, and under --json its one object."""
    argv = sys.argv[1:] if argv is None else argv
    errors: list[str] = []
    Out.json_printed = False
    try:
        code = app(args=argv, prog_name="tl", standalone_mode=False)
        code = code if isinstance(code, int) else EXIT_OK
        if code == EXIT_INTERRUPTED:  # Typer turns Ctrl-C inside a command into this exit code
            typer.echo("interrupted", err=True)
            errors = ["interrupted"]
    except typer.TyperException as err:  # click's usage errors: unknown option, missing argument, bad value
        err.show()
        code, errors = err.exit_code, [printable(err.format_message())]
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        code, errors = EXIT_INTERRUPTED, ["interrupted"]
    except Exception as err:  # noqa: BLE001 - anything not a TLError is our bug: show it, with its own code
        traceback.print_exc()
        typer.echo("error: this is a bug in tl; please report it with the traceback above", err=True)
        code, errors = EXIT_BUG, [f"a bug in tl: {type(err).__name__}: {printable(str(err))[:500]}"]
    if _wants_json(argv) and not Out.json_printed and code != EXIT_OK:
        from tlcli.engine.distributed import current

        with contextlib.suppress(TLError):
            if current().main:
                print_json(error_object(code, errors or [f"exited with code {code}"]))
    sys.exit(code)


if __name__ == "__main__":
    main()
