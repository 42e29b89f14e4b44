"""The run directory: the one owner of every file a run writes, and of how each is read back.

    RUN_DIR/
      tl-run.json          the marker, written first: tl replaces only directories that carry it
      recipe.yaml          the resolved recipe, defaults filled in
      metrics.jsonl        one row per epoch (identical for identical seeds)
      timings.jsonl        wall time per epoch (kept apart so that metrics stay identical)
      curves.png
      resume/state.json    the last finished epoch; the files it names sit beside it
      model.safetensors    the full state dict, frozen part included
      checkpoint.json      written last: its presence marks a finished run
      eval/                what `tl evaluate` writes
      model.onnx, model.pt what `tl export` writes when no -o is given (each with a .json beside it)
      tl-run.lock          flock-ed by the fit writing the run

Only the marker makes a directory tl's: a directory without it is the user's,
whatever names it holds, and tl neither writes into it nor offers `--force` for it.

Every write is atomic (`files.atomic_write`). The JSON files are parsed with
pydantic models, so a damaged run is one line that names the file.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tlcli import __version__
from tlcli.errors import RunError
from tlcli.files import atomic_write, file_lock, tensors_bytes, torch_bytes, write_json_atomic, write_text_atomic

MARKER = "tl-run.json"
LOCK = "tl-run.lock"  # held by the fit writing the run; never deleted (another process may hold it)
RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
TIMINGS = "timings.jsonl"
CURVES = "curves.png"
WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint.json"
RESUME = "resume"
STATE = "state.json"
EVAL = "eval"
EVAL_METRICS = "metrics.json"
EVAL_CONFUSION = "confusion_matrix.json"
EVAL_CONFUSION_PLOT = "confusion_matrix.png"
EVAL_TOP_LOSSES = "top_losses.png"
EVAL_REPORT = "report.html"
# `tl export` without -o writes into the run; the run owns these names, so `fit --force` removes them.
EXPORTS = {"onnx": "model.onnx", "torchscript": "model.pt"}
# In the working directory: which run the last `tl fit` here finished, for a bare `tl evaluate`.
LAST_RUN = Path(".tl") / "last-run.json"
# What `fit --force` may delete: only what tl itself writes into a run directory.
OWNED = (MARKER, RECIPE, METRICS, TIMINGS, CURVES, WEIGHTS, CHECKPOINT, RESUME, EVAL,
         *EXPORTS.values(), *(f"{name}.json" for name in EXPORTS.values()))


class _Record(BaseModel):
    # Read back from disk: bounded, and never NaN or inf (json.loads accepts both).
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


Count = Annotated[int, Field(ge=0, le=10**9)]


class StageSummary(_Record):
    """What one finished stage did."""

    name: str
    input: Literal["cache", "images"]
    frontier: list[str]
    epochs_run: Count
    best_epoch: Optional[Count] = None
    trainable_params: Count
    optimizer: Optional[str] = None  # what `auto` resolved to
    l2: Optional[Annotated[float, Field(gt=0, le=1e6)]] = None  # the probe fit's L2, when chosen on val


class ResumeState(_Record):
    """The last finished epoch of an interrupted run (epoch 0: the stage has not started)."""

    stage: Count
    epoch: Count
    rows: Count
    best_value: Optional[float] = None
    best_epoch: Count = 0
    bad_epochs: Count = 0
    stopped: bool = False
    summaries: list[StageSummary] = []
    files: dict[Literal["model", "best", "optim"], str] = {}
    # The model file holds only tensors some stage trains; this hash pins the rest
    # (rebuilt from the recipe on resume) so that changed base weights are noticed.
    frozen_hash: Optional[str] = None
    l2: Optional[Annotated[float, Field(gt=0, le=1e6)]] = None  # the probe fit's L2, chosen once per stage

    def problems(self, stages: list[tuple[str, int]], logged: list[dict]) -> list[str]:
        """What in this state the run cannot have written: `stages` are the recipe's
        (name, epochs), `logged` the rows of metrics.jsonl. Empty when it is consistent."""
        found = []
        if self.stage > len(stages):
            return [f"stage {self.stage} of a recipe with {len(stages)} stage(s)"]
        if len(self.summaries) != self.stage:
            found.append(f"{len(self.summaries)} finished stage(s) recorded at stage {self.stage}")
        for i, (summary, (name, epochs)) in enumerate(zip(self.summaries, stages)):
            if summary.name != name or not 1 <= summary.epochs_run <= epochs:
                found.append(f"stage {i + 1} recorded as {summary.name!r} with {summary.epochs_run} epochs "
                             f"(the recipe: {name!r}, at most {epochs})")
        limit = stages[self.stage][1] if self.stage < len(stages) else 0
        if self.epoch > limit:
            found.append(f"epoch {self.epoch} of a stage with {limit} epoch(s)")
        if self.best_epoch > self.epoch or self.bad_epochs > self.epoch:
            found.append(f"best epoch {self.best_epoch} / bad epochs {self.bad_epochs} after epoch {self.epoch}")
        expected = sum(s.epochs_run for s in self.summaries) + self.epoch
        if self.rows != expected:
            found.append(f"rows {self.rows}, but the stages so far ran {expected} epoch(s)")
        elif len(logged) < self.rows:
            found.append(f"{METRICS} has {len(logged)} row(s), the state {self.rows}")
        if "model" not in self.files or (self.epoch > 0 and "optim" not in self.files):
            found.append(f"the files it names ({', '.join(self.files) or 'none'}) lack the model or the optimizer")
        return found


class PreprocessRecord(_Record):
    """The preprocessing a run was trained with, as `checkpoint.json` stores it."""

    size: int = Field(ge=1, le=4096)
    resize: int = Field(ge=1, le=8192)
    mode: Literal["squash", "center_crop", "border"]
    mean: tuple[Annotated[float, Field(ge=-1e3, le=1e3)], ...] = Field(min_length=1, max_length=3)
    std: tuple[Annotated[float, Field(gt=0, le=1e3)], ...] = Field(min_length=1, max_length=3)
    interpolation: Literal["nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos"]
    channels: Literal[1, 3] = 3

    @model_validator(mode="after")
    def _one_value_per_channel(self) -> "PreprocessRecord":
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, self.channels):
            raise ValueError(f"mean and std need one value per channel ({self.channels})")
        return self


class CheckpointMeta(_Record):
    """`checkpoint.json`: what rebuilds the model offline beside its weights."""

    model: str
    head_layer: Optional[str]
    class_names: list[str] = Field(min_length=2, max_length=1_000_000)
    preprocess: PreprocessRecord
    frontier: list[str]
    cache_key: Optional[str]
    data_fingerprint: str
    stages: list[StageSummary]
    frozen_modules: list[str]
    frozen_attrs: list[str] = []
    skipped_images: list[str] = []  # undecodable files left out (data.on_bad_image: skip)
    decoder: Optional[str] = None  # what decoded the training JPEGs (nvjpeg and libjpeg-turbo differ by +-1)
    tl_version: str = __version__

    @field_validator("class_names")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("a class name appears twice")
        return names


def _parse(model: type[_Record], path: Path) -> Any:
    try:
        return model.model_validate(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError) as err:
        raise RunError(f"{path}: cannot read: {err}") from None
    except (ValueError, ValidationError) as err:
        first = err.errors()[0] if isinstance(err, ValidationError) else None
        where = ".".join(str(p) for p in first["loc"]) + ": " + first["msg"] if first else str(err)
        raise RunError(f"{path}: damaged ({where}); fit the run again with --force") from None


class EpochLog:
    """Appends one metrics row and one timing row per epoch, flushed at once."""

    def __init__(self, metrics, timings):
        self.metrics, self.timings = metrics, timings

    def write(self, row: dict, seconds: float) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        self.timings.write(json.dumps({"stage": row["stage"], "epoch": row["epoch"], "seconds": round(seconds, 4)}) + "\n")
        self.timings.flush()


class RunDir:
    """A run directory on disk. Nothing else in tl knows its file names."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # -- state

    def is_run(self) -> bool:
        """A directory tl wrote: it carries tl's marker. Nothing else counts, not even a
        `checkpoint.json`: a user's folder may hold files with tl's names."""
        try:
            marker = json.loads((self.path / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(marker, dict) and isinstance(marker.get("tl_version"), str)

    def finished(self) -> bool:
        return self.is_run() and (self.path / CHECKPOINT).is_file()

    def _foreign(self) -> bool:
        if not self.path.exists():
            return False
        if not self.path.is_dir():
            return True
        return not self.is_run() and any(p.name != LOCK for p in self.path.iterdir())

    # -- starting, resuming

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """This process alone writes the run: a second fit into it is refused, not interleaved."""
        with file_lock(self.path / LOCK, wait=False) as mine:
            if not mine:
                raise RunError(f"{self.path}: another tl fit is writing this run directory; "
                               "wait for it to finish, or choose another output_dir")
            yield

    def check_for_fit(self, recipe_text: str, force: bool, resume: bool,
                      stages: list[tuple[str, int]]) -> Optional[ResumeState]:
        """Check, writing nothing, that fit may use this directory; the state to resume, if resuming
        (`stages`: the recipe's (name, epochs), which bound what a resume state may say).

        Refuses, even with --force, a path that is a file or a non-empty
        directory tl did not write: --force replaces tl's own runs only."""
        if self._foreign():
            what = "a file" if not self.path.is_dir() else "a non-empty directory that is not a tl run"
            raise RunError(f"{self.path} is {what} (no {MARKER}); tl only writes into its own run directories: "
                           "choose another output_dir, or empty this one")
        state = self.read_resume()
        if resume:
            self._check_resumable(state, recipe_text)
            found = state.problems(stages, self._logged())
            if found:
                raise RunError(f"{self.path / RESUME / STATE}: damaged ({'; '.join(found)}); "
                               "fit again with --force")
            return state
        if not force:
            if self.finished():
                raise RunError(f"{self.path} already holds a finished run; pass --force to overwrite it")
            if state is not None:
                raise RunError(f"{self.path} holds an interrupted run (stage {state.stage + 1}, epoch {state.epoch}); "
                               "pass --resume to continue it or --force to start over")
        return None

    def _check_resumable(self, state: Optional[ResumeState], recipe_text: str) -> None:
        if self.finished():
            raise RunError(f"{self.path} holds a finished run; nothing to resume (pass --force to train it again)")
        if state is None:
            raise RunError(f"{self.path}: no interrupted run to resume (no {RESUME}/{STATE}); run tl fit without --resume")
        saved = (self.path / RECIPE).read_text() if (self.path / RECIPE).is_file() else None
        if saved != recipe_text:
            raise RunError(f"{self.path}: the recipe changed since this run started; resume needs the same recipe "
                           "(pass --force to start over)")

    def start(self, recipe_text: str) -> None:
        """A fresh run: tl's own files of any old run removed, the marker and recipe written."""
        # Starting over: nothing of an old run may be mistaken for this one's.
        # Only names tl writes are removed; anything else a user put here stays.
        for name in OWNED:
            p = self.path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / MARKER, {"tl_version": __version__}, commit=True)
        write_text_atomic(self.path / RECIPE, recipe_text)
        for name in (METRICS, TIMINGS):
            write_text_atomic(self.path / name, "")

    def rewind_logs(self, rows: int) -> None:
        """Drop log rows written after the resumed epoch (the killed epoch's, if any)."""
        for name in (METRICS, TIMINGS):
            kept = (self.path / name).read_text().splitlines()[:rows]
            write_text_atomic(self.path / name, "".join(r + "\n" for r in kept))

    @contextlib.contextmanager
    def epoch_log(self) -> Iterator[EpochLog]:
        with open(self.path / METRICS, "a") as metrics, open(self.path / TIMINGS, "a") as timings:
            yield EpochLog(metrics, timings)

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.path / METRICS).read_text().splitlines() if line.strip()]

    def _logged(self) -> list[dict]:
        """metrics.jsonl's rows for a resume check: missing or damaged is the run's damage."""
        path = self.path / METRICS
        try:
            rows = self.metrics()
        except FileNotFoundError:
            raise RunError(f"{path}: missing; the interrupted run cannot be resumed, fit again with --force") from None
        except (OSError, ValueError) as err:
            raise RunError(f"{path}: damaged ({err}); fit again with --force") from None
        if not all(isinstance(r, dict) for r in rows):
            raise RunError(f"{path}: damaged (a row is not a JSON object); fit again with --force")
        return rows

    # -- resume state

    def read_resume(self) -> Optional[ResumeState]:
        path = self.path / RESUME / STATE
        if not path.is_file():
            return None
        state = _parse(ResumeState, path)
        for name in state.files.values():
            # The names come from a file on disk: they must stay inside resume/.
            if Path(name).name != name or name in ("", ".", ".."):
                raise RunError(f"{path}: damaged (file name {name!r} points outside {RESUME}/); fit again with --force")
        return state

    def save_resume(self, state: ResumeState, tensors: dict[str, dict], objects: dict[str, Any]) -> None:
        """Epoch-tagged files first, then `state.json` naming them, then the old files go.

        `tensors` are state dicts (safetensors), `objects` are torch-saved
        state such as the optimizer's (read back with weights_only=True).
        A kill at any point leaves a consistent previous state."""
        d = self.path / RESUME
        d.mkdir(parents=True, exist_ok=True)
        tag = f"s{state.stage}-e{state.epoch:04d}"
        files = {}
        for kind, tensor_dict in tensors.items():
            files[kind] = f"{kind}-{tag}.safetensors"
            atomic_write(d / files[kind], tensors_bytes(tensor_dict))
        for kind, obj in objects.items():
            files[kind] = f"{kind}-{tag}.pt"
            atomic_write(d / files[kind], torch_bytes(obj))
        write_json_atomic(d / STATE, state.model_copy(update={"files": files}).model_dump(mode="json"), commit=True)
        for f in d.iterdir():
            if f.name != STATE and f.name not in files.values():
                f.unlink(missing_ok=True)

    def resume_tensors(self, state: ResumeState, kind: str) -> Optional[dict]:
        if kind not in state.files:
            return None
        return _load_safetensors(self.path / RESUME / state.files[kind])

    def resume_object(self, state: ResumeState, kind: str) -> Any:
        import torch

        path = self.path / RESUME / state.files[kind]
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or tampered file: the run's damage, not our bug
            raise RunError(f"{path}: damaged ({err}); fit again with --force") from None

    # -- the finished run

    def save_checkpoint(self, state: dict, meta: CheckpointMeta) -> None:
        """Weights first, then `checkpoint.json`; then the resume state goes."""
        atomic_write(self.path / WEIGHTS, tensors_bytes(state))
        write_json_atomic(self.path / CHECKPOINT, meta.model_dump(mode="json"), commit=True)
        shutil.rmtree(self.path / RESUME, ignore_errors=True)

    def read_meta(self) -> CheckpointMeta:
        if not self.path.exists():
            raise RunError(f"{self.path}: no finished run here (the directory does not exist); run `tl fit` first")
        if not self.path.is_dir():
            raise RunError(f"{self.path}: not a directory; give a run directory or a recipe")
        if not self.is_run():
            raise RunError(f"{self.path}: not a tl run directory (no {MARKER}); give the output_dir of a `tl fit`")
        if not self.finished():
            raise RunError(f"{self.path}: no finished run here ({CHECKPOINT} is missing); run `tl fit` first")
        return _parse(CheckpointMeta, self.path / CHECKPOINT)

    def read_recipe(self, overrides: tuple[str, ...] = ()):
        """The run's saved recipe; `overrides` (from the command line) change how it is used
        now (batch size, device, on_bad_image), never the model, which the checkpoint fixes."""
        from tlcli.recipe import load_recipe

        return load_recipe(self.path / RECIPE, overrides)

    def weights(self) -> dict:
        return _load_safetensors(self.path / WEIGHTS)

    def export_path(self, fmt: str) -> Path:
        """Where `tl export` writes by default: inside the run, under a name the run owns."""
        return self.path / EXPORTS[fmt]

    def eval_dir(self, name: Optional[str] = None) -> Path:
        """eval/ for the run's own test split; eval/NAME/ for another data set."""
        d = self.path / EVAL / name if name else self.path / EVAL
        d.mkdir(parents=True, exist_ok=True)
        return d


