"""Training depth: stages, end-to-end fit on images with augmentation,
per-layer and discriminative lr, early stopping, dropout override,
continue-from-checkpoint, exact resume after SIGKILL, determinism."""

import contextlib
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tlcli.run.checkpoint import load_checkpoint
from tlcli.data.sources import plan_data
from tlcli.errors import RecipeError
from tlcli.config.schema import FineTuneSpec, Recipe
from tlcli.config.reading import parse_recipe
from tlcli.model.build import build_network
from tlcli.engine.optim import block_of, param_groups
from tlcli.engine.train import FitHooks, fit
from tlcli.config.stages import plan_stages
from tlcli.engine.precision import FP32

from killing import kill_when, start
from conftest import REPO, tiny_recipe, write_recipe

TWO_STAGES = [
    {"name": "head", "epochs": 2},
    {"name": "deeper", "freeze": {"until": "stem"}, "epochs": 3,
     "fine_tune": {"lr": 0.003, "weight_decay": 0.5},
     "augment": {"random_resized_crop": {"scale": [0.7, 1.0]}, "hflip": 0.5, "color_jitter": {"brightness": 0.2}}},
]


def two_stage(tmp_path, **sections) -> dict:
    return tiny_recipe(tmp_path, stages=TWO_STAGES, **{"fine_tune": {"weight_decay": 0.5}, **sections})


def test_stage_plan_resolves_inputs_and_overrides(tmp_path):
    stages = plan_stages(Recipe.model_validate(two_stage(tmp_path)))
    assert [(s.name, s.input, s.fine_tune.epochs, s.fine_tune.lr) for s in stages] == [
        ("head", "cache", 2, 0.01), ("deeper", "images", 3, 0.003)]
    assert stages[1].fine_tune.optimizer == "adam"  # inherited from the recipe's fine_tune


def test_augmentation_with_cache_input_fails_validation_with_the_reason(tmp_path):
    stages = [{"name": "head", "input": "cache", "augment": {"hflip": 0.5}}]
    text = yaml.safe_dump(tiny_recipe(tmp_path, stages=stages), sort_keys=False)
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, name="r.yaml")
    message = str(err.value)
    assert "stages.0.augment" in message and "the cache holds un-augmented activations" in message
    assert f"r.yaml:{text.splitlines().index('  augment:') + 1}:" in message


def test_stage_fine_tune_override_errors_point_into_the_stage(tmp_path):
    stages = [{"name": "a", "fine_tune": {"lr": -1, "optimzer": "sgd"}}]
    with pytest.raises(RecipeError) as err:
        parse_recipe(yaml.safe_dump(tiny_recipe(tmp_path, stages=stages), sort_keys=False), name="r.yaml")
    assert "stages.0.fine_tune.lr" in str(err.value) and "did you mean 'optimizer'" in str(err.value)


class StageEnds(FitHooks):
    """Captures the model state each time a stage ends."""

    def __init__(self):
        self.states = []

    def on_stage_end(self, stage, net):
        self.states.append({k: v.detach().clone() for k, v in net.state_dict().items()})


def test_every_stage_keeps_its_frozen_part_bit_identical(tmp_path):
    recipe = Recipe.model_validate(two_stage(tmp_path))
    plan = plan_data(recipe.data)
    prepared = build_network(recipe, plan.class_names)
    initial = {k: v.clone() for k, v in prepared.model.state_dict().items()}
    stages = plan_stages(recipe)
    frozen = [set(prepared.for_stage(s).split.frozen_state_names(prepared.model)) for s in stages]
    assert frozen[1] < frozen[0] and "block.1.running_mean" in frozen[0] - frozen[1]
    hooks = StageEnds()
    result = fit(recipe, hooks=hooks)
    ends = hooks.states
    final = load_checkpoint(result.run_dir).model.net.state_dict()
    assert len(ends) == 2 and all(torch.equal(ends[1][k], final[k]) for k in final)
    for stage, (frozen_names, after) in enumerate(zip(frozen, [ends[0], final])):
        for k in frozen_names:
            # weight_decay is 0.5: any decay applied to a frozen tensor would show.
            assert torch.equal(initial[k], after[k]), f"stage {stage + 1}: frozen {k} changed"
    # Stage 2 trained what stage 1 had frozen, BN statistics included (BN in train mode there).
    assert not torch.equal(ends[0]["block.0.weight"], final["block.0.weight"])
    assert not torch.equal(ends[0]["block.1.running_mean"], final["block.1.running_mean"])
    rows = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [("head", 1), ("head", 2), ("deeper", 1), ("deeper", 2), ("deeper", 3)]
    meta = json.loads((result.run_dir / "checkpoint.json").read_text())
    assert [s["input"] for s in meta["stages"]] == ["cache", "images"] and meta["frontier"] == ["stem.2"]


