"""The run directory and the checkpoint: tl deletes only what it wrote, a damaged run
is one line that names the file, and a checkpoint rebuilds the model it saved."""

import json

import pytest
import torch
import yaml

from tlcli.run.checkpoint import load_checkpoint
from tlcli.errors import RunError
from tlcli.config.schema import Recipe
from tlcli.run.rundir import ResumeState, RunDir
from tlcli.engine.train import FitHooks, fit

from conftest import tiny_recipe, write_recipe


def _foreign_dir(root):
    """A user's folder that happens to have the names tl uses."""
    root.mkdir(parents=True)
    (root / "eval").mkdir()
    (root / "eval" / "results.csv").write_text("precious")
    (root / "resume").mkdir()
    (root / "resume" / "cv.pdf").write_text("precious")
    (root / "recipe.yaml").write_text("# my own notes\n")
    (root / "metrics.jsonl").write_text("precious\n")
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_fit_refuses_a_non_empty_directory_it_did_not_write(tmp_path, cli, force):
    before = _foreign_dir(tmp_path / "mine")
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, output_dir=str(tmp_path / "mine")))
    code, out = cli("fit", path, *(["--force"] if force else []))
    assert code == 1 and "is a non-empty directory that is not a tl run" in out and "Traceback" not in out
    assert {p: p.read_bytes() for p in (tmp_path / "mine").rglob("*") if p.is_file()} == before


def test_fit_refuses_a_file_as_output_dir(tmp_path, cli):
    (tmp_path / "out").write_text("precious")
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, output_dir=str(tmp_path / "out")))
    code, out = cli("fit", path, "--force")
    assert code == 1 and "is a file" in out and (tmp_path / "out").read_text() == "precious"


@pytest.mark.parametrize("value", ["", ".", "./"])
def test_output_dir_must_name_a_directory_of_its_own(tmp_path, cli, value):
    text = yaml.safe_dump(tiny_recipe(tmp_path, output_dir=value), sort_keys=False)
    path = write_recipe(tmp_path / "r.yaml", text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith("output_dir"))
    code, out = cli("validate", path)
    assert code == 1 and f"{path}:{line}: output_dir: must name a directory of its own" in out


def test_output_dir_holding_the_recipe_file_is_refused(tmp_path, cli):
    """A recipe run from its own folder must not replace itself (the folder is empty but for it)."""
    folder = tmp_path / "exp"
    path = write_recipe(folder / "r.yaml", tiny_recipe(tmp_path, output_dir=str(folder)))
    text = path.read_text()
    code, out = cli("fit", path, "--force")
    assert code == 1 and "output_dir:" in out and "holds this recipe file" in out
    assert path.read_text() == text and sorted(p.name for p in folder.iterdir()) == ["r.yaml"]


def test_force_replaces_only_what_tl_wrote(tmp_path, cli):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fine_tune={"epochs": 1}))
    assert cli("fit", path)[0] == 0
    assert cli("evaluate", path)[0] == 0
    run = tmp_path / "run"
    assert (run / "tl-run.json").is_file() and (run / "eval" / "metrics.json").is_file()
    (run / "notes.txt").write_text("mine")
    assert cli("fit", path, "--force")[0] == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "eval").exists()  # the old run's evaluation no longer describes this model


def test_a_failed_recipe_check_leaves_the_old_run_alone(tmp_path, cli):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fine_tune={"epochs": 1}))
    assert cli("fit", path)[0] == 0
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    write_recipe(path, tiny_recipe(tmp_path, freeze={"until": "blok.1"}))
    code, out = cli("fit", path, "--force")
    assert code == 1 and "unknown node 'blok.1'" in out
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def _edit_meta(run, change):
    meta = json.loads((run / "checkpoint.json").read_text())
    change(meta)
    (run / "checkpoint.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    return fit(Recipe.model_validate(tiny_recipe(tmp, fine_tune={"epochs": 1}))).run_dir


class _Outputs(FitHooks):
    """The trained model's outputs on fixed inputs, taken in memory before anything is saved."""

    def __init__(self, inputs):
        self.inputs, self.outputs = inputs, None

    def on_stage_end(self, stage, net):
        was = net.training
        net.eval()
        with torch.no_grad():
            self.outputs = net(self.inputs).clone()
        net.train(was)


@pytest.mark.parametrize("surgery", [False, True], ids=["head", "surgery"])
def test_checkpoint_rebuilds_the_model_that_was_trained(tmp_path, surgery):
    inputs = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    hook = _Outputs(inputs)
    extra = {"surgery": [{"add": {"name": "drop", "type": "dropout", "p": 0.3, "inputs": ["flatten"]}},
                         {"add": {"name": "out", "type": "linear", "inputs": ["drop"]}}, {"outputs": ["out"]}]}
    recipe = tiny_recipe(tmp_path, fine_tune={"epochs": 2}, freeze={"until": "stem"}, **(extra if surgery else {}))
    run = fit(Recipe.model_validate(recipe), hooks=hook).run_dir
    ckpt = load_checkpoint(run)
    with torch.no_grad():
        rebuilt = ckpt.model.eval()(inputs)
    assert hook.outputs is not None
    # Equal up to the kernels' summation order: featurize runs the shared modules channels_last.
    torch.testing.assert_close(rebuilt, hook.outputs, rtol=1e-5, atol=1e-6)
    assert ckpt.class_names == [str(i) for i in range(10)] and ckpt.preprocess.size == 32
    assert not ckpt.model.net.get_submodule("stem.1").training


@pytest.mark.parametrize("damage,fragment", [
    (lambda run: (run / "checkpoint.json").write_text("{not json"), "checkpoint.json: damaged"),
    (lambda run: (run / "checkpoint.json").write_text(json.dumps({"model": "x"})), "checkpoint.json: damaged (head_layer: Field required"),
    (lambda run: (run / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:100]),
     "model.safetensors: damaged or unreadable"),
    (lambda run: _edit_meta(run, lambda m: m["preprocess"].update(std=[0, 0, 0])), "damaged (preprocess.std.0"),
    (lambda run: _edit_meta(run, lambda m: m["preprocess"].pop("mean")), "damaged (preprocess.mean: Field required"),
])
def test_a_damaged_run_is_one_line_naming_the_file(finished_run, tmp_path, damage, fragment, cli):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    damage(run)
    code, out = cli("evaluate", run)  # any exception but the CLI's own exit would fail here with its traceback
    assert code == 1 and fragment in out and len(out.strip().splitlines()) == 1, out


def test_resume_state_cannot_name_files_outside_the_run(tmp_path):
    run = RunDir(tmp_path / "run")
    (run / "resume").mkdir(parents=True)
    state = ResumeState(stage=0, epoch=1, rows=1, files={"model": "../../etc/passwd"})
    (run / "resume" / "state.json").write_text(state.model_dump_json())
    with pytest.raises(RunError, match="points outside resume/"):
        run.read_resume()


def test_a_base_checkpoint_that_names_itself_is_an_error(finished_run, tmp_path, cli):
    import shutil

    run = tmp_path / "loop"
    shutil.copytree(finished_run, run)
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    saved["base"] = {"checkpoint": str(run)}
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    code, out = cli("evaluate", run)
    assert code == 1 and "base checkpoint cycle" in out
