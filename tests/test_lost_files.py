"""Nothing of the user's is lost: tl writes only into directories that carry its marker,
and never replaces a file the user named (`-o`, `recipes cp`) without --force."""

import json
import shutil

import pytest

from tlcli.config.schema import Recipe
from tlcli.engine.train import fit

from conftest import tiny_recipe, write_recipe


def _snapshot(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _lookalike(root, *names):
    """A user's folder holding files with the names tl writes, none written by tl."""
    files = {"checkpoint.json": '{"mine": true}', "model.safetensors": "my weights", "metrics.jsonl": "my metrics\n",
             "eval/results.txt": "precious", "resume/state.json": '{"stage": 0}'}
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(files[name])
    return _snapshot(root)


@pytest.mark.parametrize("names", [
    ("checkpoint.json", "model.safetensors", "metrics.jsonl", "eval/results.txt"),
    ("resume/state.json",),
    ("checkpoint.json",),
], ids=["finished-lookalike", "resume-lookalike", "bare-checkpoint"])
@pytest.mark.parametrize("flags", [(), ("--force",), ("--resume",)], ids=["plain", "force", "resume"])
def test_fit_never_writes_into_a_directory_without_the_marker(tmp_path, cli, names, flags):
    before = _lookalike(tmp_path / "d", *names)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, output_dir=str(tmp_path / "d")))
    code, out = cli("fit", path, *flags)
    assert code == 1 and "not a tl run" in out and "Traceback" not in out, out
    assert "--force" not in out  # --force is never offered for a directory tl does not own
    assert _snapshot(tmp_path / "d") == before


def test_evaluate_refuses_a_directory_without_the_marker(tmp_path, cli):
    before = _lookalike(tmp_path / "d", "checkpoint.json", "model.safetensors", "eval/results.txt")
    code, out = cli("evaluate", tmp_path / "d")
    assert code == 1 and "not a tl run directory" in out
    assert _snapshot(tmp_path / "d") == before


def test_a_marker_that_is_not_tls_does_not_make_a_run(tmp_path, cli):
    before = _lookalike(tmp_path / "d", "checkpoint.json")
    (tmp_path / "d" / "tl-run.json").write_text("my own notes, not JSON")
    before = _snapshot(tmp_path / "d")
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, output_dir=str(tmp_path / "d")))
    code, out = cli("fit", path, "--force")
    assert code == 1 and "not a tl run" in out
    assert _snapshot(tmp_path / "d") == before


def test_a_run_killed_while_writing_its_marker_is_tls_to_start_again(tmp_path, cli):
    """Killed between the marker's part file and its rename (seen as a sweep resumed after a kill),
    a run directory holds tl's lock and `tl-run.json.part` only: fit starts there. One file more
    of anyone else's, and it is a user's folder again."""
    run = tmp_path / "d"
    run.mkdir()
    (run / "tl-run.lock").write_bytes(b"")
    (run / "tl-run.json.part").write_bytes(b'{"tl_ver')
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, output_dir=str(run), fine_tune={"epochs": 1}))
    (run / "notes.txt").write_text("mine")
    before = _snapshot(run)
    code, out = cli("fit", path)
    assert code == 1 and "not a tl run" in out and _snapshot(run) == before
    (run / "notes.txt").unlink()
    code, out = cli("fit", path)
    assert code == 0, out
    assert json.loads((run / "tl-run.json").read_text())["tl_version"] and not (run / "tl-run.json.part").exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lost")
    return fit(Recipe.model_validate(tiny_recipe(tmp, fine_tune={"epochs": 1}))).run_dir


@pytest.mark.parametrize("existing", ["model", "sidecar"])
def test_export_never_replaces_a_named_file_or_its_sidecar_without_force(run_dir, tmp_path, cli, existing):
    target = tmp_path / "user.pt"
    victim = target if existing == "model" else tmp_path / "user.pt.json"
    victim.write_text("precious")
    code, out = cli("export", run_dir, "--format", "torchscript", "-o", target)
    assert code == 1 and f"{victim} already exists; pass --force" in out
    assert victim.read_text() == "precious"
    assert not (target if existing == "sidecar" else tmp_path / "user.pt.json").exists()  # nothing half-written
    code, out = cli("export", run_dir, "--format", "torchscript", "-o", target, "--force")
    assert code == 0, out
    assert victim.read_bytes() != b"precious"
    assert json.loads((tmp_path / "user.pt.json").read_text())["format"] == "torchscript"


def test_predict_never_replaces_a_named_csv_without_force(run_dir, tmp_path, cli):
    from conftest import make_imagefolder

    images = make_imagefolder(tmp_path / "imgs", classes=("0", "1"), per_class=2)
    csv = tmp_path / "preds.csv"
    csv.write_text("precious")
    code, out = cli("predict", run_dir, images, "-o", csv)
    assert code == 1 and f"{csv} already exists; pass --force" in out and csv.read_text() == "precious"
    assert cli("predict", run_dir, images, "-o", csv, "--force")[0] == 0
    assert csv.read_text().startswith("path,")


@pytest.mark.parametrize("verb", ["export", "predict", "recipes"])
def test_an_output_that_is_a_directory_is_one_line(run_dir, tmp_path, cli, verb):
    from conftest import make_imagefolder

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    if verb == "export":
        code, out = cli("export", run_dir, "-o", folder, "--force")
    elif verb == "predict":
        code, out = cli("predict", run_dir, make_imagefolder(tmp_path / "i", classes=("0", "1"), per_class=2),
                        "-o", folder, "--force")
    else:
        (folder / "quickstart.yaml").mkdir()
        code, out = cli("recipes", "cp", "quickstart", folder)
    assert code == 1 and "is a directory; name a file" in out and "Traceback" not in out
    assert (folder / "keep.txt").read_text() == "precious"


def test_recipes_cp_refuses_an_existing_file_unless_forced(tmp_path, cli):
    dest = tmp_path / "mine.yaml"
    dest.write_text("precious")
    code, out = cli("recipes", "cp", "quickstart", dest)
    assert code == 1 and f"{dest} already exists; pass --force" in out and dest.read_text() == "precious"
    assert cli("recipes", "cp", "quickstart", dest, "--force")[0] == 0
    assert "base:" in dest.read_text()


def test_fit_force_removes_the_old_runs_exports(run_dir, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fine_tune={"epochs": 1}))
    assert cli("export", run, "--format", "torchscript")[0] == 0
    assert (run / "model.pt").is_file() and (run / "model.pt.json").is_file()
    (run / "notes.txt").write_text("mine")
    assert cli("fit", path, "--force")[0] == 0
    # An export of the old weights beside the new ones would be a model nobody trained.
    assert not (run / "model.pt").exists() and not (run / "model.pt.json").exists()
    assert (run / "notes.txt").read_text() == "mine"
