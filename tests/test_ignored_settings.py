"""Every setting that the recipe's own choices make tl ignore is told, as a warning at its line,
and every boundary mistake is refused at `tl validate`, at its line."""

from __future__ import annotations

import re
import textwrap

import pytest

from conftest import invoke, make_imagefolder

HEAD = """\
base: {zoo: tl, model: tiny_resnet, weights: none}
data: DATA
cache: CACHE_SPEC
output_dir: RUN
device: cpu
"""


def recipe_file(tmp_path, body: str, data: str = "{dataset: digits, limit: 200}", cache: str = "{dir: CACHE}"):
    """HEAD (lines 1-5: data on line 2, cache on 3) then `body` from line 6; paths inside tmp_path."""
    text = HEAD.replace("DATA", data).replace("CACHE_SPEC", cache) + textwrap.dedent(body)
    text = text.replace("CACHE", str(tmp_path / "cache")).replace("RUN", str(tmp_path / "run"))
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def warnings_of(output: str) -> list[str]:
    return [line[len("warning: "):] for line in output.splitlines() if line.startswith("warning: ")]


# (body from line 6, the warning expected: "LINE: dotted.path: ignored...")
STATIC = {
    "lbfgs ignores lr": ("freeze: {until: dropout}\nfine_tune: {optimizer: lbfgs, lr: 0.1}\n",
                         "7: fine_tune.lr: ignored: lbfgs fits this head"),
    "lbfgs ignores schedule": ("freeze: {until: dropout}\nfine_tune:\n  optimizer: lbfgs\n  schedule: cosine\n",
                               "9: fine_tune.schedule: ignored: lbfgs"),
    "lbfgs ignores warmup": ("freeze: {until: dropout}\nfine_tune: {optimizer: lbfgs, warmup_epochs: 1}\n",
                             "7: fine_tune.warmup_epochs: ignored: lbfgs"),
    "lbfgs ignores the batch size": ("freeze: {until: dropout}\nfine_tune: {optimizer: lbfgs, batch_size: 8}\n",
                                     "7: fine_tune.batch_size: ignored: lbfgs"),
    "lbfgs ignores label smoothing": ("freeze: {until: dropout}\nfine_tune: {optimizer: lbfgs, label_smoothing: 0.1}\n",
                                      "7: fine_tune.label_smoothing: ignored: lbfgs"),
    "lbfgs ignores grad_clip": ("freeze: {until: dropout}\nfine_tune: {optimizer: lbfgs, grad_clip: 1.0}\n",
                                "7: fine_tune.grad_clip: ignored: lbfgs"),
    "adam has no momentum": ("freeze: {until: block.1}\nfine_tune: {optimizer: adam, momentum: 0.5}\n",
                             "7: fine_tune.momentum: ignored: adam has no momentum setting"),
    "steps without schedule step": ("freeze: {until: block.1}\nfine_tune: {optimizer: sgd, step_epochs: 3}\n",
                                    "7: fine_tune.step_epochs: ignored: schedule constant has no steps"),
    "head init with no head replaced": ("freeze: {until: block.1}\nhead: {layer: none, init: normal}\n",
                                        "7: head.init: ignored: head: {layer: none} replaces no layer"),
    "cache settings with no cache stage": (
        "freeze: {until: block.1}\nfine_tune: {optimizer: adam}\naugment: {hflip: 0.5}\n",
        "3: cache.dtype: ignored: no stage trains from the feature cache", {"cache": "{dir: CACHE, dtype: bfloat16}"}),
    "a field the added node's type does not read": (
        "freeze: {until: block.1}\nsurgery:\n  - add: {name: d2, type: dropout, inputs: [flatten], p: 0.1, n_out: 3}\n",
        "8: surgery.0.add.n_out: ignored: a dropout node does not read it"),
    "on_bad_image for the built-in digits": (
        "freeze: {until: block.1}\n", "2: data.on_bad_image: ignored: the built-in digits are not decoded from files",
        {"data": "{dataset: digits, limit: 200, on_bad_image: skip}"}),
    "an augment that changes nothing": (
        "freeze: {until: block.1}\nfine_tune: {optimizer: adam}\naugment: {hflip: 0}\n",
        "8: augment: augments nothing (hflip 0, no random_resized_crop, no color_jitter)"),
    "refit under adam": ("freeze: {until: block.1}\nfine_tune: {optimizer: adam, refit: false}\n",
                         "7: fine_tune.refit: ignored: adam keeps val held out"),
    "refit under early stopping": (
        "freeze: {until: dropout}\nfine_tune:\n  optimizer: lbfgs\n  early_stopping: {patience: 2}\n  refit: true\n",
        "10: fine_tune.refit: ignored: early stopping keeps the epoch that scored best on val"),
    "refit in a stage another follows": (
        "freeze: {until: dropout}\nstages:\n  - name: probe\n    fine_tune: {optimizer: lbfgs, refit: true}\n"
        "  - name: more\n    freeze: {until: block.1}\n    fine_tune: {optimizer: adam}\n",
        "9: stages.0.fine_tune.refit: ignored: a later stage trains on from this one"),
    "a stage's own lr under lbfgs": (
        "freeze: {until: dropout}\nstages:\n  - name: probe\n    fine_tune: {optimizer: lbfgs, lr: 0.5}\n",
        "9: stages.0.fine_tune.lr: ignored: lbfgs"),
}


