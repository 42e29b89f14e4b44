"""`python -m tlcli`: the same entry point as the `tl` script (torchrun launches it this way)."""

from tlcli.cli import main

main()
