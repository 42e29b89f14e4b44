"""The feature cache: keyed on everything that shapes features, never stale, never half-written."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tlcli.data.sources import plan_data
from tlcli.engine.cache import cache_key, open_cache
from tlcli.engine.features import featurize, key_components
from tlcli.model.tiny import TinyResNet
from tlcli.config.schema import Recipe
from tlcli.model.build import build_network
from tlcli.engine.precision import FP32

from killing import kill_when, start
from conftest import make_imagefolder, tiny_recipe, write_recipe


def key_of(recipe_dict) -> str:
    recipe = Recipe.model_validate(recipe_dict)
    plan = plan_data(recipe.data)
    prepared = build_network(recipe, plan.class_names)
    return cache_key(key_components(prepared, plan, prepared.extractor(), recipe.cache.dtype, precision="fp32",
                                    compiled=recipe.cache.compile))


def _weights_file(path, seed):
    torch.manual_seed(seed)
    save_file(TinyResNet().state_dict(), str(path))
    return str(path)


def test_feature_relevant_changes_give_new_keys(tmp_path):
    w1, w2 = _weights_file(tmp_path / "w1.safetensors", 1), _weights_file(tmp_path / "w2.safetensors", 2)
    base = tiny_recipe(tmp_path, base={"weights": {"file": w1}})
    variants = {
        "boundary": tiny_recipe(tmp_path, base={"weights": {"file": w1}}, freeze={"until": "block.4"}),
        "image size": tiny_recipe(tmp_path, base={"weights": {"file": w1}, "input_size": 24}),
        "weights": tiny_recipe(tmp_path, base={"weights": {"file": w2}}),
        "data sample": tiny_recipe(tmp_path, base={"weights": {"file": w1}}, data={"limit": 150}),
        "data split": tiny_recipe(tmp_path, base={"weights": {"file": w1}}, data={"split": {"seed": 1}}),
        "classes": tiny_recipe(tmp_path, base={"weights": {"file": w1}}, data={"classes": [0, 1, 2, 3, 4]}),
        "dtype": tiny_recipe(tmp_path, base={"weights": {"file": w1}}, cache={"dtype": "bfloat16"}),
        "compile": tiny_recipe(tmp_path, base={"weights": {"file": w1}}, cache={"compile": True}),
    }
    keys = {name: key_of(r) for name, r in variants.items()}
    reference = key_of(base)
    for name, key in keys.items():
        assert key != reference, f"changing the {name} must change the cache key"
    assert len(set(keys.values())) == len(keys)


def test_caches_written_before_the_compile_option_keep_their_keys(tmp_path):
    """`compile` enters the key's components only when on: every uncompiled cache on disk is still hit."""
    recipe = Recipe.model_validate(tiny_recipe(tmp_path))
    plan = plan_data(recipe.data)
    prepared = build_network(recipe, plan.class_names)
    off = key_components(prepared, plan, prepared.extractor(), "float32", precision="fp32")
    on = key_components(prepared, plan, prepared.extractor(), "float32", precision="fp32", compiled=True)
    assert "compile" not in off and on == {**off, "compile": True}


def _compiled_and_eager(tmp_path, monkeypatch, compile_with):
    """The train/val/test features of one recipe featurized eagerly and with cache.compile, and the
    two cache directories; `compile_with` stands in for torch.compile (None: the real one)."""
    from tlcli.config.reading import load_recipe
    from tlcli.engine.features import featurize_recipe
    from safetensors.torch import load_file

    if compile_with is not None:
        monkeypatch.setattr(torch, "compile", compile_with)
    out = {}
    for compiled in (False, True):
        path = write_recipe(tmp_path / f"{compiled}.yaml", tiny_recipe(tmp_path, cache={"compile": compiled}))
        (cache,) = featurize_recipe(load_recipe(path))
        shards = sorted(cache.path.glob("*.safetensors"))
        out[compiled] = (cache.path, {s.name: load_file(str(s)) for s in shards})
    return out