def test_frozen_part_stays_in_eval_while_training_on_images(tmp_path):
    class Modes(FitHooks):
        seen = []

        def on_train_epoch_end(self, stage, epoch, model):
            if model.extractor is not None:
                net = model.pinned.net
                self.seen.append((net.get_submodule("stem.1").training, net.get_submodule("block.1").training))

    fit(Recipe.model_validate(two_stage(tmp_path)), hooks=Modes())
    assert Modes.seen == [(False, True)] * 3


def test_same_recipe_and_seed_give_identical_metrics_across_stages(tmp_path):
    a = fit(Recipe.model_validate(two_stage(tmp_path / "a")))
    b = fit(Recipe.model_validate(two_stage(tmp_path / "b")))
    assert (a.run_dir / "metrics.jsonl").read_text() == (b.run_dir / "metrics.jsonl").read_text()
    sa, sb = load_file(str(a.run_dir / "model.safetensors")), load_file(str(b.run_dir / "model.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _kill_after(recipe_path, run_dir, stage: int, epoch: int) -> None:
    """Start `tl fit` as a process and SIGKILL it once it has saved (stage, epoch)."""
    state_file = run_dir / "resume" / "state.json"

    def saved() -> bool:
        s = None
        with contextlib.suppress(OSError, ValueError):  # not written yet, or mid-replace
            s = json.loads(state_file.read_text())
        return s is not None and (s["stage"], s["epoch"]) >= (stage, epoch)

    assert kill_when(start(["fit", recipe_path]), saved), "the run finished before it could be killed; make it longer"
    assert not (run_dir / "checkpoint.json").exists()


@pytest.mark.parametrize("stage,epoch", [(0, 2), (1, 2)], ids=["stage1", "stage2"])
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, stage, epoch, cli):
    stages = [{"name": "head", "epochs": 6},
              {"name": "deeper", "freeze": {"until": "stem"}, "epochs": 12, "fine_tune": {"lr": 0.003, "schedule": "cosine"},
               "augment": {"random_resized_crop": {"scale": [0.7, 1.0]}}}]
    recipe = tiny_recipe(tmp_path, stages=stages, data={"limit": 400})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run_dir = tmp_path / "run"
    _kill_after(path, run_dir, stage, epoch)
    saved = json.loads((run_dir / "resume" / "state.json").read_text())
    assert (saved["stage"], saved["epoch"]) >= (stage, epoch)

    code, out = cli("fit", path)
    assert code == 1 and "interrupted run" in out and "--resume" in out  # no silent restart
    code, out = cli("fit", path, "--resume")
    assert code == 0, out

    reference = tiny_recipe(tmp_path / "ref", stages=stages, data={"limit": 400})
    reference["cache"] = recipe["cache"]
    ref = fit(Recipe.model_validate(reference))
    resumed = load_file(str(run_dir / "model.safetensors"))
    expected = load_file(str(ref.run_dir / "model.safetensors"))
    assert resumed.keys() == expected.keys()
    for k in expected:
        assert torch.equal(resumed[k], expected[k]), k
    assert (run_dir / "metrics.jsonl").read_text() == (ref.run_dir / "metrics.jsonl").read_text()
    assert not (run_dir / "resume").exists()


def test_resume_refuses_a_changed_recipe_and_a_finished_run(tmp_path, cli):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fine_tune={"epochs": 1}))
    code, out = cli("fit", path, "--resume")
    assert code == 1 and "no interrupted run" in out
    assert cli("fit", path)[0] == 0
    code, out = cli("fit", path, "--resume")
    assert code == 1 and "finished run" in out


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    ft = {"lr": 0.3, "epochs": 12, "optimizer": "sgd", "early_stopping": {"monitor": "val_loss", "patience": 2}}
    result = fit(Recipe.model_validate(tiny_recipe(tmp_path, fine_tune=ft)))
    rows = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    best = min(range(len(rows)), key=lambda i: rows[i]["val_loss"])
    meta = json.loads((result.run_dir / "checkpoint.json").read_text())
    assert meta["stages"][0]["best_epoch"] == best + 1
    assert len(rows) == best + 1 + 2 < 12  # stopped after `patience` epochs without improvement
    assert meta["stages"][0]["epochs_run"] == len(rows) == result.epochs  # epochs run, not one more
    # What fit reports is the kept (best) epoch's row, not the last one's.
    assert result.best_kept and result.final == rows[best] and result.final != rows[-1]
    # The saved model is the best epoch's: its val loss is the best one.
    from tlcli.engine.cache import cached_batches
    from tlcli.engine.train import evaluate_epoch
    from tlcli.engine.stage import StageForward
    from tlcli.engine.features import featurize

    recipe = Recipe.model_validate(tiny_recipe(tmp_path, fine_tune=ft))
    ckpt = load_checkpoint(result.run_dir)
    plan = plan_data(recipe.data)
    prepared = build_network(recipe, plan.class_names)
    prepared.model.load_state_dict(ckpt.model.net.state_dict())
    cache = featurize(prepared, plan, torch.device("cpu"), recipe.cache, recipe.data, precision=FP32)
    val = evaluate_epoch(StageForward(prepared, False, torch.device("cpu")), cached_batches(cache, "val", 1024, None), "cpu")
    assert val["loss"] == pytest.approx(rows[best]["val_loss"], abs=1e-6)


