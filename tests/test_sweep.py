"""`tl sweep` on the tiny model: the table, the JSON, the picture, a recommendation that fits from
the sweep's caches, the test split never read, the one pass's bits, resume after a kill, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import invoke, tiny_recipe, write_recipe
from killing import files_appeared, kill_when, seeded, start

KINDS = {"probe", "multi-depth", "unfreeze"}


def sweep_recipe(tmp_path: Path, **sweep) -> Path:
    recipe = tiny_recipe(tmp_path, freeze={"until": "flatten"}, fine_tune={"optimizer": "auto", "epochs": 3},
                         sweep=sweep or None)
    recipe["data"]["split"] = {"val": 0.2, "test": 0.2, "seed": 0}
    return write_recipe(tmp_path / "recipe.yaml", recipe)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep, shared: (recipe path, the --json object, the human output)."""
    tmp = tmp_path_factory.mktemp("sweep")
    path = sweep_recipe(tmp)
    result = invoke("sweep", path, "--json")
    assert result.exit_code == 0, result.output
    return path, json.loads(result.stdout), result.stderr


def test_the_sweep_measures_every_boundary_and_says_so_in_one_json_object(swept):
    path, out, text = swept
    assert out["ok"] and out["boundaries"] == ["stem", "block", "flatten"]
    kinds = {(r["kind"], r["boundary"]) for r in out["rows"]}
    assert {("probe", b) for b in ("stem", "block", "flatten")} <= kinds
    assert {("unfreeze", "stem"), ("unfreeze", "block")} <= kinds
    assert ("multi-depth", "stem+block+flatten") in kinds
    for row in out["rows"]:
        assert 0 <= row["val_acc"] <= 1 and row["trainable_params"] > 0 and row["cache_bytes"] > 0
    # The table is on stderr under --json, with the choice marked; stdout held one object.
    choice = next(r for r in out["rows"] if r["id"] == out["choice"])
    assert any(line.startswith("*") and choice["kind"] in line for line in text.splitlines())
    sweep_dir = Path(out["sweep_dir"])
    assert (sweep_dir / "table.txt").read_text().splitlines()[0].split()[:2] == ["measurement", "boundary"]
    assert (sweep_dir / "accuracy_vs_depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((sweep_dir / "sweep.json").read_text())["choice"] == out["choice"]


def test_one_pass_writes_every_cache_with_every_split_and_the_fits_write_none(swept):
    """The candidates' fits (their head stages read train and val only) find the pass's caches."""
    path, _, _ = swept
    manifests = list((path.parent / "cache").glob("*/manifest.json"))
    assert len(manifests) == 6  # probes at stem, block, flatten; multi-depth; the base at stem and block
    for manifest in manifests:
        assert sorted(json.loads(manifest.read_text())["splits"]) == ["test", "train", "val"], manifest


def test_every_probe_is_cross_validated_and_the_choice_follows_the_rule(swept):
    """The probes fitted as probes (L-BFGS, an L2) carry a cross-validated accuracy; the unfreeze
    rows and the tiny model's own head (dropout, then Linear: adam) none. The JSON's choice is
    `choose` of the JSON's own rows: the rows saved are the rows chosen from."""
    from tlcli.engine.sweep import choose
    from tlcli.run.sweepdir import SweepRow

    _, out, _ = swept
    for row in out["rows"]:
        assert (row["cv_acc"] is None) == (row["kind"] == "unfreeze" or row["l2"] is None), row
    assert sum(row["cv_acc"] is not None for row in out["rows"]) == 3  # at stem, at block, multi-depth
    rows = [SweepRow(**r, recipe_text="") for r in out["rows"]]
    assert out["choice"] == choose(rows, 0.0).id


def _row(cid, val, params, cv=None, kind="probe"):
    from tlcli.run.sweepdir import SweepRow

    return SweepRow(id=cid, kind=kind, boundary=cid, trainable_params=params, cache_bytes=1, val_acc=val, cv_acc=cv,
                    seconds=0, recipe_text="")


def test_ties_within_sweep_tie_go_to_fewer_trainable_parameters():
    from tlcli.engine.sweep import choose

    rows = [_row("a", 0.5, 100, cv=0.90), _row("b", 0.5, 5000, cv=0.92), _row("c", 0.5, 200, cv=0.915)]
    assert choose(rows, 0.0).id == "b"
    assert choose(rows, 0.01).id == "c"
    assert choose(rows, 0.05).id == "a"
    # Without a cross-validated score (rows not in memory), a probe is scored on val.
    rows = [_row("a", 0.90, 100), _row("b", 0.92, 5000), _row("c", 0.915, 200)]
    assert [choose(rows, t).id for t in (0.0, 0.01, 0.05)] == ["b", "c", "a"]


def test_a_probe_lucky_on_val_loses_to_the_one_that_cross_validates_better():
    from tlcli.engine.sweep import choose

    rows = [_row("default", 0.95, 900, cv=0.94), _row("lucky", 0.99, 100, cv=0.92), _row("steady", 0.96, 300, cv=0.97)]
    assert choose(rows, 0.0).id == "steady"


def test_an_unfreeze_wins_only_by_beating_the_chosen_probe_on_the_same_val_images():
    from tlcli.engine.sweep import choose

    probes = [_row("lucky", 0.99, 100, cv=0.92), _row("steady", 0.95, 300, cv=0.97)]
    ahead = _row("unfreeze-a", 0.97, 10**6, kind="unfreeze")
    # 0.97 on val is below the lucky probe's val, but that probe was not chosen: the steady one's is the bar.
    assert choose([*probes, ahead], 0.0).id == "unfreeze-a"
    assert choose([*probes, ahead], 0.03).id == "steady"  # not better by more than the tie
    assert choose([*probes, _row("unfreeze-b", 0.95, 10**6, kind="unfreeze")], 0.0).id == "steady"  # equal is not better
    both = [*probes, ahead, _row("unfreeze-c", 0.975, 2 * 10**6, kind="unfreeze")]
    assert choose(both, 0.0).id == "unfreeze-c"
    assert choose(both, 0.01).id == "unfreeze-a"  # within the tie of the best unfreeze: fewer parameters


def test_the_recommended_recipe_validates_and_fits_from_the_sweeps_caches(swept):
    _, out, _ = swept
    recommended = Path(out["recommended"])
    assert invoke("validate", recommended).exit_code == 0
    fitted = invoke("fit", recommended, "--json")
    assert fitted.exit_code == 0, fitted.output
    assert "feature cache hit" in fitted.stderr and "feature cache written" not in fitted.stderr
    choice = next(r for r in out["rows"] if r["id"] == out["choice"])
    # The same recipe, the same caches, the same seed: the sweep's measurement, reproduced.
    assert json.loads(fitted.stdout)["final"]["val_acc"] == choice["val_acc"]
    assert json.loads(fitted.stdout)["run_dir"] == str(Path(out["sweep_dir"]).parent / "recommended")


def test_an_unfreeze_recommendation_is_two_stages_that_fit_from_the_caches(swept):
    """Every candidate's recipe is one a user could run: the LP-FT ones fit without featurizing."""
    _, out, _ = swept
    candidate = Path(out["sweep_dir"]) / "candidates" / "unfreeze-stem.yaml"
    recipe = yaml.safe_load(candidate.read_text())
    assert [s["name"] for s in recipe["stages"]] == ["head", "unfreeze"]
    assert recipe["stages"][1]["freeze"] == {"until": "stem"} and recipe["stages"][1]["input"] == "cache"
    recipe["output_dir"] = str(candidate.parent / "again")
    fitted = invoke("fit", write_recipe(candidate.parent / "again.yaml", recipe), "--json")
    assert fitted.exit_code == 0, fitted.output
    assert "feature cache written" not in fitted.stderr
    row = next(r for r in out["rows"] if r["id"] == "unfreeze-stem")
    assert json.loads(fitted.stdout)["final"]["val_acc"] == row["val_acc"]


def test_the_one_pass_writes_the_bits_tl_featurize_writes(swept, tmp_path):
    """The sweep's union extractor against each candidate's own, through `tl featurize`."""
    _, out, _ = swept
    candidates = Path(out["sweep_dir"]) / "candidates"
    for name in ("probe-block", "multi-depth", "unfreeze-block"):
        recipe = yaml.safe_load((candidates / f"{name}.yaml").read_text())
        sweep_cache = Path(recipe["cache"]["dir"])
        recipe["cache"]["dir"] = str(tmp_path / name)
        recipe["output_dir"] = str(tmp_path / f"run-{name}")
        if "stages" in recipe:  # the second stage's cache: the base frozen at the boundary, every split
            recipe["freeze"], recipe["stages"] = recipe["stages"][1]["freeze"], []
        featurized = invoke("featurize", write_recipe(tmp_path / f"{name}.yaml", recipe), "--json")
        assert featurized.exit_code == 0, featurized.output
        (cache,) = json.loads(featurized.stdout)["caches"]
        mine = sorted(Path(cache["path"]).glob("*.safetensors"))
        assert mine and len(mine) == len(list((sweep_cache / cache["key"]).glob("*.safetensors")))
        for shard in mine:
            theirs = load_file(str(sweep_cache / cache["key"] / shard.name))
            for key, tensor in load_file(str(shard)).items():
                assert tensor.dtype == theirs[key].dtype and tensor.equal(theirs[key]), (name, shard.name, key)


def test_the_test_split_is_never_read_while_choosing(tmp_path, monkeypatch):
    from tlcli import api
    from tlcli.engine.cache import FeatureCache

    read = []
    original = FeatureCache.read_shard
    monkeypatch.setattr(FeatureCache, "read_shard", lambda self, name: read.append(name) or original(self, name))
    result = api.sweep(sweep_recipe(tmp_path, unfreeze=False))
    assert result.rows and read
    assert not [name for name in read if name.startswith("test-")]
    assert any(name.startswith("val-") for name in read)


def test_boundaries_the_recipe_names_are_checked_at_their_line(tmp_path):
    path = sweep_recipe(tmp_path, boundaries=["stem", "blok"])
    result = invoke("sweep", path)
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [l for l in result.stderr.splitlines() if "sweep.boundaries.1" in l]
    assert line.startswith(f"error: {path}:") and "unknown node 'blok'" in line and "did you mean 'block'" in line


def test_a_sweep_error_under_json_is_one_object_naming_every_problem(tmp_path):
    path = sweep_recipe(tmp_path, boundaries=["blok", "flatten", "nope"])
    result = invoke("sweep", path, "--json")
    obj = json.loads(result.stdout)
    assert result.exit_code == 1 and obj["ok"] is False and obj["exit_code"] == 1
    assert [e.split(": ")[1] for e in obj["errors"]] == ["sweep.boundaries.0", "sweep.boundaries.2"]


def test_named_boundaries_are_swept_with_the_heads_input(tmp_path):
    result = invoke("sweep", sweep_recipe(tmp_path, boundaries=["block"], unfreeze=False), "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["boundaries"] == ["block", "flatten"]
    assert {r["kind"] for r in out["rows"]} == {"probe", "multi-depth"}


def test_a_finished_sweep_is_kept_unless_forced_and_force_removes_only_the_sweeps_files(swept):
    path, out, _ = swept
    sweep_dir = Path(out["sweep_dir"])
    again = invoke("sweep", path)
    assert again.exit_code == 1 and "already holds a finished sweep; pass --force" in again.stderr
    mine = sweep_dir / "notes.txt"
    mine.write_text("the user's")
    forced = invoke("sweep", path, "--force", "--json")
    assert forced.exit_code == 0, forced.output
    assert mine.read_text() == "the user's"
    assert [r["val_acc"] for r in json.loads(forced.stdout)["rows"]] == [r["val_acc"] for r in out["rows"]]


def test_a_sweep_never_writes_into_a_directory_that_is_not_tls(tmp_path):
    path = sweep_recipe(tmp_path)
    theirs = tmp_path / "run"
    theirs.mkdir()
    (theirs / "data.csv").write_text("keep me")
    for flags in ((), ("--force",)):
        result = invoke("sweep", path, *flags)
        assert result.exit_code == 1 and "not a tl run directory" in result.stderr
    assert [p.name for p in theirs.iterdir()] == ["data.csv"]


@pytest.mark.slow
def test_a_sweep_killed_after_a_measurement_resumes_and_keeps_it(tmp_path):
    seed, rng = seeded("sweep-kill")
    k = rng.randint(1, 3)
    print(f"sweep kill test (seed {seed}): killed after measurement {k}")
    path = sweep_recipe(tmp_path)
    rows = tmp_path / "run" / "sweep" / "rows"
    proc = start(["sweep", path], cwd=tmp_path)
    assert kill_when(proc, files_appeared(lambda: list(rows.glob("*.json")), k)), "the kill landed after the sweep"
    assert not (tmp_path / "run" / "sweep" / "sweep.json").exists()
    kept = {p.name for p in rows.glob("*.json")}
    refused = invoke("sweep", path)
    assert refused.exit_code == 1 and "interrupted sweep; pass --resume" in refused.stderr
    resumed = subprocess.run([sys.executable, "-m", "tlcli", "sweep", str(path), "--resume", "--json"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("kept from the interrupted sweep") == len(kept) >= k
    fresh = invoke("sweep", sweep_recipe(tmp_path / "fresh"), "--json")
    assert [(r["id"], r["val_acc"]) for r in json.loads(resumed.stdout)["rows"]] == \
        [(r["id"], r["val_acc"]) for r in json.loads(fresh.stdout)["rows"]]


def test_resuming_a_sweep_needs_the_same_recipe(tmp_path):
    path = sweep_recipe(tmp_path, unfreeze=False)
    sweep_dir = tmp_path / "run" / "sweep"
    sweep_dir.mkdir(parents=True)
    (tmp_path / "run" / "tl-run.json").write_text('{"tl_version": "0"}')
    (sweep_dir / "recipe.yaml").write_text("another recipe\n")
    result = invoke("sweep", path, "--resume")
    assert result.exit_code == 1 and "the recipe changed since this sweep started" in result.stderr


def test_default_boundaries_follow_each_familys_blocks():
    from tlcli.config.reading import parse_recipe
    from tlcli.model.build import build_network
    from tlcli.model.depths import default_boundaries

    def boundaries(zoo, model):
        recipe = parse_recipe(yaml.safe_dump({"base": {"zoo": zoo, "model": model, "weights": "none"},
                                              "data": {"dataset": "digits"}, "output_dir": "runs/x"}))
        network = build_network(recipe, [str(i) for i in range(10)])
        return default_boundaries(network.graph, network.head_layer)

    assert boundaries("timm", "tf_efficientnet_lite0") == ["blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6",
                                                            "global_pool.flatten"]
    assert boundaries("torchvision", "resnet18") == ["layer1", "layer2", "layer3", "layer4", "flatten"]
    assert boundaries("timm", "vit_tiny_patch16_224") == ["blocks.3", "blocks.5", "blocks.7", "blocks.9", "blocks.11",
                                                           "fc_norm"]


@pytest.mark.real
def test_on_lite0_the_one_pass_writes_the_bits_tl_featurize_writes(tmp_path):
    """The same check on the real network: its depthwise blocks, its pooled branches and their
    concatenation, as the shipped default's sweep computes them."""
    recipe = {"base": {"zoo": "timm", "model": "tf_efficientnet_lite0", "weights": "embedded", "input_size": 64},
              "data": {"dataset": "digits", "limit": 120, "split": {"val": 0.2, "test": 0.2, "seed": 0}},
              "freeze": {"until": "global_pool"}, "sweep": {"boundaries": ["blocks.4"], "unfreeze": False},
              "cache": {"dir": str(tmp_path / "cache")}, "output_dir": str(tmp_path / "run"), "device": "cpu"}
    result = invoke("sweep", write_recipe(tmp_path / "recipe.yaml", recipe), "--json")
    assert result.exit_code == 0, result.output
    candidates = Path(json.loads(result.stdout)["sweep_dir"]) / "candidates"
    for name in ("probe-blocks.4", "multi-depth"):
        mine = yaml.safe_load((candidates / f"{name}.yaml").read_text())
        mine["cache"]["dir"], mine["output_dir"] = str(tmp_path / name), str(tmp_path / f"run-{name}")
        featurized = invoke("featurize", write_recipe(tmp_path / f"{name}.yaml", mine), "--json")
        (cache,) = json.loads(featurized.stdout)["caches"]
        for shard in Path(cache["path"]).glob("*.safetensors"):
            theirs = load_file(str(tmp_path / "cache" / cache["key"] / shard.name))
            for key, tensor in load_file(str(shard)).items():
                assert tensor.equal(theirs[key]), (name, shard.name, key)


def test_a_probe_whose_folds_would_not_fit_the_memory_budget_is_scored_on_val(tmp_path, monkeypatch):
    """Cross-validation holds every fold's logits: past cache.memory_mib it is skipped (cv_acc
    None) and the choice falls back to val accuracy, rather than the sweep running out of memory."""
    import tlcli.engine.sweep as sweep_module
    from tlcli import api
    from tlcli.engine.probe import cross_validation_mib

    assert cross_validation_mib(1000, 100, 10) < cross_validation_mib(2000, 100, 10) < cross_validation_mib(2000, 100, 100)
    monkeypatch.setattr(sweep_module, "cross_validation_mib", lambda *a, **k: 10.0**9)
    result = api.sweep(sweep_recipe(tmp_path, unfreeze=False))
    assert [r.cv_acc for r in result.rows] == [None] * len(result.rows)
    best = max(r.val_acc for r in result.rows)
    assert result.choice.val_acc == best
