"""kill -9 at random points of featurize and fit (slow): no cache is ever accepted that
differs from an uninterrupted build, and a run killed again and again resumes bit-exact."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tlcli.features import open_cache

from conftest import tiny_recipe, write_recipe

pytestmark = pytest.mark.slow
KILLS = 10


def _run_and_kill(args, after: float) -> bool:
    """Start `tl ARGS`, SIGKILL it after `after` seconds; True if it was still running then."""
    proc = subprocess.Popen([sys.executable, "-m", "tlcli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + after
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed


def _tensors(cache_dir):
    return {p.name: load_file(str(p)) for p in sorted(cache_dir.glob("*.safetensors"))}


def _assert_same_cache(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        assert all(torch.equal(got[name][k], expected[name][k]) for k in expected[name]), name


def test_featurize_killed_at_random_points_never_leaves_an_accepted_wrong_cache(tmp_path):
    # About 4 s of start-up, then about 2 s of writing 16-row shards: kills land throughout.
    recipe = tiny_recipe(tmp_path, base={"input_size": 160}, data={"limit": 300, "batch_size": 8},
                         cache={"shard_size": 16})
    reference = write_recipe(tmp_path / "ref.yaml", {**recipe, "cache": {**recipe["cache"], "dir": str(tmp_path / "ref")}})
    assert subprocess.run([sys.executable, "-m", "tlcli", "featurize", str(reference)], capture_output=True).returncode == 0
    expected = _tensors(next((tmp_path / "ref").glob("*/manifest.json")).parent)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    rng, kills, tries = random.Random(0), 0, 0
    while kills < KILLS and tries < 3 * KILLS:
        tries += 1
        complete = list((tmp_path / "cache").glob("*/manifest.json"))
        # Once a complete cache exists, --force rebuilds it: a kill then must leave the old one intact.
        kills += _run_and_kill(["featurize", path, *(["--force"] if complete else [])], rng.uniform(3.8, 5.6))
        for candidate in (tmp_path / "cache").iterdir():
            if candidate.is_dir() and open_cache(candidate) is not None:
                _assert_same_cache(_tensors(candidate), expected)
    assert kills >= KILLS, f"only {kills} of {tries} runs were killed mid-way"
    assert subprocess.run([sys.executable, "-m", "tlcli", "featurize", str(path)], capture_output=True).returncode == 0
    caches = [c for c in (tmp_path / "cache").iterdir() if c.is_dir() and open_cache(c) is not None]
    assert len(caches) == 1
    _assert_same_cache(_tensors(caches[0]), expected)


def test_fit_killed_again_and_again_resumes_to_the_uninterrupted_result(tmp_path, cli):
    stages = [{"name": "head", "epochs": 8},
              {"name": "deeper", "freeze": {"until": "stem"}, "epochs": 24, "fine_tune": {"lr": 0.003, "schedule": "cosine"},
               "augment": {"random_resized_crop": {"scale": [0.7, 1.0]}, "hflip": 0.5}}]
    # About 4 s of start-up, then about 15 s of training; each run is killed within about a
    # second of its start-up, so each makes a little progress and the kills land throughout.
    recipe = tiny_recipe(tmp_path, stages=stages, data={"limit": 600}, base={"input_size": 64})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    reference = {**recipe, "output_dir": str(tmp_path / "ref")}
    assert cli("fit", write_recipe(tmp_path / "ref.yaml", reference))[0] == 0
    run = tmp_path / "run"
    rng, kills = random.Random(1), 0
    for _ in range(4 * KILLS):
        if kills >= KILLS or (run / "checkpoint.json").exists():
            break
        resume = ["--resume"] if (run / "resume" / "state.json").exists() else []
        kills += _run_and_kill(["fit", path, *resume], rng.uniform(4.0, 5.2))
        assert not (run / "checkpoint.json").exists() or not (run / "resume").exists()
    assert kills >= KILLS, f"only {kills} kills landed"
    resume = ["--resume"] if (run / "resume" / "state.json").exists() else []
    code, out = cli("fit", path, *resume)
    assert code == 0, out
    got, want = load_file(str(run / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    assert json.loads((run / "checkpoint.json").read_text())["stages"][1]["epochs_run"] == 24
