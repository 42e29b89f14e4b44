"""The Keras blog's experiment at full size on CPU: a small CNN trained on
digits 0-4, all but its last two layers frozen, fine-tuned on digits 5-9;
against the same CNN trained on 5-9 from scratch for the same epochs.

    .venv/bin/python benchmarks/keras_blog.py      (make keras-blog)

Prints the test accuracy on digits 5-9 of both, with fit times.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tlcli.engine.evaluate import evaluate  # noqa: E402
from tlcli.config.schema import load_recipe  # noqa: E402
from tlcli.engine.train import fit  # noqa: E402


def run(name: str) -> tuple[dict, float]:
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    started = time.perf_counter()
    result = fit(recipe, force=True)
    seconds = time.perf_counter() - started
    return evaluate(result.run_dir).metrics, seconds


def main() -> None:
    rows = []
    for name, what in (
        ("keras-blog-digits-0to4", "pretrain on 0-4 (scratch)"),
        ("keras-blog-digits", "fine-tune on 5-9 (conv frozen)"),
        ("keras-blog-digits-scratch", "5-9 from scratch"),
    ):
        metrics, seconds = run(name)
        rows.append((what, metrics["accuracy"], metrics["n"], seconds))
    print(f"{'run':34} {'test acc':>9} {'n':>5} {'fit s':>7}")
    for what, acc, n, seconds in rows:
        print(f"{what:34} {acc:9.4f} {n:5d} {seconds:7.1f}")


if __name__ == "__main__":
    main()
