"""Nothing silently wrong: what would train, score or resume on something other than what
the user meant is an error, from the recipe, the data, weights, resume states and caches."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tlcli.engine.train import FitHooks, fit

from conftest import make_imagefolder, tiny_recipe, write_recipe


def _error(code, out, *fragments):
    assert code == 1, out
    assert "Traceback" not in out, out
    for fragment in fragments:
        assert fragment in out, out


# --------------------------------------------------------------------------- the recipe


@pytest.mark.parametrize("section,key", [("fine_tune", "lr"), ("fine_tune", "epochs"), ("data", "batch_size"),
                                         ("fine_tune", "weight_decay")])
def test_a_boolean_is_not_a_number(tmp_path, cli, section, key):
    recipe = tiny_recipe(tmp_path, **{section: {key: True}})
    text = yaml.safe_dump(recipe, sort_keys=False)
    path = write_recipe(tmp_path / "r.yaml", text)
    lines = text.splitlines()
    at = lines.index(f"{section}:") + 1
    line = next(i for i, l in enumerate(lines[at:], at + 1) if l.strip().startswith(f"{key}:"))
    code, out = cli("validate", path)
    _error(code, out, f"{path}:{line}: {section}.{key}: true is a boolean; this takes a number")


def test_a_boolean_override_is_not_a_number(tmp_path, cli):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    code, out = cli("validate", path, "fine_tune.lr=true")
    _error(code, out, "override fine_tune.lr: true is a boolean; this takes a number")


@pytest.mark.parametrize("value", ["", ".", "./"])
def test_the_cache_needs_a_directory_of_its_own(tmp_path, cli, value):
    text = yaml.safe_dump(tiny_recipe(tmp_path, cache={"dir": value}), sort_keys=False)
    path = write_recipe(tmp_path / "r.yaml", text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.strip().startswith("dir:"))
    code, out = cli("validate", path)
    _error(code, out, f"{path}:{line}: cache.dir: must name a directory of its own for the cache")


def test_a_tilde_is_the_home_directory_where_tl_writes_and_where_it_records(tmp_path, cli, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(tmp_path, output_dir="~/runs/x", cache={"dir": "~/cache"}, fine_tune={"epochs": 1})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert cli("fit", path)[0] == 0
    assert not (tmp_path / "~").exists()
    saved = yaml.safe_load((home / "runs" / "x" / "recipe.yaml").read_text())
    assert saved["output_dir"] == str(home / "runs" / "x") and saved["cache"]["dir"] == str(home / "cache")
    assert any((home / "cache").glob("*/manifest.json"))


# --------------------------------------------------------------------------- the data


@pytest.mark.parametrize("stage_input", ["cache", "images"])
def test_skipping_every_image_of_a_class_is_an_error_naming_it(tmp_path, cli, stage_input):
    root = make_imagefolder(tmp_path / "data", classes=("a", "b", "c"), per_class=8)
    for f in (root / "b").iterdir():
        f.write_bytes(b"not an image")
    recipe = tiny_recipe(tmp_path, data={"imagefolder": str(root), "on_bad_image": "skip"},
                         fine_tune={"epochs": 1})
    recipe["data"] = {k: v for k, v in recipe["data"].items() if k not in ("dataset", "limit")}
    if stage_input == "images":
        recipe["stages"] = [{"name": "all", "input": "images"}]
    code, out = cli("fit", write_recipe(tmp_path / "r.yaml", recipe))
    _error(code, out, "class 'b' has no readable image in the train split")
    assert not (tmp_path / "run" / "checkpoint.json").exists()


# --------------------------------------------------------------------------- weights


def _weights_file(tmp_path, change):
    from tlcli.model.tiny import TL_MODELS

    model, _ = TL_MODELS["tiny_resnet"]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    change(state)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("change,fragment", [
    (lambda s: s.update({"stem.0.weight": s["stem.0.weight"].to(torch.int64)}), "stem.0.weight is int64, the model's is float32"),
    (lambda s: s["stem.0.weight"].view(-1).__setitem__(0, float("nan")), "stem.0.weight holds NaN or inf"),
    (lambda s: s["fc.bias"].fill_(float("inf")), "fc.bias holds NaN or inf"),
])
def test_weights_no_model_should_load_are_refused(tmp_path, cli, change, fragment):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        tmp_path, base={"weights": {"file": str(_weights_file(tmp_path, change))}}))
    code, out = cli("featurize", path)
    _error(code, out, "refusing these weights", fragment)


# --------------------------------------------------------------------------- resume states


class _StopAt(FitHooks):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, stage, epoch, model):
        if epoch == self.epoch:
            raise KeyboardInterrupt  # as a Ctrl-C would: the epochs before it are saved


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interrupted")
    recipe = tiny_recipe(tmp, fine_tune={"epochs": 6})
    path = write_recipe(tmp / "r.yaml", recipe)
    from tlcli.config.reading import load_recipe

    with pytest.raises(KeyboardInterrupt):
        fit(load_recipe(path), hooks=_StopAt(4))
    state = json.loads((tmp / "run" / "resume" / "state.json").read_text())
    assert state["epoch"] == 3
    return tmp, path


def _tampered_copy(interrupted, tmp_path, change):
    tmp, path = interrupted
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run)
    recipe = yaml.safe_load(path.read_text())
    recipe["output_dir"] = str(run)
    new = write_recipe(tmp_path / "r.yaml", recipe)
    # The saved recipe must match for a resume; rewrite it the way fit saves it.
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    saved["output_dir"] = str(run)
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    change(run)
    return new


def _state(change):
    def apply(run):
        state = json.loads((run / "resume" / "state.json").read_text())
        change(state)
        (run / "resume" / "state.json").write_text(json.dumps(state))
    return apply


@pytest.mark.parametrize("change,fragment", [
    (_state(lambda s: s.update(epoch=1_000_000)), "epoch 1000000 of a stage with 6 epoch(s)"),
    (_state(lambda s: s.update(epoch=-5)), "epoch: Input should be greater than or equal to 0"),
    (_state(lambda s: s.update(stage=-1)), "stage: Input should be greater than or equal to 0"),
    (_state(lambda s: s.update(stage=99)), "stage 99 of a recipe with 1 stage(s)"),
    (_state(lambda s: s.update(rows=-1)), "rows: Input should be greater than or equal to 0"),
    (_state(lambda s: s.update(rows=1)), "rows 1, but the stages so far ran 3 epoch(s)"),
    (_state(lambda s: s.update(best_epoch=5)), "best epoch 5"),
    (_state(lambda s: s["files"].pop("optim")), "lack the model or the optimizer"),
    (lambda run: (run / "metrics.jsonl").unlink(), "metrics.jsonl: missing"),
    (lambda run: (run / "metrics.jsonl").write_text('{"stage": "fit"}\n'), "metrics.jsonl has 1 row(s), the state 3"),
])
def test_a_resume_state_that_lies_is_refused(interrupted, tmp_path, cli, change, fragment):
    path = _tampered_copy(interrupted, tmp_path, change)
    code, out = cli("fit", path, "--resume")
    _error(code, out, fragment)
    assert not (tmp_path / "run" / "checkpoint.json").exists()


def test_an_untampered_copy_resumes(interrupted, tmp_path, cli):
    path = _tampered_copy(interrupted, tmp_path, lambda run: None)
    code, out = cli("fit", path, "--resume")
    assert code == 0, out
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 6


# --------------------------------------------------------------------------- caches


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    from tlcli.engine.features import featurize_recipe
    from tlcli.config.reading import load_recipe

    tmp = tmp_path_factory.mktemp("cache")
    recipe = tiny_recipe(tmp, cache={"shard_size": 32}, data={"batch_size": 32}, fine_tune={"epochs": 2})
    path = write_recipe(tmp / "r.yaml", recipe)
    (cache,) = featurize_recipe(load_recipe(path))
    return tmp, path, cache.path


def _cache_copy(built_cache, tmp_path):
    tmp, path, cache = built_cache
    shutil.copytree(cache.parent, tmp_path / "cache", ignore=shutil.ignore_patterns("locks"))
    recipe = yaml.safe_load(path.read_text())
    recipe["cache"]["dir"] = str(tmp_path / "cache")
    recipe["output_dir"] = str(tmp_path / "run")
    return write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "cache" / cache.name


def _manifest(cache, change):
    manifest = json.loads((cache / "manifest.json").read_text())
    change(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest))


def _rewrite_shard(cache, name, change):
    """A careful forger: the shard changed *and* the manifest's size and digest updated to match."""
    import hashlib

    tensors = load_file(str(cache / name))
    change(tensors)
    save_file(tensors, str(cache / name))
    data = (cache / name).read_bytes()

    def update(manifest):
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                if shard["file"] == name:
                    shard.update(bytes=len(data), digest=hashlib.blake2b(data, digest_size=16).hexdigest())
    _manifest(cache, update)


