"""`precision`: chosen from what the hardware reports (injected here for both kinds of CPU and
for CUDA), keyed into the cache, recorded in the run, and the same arithmetic at evaluate and
predict as in training."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tlcli.config.schema import Recipe
from tlcli.engine.precision import cpu_flags, resolve_precision
from tlcli.errors import SpecError

from conftest import invoke, tiny_recipe, write_recipe

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
COOPER_LAKE = {"avx2", "avx512f", "avx512_bf16"}
EPYC_ZEN2 = {"avx2", "fma", "sse4_2"}


@pytest.mark.parametrize("flags, auto", [(SAPPHIRE_RAPIDS, "bf16"), (COOPER_LAKE, "bf16"), (EPYC_ZEN2, "fp32"),
                                         (set(), "fp32")])
def test_auto_is_bf16_only_on_a_cpu_that_reports_bf16_arithmetic(flags, auto):
    chosen = resolve_precision("auto", CPU, flags=flags)
    assert chosen.name == auto
    assert ("amx_bf16" in chosen.reason) == ("amx_bf16" in flags and auto == "bf16")
    assert resolve_precision("fp32", CPU, flags=flags).name == "fp32"
    asked = resolve_precision("bf16", CPU, flags=flags)  # asked for: honoured, and said when it is slow here
    assert asked.name == "bf16" and ("emulated" in asked.reason) == (auto == "fp32")


def test_auto_on_cuda_follows_the_gpus_bf16_support_and_bf16_without_it_is_the_recipes_error():
    assert resolve_precision("auto", CUDA, cuda_bf16=True).name == "bf16"
    assert resolve_precision("auto", CUDA, cuda_bf16=False).name == "fp32"
    assert resolve_precision("bf16", CUDA, cuda_bf16=True).name == "bf16"
    with pytest.raises(SpecError) as err:
        resolve_precision("bf16", CUDA, cuda_bf16=False)
    assert err.value.issues[0][0] == ("precision",)
    with pytest.raises(SpecError):
        resolve_precision("bf16", torch.device("mps"))
    assert resolve_precision("auto", torch.device("mps")).name == "fp32"


def test_cpu_flags_are_read_from_cpuinfo_on_x86_and_arm():
    x86 = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx2 amx_bf16 avx512_bf16\n\nprocessor\t: 1\n"
    assert {"amx_bf16", "avx512_bf16", "avx2"} <= cpu_flags(x86)
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd bf16\n") == {"fp", "asimd", "bf16"}
    assert cpu_flags("") == set()
    # This machine's own answer goes through the same parser (whatever it has).
    assert resolve_precision("auto", CPU).name in ("fp32", "bf16")


def _recipe(tmp_path, precision, **sections):
    return tiny_recipe(tmp_path, precision=precision, **sections)


def test_precision_is_keyed_into_the_cache_and_bf16_rows_are_bf16_arithmetic(tmp_path):
    """Each precision has its own cache (neither hits the other's), its components say which,
    and the bf16 rows are not the fp32 rows (so the key is not a formality)."""
    from tlcli.engine.cache import open_cache

    keys = {}
    rows = {}
    for precision in ("fp32", "bf16"):
        path = write_recipe(tmp_path / f"{precision}.yaml", _recipe(tmp_path, precision))
        result = invoke("featurize", path, "--json")
        assert result.exit_code == 0, result.output
        key = json.loads(result.stdout)["caches"][0]["key"]
        cache = open_cache(tmp_path / "cache" / key)
        assert cache.manifest["components"]["precision"] == precision
        assert cache.manifest["frontier"][0]["dtype"] == "float32"  # stored as float32 unless cache.dtype says
        keys[precision], rows[precision] = key, next(cache.iterate("train"))[0][0]
    assert keys["fp32"] != keys["bf16"]
    assert not torch.equal(rows["fp32"], rows["bf16"])
    torch.testing.assert_close(rows["bf16"], rows["fp32"], atol=0.1, rtol=0.05)


def _logits_both_ways(tmp_path, recipe: dict):
    """A fitted run's test logits from the cache, then from the images (cache removed)."""
    from tlcli.data.sources import plan_data
    from tlcli.engine.inference import cached_logits, model_logits
    from tlcli.progress import Reporter
    from tlcli.run.checkpoint import load_checkpoint

    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    fitted = invoke("fit", path, "--json")
    assert fitted.exit_code == 0, fitted.output
    r = Recipe.model_validate(recipe)
    run, plan = load_checkpoint(tmp_path / "run"), plan_data(r.data)
    cached = cached_logits(run, plan, r.cache, CPU)
    assert cached is not None, "the run's own cache (at its precision) must be found"
    images = model_logits(run, plan.splits["test"], r.data.batch_size, 0, CPU, Reporter())
    return json.loads(fitted.stdout), run, cached, images, path


@pytest.mark.parametrize("precision, dtype", [("bf16", "float32"), ("fp32", "bfloat16"), ("bf16", "bfloat16")])
def test_evaluate_on_images_computes_what_the_head_trained_on(tmp_path, precision, dtype):
    """A head trained on bf16-computed (or bf16-stored) rows is scored on images with the same
    arithmetic: the logits from the images are the logits from the cached rows (to the last
    bits of the head's fp32 matmul, batched differently); the plain fp32 full model's (what
    evaluate ran before the precision was recorded) are a hundred times further off."""
    out, run, cached, images, path = _logits_both_ways(tmp_path, _recipe(tmp_path, precision, cache={"dtype": dtype}))
    assert out["precision"] == precision and run.meta.precision == precision
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["precision"] == precision
    same = np.abs(images.logits - cached.logits).max()
    other = np.abs(_fp32_full_model_logits(run) - cached.logits).max()
    assert same <= 1e-6 and other >= 100 * max(same, 1e-7), (same, other)
    # And the command: the same scores from the cache and from the images.
    from_cache = invoke("evaluate", path, "--json")
    shutil.rmtree(tmp_path / "cache")
    from_images = invoke("evaluate", path, "--json")
    a, b = json.loads(from_cache.stdout), json.loads(from_images.stdout)
    assert (a["scored_from"], b["scored_from"]) == ("cache", "images")
    assert a["accuracy"] == b["accuracy"] and a["confusion_matrix"] == b["confusion_matrix"]


def _fp32_full_model_logits(run) -> np.ndarray:
    from tlcli.data.sources import plan_data
    from tlcli.data.pipeline import ImageLoader

    plan = plan_data(run.recipe.data)
    model = run.model.eval()
    out = []
    with torch.inference_mode():
        for x, _ in ImageLoader(plan.splits["test"], run.preprocess, run.recipe.data.batch_size, CPU, 0):
            out.append(model(x).float())
    return torch.cat(out).numpy()


def test_an_image_stage_trains_and_is_scored_under_autocast(tmp_path):
    """Two stages, the second on images at bf16: evaluate and predict run the whole model under
    autocast, exactly as that stage's own forward (its validation) did; not the fp32 model."""
    from tlcli.engine.inference import run_forward
    from tlcli.engine.precision import Precision
    from tlcli.engine.stage import StageForward
    from tlcli.model.build import build_network
    from tlcli.run.checkpoint import load_checkpoint

    stages = [{"name": "head", "epochs": 1}, {"name": "body", "epochs": 1, "input": "images",
                                               "freeze": {"until": "stem"}, "fine_tune": {"lr": 0.001}}]
    recipe = _recipe(tmp_path, "bf16", stages=stages)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    fitted = invoke("fit", path, "--json")
    assert fitted.exit_code == 0, fitted.output
    run = load_checkpoint(tmp_path / "run")
    assert run.meta.precision == "bf16" and run.meta.stages[-1].input == "images"
    torch.manual_seed(0)
    side = run.preprocess.size
    x = torch.randn(8, len(run.preprocess.mean), side, side)
    network = build_network(Recipe.model_validate(recipe), run.class_names, weights=False)
    network.model.load_state_dict(run.model.net.state_dict())
    stage_view = network.for_stage(network.stages[-1])
    trained = StageForward(stage_view, True, CPU, precision=Precision("bf16", "test"))
    trained.train(False)
    with torch.inference_mode():
        ours = run_forward(run, CPU)(x)
        theirs = trained([x])
        plain = run.model.eval()(x).float()
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert not torch.equal(ours, plain)


def test_a_run_started_in_bf16_by_auto_is_not_resumed_in_fp32_on_another_cpu(tmp_path, monkeypatch):
    """`precision: auto` is resolved per machine: interrupted on an AMX machine (bf16), the run
    is refused on an AVX2 one (fp32) rather than going on with other features; resumed on the
    AMX machine it finishes."""
    import tlcli.engine.precision as precision
    from tlcli.config.reading import load_recipe
    from tlcli.engine.fit_steps import FitHooks
    from tlcli.engine.train import fit

    class StopAt2(FitHooks):
        def on_train_epoch_end(self, stage, epoch, model):
            if epoch == 2:
                raise KeyboardInterrupt

    path = write_recipe(tmp_path / "recipe.yaml", _recipe(tmp_path, "auto", fine_tune={"epochs": 4}))
    monkeypatch.setattr(precision, "cpu_flags", lambda: SAPPHIRE_RAPIDS)
    with pytest.raises(KeyboardInterrupt):
        fit(load_recipe(path), hooks=StopAt2())
    state = json.loads((tmp_path / "run" / "resume" / "state.json").read_text())
    assert state["precision"] == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: EPYC_ZEN2)
    refused = invoke("fit", path, "--resume")
    assert refused.exit_code != 0 and "this run trained in bf16; here it would go on in fp32" in refused.output, \
        refused.output
    assert "Traceback" not in refused.output
    monkeypatch.setattr(precision, "cpu_flags", lambda: SAPPHIRE_RAPIDS)
    resumed = invoke("fit", path, "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["precision"] == "bf16"


@pytest.mark.parametrize("flags, said", [(SAPPHIRE_RAPIDS, True), (EPYC_ZEN2, False)])
def test_a_recipe_left_at_fp32_hears_of_bf16_after_the_work_only_where_the_cpu_has_it(tmp_path, monkeypatch, flags,
                                                                                       said):
    import tlcli.engine.precision as precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    recipe = tiny_recipe(tmp_path)
    del recipe["precision"]  # the default
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    fitted = invoke("fit", path)
    assert fitted.exit_code == 0, fitted.output
    lines = fitted.stderr.strip().splitlines()
    hinted = [line for line in lines if "`precision: auto`" in line]
    assert bool(hinted) == said, fitted.stderr
    if said:
        assert lines[-1] == hinted[0] and "amx_bf16" in hinted[0]  # the last word, after the work
    # A recipe that names its precision has chosen: no hint.
    pinned = invoke("fit", write_recipe(tmp_path / "pinned.yaml", {**recipe, "precision": "fp32"}), "--force")
    assert "`precision: auto`" not in pinned.stderr