def remember_last_run(run_dir: Path, cwd: Optional[Path] = None) -> None:
    path = (cwd or Path.cwd()) / LAST_RUN
    path.parent.mkdir(exist_ok=True)
    write_json_atomic(path, {"run_dir": str(Path(run_dir).resolve())})


def find_run(target: Optional[Path], overrides: tuple[str, ...] = ()) -> RunDir:
    """A run directory from a run directory, a recipe (its output_dir, after overrides),
    or nothing: the run that the last `tl fit` in this directory finished."""
    if target is None:
        if not LAST_RUN.is_file():
            raise RunError("no run given, and no `tl fit` has finished in this directory; "
                           "give a run directory or a recipe")
        try:
            return RunDir(json.loads(LAST_RUN.read_text())["run_dir"])
        except (ValueError, KeyError, TypeError):
            raise RunError(f"{LAST_RUN}: damaged; give a run directory or a recipe") from None
    if target.is_dir():
        if overrides:
            raise RunError(f"{target}: KEY=VALUE overrides apply to a recipe, not to a run directory")
        return RunDir(target)
    if target.suffix in (".yaml", ".yml") or target.is_file():
        from tlcli.recipe import load_recipe

        return RunDir(load_recipe(target, overrides).output_dir)
    raise RunError(f"{target}: neither a run directory nor a recipe file")


def _load_safetensors(path: Path) -> dict:
    from tlcli.weights import read_tensors, require_sound

    advice = "; fit the run again with --force"
    state = read_tensors(path, RunError, advice)
    require_sound(state, None, path, RunError, advice)
    return state


class FollowerRun(RunDir):
    """The run directory as a rank other than 0 sees it under torchrun: it reads what rank 0
    writes (the resume state) and writes nothing itself."""

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        yield

    def start(self, recipe_text: str) -> None:
        pass

    def rewind_logs(self, rows: int) -> None:
        pass

    @contextlib.contextmanager
    def epoch_log(self) -> Iterator["EpochLog"]:
        yield _NoLog()

    def save_resume(self, state: "ResumeState", tensors: dict, objects: dict) -> None:
        pass

    def save_checkpoint(self, state: dict, meta: "CheckpointMeta") -> None:
        pass


class _NoLog:
    def write(self, row: dict, seconds: float) -> None:
        pass