def _swap(cache, a, b):
    (cache / a).rename(cache / "tmp")
    (cache / b).rename(cache / a)
    (cache / "tmp").rename(cache / b)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data, past the header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper,fragment", [
    (lambda c: _swap(c, "train-00000.safetensors", "train-00001.safetensors"), "not the file the manifest describes"),
    (lambda c: _flip_byte(c / "train-00001.safetensors"), "not the file the manifest describes"),
    (lambda c: (c / "val-00000.safetensors").write_bytes(b"\0" * (c / "val-00000.safetensors").stat().st_size),
     "not the file the manifest describes"),
    (lambda c: _rewrite_shard(c, "train-00000.safetensors", lambda t: t["labels"].fill_(99)),
     "labels are not 32 class indices below 10"),
    (lambda c: _rewrite_shard(c, "train-00000.safetensors", lambda t: t.update(frontier_0=t["frontier_0"][:, :4].contiguous())),
     "frontier_0 does not have 32 rows"),
    (lambda c: _manifest(c, lambda m: m["splits"]["train"].update(
        count=m["splits"]["train"]["count"] - m["splits"]["train"]["shards"].pop()["rows"])),
     "split train holds"),
])
def test_a_cache_that_lies_is_damage_not_data(built_cache, tmp_path, cli, tamper, fragment):
    path, cache = _cache_copy(built_cache, tmp_path)
    tamper(cache)
    code, out = cli("fit", path)
    _error(code, out, "damaged feature cache", fragment, "rebuild it with tl featurize --force")
    assert not (tmp_path / "run" / "checkpoint.json").exists()