def test_early_stopping_needs_a_validation_split(tmp_path, cli):
    r = tiny_recipe(tmp_path, fine_tune={"early_stopping": {"patience": 2}}, data={"split": {"val": 0.0, "test": 0.2}})
    code, out = cli("fit", write_recipe(tmp_path / "r.yaml", r))
    assert code == 1 and "fine_tune.early_stopping: early stopping watches the validation split" in out


def test_discriminative_and_per_layer_learning_rates():
    assert [block_of(n) for n in ("blocks.5.2.conv_pw.weight", "layer4.1.bn1.bias", "features.28.weight", "conv_head.weight", "fc.bias")] == [
        "blocks.5", "layer4.1", "features.28", "conv_head", "fc"]
    p = lambda *shape: torch.nn.Parameter(torch.zeros(*shape))
    named = [("blocks.5.0.conv.weight", p(4, 4, 1, 1)), ("blocks.5.0.bn.weight", p(4)), ("blocks.6.0.conv.weight", p(4, 4, 1, 1)),
             ("conv_head.weight", p(4, 4, 1, 1)), ("classifier.weight", p(2, 4)), ("classifier.bias", p(2))]
    ft = FineTuneSpec(lr=0.1, layer_decay=0.5, weight_decay=0.01)
    groups = param_groups(ft, named, {"blocks.6": 0.7})
    lr_of = {n: g["lr"] for g in groups for n in g["names"]}
    assert lr_of == pytest.approx({"classifier.weight": 0.1, "classifier.bias": 0.1, "conv_head.weight": 0.05,
                                   "blocks.6.0.conv.weight": 0.7, "blocks.5.0.conv.weight": 0.0125, "blocks.5.0.bn.weight": 0.0125})
    wd_of = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert wd_of["classifier.bias"] == wd_of["blocks.5.0.bn.weight"] == 0.0 and wd_of["classifier.weight"] == 0.01