@pytest.mark.parametrize("case", STATIC, ids=list(STATIC))
def test_validate_warns_of_each_ignored_setting_at_its_line(tmp_path, case):
    body, expected, *head = STATIC[case]
    path = recipe_file(tmp_path, body, **(head[0] if head else {}))
    result = invoke("validate", path)
    assert result.exit_code == 0, result.output
    told = warnings_of(result.stderr)
    assert any(w.startswith(f"{path}:{expected}") for w in told), f"expected {expected!r} among {told}"
    assert len(told) == 1, told  # and nothing else is flagged


def test_settings_that_are_read_are_not_flagged(tmp_path):
    """Controls: the same keys where their path reads them."""
    path = recipe_file(tmp_path, """\
        freeze: {until: block.1}
        surgery:
          - add: {name: d2, type: dropout, inputs: [flatten], p: 0.1}
        fine_tune: {optimizer: sgd, lr: 0.1, momentum: 0.5, schedule: step, step_epochs: 2, label_smoothing: 0.1,
                    grad_clip: 1.0, batch_size: 16, weight_decay: 0.001}
        """)
    result = invoke("validate", path)
    assert result.exit_code == 0 and warnings_of(result.stderr) == [], result.output


def test_the_quickstart_recipe_warns_of_nothing():
    result = invoke("validate", "recipes/quickstart.yaml")
    assert result.exit_code == 0 and warnings_of(result.stderr) == [], result.output


def test_warnings_come_in_line_order(tmp_path):
    path = recipe_file(tmp_path, """\
        freeze: {until: dropout}
        head: {layer: auto, init: normal}
        fine_tune:
          optimizer: lbfgs
          schedule: cosine
          lr: 0.1
        """, data="{dataset: digits, limit: 200, on_bad_image: skip}")
    lines = [int(re.match(r".*?:(\d+): ", w).group(1)) for w in warnings_of(invoke("validate", path).stderr)]
    assert lines == sorted(lines) and len(lines) == 3, lines


def test_lbfgs_on_a_stage_that_trains_on_images_is_refused_at_validate(tmp_path):
    path = recipe_file(tmp_path, "freeze: {until: dropout}\nfine_tune: {optimizer: lbfgs}\naugment: {hflip: 0.5}\n")
    result = invoke("validate", path)
    assert result.exit_code == 1
    assert f"error: {path}:7: fine_tune.optimizer: lbfgs fits a Linear head on cached features" in result.stderr


# --------------------------------------------------------------------------- told when fit resolves them


def fit_warnings(tmp_path, body: str, *overrides: str) -> tuple[str, list[str]]:
    path = recipe_file(tmp_path, body)
    result = invoke("fit", path, *overrides)
    assert result.exit_code == 0, result.output
    return str(path), warnings_of(result.stderr)


def test_the_readme_override_of_lr_under_auto_is_told(tmp_path):
    """`tl fit recipes/quickstart.yaml fine_tune.lr=0.01` ran and ignored lr, saying nothing."""
    _, told = fit_warnings(tmp_path, "freeze: {until: dropout}\nfine_tune: {epochs: 2}\n", "fine_tune.lr=0.01")
    assert told == ["override fine_tune.lr: ignored: optimizer auto fits this head with L-BFGS (full batch, its own "
                    "step size); set optimizer: adam to use it"]


def test_auto_resolving_to_adam_reads_lr_and_tells_nothing(tmp_path):
    """Control: a head of more than one layer trains with adam, which reads lr."""
    _, told = fit_warnings(tmp_path, "freeze: {until: block.1}\nfine_tune: {epochs: 1, lr: 0.01}\n")
    assert told == []


def test_lr_in_the_recipe_under_auto_is_told_at_its_line(tmp_path):
    path, told = fit_warnings(tmp_path, "freeze: {until: dropout}\nfine_tune:\n  epochs: 2\n  lr: 0.01\n")
    assert [w for w in told if "fine_tune.lr" in w] == [f"{path}:9: fine_tune.lr: ignored: optimizer auto fits this "
                                                      "head with L-BFGS (full batch, its own step size); set optimizer: "
                                                      "adam to use it"]


def test_dropout_and_train_bn_with_nothing_to_act_on_are_told(tmp_path):
    path, told = fit_warnings(tmp_path, "freeze: {until: dropout}\nfine_tune:\n  epochs: 1\n  dropout: 0.2\n"
                                        "  train_bn: false\n")
    assert f"{path}:9: fine_tune.dropout: ignored: this stage trains no Dropout layer" in told
    assert f"{path}:10: fine_tune.train_bn: ignored: this stage trains no BatchNorm layer" in told


