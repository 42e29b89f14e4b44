"""Under torchrun (issue 12): two CPU processes on gloo, as CI's two cores allow.

Each test starts real `torch.distributed.run` processes: what matters here (a
process group, a rank that dies, files written by one rank and read by another)
only shows between processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_tl, tiny_recipe, write_recipe
from killing import kill_when, rank_pids



def torchrun(*args, cwd: Path, nproc: int = 2, timeout: int = 300, wait: bool = True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tlcli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _cache_tensors(cache_dir: Path) -> tuple[dict, dict]:
    (path,) = [p for p in cache_dir.iterdir() if (p / "manifest.json").is_file()]
    manifest = json.loads((path / "manifest.json").read_text())
    tensors = {s["file"]: load_file(str(path / s["file"])) for split in manifest["splits"].values() for s in split["shards"]}
    return manifest, tensors


@pytest.mark.slow
def test_featurize_on_two_ranks_writes_the_single_process_cache(tmp_path):
    for name in ("one", "two"):
        write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(tmp_path / name, cache={"shard_size": 40}, data={"limit": 300}))
    single = run_tl("featurize", "one.yaml", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    done = torchrun("featurize", "two.yaml", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    shares = {int(line.split("/")[0].split()[-1]): int(line.split(": ")[1].split()[0])
              for line in done.stderr.splitlines() if line.startswith("rank ") and line.endswith(" rows")}
    assert set(shares) == {0, 1} and all(shares.values()), done.stderr  # the work was split
    assert sum(shares.values()) == 300
    assert json.loads(done.stdout)["caches"][0]["rows"] == {"train": 210, "val": 30, "test": 60}  # rank 0 speaks
    m1, t1 = _cache_tensors(tmp_path / "one" / "cache")
    m2, t2 = _cache_tensors(tmp_path / "two" / "cache")
    assert m1["key"] == m2["key"] and m1["splits"] == m2["splits"]  # same shards, same rows, same order
    for name, tensors in t1.items():
        for k, v in tensors.items():
            assert torch.equal(v, t2[name][k]), (name, k)  # CPU, fp32: bit-identical
    assert not [p for p in (tmp_path / "two" / "cache").iterdir() if ".tmp-" in p.name]


def _two_stage(root: Path, **fine_tune) -> dict:
    # No augmentation, no dropout, BatchNorm statistics frozen: 2 ranks x 8 is then, in exact
    # arithmetic, 1 rank x 16 (gradients are averaged over the same 16 images).
    ft = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 3, "batch_size": 16, "seed": 0, "dropout": 0.0,
          "train_bn": False,
          **fine_tune}
    return tiny_recipe(root, data={"limit": 200}, fine_tune=ft,
                       stages=[{"name": "head", "fine_tune": {"epochs": 2}},
                               {"name": "images", "input": "images", "freeze": {"until": "stem.2"}}])


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_an_image_stage_on_two_ranks_equals_one_rank_with_the_global_batch(tmp_path):
    write_recipe(tmp_path / "one.yaml", _two_stage(tmp_path / "one"))
    write_recipe(tmp_path / "two.yaml", _two_stage(tmp_path / "two"))
    single = run_tl("fit", "one.yaml", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    done = torchrun("fit", "two.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    one, two = _rows(tmp_path / "one" / "run"), _rows(tmp_path / "two" / "run")
    assert [r["stage"] for r in two] == ["head", "head", "images", "images", "images"]
    assert len(one) == len(two)  # zip would drop the rows one run has and the other lacks
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a, b, key)
    w1 = load_file(str(tmp_path / "one" / "run" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "run" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    # The weights agree to summation order: an all-reduced mean of two means is not bit for bit
    # the mean of 16, and 3 epochs of momentum SGD carry that to ~1e-5 on weights of ~0.1-1.
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4, msg=k)
    assert abs(one[-1]["train_loss"] - one[2]["train_loss"]) > 1e-3  # the image stage did train
    assert (tmp_path / "two" / "run" / "curves.png").is_file()
    # Evaluate under torchrun runs on rank 0 and scores like one process.
    evaluated = torchrun("evaluate", tmp_path / "two" / "run", "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "rank 1/2: evaluate runs on rank 0" in evaluated.stderr
    alone = run_tl("evaluate", tmp_path / "two" / "run", "--json", cwd=tmp_path)
    assert json.loads(evaluated.stdout)["accuracy"] == json.loads(alone.stdout)["accuracy"]


@pytest.mark.slow
def test_a_dead_rank_stops_the_run_and_resume_on_two_ranks_finishes_it(tmp_path):
    write_recipe(tmp_path / "ref.yaml", _two_stage(tmp_path / "ref", epochs=8))
    write_recipe(tmp_path / "r.yaml", _two_stage(tmp_path / "killed", epochs=8))
    reference = torchrun("fit", "ref.yaml", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr

    launcher = torchrun("fit", "r.yaml", cwd=tmp_path, wait=False)
    metrics = tmp_path / "killed" / "run" / "metrics.jsonl"

    def two_image_epochs() -> bool:
        return metrics.is_file() and sum(1 for line in metrics.read_text().splitlines() if '"images"' in line) >= 2

    assert kill_when(launcher, two_image_epochs, target=lambda: rank_pids(launcher.pid)[1]), \
        "the fit finished before it could be killed: " + launcher.stderr.read()
    killed_at = time.time()
    try:
        launcher.wait(timeout=120)  # bounded: well under distributed.timeout_s
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        pytest.fail("the surviving rank hung after its peer died")
    assert launcher.returncode != 0 and time.time() - killed_at < 120
    assert not (tmp_path / "killed" / "run" / "checkpoint.json").exists()

    resumed = torchrun("fit", "r.yaml", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    w_ref = load_file(str(tmp_path / "ref" / "run" / "model.safetensors"))
    w_res = load_file(str(tmp_path / "killed" / "run" / "model.safetensors"))
    for k in w_ref:
        assert torch.equal(w_res[k], w_ref[k]), k
    assert _rows(tmp_path / "killed" / "run") == _rows(tmp_path / "ref" / "run")


@pytest.mark.slow
def test_a_rank_killed_while_featurizing_leaves_no_cache_that_is_accepted(tmp_path):
    from tlcli.engine.cache import open_cache

    recipe = tiny_recipe(tmp_path, base={"input_size": 192}, data={"limit": None, "batch_size": 16},
                         cache={"shard_size": 16})
    write_recipe(tmp_path / "r.yaml", recipe)
    launcher = torchrun("featurize", "r.yaml", cwd=tmp_path, wait=False)
    cache = tmp_path / "cache"
    four_shards = lambda: any(len(list(p.glob("train-*.safetensors"))) >= 4 for p in cache.glob("*.tmp-*"))  # noqa: E731
    assert kill_when(launcher, four_shards, target=lambda: rank_pids(launcher.pid)[1]), \
        "featurize finished before it could be killed: " + launcher.stderr.read()
    try:
        launcher.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        pytest.fail("rank 0 hung after rank 1 died")
    assert launcher.returncode != 0
    assert not [p for p in cache.iterdir() if p.is_dir() and p.name != "locks" and open_cache(p) is not None]
    again = torchrun("featurize", "r.yaml", cwd=tmp_path)  # starts over, and finishes
    assert again.returncode == 0 and "feature cache written" in again.stderr, again.stderr


@pytest.mark.slow
def test_fit_nproc_runs_torchrun_for_the_user(tmp_path):
    write_recipe(tmp_path / "r.yaml", _two_stage(tmp_path / "n", epochs=1))
    done = run_tl("fit", "r.yaml", "--nproc", "2", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["epochs"] == 3  # 2 head epochs + 1 on images; only rank 0 printed


# --------------------------------------------------------------------------- the parts, in one process


@pytest.mark.parametrize("n,world", [(7, 2), (8, 2), (10, 3), (1, 4), (13, 4)])
def test_rank_shares_are_distributed_samplers_and_batches_add_up(n, world):
    from torch.utils.data import DistributedSampler

    from tlcli.engine.stage import rank_share

    order = torch.randperm(n, generator=torch.Generator().manual_seed(n * 31 + world)).tolist()

    class Ordered(torch.utils.data.Dataset):
        """A dataset whose items are the order's entries; the sampler's indices pick them."""

        def __len__(self):
            return n

        def __getitem__(self, i):
            return order[i]

    data = Ordered()
    for rank in range(world):
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
        assert rank_share(order, rank, world) == [data[i] for i in sampler], rank
    shares = [rank_share(order, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # every rank runs the same number of steps
    # Batch k of every rank together is batch k of the single-process order at `world` times the batch.
    full = [i for column in zip(*shares) for i in column]
    assert len(full) == world * len(shares[0]) and full[:n] == order
    assert rank_share(order, 0, 1) == order


def test_the_recipe_says_which_batch_it_sets():
    from tlcli.errors import SpecError
    from tlcli.config.schema import DistributedSpec
    from tlcli.config.stages import plan_stages
    from tlcli.config.reading import parse_recipe
    from tlcli.engine.stage import rank_batch_size

    recipe = parse_recipe("base: {zoo: tl, model: tiny_resnet, weights: none}\ndata: {dataset: digits}\n"
                          "fine_tune: {batch_size: 32}\noutput_dir: runs/x\n")
    stage = plan_stages(recipe)[0]
    assert rank_batch_size(stage, DistributedSpec(), 4) == 8  # global by default
    assert rank_batch_size(stage, DistributedSpec(batch="per_rank"), 4) == 32
    with pytest.raises(SpecError, match="does not split evenly over 3 ranks"):
        rank_batch_size(stage, DistributedSpec(), 3)


def test_each_rank_gets_its_own_gpu(monkeypatch):
    from tlcli.engine.distributed import current
    from tlcli.engine.device import resolve_device

    assert str(resolve_device("auto", cuda_available=True, cuda_count=4, local_rank=3)) == "cuda:3"
    assert str(resolve_device("cuda", cuda_available=True, cuda_count=4, local_rank=2)) == "cuda:2"
    assert str(resolve_device("auto", cuda_available=False, local_rank=1)) == "cpu"  # gloo on the CPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (current().rank, current().world, current().local_rank, current().main) == (1, 2, 1, False)
    assert str(resolve_device("auto", cuda_available=True, cuda_count=2)) == "cuda:1"
