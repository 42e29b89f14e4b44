"""Experiment trackers: each epoch's metrics row sent to TensorBoard, MLflow and metrics.csv.

Beside metrics.jsonl (which stays the run's own record), a fit logs to the trackers the
recipe's `tracking.to` names, with the real libraries: TensorBoard's event files in
RUN/tensorboard, one MLflow run per `tl fit` (its id kept in RUN/tracking.json), and
RUN/metrics.csv. A resumed fit continues the same TensorBoard run (events after the resume
point are purged) and the same MLflow run (steps already there are not logged twice).
`tl evaluate` adds its scores and pictures to both.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import logging
import time
from pathlib import Path
from typing import Optional

from tlcli.config.schema import Recipe, TrackingSpec
from tlcli.errors import SpecError, TLError
from tlcli.files import atomic_write, write_json_atomic
from tlcli.run.rundir import CHECKPOINT, CURVES, METRICS, METRICS_CSV, RECIPE, TENSORBOARD, TRACKING, WEIGHTS

# The run's files an MLflow run gets as artifacts when the fit ends.
ARTIFACTS = (WEIGHTS, CHECKPOINT, RECIPE, METRICS, CURVES)
# tracker -> (the modules it needs, the extra that installs them); MLflow's sqlite store needs SQLAlchemy and Alembic.
EXTRAS = {"tensorboard": (("tensorboard",), "tl[tensorboard]"), "mlflow": (("mlflow", "sqlalchemy", "alembic"), "tl[mlflow]")}
SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


def missing_trackers(spec: TrackingSpec) -> list[str]:
    """A message for each tracker whose library is not installed (found without importing it)."""
    missing = []
    for name, (modules, extra) in EXTRAS.items():
        absent = [m for m in modules if name in spec.to and importlib.util.find_spec(m) is None]
        if absent:
            missing.append(f"{name} needs the {' and '.join(absent)} package{'s' if len(absent) > 1 else ''}: "
                           f"pip install '{extra}'")
    return missing


def require_trackers(recipe: Recipe) -> None:
    """A located error for each tracker the recipe asks for whose library is missing, or whose
    MLflow server does not answer: before a fit starts its run, not after."""
    missing = missing_trackers(recipe.tracking)
    if missing:
        raise SpecError([(("tracking", "to"), message) for message in missing])
    if "mlflow" in recipe.tracking.to:
        problem = _unreachable(mlflow_uri(recipe.tracking))
        if problem:
            raise SpecError([(("tracking", "mlflow_uri"), problem)])


def mlflow_uri(spec: TrackingSpec, cwd: Optional[Path] = None) -> str:
    """The recipe's URI, else MLFLOW_TRACKING_URI, else MLflow's own default, sqlite:///mlflow.db
    in the working directory; a relative sqlite path is made absolute (resume from anywhere)."""
    import os

    uri = spec.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{((cwd or Path.cwd()) / uri[len('sqlite:///'):]).resolve()}"
    return uri


def _unreachable(uri: str, timeout: float = 5.0) -> str:
    """Why a tracking server does not answer, or '': said in seconds, where MLflow's client
    retries a refused connection with backoff for minutes before it gives up."""
    import socket
    import urllib.parse

    if not uri.startswith(("http://", "https://")):
        return ""
    url = urllib.parse.urlsplit(uri)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as err:
        return f"the MLflow tracking server {uri} is not reachable ({err.strerror or err})"
    return ""


def _quiet_mlflow():
    # MLflow logs its database migrations at INFO on stderr: not tl's output.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow import MlflowClient

    return MlflowClient


class Trackers:
    """The trackers of one fit. `resumed_rows`: the epochs the run had logged before this fit."""

    def __init__(self, recipe: Recipe, run_path: Path, recipe_text: str, resumed_rows: Optional[int]):
        self.spec, self.path = recipe.tracking, run_path
        self.writer = self.client = self.run_id = None
        self.logged: set[int] = set()
        if "tensorboard" in self.spec.to:
            self._open_tensorboard(recipe_text, resumed_rows)
        if "mlflow" in self.spec.to:
            try:
                self._open_mlflow(recipe, resumed_rows)
            except TLError:
                raise
            except Exception as err:  # noqa: BLE001 - a store that cannot be reached or read is the user's to fix
                reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                raise TLError(f"tracking: mlflow: cannot open the tracking store {mlflow_uri(self.spec)} "
                              f"({type(err).__name__}: {reason})") from None

    def _open_tensorboard(self, recipe_text: str, resumed_rows: Optional[int]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed fit logged past its last resume state are dropped, so the
        # resumed epochs are not there twice.
        self.writer = SummaryWriter(str(self.path / TENSORBOARD), purge_step=(resumed_rows + 1) if resumed_rows else None)
        if not resumed_rows:
            self.writer.add_text("recipe", "```yaml\n" + recipe_text + "```", 0)

    def _open_mlflow(self, recipe: Recipe, resumed_rows: Optional[int]) -> None:
        from mlflow.entities import Param

        client_class = _quiet_mlflow()
        record = _read_record(self.path) if resumed_rows is not None else {}
        if record.get("mlflow"):
            self.client = client_class(tracking_uri=record["mlflow"]["uri"])
            self.run_id = record["mlflow"]["run_id"]
            self.logged = {m.step for m in self.client.get_metric_history(self.run_id, "train_loss")}
            return
        uri = mlflow_uri(self.spec)
        self.client = client_class(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(self.spec.experiment)
        if experiment is None:
            artifacts = Path(uri[len("sqlite:///"):]).parent / "mlartifacts" if uri.startswith("sqlite:///") else None
            experiment_id = self.client.create_experiment(self.spec.experiment,
                                                          artifact_location=artifacts.as_uri() if artifacts else None)
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=self.path.name,
                                             tags={"tl.run_dir": str(self.path)}).info.run_id
        write_json_atomic(self.path / TRACKING, {"mlflow": {"uri": uri, "run_id": self.run_id}})
        params = [Param(k, v) for k, v in _flat(recipe.model_dump(mode="json")).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log_epoch(self, row: dict, step: int, rows: list[dict]) -> None:
        """After each epoch: `row` is that epoch's metrics, `step` its place in the whole fit
        (1-based), `rows` every row so far (metrics.csv is rewritten from them)."""
        if self.writer is not None:
            for key in SCALARS:
                if row.get(key) is not None:
                    self.writer.add_scalar(key, row[key], step)
                    self.writer.add_scalar(f"{row['stage']}/{key}", row[key], row["epoch"])
            self.writer.flush()  # a killed fit keeps what it logged
        if self.client is not None and step not in self.logged:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            with _store_errors(f"logging epoch {step}"):
                self.client.log_batch(self.run_id, metrics=[Metric(k, float(row[k]), now, step)
                                                            for k in SCALARS if row.get(k) is not None])
            self.logged.add(step)
        if "csv" in self.spec.to:
            write_metrics_csv(self.path / METRICS_CSV, rows)

    def finish(self) -> None:
        """At the end of the fit: the curves to TensorBoard; the run's files to MLflow, which ends its run."""
        files = [self.path / name for name in ARTIFACTS]
        curves = next((f for f in files if f.name == CURVES and f.is_file()), None)
        if self.writer is not None:
            if curves is not None:
                self.writer.add_image("curves", _image(curves), dataformats="HWC")
            self.writer.close()
        if self.client is not None:
            with _store_errors("logging the run's files"):
                for file in files:
                    if file.is_file():
                        self.client.log_artifact(self.run_id, str(file))
                self.client.set_terminated(self.run_id, "FINISHED")