def test_a_compiled_featurize_compiles_once_pads_its_short_batches_and_keeps_its_own_cache(tmp_path, monkeypatch):
    """torch.compile (a stand-in that records what it is given) is asked once, for one static
    shape; every batch reaches it at the full batch size (a short one padded, its rows cut back
    after), and the rows written are the eager ones, in a cache of their own."""
    asked, sizes = [], []

    def standin(module, **options):
        asked.append(options)
        return lambda x: sizes.append(len(x)) or module(x)

    out = _compiled_and_eager(tmp_path, monkeypatch, standin)
    assert asked == [{"dynamic": False}] and set(sizes) == {32}  # splits of 140, 20 and 40 rows at batch 32
    (eager_dir, eager), (compiled_dir, compiled) = out[False], out[True]
    assert eager_dir != compiled_dir and eager.keys() == compiled.keys()
    for name in eager:
        for tensor in eager[name]:
            assert torch.allclose(eager[name][tensor].float(), compiled[name][tensor].float(), atol=1e-6), (name, tensor)


@pytest.mark.slow
def test_the_real_torch_compile_featurizes_what_eager_featurizes(tmp_path, monkeypatch):
    out = _compiled_and_eager(tmp_path, monkeypatch, None)
    for name, tensors in out[False][1].items():
        for tensor, eager in tensors.items():
            assert torch.allclose(eager.float(), out[True][1][name][tensor].float(), atol=1e-4, rtol=1e-4), (name, tensor)


def test_training_only_changes_reuse_the_key(tmp_path):
    base = tiny_recipe(tmp_path)
    reference = key_of(base)
    assert key_of(tiny_recipe(tmp_path, fine_tune={"lr": 0.5, "epochs": 9, "batch_size": 7, "optimizer": "sgd"})) == reference
    assert key_of(tiny_recipe(tmp_path, output_dir=str(tmp_path / "elsewhere"), head={"init": "normal"})) == reference


