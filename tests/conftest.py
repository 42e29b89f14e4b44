"""Shared helpers: small recipes written to tmp dirs, and the CLI run in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(tmp_path: Path, **sections) -> dict:
    """tiny_resnet on a small stratified sample of digits, everything in tmp."""
    recipe = {
        "base": {"zoo": "tl", "model": "tiny_resnet", "weights": "none"},
        "data": {"dataset": "digits", "limit": 200, "split": {"val": 0.1, "test": 0.2, "seed": 0}, "batch_size": 32},
        "freeze": {"until": "block.1"},
        "head": {"init": "xavier"},
        "fine_tune": {"optimizer": "adam", "lr": 0.01, "epochs": 3, "batch_size": 32, "seed": 0},
        "cache": {"dir": str(tmp_path / "cache")},
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        # Pinned: the tests' output and arithmetic are the same on a CPU with bf16 units and one
        # without (auto, and its hint, are tested with the CPU's flags injected).
        "precision": "fp32",
    }
    for section, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(section), dict):
            recipe[section] = {**recipe[section], **value}
        elif value is None:
            recipe.pop(section, None)
        else:
            recipe[section] = value
    return recipe


def write_recipe(path: Path, recipe: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def invoke(*args, cwd: Path | None = None):
    """`tl ARGS` in-process (the one test wrapper of click's runner), from `cwd` when given:
    the result, with its exit code and its output (stdout and stderr, together and apart).
    An exception that is not an exit is our bug: it is raised, with its traceback."""
    from tlcli.cli import app

    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)
    finally:
        os.chdir(old)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture
def cli():
    """Run `tl ARGS...` in-process; returns (exit_code, output)."""

    def run(*args: str):
        result = invoke(*args)
        return result.exit_code, result.output

    return run


def inspect_rows(output: str) -> dict[str, list[str]]:
    """`tl inspect`'s table as printed without a terminal: node name -> its cells (index, name,
    op, output, params, then the state words)."""
    rows = [line.split() for line in output.splitlines() if line[:1].isdigit() and len(line.split()) >= 6]
    return {cells[1]: cells for cells in rows}


def run_tl(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`tl` as a real subprocess, for what only a process shows (exit codes, tracebacks, kills)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tlcli", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def make_imagefolder(root: Path, classes=("a", "b", "c"), per_class: int = 12, split_dirs=None) -> Path:
    """Real images (scikit-learn digits, upscaled) saved as PNGs, one folder per class."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    groups = split_dirs or [None]
    for g, group in enumerate(groups):
        for c, name in enumerate(classes):
            folder = root / group / name if group else root / name
            folder.mkdir(parents=True, exist_ok=True)
            picks = np.flatnonzero(digits.target == c)[g * per_class : (g + 1) * per_class]
            for i in picks:
                img = (255 - digits.images[i] * 255 / 16).astype("uint8")
                Image.fromarray(img).resize((24, 24)).convert("RGB").save(folder / f"{i}.png")
    return root


class LocalServer:
    """An HTTP server on 127.0.0.1 serving one directory; never the internet."""

    def __init__(self, directory: Path, handler=None):
        """`handler`: a request handler class of the test's own (default: serve files)."""
        import functools
        import http.server
        import threading

        if handler is None:
            handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
            handler.log_message = lambda *a: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def offline(monkeypatch):
    """Make every download fail fast: proxies point at a closed loopback port."""
    import urllib.request

    # urlopen builds its global opener, proxies included, on first use and keeps it:
    # start from none and restore afterwards, so the fake proxy cannot outlive the test.
    monkeypatch.setattr(urllib.request, "_opener", None)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