def log_evaluation(run_path: Path, spec: TrackingSpec, metrics: dict, eval_dir: Path) -> None:
    """`tl evaluate`'s scores and pictures, into the trackers the fit logged to."""
    prefix = "test" if eval_dir.name == "eval" else f"eval_{eval_dir.name}"
    scores = {f"{prefix}_{k}": float(metrics[k]) for k in ("accuracy", "balanced_accuracy", "top5", "macro_f1")}
    if "tensorboard" in spec.to and (run_path / TENSORBOARD).is_dir():
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_path / TENSORBOARD))
        for key, value in scores.items():
            writer.add_scalar(key, value, 0)
        confusion = eval_dir / "confusion_matrix.png"
        if confusion.is_file():
            writer.add_image(f"{prefix}_confusion_matrix", _image(confusion), dataformats="HWC")
        writer.close()
    record = _read_record(run_path).get("mlflow")
    if "mlflow" in spec.to and record:
        client = _quiet_mlflow()(tracking_uri=record["uri"])
        for key, value in scores.items():
            client.log_metric(record["run_id"], key, value)
        client.log_artifacts(record["run_id"], str(eval_dir), artifact_path=eval_dir.name)


@contextlib.contextmanager
def _store_errors(doing: str):
    """An MLflow store that fails in the middle of a fit (a server gone, a disk full) stops the
    fit with one line; the run is resumable, and its steps already in MLflow are not logged again."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - MLflow fails as MlflowException, OSError, requests' errors, ...
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise TLError(f"tracking: mlflow: {doing} failed ({type(err).__name__}: {reason}); fix the store, "
                      "then `tl fit --resume` continues the run") from None


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue().encode())


def _read_record(run_path: Path) -> dict:
    path = run_path / TRACKING
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        mlflow = record.get("mlflow")
        if mlflow is not None and not (isinstance(mlflow.get("uri"), str) and isinstance(mlflow.get("run_id"), str)
                                       and len(mlflow["run_id"]) <= 64):
            raise ValueError("mlflow needs a uri and a run_id")
        return record
    except (ValueError, AttributeError) as err:
        raise TLError(f"{path}: damaged ({err}); fit again with --force") from None


def _flat(tree, prefix: str = "") -> dict[str, str]:
    """The recipe as MLflow params: dotted keys, values as text (MLflow keeps 6000 characters)."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list) and tree and any(isinstance(v, (dict, list)) for v in tree):
        return {prefix.rstrip("."): json.dumps(tree)[:6000]}
    return {prefix.rstrip("."): json.dumps(tree)[:6000] if isinstance(tree, list) else str(tree)[:6000]}


def _image(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