def test_dropout_and_train_bn_that_reach_a_layer_are_not_told(tmp_path):
    """Control: below block.1 the stage trains a BatchNorm and the Dropout."""
    _, told = fit_warnings(tmp_path, "freeze: {until: block.1}\nfine_tune:\n  epochs: 1\n  dropout: 0.2\n"
                                     "  train_bn: false\n")
    assert told == []


def test_a_split_for_a_folder_split_on_disk_is_told(tmp_path):
    root = make_imagefolder(tmp_path / "folder", per_class=6, split_dirs=("train", "val", "test"))
    path = recipe_file(tmp_path, "freeze: {until: block.1}\nfine_tune: {epochs: 1}\n",
                       data=f"{{imagefolder: {root}, split: {{val: 0.2}}}}")
    result = invoke("fit", path)
    assert result.exit_code == 0, result.output
    assert any(w.startswith(f"{path}:2: data.split: ignored: ") and "split on disk" in w
               for w in warnings_of(result.stderr)), result.stderr


def test_distributed_settings_in_one_process_are_told(tmp_path):
    path, told = fit_warnings(tmp_path, "freeze: {until: block.1}\nfine_tune: {epochs: 1}\ndistributed: {batch: per_rank}\n")
    assert told == [f"{path}:8: distributed.batch: ignored: read under torchrun only (this is one process)"]


def test_quiet_still_tells_ignored_settings(tmp_path):
    path = recipe_file(tmp_path, "freeze: {until: dropout}\nfine_tune: {epochs: 1}\n")
    result = invoke("fit", path, "--quiet", "fine_tune.lr=0.01")
    assert result.exit_code == 0 and result.stdout == ""
    assert "warning: override fine_tune.lr: ignored" in result.stderr


# --------------------------------------------------------------------------- boundary mistakes


def test_an_empty_until_is_refused_at_its_line(tmp_path):
    """`freeze: {until: }` froze nothing, silently: validate said ok and fit trained the whole net."""
    path = recipe_file(tmp_path, "freeze:\n  until:\n")
    result = invoke("validate", path)
    assert result.exit_code == 1
    assert re.search(rf"error: {re.escape(str(path))}:7: freeze.until: .*names no node", result.stderr), result.stderr


def test_a_null_freeze_is_refused(tmp_path):
    path = recipe_file(tmp_path, "freeze:\nhead: {init: xavier}\n")
    result = invoke("validate", path)
    assert result.exit_code == 1 and f"{path}:6: freeze: names no boundary" in result.stderr, result.stderr


@pytest.mark.parametrize("written", ["none", "{}"])
def test_saying_nothing_is_frozen_is_accepted(tmp_path, written):
    """Controls: `none` and an empty mapping say it outright."""
    result = invoke("validate", recipe_file(tmp_path, f"freeze: {written}\n"))
    assert result.exit_code == 0 and warnings_of(result.stderr) == [], result.output


def test_trainable_layers_with_nothing_frozen_are_refused(tmp_path):
    path = recipe_file(tmp_path, "freeze: {trainable: [fc]}\n")
    result = invoke("validate", path)
    assert result.exit_code == 1 and f"{path}:6: freeze: trainable names layers" in result.stderr, result.stderr


def test_a_saved_recipe_reads_back_with_its_freeze():
    """The dumped recipe (saved in every run directory) reads back: no `until: null` left in it."""
    from tlcli.config.schema import FreezeSpec

    for written in ("none", {"until": "x"}, {"all_but_last": 2}, {"until": ["a", "b"], "trainable": ["c"]}):
        spec = FreezeSpec.model_validate(written)
        assert FreezeSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_a_boundary_that_freezes_everything_is_refused_at_validate(tmp_path):
    """`until: fc` (the head itself) left nothing to train, and only fit said so."""
    path = recipe_file(tmp_path, "freeze:\n  until: fc\n")
    result = invoke("validate", path)
    assert result.exit_code == 1
    assert f"error: {path}:7: freeze.until: everything is frozen: there is nothing left to train" in result.stderr


def test_a_stage_boundary_that_freezes_everything_is_refused_at_its_line(tmp_path):
    path = recipe_file(tmp_path, "freeze: {until: block.1}\nstages:\n  - name: a\n  - name: b\n    freeze: {until: fc}\n")
    result = invoke("validate", path)
    assert result.exit_code == 1
    assert f"error: {path}:10: stages.1.freeze.until: everything is frozen" in result.stderr, result.stderr


def test_the_last_boundary_that_leaves_the_head_trains(tmp_path):
    """Control: the node just before the head is a legal boundary."""
    result = invoke("validate", recipe_file(tmp_path, "freeze:\n  until: dropout\n"))
    assert result.exit_code == 0, result.output
