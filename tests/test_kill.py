"""kill -9 mid-work (slow): featurize killed after its k-th shard never leaves an accepted cache
that differs from an uninterrupted build, and a fit killed after its k-th resume state, again
and again, resumes to the uninterrupted result bit for bit. Kills come at observed events
(a shard appeared, the state changed), so they land mid-work however busy the machine is;
every kill is checked to have landed mid-work, and each test needs at least KILLS of them."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tlcli.engine.cache import open_cache

from conftest import run_tl, tiny_recipe, write_recipe
from killing import Changes, files_appeared, kill_when, seeded, start

pytestmark = pytest.mark.slow
KILLS = 10


def _tensors(cache_dir):
    return {p.name: load_file(str(p)) for p in sorted(cache_dir.glob("*.safetensors"))}


def _assert_same_cache(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        assert all(torch.equal(got[name][k], expected[name][k]) for k in expected[name]), name


def _report(capsys, line):
    with capsys.disabled():
        print(f"\n{line}")


def test_featurize_killed_mid_build_never_leaves_an_accepted_wrong_cache(tmp_path, capsys):
    # 300 images in 16-row shards: about 19 shards, each a kill point.
    recipe = tiny_recipe(tmp_path, base={"input_size": 96}, data={"limit": 300, "batch_size": 8},
                         cache={"shard_size": 16})
    reference = write_recipe(tmp_path / "ref.yaml", {**recipe, "cache": {**recipe["cache"], "dir": str(tmp_path / "ref")}})
    assert run_tl("featurize", reference).returncode == 0
    expected = _tensors(next((tmp_path / "ref").glob("*/manifest.json")).parent)
    shards = len(expected)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    cache = tmp_path / "cache"
    seed, rng = seeded("featurize")
    landed, runs, points = 0, 0, []
    while landed < KILLS and runs < 3 * KILLS:
        runs += 1
        forced = bool(list(cache.glob("*/manifest.json")))  # rebuilding beside a complete cache must leave it intact
        proc = start(["featurize", path, *(["--force"] if forced else [])])
        k = rng.randint(1, shards - 2)
        mine = lambda: list(cache.glob(f"*.tmp-{proc.pid}/*.safetensors"))  # noqa: E731 - this run's shards only
        if kill_when(proc, files_appeared(mine, k)):
            landed += 1
            points.append(k)
            assert len(mine()) < shards, "killed after its last shard: not mid-work"
        for candidate in cache.iterdir():
            if candidate.is_dir() and open_cache(candidate) is not None:
                _assert_same_cache(_tensors(candidate), expected)
    _report(capsys, f"featurize kill test (seed {seed}): {landed} of {runs} runs killed mid-build, "
                    f"after shards {points} of {shards}")
    assert landed >= KILLS, f"only {landed} of {runs} kills landed mid-work (seed {seed})"
    assert run_tl("featurize", path).returncode == 0
    caches = [c for c in cache.iterdir() if c.is_dir() and open_cache(c) is not None]
    assert len(caches) == 1
    _assert_same_cache(_tensors(caches[0]), expected)


def test_fit_killed_again_and_again_resumes_to_the_uninterrupted_result(tmp_path, cli, capsys):
    stages = [{"name": "head", "epochs": 8},
              {"name": "deeper", "freeze": {"until": "stem"}, "epochs": 24, "fine_tune": {"lr": 0.003, "schedule": "cosine"},
               "augment": {"random_resized_crop": {"scale": [0.7, 1.0]}, "hflip": 0.5}}]
    recipe = tiny_recipe(tmp_path, stages=stages, data={"limit": 600}, base={"input_size": 64})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    reference = {**recipe, "output_dir": str(tmp_path / "ref")}
    assert cli("fit", write_recipe(tmp_path / "ref.yaml", reference))[0] == 0
    run = tmp_path / "run"
    state = run / "resume" / "state.json"
    seed, rng = seeded("fit")
    landed, runs, where = 0, 0, []
    while landed < KILLS and runs < 3 * KILLS and not (run / "checkpoint.json").exists():
        runs += 1
        proc = start(["fit", path, *(["--resume"] if state.exists() else [])])
        # The k-th new resume state of this run: k epochs (or a stage's end) done since it started.
        if kill_when(proc, Changes(state).at_least(rng.randint(1, 2))):
            landed += 1
            saved = json.loads(state.read_text())
            where.append(f"{saved['stage'] + 1}.{saved['epoch']}")
            assert not (run / "checkpoint.json").exists(), "killed after it finished: not mid-work"
    _report(capsys, f"fit kill test (seed {seed}): {landed} of {runs} runs killed mid-fit, after stage.epoch {where}")
    assert landed >= KILLS, f"only {landed} of {runs} kills landed mid-work (seed {seed})"
    code, out = cli("fit", path, "--resume")
    assert code == 0, out
    got, want = load_file(str(run / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    assert json.loads((run / "checkpoint.json").read_text())["stages"][1]["epochs_run"] == 24
