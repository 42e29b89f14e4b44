"""The README's first steps, run as written: `make demo`, then the walk-through's code blocks, in a
copy of the repository's recipes that shares this test run's venv.

It checks what a new user checks: that `make demo` ends with the line the README promises, that
`tl predict` names the right digit for every file the user made, and that the onnxruntime snippet
prints the right class."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [pytest.mark.real, pytest.mark.slow]

README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of `text`: (language, code), in order."""
    return re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A directory laid out as a fresh clone after `make install`: the Makefile, pyproject, the
    recipes, and `.venv` pointing at the venv running these tests."""
    root = tmp_path_factory.mktemp("clone")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, root / name)  # copy2 keeps the times: the install stamp stays newer
    shutil.copytree(REPO / "recipes", root / "recipes")
    venv = Path(sys.executable).parent.parent
    (root / ".venv").symlink_to(venv)
    return root


def run(command: list[str], cwd: Path, timeout: int = 1200) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    done = subprocess.run(command, cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def demo(checkout) -> str:
    venv = checkout / ".venv"
    stamp = venv / ".tl-installed"
    # The install step is what `make test` did already; -o keeps make from redoing it here.
    return run(["make", "demo", f"VENV={venv}", "-o", str(stamp)], checkout)


def test_make_demo_ends_with_the_accuracy_the_readme_promises(demo):
    promised = re.search(r"`make demo` ends with\s+`([^`]+)`", README, flags=re.S).group(1)
    assert promised in demo, f"the README promises {promised!r}; make demo printed:\n{demo[-3000:]}"
    accuracy = float(re.match(r"test accuracy (\d\.\d+)", promised).group(1))
    assert accuracy >= 0.93


@pytest.fixture(scope="module")
def code() -> list[tuple[str, str]]:
    found = blocks(section("Walk-through"))
    assert [language for language, _ in found] == ["bash", "bash", "python"]
    return found


@pytest.fixture(scope="module")
def made(demo, checkout, code) -> list[Path]:
    """The walk-through's first block: the user's own digit files."""
    run(["bash", "-euo", "pipefail", "-c", code[0][1]], checkout)
    files = sorted((checkout / "my-digits").iterdir())
    assert len(files) >= 5 and all(re.fullmatch(r"\d-\d+\.png", p.name) for p in files)
    return files


def test_the_walkthrough_as_written_predicts_the_users_own_digits(made, checkout, code):

    shown = run(["bash", "-euo", "pipefail", "-c", code[1][1]], checkout)  # evaluate, predict, export
    rows = re.findall(r"^\S*?(\d)-(\d+)\.png\s+(\S+) (\d\.\d+)", shown, flags=re.M)
    assert len(rows) == len(made), shown
    wrong = [(f"{truth}-{i}.png", said) for truth, i, said, _ in rows if said != truth]
    assert not wrong, f"tl predict got these of the user's own digits wrong: {wrong}\n{shown}"
    report = checkout / "runs/quickstart/eval/report.html"
    assert report.is_file() and (checkout / "quickstart.onnx").is_file()

    snippet = code[2][1]
    first = re.search(r'my-digits/([^"]+)"', snippet).group(1)
    assert (checkout / "my-digits" / first).is_file(), "the snippet opens a file the walk-through made"
    printed = run([str(checkout / ".venv/bin/python"), "-c", snippet], checkout).strip()
    assert printed == first.split("-")[0], f"the onnxruntime snippet printed {printed!r} for {first}"


def test_the_walkthrough_files_are_written_as_a_user_writes_them(made):
    """White ink on black, uint8 (x * 255 / 16): the rendering tl trains the built-in digits on."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for path in made:
        i = int(path.stem.split("-")[1])
        pixels = np.asarray(Image.open(path))
        assert pixels.dtype == np.uint8 and (pixels == (digits.images[i] * 255 / 16).astype(np.uint8)).all()