@pytest.mark.parametrize("tamper", [
    lambda c: _manifest(c, lambda m: m.update(splits={})),
    # Out of the cache and back into it: a file that is there, at the size the manifest says.
    lambda c: _manifest(c, lambda m: m["splits"]["train"]["shards"][0].update(
        file=f"../{c.name}/{m['splits']['train']['shards'][1]['file']}")),
    lambda c: _manifest(c, lambda m: m.update(key="0" * 24)),
], ids=["empty-splits", "path-outside", "other-key"])
def test_a_manifest_that_does_not_hold_is_never_read_and_the_cache_is_rebuilt(built_cache, tmp_path, cli, tamper):
    path, cache = _cache_copy(built_cache, tmp_path)
    tamper(cache)
    code, out = cli("featurize", path)
    assert code == 0, out
    assert "feature cache written" in out  # rebuilt, not a hit
    manifest = json.loads((cache / "manifest.json").read_text())
    assert all(s["file"].startswith(split) for split, v in manifest["splits"].items() for s in v["shards"])
    assert manifest["splits"]["train"]["count"] > 0


# --------------------------------------------------------------------------- a finished run's overrides


@pytest.mark.parametrize("override", ["data.split.seed=5", "base.input_size=64", "fine_tune.lr=0.5"])
def test_an_override_that_would_change_a_finished_runs_model_or_split_is_refused(tmp_path, cli, override):
    """Evaluate and predict take overrides of how to run (batch, threads, bad images, device) and
    which run (output_dir); one that would score another split or rebuild another model is refused."""
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fine_tune={"epochs": 1}))
    assert cli("fit", path)[0] == 0
    code, out = cli("evaluate", path, override)
    _error(code, out, f"override {override.partition('=')[0]}: differs from the finished run's own")
    assert cli("evaluate", path, "data.batch_size=7", "device=cpu")[0] == 0


def test_the_overrides_a_run_was_fit_with_may_be_repeated_to_use_it(tmp_path, cli, monkeypatch):
    """`tl fit R base.input_size=40 output_dir=X` then `tl evaluate R base.input_size=40 output_dir=X`:
    the same command line, with the verb changed, must work."""
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fine_tune={"epochs": 1}))
    same = ("base.input_size=40", "fine_tune.lr=0.02", "cache.dir=relative-cache", f"output_dir={tmp_path / 'other'}")
    monkeypatch.chdir(tmp_path)  # cache.dir is relative to it here, and saved absolute in the run
    assert cli("fit", path, *same)[0] == 0
    code, out = cli("evaluate", path, *same)
    assert code == 0 and "test accuracy" in out, out
    code, out = cli("evaluate", path, "base.input_size=48", *same[1:])
    _error(code, out, "override base.input_size: differs from the finished run's own")
