"""The command line: the only part of tl that prints errors or exits. Imports no torch."""

from tlcli.cli.main import main
from tlcli.cli.commands import app
from tlcli.cli.output import EXIT_BELOW_MIN, EXIT_BUG, EXIT_CODES, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

__all__ = ["main", "app", "EXIT_CODES", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_BELOW_MIN", "EXIT_BUG",
           "EXIT_INTERRUPTED"]