def test_layer_lr_reaches_the_optimizer(tmp_path):
    recipe = Recipe.model_validate(tiny_recipe(tmp_path, freeze={"until": "stem"}, fine_tune={"lr": 0.01, "layer_lr": {"fc": 0.5}, "epochs": 1}))
    result = fit(recipe)
    rows = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == 0.5  # the largest group lr is logged


def test_dropout_override_touches_only_trainable_dropout(tmp_path):
    class Dropout(FitHooks):
        p = None

        def on_stage_end(self, stage, net):
            Dropout.p = net.dropout.p

    fit(Recipe.model_validate(tiny_recipe(tmp_path, fine_tune={"dropout": 0.45, "epochs": 1})), hooks=Dropout())
    assert Dropout.p == 0.45
    from tlcli.engine.stage import apply_dropout
    from tlcli.model.tiny import TinyResNet

    m = TinyResNet()
    apply_dropout(m, ["dropout"], 0.9)
    assert m.dropout.p == 0.2  # frozen dropout is left alone


def test_continue_from_checkpoint_with_a_new_boundary(tmp_path):
    first = fit(Recipe.model_validate(tiny_recipe(tmp_path / "a", freeze={"until": "pool"}, fine_tune={"epochs": 2})))
    trained = load_file(str(first.run_dir / "model.safetensors"))
    r = tiny_recipe(tmp_path / "b", base={"checkpoint": str(first.run_dir)}, freeze={"until": "stem"}, fine_tune={"epochs": 1})
    r["base"] = {"checkpoint": str(first.run_dir)}
    recipe = Recipe.model_validate(r)
    plan = plan_data(recipe.data)
    prepared = build_network(recipe, plan.class_names)
    # The base is the trained run, head included (same classes: continuing).
    start = prepared.model.state_dict()
    assert all(torch.equal(start[k], trained[k]) for k in trained)
    second = fit(recipe)
    after = load_file(str(second.run_dir / "model.safetensors"))
    assert all(torch.equal(after[k], trained[k]) for k in trained if k.startswith("stem."))
    assert not torch.equal(after["block.0.weight"], trained["block.0.weight"])
    saved = yaml.safe_load((second.run_dir / "recipe.yaml").read_text())
    assert saved["base"]["checkpoint"] == str(first.run_dir.resolve())
    assert load_checkpoint(second.run_dir).class_names == [str(i) for i in range(10)]


def test_continue_from_a_missing_checkpoint_is_a_recipe_error(tmp_path, cli):
    r = tiny_recipe(tmp_path)
    r["base"] = {"checkpoint": str(tmp_path / "nope")}
    code, out = cli("validate", write_recipe(tmp_path / "r.yaml", r))
    assert code == 1 and "base.checkpoint" in out and "no finished run" in out


def test_shipped_two_stage_recipe_plans_cache_then_images():
    from tlcli.config.reading import load_recipe

    stages = plan_stages(load_recipe(REPO / "recipes" / "digits-two-stage.yaml"))
    assert [s.input for s in stages] == ["cache", "images"]


class _Crash(Exception):
    """A crash in the middle of a fit, raised from a hook."""