def test_image_content_change_gives_new_key_even_with_same_mtime(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", per_class=10)
    recipe = tiny_recipe(tmp_path)
    recipe["data"] = {"imagefolder": str(root), "split": {"val": 0.1, "test": 0.2}}
    before = key_of(recipe)
    victim = sorted((root / "b").iterdir())[0]
    stat = victim.stat()
    other = sorted((root / "c").iterdir())[0].read_bytes()
    victim.write_bytes(other)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the Ludwig #1078 trap
    assert key_of(recipe) != before


def test_second_featurize_hits_and_fit_reuses(tmp_path, cli):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    code, out = cli("featurize", path)
    assert code == 0, out
    caches = [p for p in (tmp_path / "cache").iterdir() if (p / "manifest.json").is_file()]
    assert len(caches) == 1
    first = {p.name: p.stat().st_mtime_ns for p in caches[0].iterdir()}
    write_recipe(path, tiny_recipe(tmp_path, fine_tune={"lr": 0.05, "epochs": 2}))
    code, out = cli("fit", path)
    assert code == 0, out
    assert [p for p in (tmp_path / "cache").iterdir() if (p / "manifest.json").is_file()] == caches
    assert {p.name: p.stat().st_mtime_ns for p in caches[0].iterdir()} == first


def test_cache_layout_and_manifest(tmp_path):
    recipe = Recipe.model_validate(tiny_recipe(tmp_path, cache={"shard_size": 40}))
    plan = plan_data(recipe.data)
    prepared = build_network(recipe, plan.class_names)
    cache = featurize(prepared, plan, torch.device("cpu"), recipe.cache, recipe.data, precision=FP32)
    m = json.loads((cache.path / "manifest.json").read_text())
    assert [f["name"] for f in m["frontier"]] == ["stem.2", "block.1"]
    assert m["splits"]["train"]["count"] == len(plan.splits["train"])
    assert len(m["splits"]["train"]["shards"]) > 1  # shard_size bounds memory
    assert sum(len(labels) for _, labels in cache.iterate("test")) == len(plan.splits["test"])
    # Damage a shard: the cache is no longer accepted.
    shard = cache.path / m["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    assert open_cache(cache.path) is None


def test_killed_featurize_leaves_no_accepted_cache_and_is_rebuilt(tmp_path):
    # One-image shards: the kill comes after the second shard of this run appears.
    recipe = tiny_recipe(tmp_path, base={"input_size": 512}, data={"limit": 400, "batch_size": 4}, cache={"shard_size": 4})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    cache_root = tmp_path / "cache"
    proc = start(["featurize", path])
    second = lambda: any(cache_root.glob(f"*.tmp-{proc.pid}/train-00001.safetensors"))  # noqa: E731
    assert kill_when(proc, second), "featurize finished before it could be killed"
    partials = list(cache_root.glob("*.tmp-*"))
    assert partials and not list(cache_root.glob("*/manifest.json"))
    key = partials[0].name.split(".tmp-")[0]
    assert open_cache(cache_root / key) is None

    r = Recipe.model_validate(recipe)
    plan = plan_data(r.data)
    prepared = build_network(r, plan.class_names)
    cache = featurize(prepared, plan, torch.device("cpu"), r.cache, r.data, precision=FP32)
    assert cache.key == key and open_cache(cache_root / key) is not None
    assert not list(cache_root.glob("*.tmp-*")), "the dead run's partial directory is cleaned up"
    assert cache.count("train") + cache.count("val") + cache.count("test") == 400


# --------------------------------------------------------------------------- concurrency


def _popen(*args):
    return subprocess.Popen([sys.executable, "-m", "tlcli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_featurizers_of_one_key_build_it_once(tmp_path):
    recipe = tiny_recipe(tmp_path, base={"input_size": 96}, data={"limit": 300})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    first, second = _popen("featurize", path), _popen("featurize", path)
    outs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == second.returncode == 0, outs
    logs = [err for _, err in outs]
    assert sum("feature cache written" in log for log in logs) == 1, logs
    assert sum("feature cache hit" in log for log in logs) == 1, logs
    assert len(list((tmp_path / "cache").glob("*/manifest.json"))) == 1


def test_featurize_force_never_swaps_a_cache_out_from_under_a_fit(tmp_path):
    """A fit holds its cache open (shared lock) for the whole run; a forced rebuild is
    built beside it and swapped in only after the fit is done."""
    from tlcli.files import file_lock
    from tlcli.engine.cache import read_lock

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    assert subprocess.run([sys.executable, "-m", "tlcli", "featurize", str(path)], capture_output=True).returncode == 0
    cache = next((tmp_path / "cache").glob("*/manifest.json")).parent
    shard = next(cache.glob("train-*.safetensors"))
    before = shard.read_bytes()
    with file_lock(read_lock(cache), shared=True):  # what a running fit holds
        proc = _popen("featurize", "--force", path)
        # The rebuild says it is waiting once its new cache is complete beside the old one.
        for line in proc.stderr:
            if "waiting for the fits reading" in line:
                break
        assert proc.poll() is None, "the forced rebuild must wait for the reader"
        assert list(cache.parent.glob(f"{cache.name}.tmp-*/manifest.json"))
        assert shard.read_bytes() == before and (cache / "manifest.json").is_file()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert open_cache(cache) is not None and not list(cache.parent.glob(f"{cache.name}.*-*"))


def test_a_second_fit_into_the_same_run_directory_is_refused(tmp_path, cli):
    from tlcli.files import file_lock

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fine_tune={"epochs": 1}))
    with file_lock(tmp_path / "run" / "tl-run.lock"):  # what a running fit holds
        code, out = cli("fit", path)
    assert code == 1 and "another tl fit is writing this run directory" in out
    assert not (tmp_path / "run" / "checkpoint.json").exists()
    assert cli("fit", path)[0] == 0  # the lock-file alone does not make the directory foreign
