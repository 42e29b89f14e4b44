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
      tl-run.lock          flock-ed by the fit writing the run

Every write is atomic (`files.atomic_write`). The JSON files are parsed with
pydantic models, so a damaged run is one line that names the file.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
# In the working directory: which run the last `tl fit` here finished, for a bare `tl evaluate`.
LAST_RUN = Path(".tl") / "last-run.json"
# What `fit --force` may delete: only what tl itself writes into a run directory.
OWNED = (MARKER, RECIPE, METRICS, TIMINGS, CURVES, WEIGHTS, CHECKPOINT, RESUME, EVAL)


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StageSummary(_Record):
    """What one finished stage did."""

    name: str
    input: str
    frontier: list[str]
    epochs_run: int
    best_epoch: Optional[int] = None
    trainable_params: int
    optimizer: Optional[str] = None  # what `auto` resolved to
    l2: Optional[float] = None  # the probe fit's L2, when chosen on val


class ResumeState(_Record):
    """The last finished epoch of an interrupted run (epoch 0: the stage has not started)."""

    stage: int
    epoch: int
    rows: int
    best_value: Optional[float] = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False
    summaries: list[StageSummary] = []
    files: dict[str, str] = {}
    # The model file holds only tensors some stage trains; this hash pins the rest
    # (rebuilt from the recipe on resume) so that changed base weights are noticed.
    frozen_hash: Optional[str] = None
    l2: Optional[float] = None  # the probe fit's L2, chosen once per stage


class PreprocessRecord(_Record):
    """The preprocessing a run was trained with, as `checkpoint.json` stores it."""

    size: int = Field(ge=1, le=4096)
    resize: int = Field(ge=1, le=8192)
    mode: Literal["squash", "center_crop"]
    mean: tuple[float, ...] = Field(min_length=1, max_length=3)
    std: tuple[Annotated[float, Field(gt=0)], ...] = Field(min_length=1, max_length=3)
    interpolation: Literal["nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos"]
    channels: Literal[1, 3] = 3


class CheckpointMeta(_Record):
    """`checkpoint.json`: what rebuilds the model offline beside its weights."""

    model: str
    head_layer: Optional[str]
    class_names: list[str]
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
        """A directory tl wrote: the marker, or (runs from before it) a checkpoint or resume state."""
        return any((self.path / name).exists() for name in (MARKER, CHECKPOINT, f"{RESUME}/{STATE}"))

    def finished(self) -> bool:
        return (self.path / CHECKPOINT).is_file()

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

    def check_for_fit(self, recipe_text: str, force: bool, resume: bool) -> Optional[ResumeState]:
        """Check, writing nothing, that fit may use this directory; the state to resume, if resuming.

        Refuses, even with --force, a path that is a file or a non-empty
        directory tl did not write: --force replaces tl's own runs only."""
        if self._foreign():
            what = "a file" if not self.path.is_dir() else "a non-empty directory that is not a tl run"
            raise RunError(f"{self.path} is {what} (no {MARKER}); tl only writes into its own run directories: "
                           "choose another output_dir, or empty this one")
        state = self.read_resume()
        if resume:
            self._check_resumable(state, recipe_text)
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
        write_json_atomic(self.path / MARKER, {"tl_version": __version__})
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
        write_json_atomic(d / STATE, state.model_copy(update={"files": files}).model_dump(mode="json"))
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
        write_json_atomic(self.path / CHECKPOINT, meta.model_dump(mode="json"))
        shutil.rmtree(self.path / RESUME, ignore_errors=True)

    def read_meta(self) -> CheckpointMeta:
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise RunError(f"{path}: damaged or unreadable ({err}); fit the run again with --force") from None


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
