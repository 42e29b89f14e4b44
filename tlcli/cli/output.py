"""What the command line prints, and where: text, warnings, one JSON object, errors as lines and exit codes.

Output contract, for shell scripts and CI: with `--json`, stdout holds one JSON
object and nothing else (human text and progress go to stderr); `--quiet`
keeps only warnings and errors. Exit codes are in `EXIT_CODES`. The engine's
errors become lines here, and nowhere else.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys

import typer

from tlcli.errors import TLError
from tlcli.text import printable

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BELOW_MIN, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 70, 130
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "a problem with the recipe, the data, a run directory or the disk (one line per problem on stderr)",
    EXIT_USAGE: "wrong command-line usage (unknown option, missing argument)",
    EXIT_BELOW_MIN: "tl evaluate --min-accuracy: the run scored below the threshold",
    EXIT_BUG: "a bug in tl: the traceback is printed; please report it",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


def say(line: str, err: bool = False) -> None:
    # A non-UTF-8 file name must not crash the line that reports it.
    typer.echo(printable(line), err=err)


class Out:
    """Where each kind of output goes, under --json and --quiet. Under torchrun, rank 0 speaks
    for the run; the other ranks print only their own tagged lines and errors.

    With --json, exactly one object reaches stdout on every path: the command's result, its
    error, or (from `main`, when the command printed none) the usage error, crash or interrupt."""

    json_printed = False  # per process: `main` prints a fallback object only when nothing was printed

    def __init__(self, as_json: bool = False, quiet: bool = False):
        from tlcli.engine.distributed import Dist, current

        self.as_json, self.quiet = as_json, quiet
        try:
            self.dist = current()
        except TLError:
            self.dist = Dist()  # a malformed torchrun environment is reported by the command itself

    def text(self, line: str = "") -> None:
        if not self.quiet and self.dist.main:
            say(line, err=self.as_json)

    def warn(self, line: str) -> None:
        if self.dist.main:
            say(f"warning: {line}", err=True)

    def result(self, obj: dict) -> None:
        if self.as_json and self.dist.main:
            print_json({"exit_code": EXIT_OK, **obj})

    def reporter(self):
        from tlcli.progress import LineReporter, QuietReporter, RankReporter, RichReporter

        if self.quiet:
            return QuietReporter()
        if not self.dist.main:
            return RankReporter(str(self.dist))
        return RichReporter() if sys.stderr.isatty() else LineReporter()

    def on_rank_0_only(self, verb: str) -> bool:
        """Under torchrun, `verb` runs on rank 0; True (after saying so) on the other ranks."""
        if self.dist.main:
            return False
        typer.echo(f"{self.dist}: {verb} runs on rank 0", err=True)
        return True

    def fail(self, err: TLError, code: int = EXIT_ERROR) -> None:
        lines = [printable(line) for line in str(err).splitlines()]
        for line in lines:
            say(f"error: {line}" if not line.startswith(("error", " ")) else line, err=True)
        if self.as_json and self.dist.main:
            print_json(error_object(code, lines))
        raise typer.Exit(code=code) from None


def print_json(obj: dict) -> None:
    """The one JSON object of this command, on stdout (ASCII: any file name survives it)."""
    if Out.json_printed:
        return  # a second object would break `| jq`; the first one stands
    Out.json_printed = True
    typer.echo(json.dumps(obj, indent=2, default=str))


def error_object(code: int, lines: list[str]) -> dict:
    return {"ok": False, "exit_code": code, "errors": lines}


# A disk that is full, read-only or not ours is the user's to fix, not a bug in tl.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@contextlib.contextmanager
def user_errors(out: Out):
    """The one place that turns the engine's errors into lines and an exit code."""
    try:
        yield
    except TLError as err:
        out.fail(err)
    except OSError as err:
        # The operating system refusing a path (too long, missing parent, a directory where a
        # file goes, a device, a full or read-only disk) is one line naming the path, whatever
        # the errno. An OSError with no path and no disk errno is our bug: keep the traceback.
        if err.filename is None and err.errno not in _DISK_ERRNOS:
            raise
        where = err.filename if err.filename is not None else "a file"
        where = os.fsdecode(where) if isinstance(where, bytes) else str(where)
        also = f" -> {err.filename2}" if getattr(err, "filename2", None) else ""
        out.fail(TLError(f"{where}{also}: {err.strerror or err}"))
    except MemoryError:
        out.fail(TLError("out of memory; lower fine_tune.batch_size or data.batch_size, or the width of added layers"))
