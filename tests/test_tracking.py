"""Experiment tracking, read back with the trackers' own readers: TensorBoard's
EventAccumulator and MLflow's client. A resumed fit continues the same TensorBoard and MLflow
runs without duplicated steps; a tracker that is not installed is one line naming its extra."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import invoke, tiny_recipe, write_recipe



class Killed(Exception):
    """Stands for a kill at one exact point of the fit."""


def _recipe(tmp_path, **extra):
    recipe = tiny_recipe(tmp_path, fine_tune={"epochs": 5},
                         tracking={"to": ["tensorboard", "mlflow", "csv"],
                                   "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, **extra)
    return write_recipe(tmp_path / "r.yaml", recipe)


def _ok(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def _mlflow(tmp_path, run):
    from mlflow import MlflowClient

    record = json.loads((run / "tracking.json").read_text())["mlflow"]
    return MlflowClient(tracking_uri=record["uri"]), record["run_id"]


def test_a_fit_and_its_evaluation_read_back_from_tensorboard_mlflow_and_the_csv(tmp_path):
    path = _recipe(tmp_path)
    _ok("fit", path)
    _ok("evaluate", path)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    events = _events(run)
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train_loss")] == \
        [(i, round(r["train_loss"], 6)) for i, r in enumerate(rows, start=1)]
    assert [e.step for e in events.Scalars("fit/val_acc")] == [r["epoch"] for r in rows]
    assert events.Scalars("test_accuracy")[0].value == pytest.approx(
        json.loads((run / "eval" / "metrics.json").read_text())["accuracy"])
    assert {"curves", "test_confusion_matrix"} <= set(events.Tags()["images"])
    recipe_text = events.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "output_dir:" in recipe_text

    client, run_id = _mlflow(tmp_path, run)
    found = client.get_run(run_id)
    assert found.info.status == "FINISHED"
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "val_acc"), key=lambda m: m.step)] == \
        [(i, r["val_acc"]) for i, r in enumerate(rows, start=1)]
    assert found.data.params["fine_tune.epochs"] == "5" and found.data.params["base.model"] == "tiny_resnet"
    assert found.data.metrics["test_accuracy"] == pytest.approx(events.Scalars("test_accuracy")[0].value)
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"model.safetensors", "checkpoint.json", "curves.png", "eval/metrics.json", "eval/report.html"} <= artifacts

    with open(run / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["val_acc"]) for r in table] == [r["val_acc"] for r in rows]


def test_a_resumed_fit_continues_the_same_runs_without_duplicated_steps(tmp_path, monkeypatch):
    import tlcli.engine.train as train

    saves, real_save = [], train.save_epoch

    def dies_after_logging_epoch_three(ctx, setup, stopper, epoch, rows, summaries):
        # The trackers have logged epoch 3; its resume state is never written: a kill here.
        if epoch == 3:
            raise Killed("after the trackers logged epoch 3")
        saves.append(epoch)
        return real_save(ctx, setup, stopper, epoch, rows, summaries)

    path = _recipe(tmp_path)
    monkeypatch.setattr(train, "save_epoch", dies_after_logging_epoch_three)
    with pytest.raises(Killed):
        invoke("fit", path)
    monkeypatch.setattr(train, "save_epoch", real_save)
    run = tmp_path / "run"
    client, run_id = _mlflow(tmp_path, run)
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [1, 2, 3]
    assert saves == [1, 2]
    _ok("fit", path, "--resume")

    reference = tmp_path / "reference"
    write_recipe(reference / "r.yaml", tiny_recipe(reference, fine_tune={"epochs": 5}))
    _ok("fit", reference / "r.yaml")
    expected = [json.loads(line)["train_loss"] for line in (reference / "run" / "metrics.jsonl").read_text().splitlines()]

    steps = [(e.step, e.value) for e in _events(run).Scalars("train_loss")]
    assert [s for s, _ in steps] == [1, 2, 3, 4, 5]  # epoch 3's first logging was purged
    assert [v for _, v in steps] == pytest.approx(expected, abs=1e-6)
    again, same_id = _mlflow(tmp_path, run)
    assert same_id == run_id and again.get_run(run_id).info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in again.get_metric_history(run_id, "train_loss"))
    assert [s for s, _ in history] == [1, 2, 3, 4, 5]
    assert [v for _, v in history] == pytest.approx(expected, abs=1e-6)


def test_a_tracker_that_is_not_installed_is_one_line_naming_its_extra(tmp_path, monkeypatch, cli):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    code, out = cli("validate", str(_recipe(tmp_path)))
    assert code == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tracking.to: mlflow needs the mlflow package: pip install 'tl[mlflow]'" in errors[0]


def test_the_tracking_option_on_fit_is_the_override(tmp_path):
    recipe = tiny_recipe(tmp_path, fine_tune={"epochs": 2})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    _ok("fit", path, "--tracking", "csv")
    assert (tmp_path / "run" / "metrics.csv").is_file() and not (tmp_path / "run" / "tensorboard").exists()
    result = invoke("fit", path, "--force", "--tracking", "tensorbord")
    assert result.exit_code == 1 and "did you mean 'tensorboard'?" in result.output


def test_an_mlflow_server_that_does_not_answer_is_one_line_before_the_run_starts(tmp_path, cli):
    import socket

    with socket.socket() as s:  # a port on loopback that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = _recipe(tmp_path)
    code, out = cli("fit", str(path), f"tracking.mlflow_uri=http://127.0.0.1:{port}/")
    assert code == 1 and "Traceback" not in out, out
    assert f"tracking.mlflow_uri: the MLflow tracking server http://127.0.0.1:{port}/ is not reachable" in out
    assert not (tmp_path / "run").exists()  # refused before the fit started its run


def test_mlflows_store_libraries_are_named_when_missing(tmp_path, monkeypatch, cli):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("sqlalchemy", "alembic") else real(name, *a))
    code, out = cli("validate", str(_recipe(tmp_path)))
    assert code == 1 and "mlflow needs the sqlalchemy and alembic packages: pip install 'tl[mlflow]'" in out, out


def test_an_mlflow_store_failing_mid_fit_stops_it_with_one_line_and_resume_finishes(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    real, calls = MlflowClient.log_batch, []

    def fails_at_epoch_three(self, run_id, metrics=(), **kwargs):
        if metrics and metrics[0].step == 3:
            raise ConnectionError("the server went away")
        calls.append(1)
        return real(self, run_id, metrics=metrics, **kwargs)

    path = _recipe(tmp_path)
    monkeypatch.setattr(MlflowClient, "log_batch", fails_at_epoch_three)
    result = invoke("fit", path)
    assert result.exit_code == 1 and "tracking: mlflow: logging epoch 3 failed (ConnectionError: the server went away)" \
        in result.output, result.output
    monkeypatch.setattr(MlflowClient, "log_batch", real)
    _ok("fit", path, "--resume")
    client, run_id = _mlflow(tmp_path, tmp_path / "run")
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [1, 2, 3, 4, 5]