def test_resume_state_holds_only_trained_tensors_and_pins_the_rest(tmp_path, cli):
    """A cache stage's resume file has the head, not the frozen backbone; the backbone
    is rebuilt from the recipe on resume, and a changed weights file is refused."""
    from safetensors.torch import save_file

    from tlcli.model.tiny import TinyResNet

    def weights(seed):
        torch.manual_seed(seed)
        save_file(TinyResNet().state_dict(), str(tmp_path / "w.safetensors"))

    class CrashAtEpoch2(FitHooks):
        def on_train_epoch_end(self, stage, epoch, model):
            if epoch == 2:
                raise _Crash()

    weights(1)
    recipe = tiny_recipe(tmp_path, base={"weights": {"file": str(tmp_path / "w.safetensors")}}, freeze={"until": "pool"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(_Crash):
        fit(Recipe.model_validate(recipe), hooks=CrashAtEpoch2())
    state = json.loads((tmp_path / "run" / "resume" / "state.json").read_text())
    saved = load_file(str(tmp_path / "run" / "resume" / state["files"]["model"]))
    assert sorted(saved) == ["fc.bias", "fc.weight"]
    weights(2)  # the base changes under the interrupted run
    code, out = cli("fit", path, "--resume")
    assert code == 1 and "frozen weights changed since this run started" in out
    weights(1)
    assert cli("fit", path, "--resume")[0] == 0


def test_a_cache_holds_only_the_splits_something_reads(tmp_path):
    """Stage 1's cache trains stage 1; evaluate scores the final model, whose frozen part is
    stage 2's: stage 1's test rows would never be read, so they are not computed."""
    fit(Recipe.model_validate(two_stage(tmp_path)))
    manifests = [json.loads(m.read_text()) for m in (tmp_path / "cache").glob("*/manifest.json")]
    assert [sorted(m["splits"]) for m in manifests] == [["train", "val"]]
    fit(Recipe.model_validate(tiny_recipe(tmp_path / "one", cache={"dir": str(tmp_path / "cache1")})))
    manifests = [json.loads(m.read_text()) for m in (tmp_path / "cache1").glob("*/manifest.json")]
    assert [sorted(m["splits"]) for m in manifests] == [["test", "train", "val"]]


def test_an_unaugmented_image_stage_decodes_once_and_trains_exactly_as_decoding_every_epoch(tmp_path, monkeypatch):
    """Held decoded images (they fit cache.memory_mib) are the loader's batches, in the epoch's
    shuffled order: the metrics are identical to a run that decodes every epoch (memory_mib: 0),
    and the images were decoded once per split rather than once per epoch."""
    import tlcli.engine.stage as stage_module
    from tlcli.config.reading import load_recipe
    from tlcli.engine.train import fit

    made = []
    original = stage_module.ImageLoader

    def counting(*args, **kwargs):
        made.append(len(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(stage_module, "ImageLoader", counting)
    stages = [{"name": "images", "input": "images", "epochs": 3}]
    runs = {}
    for memory in (0, 2048):
        r = tiny_recipe(tmp_path / str(memory), stages=stages, cache={"memory_mib": memory})
        made.clear()
        fit(load_recipe(write_recipe(tmp_path / f"{memory}.yaml", r)))
        runs[memory] = ((tmp_path / str(memory) / "run" / "metrics.jsonl").read_text(), len(made))
    assert runs[0][0] == runs[2048][0]
    assert runs[0][1] == 6 and runs[2048][1] == 2  # train and val each epoch, against once each


def test_an_augment_that_changes_nothing_trains_as_an_unaugmented_image_stage(tmp_path, monkeypatch):
    """`augment: {hflip: 0}` (the fuzzer's case: torchvision refuses an empty Compose) is no
    augmentation: the stage trains on images, holds them decoded, and gives the
    metrics of the same stage with no augment at all."""
    import tlcli.engine.stage as stage_module
    from tlcli.config.reading import load_recipe
    from tlcli.engine.train import fit

    made = []
    original = stage_module.ImageLoader
    monkeypatch.setattr(stage_module, "ImageLoader", lambda *a, **k: made.append(1) or original(*a, **k))
    runs = {}
    for name, extra in (("none", {}), ("nothing", {"augment": {"hflip": 0}})):
        stages = [{"name": "images", "input": "images", "epochs": 2, **extra}]
        made.clear()
        fit(load_recipe(write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(tmp_path / name, stages=stages))))
        runs[name] = ((tmp_path / name / "run" / "metrics.jsonl").read_text(), len(made))
    assert runs["nothing"] == runs["none"]
    assert runs["nothing"][1] == 2  # train and val decoded once: held, as without augment
