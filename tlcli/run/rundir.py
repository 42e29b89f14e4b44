"""The run directory: its file names, who may write into it, and every write and read of its files.

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
whatever names it holds, and tl neither writes into it nor offers `--force` for
it. No other module knows these names.

Whether this process may write is decided once, when the RunDir is made: every
change to the directory goes through its `_disk`, which for a rank other than
0 under torchrun is one that changes nothing. Every write is atomic
(`files.atomic_write`); the JSON files are parsed with the schemas in
`run.records`, so a damaged run is one line that names the file.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

from tlcli import __version__
from tlcli.errors import RunError, SpecError
from tlcli.files import atomic_write, file_lock, tensors_bytes, torch_bytes
from tlcli.run.records import CheckpointMeta, ResumeState, parse_record

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
# Experiment trackers' files in the run (run/tracking.py): TensorBoard's events, the CSV, the MLflow run's id.
TENSORBOARD = "tensorboard"
METRICS_CSV = "metrics.csv"
TRACKING = "tracking.json"
# `tl export` without -o writes into the run; the run owns these names, so `fit --force` removes them.
EXPORTS = {"onnx": "model.onnx", "torchscript": "model.pt"}
# In the working directory: which run the last `tl fit` here finished, for a bare `tl evaluate`.
LAST_RUN = Path(".tl") / "last-run.json"
# What `fit --force` may delete: only what tl itself writes into a run directory.
OWNED = (MARKER, RECIPE, METRICS, TIMINGS, CURVES, WEIGHTS, CHECKPOINT, RESUME, EVAL, TENSORBOARD, METRICS_CSV, TRACKING,
         *EXPORTS.values(), *(f"{name}.json" for name in EXPORTS.values()))
DAMAGED = "fit again with --force"


class _Disk:
    """Every change a RunDir makes to the file system."""

    def write(self, path: Path, data: bytes, commit: bool = False) -> None:
        atomic_write(path, data, commit)

    def append(self, path: Path, lines: list[str]) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)

    def remove(self, path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def mkdir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def exclusive(self, lock: Path) -> Iterator[None]:
        with file_lock(lock, wait=False) as mine:
            if not mine:
                raise RunError(f"{lock.parent}: another tl fit is writing this run directory; "
                               "wait for it to finish, or choose another output_dir")
            yield


class _NoDisk(_Disk):
    """A process that reads the run but must not change it (a torchrun rank other than 0)."""

    def write(self, path: Path, data: bytes, commit: bool = False) -> None:
        pass

    def append(self, path: Path, lines: list[str]) -> None:
        pass

    def remove(self, path: Path) -> None:
        pass

    def mkdir(self, path: Path) -> None:
        pass

    @contextlib.contextmanager
    def exclusive(self, lock: Path) -> Iterator[None]:
        yield


class RunDir:
    """A run directory on disk. `writer=False`: this process reads it and changes nothing."""

    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self._disk = _Disk() if writer else _NoDisk()

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # -- whose directory

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

    def foreign(self) -> bool:
        """A file, or a non-empty directory that tl did not write: never written into."""
        if not self.path.exists():
            return False
        if not self.path.is_dir():
            return True
        # A fit killed while it wrote its marker leaves the lock and the marker's part file and
        # nothing else (the marker is written first): tl's own start, to be started again.
        started = {LOCK, MARKER + ".part"}
        return not self.is_run() and any(p.name not in started for p in self.path.iterdir())

    # -- admission: may a fit use this directory?

    def check_for_fit(self, recipe_text: str, force: bool, resume: bool, stages: list[tuple[str, int]],
                      recipe_file: Optional[Path] = None) -> Optional[ResumeState]:
        """Check, writing nothing, that fit may use this directory; the state to resume, if resuming
        (`stages`: the recipe's (name, epochs), which bound what a resume state may say).

        Refuses, even with --force, a path that is a file, a non-empty directory tl did not
        write, or the folder that holds the recipe itself (starting over would write over it)."""
        holders = (recipe_file.resolve().parent, *recipe_file.resolve().parents) if recipe_file else ()
        if recipe_file is not None and recipe_file.is_file() and self.path.resolve() in holders:
            raise SpecError([(("output_dir",), f"{self.path} holds this recipe file; fit would write over it: "
                                               "choose a directory of its own (e.g. runs/NAME)")])
        if self.foreign():
            what = "a file" if not self.path.is_dir() else "a non-empty directory that is not a tl run"
            raise RunError(f"{self.path} is {what} (no {MARKER}); tl only writes into its own run directories: "
                           "choose another output_dir, or empty this one")
        state = self.read_resume()
        if resume:
            self._check_resumable(state, recipe_text)
            found = state.problems(stages, self._logged())
            if found:
                raise RunError(f"{self.path / RESUME / STATE}: damaged ({'; '.join(found)}); {DAMAGED}")
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

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """This process alone writes the run: a second fit into it is refused, not interleaved."""
        with self._disk.exclusive(self.path / LOCK):
            yield

    # -- a fit's files

    def start(self, recipe_text: str) -> None:
        """A fresh run: tl's own files of any old run removed, the marker and recipe written."""
        # Starting over: nothing of an old run may be mistaken for this one's.
        # Only names tl writes are removed; anything else a user put here stays.
        for name in OWNED:
            self._disk.remove(self.path / name)
        self._disk.mkdir(self.path)
        self._disk.write(self.path / MARKER, _json({"tl_version": __version__}), commit=True)
        self._disk.write(self.path / RECIPE, recipe_text.encode("utf-8"))
        for name in (METRICS, TIMINGS):
            self._disk.write(self.path / name, b"")

    def rewind_logs(self, rows: int) -> None:
        """Drop log rows written after the resumed epoch (the killed epoch's, if any)."""
        for name in (METRICS, TIMINGS):
            kept = (self.path / name).read_text().splitlines()[:rows]
            self._disk.write(self.path / name, "".join(r + "\n" for r in kept).encode("utf-8"))

    def log_epoch(self, row: dict, seconds: float) -> None:
        """One metrics row and one timing row, appended at once (timings apart: metrics stay identical)."""
        self._disk.append(self.path / METRICS, [json.dumps(row)])
        timing = {"stage": row["stage"], "epoch": row["epoch"], "seconds": round(seconds, 4)}
        self._disk.append(self.path / TIMINGS, [json.dumps(timing)])

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.path / METRICS).read_text().splitlines() if line.strip()]

    def _logged(self) -> list[dict]:
        """metrics.jsonl's rows for a resume check: missing or damaged is the run's damage."""
        path = self.path / METRICS
        try:
            rows = self.metrics()
        except FileNotFoundError:
            raise RunError(f"{path}: missing; the interrupted run cannot be resumed, {DAMAGED}") from None
        except (OSError, ValueError) as err:
            raise RunError(f"{path}: damaged ({err}); {DAMAGED}") from None
        if not all(isinstance(r, dict) for r in rows):
            raise RunError(f"{path}: damaged (a row is not a JSON object); {DAMAGED}")
        return rows

    def write_picture(self, name: str, draw) -> None:
        """A picture of the run (curves.png): `draw(path)` renders it; only the writer draws."""
        if self.writer:
            draw(self.path / name)

    # -- resume state

    def read_resume(self) -> Optional[ResumeState]:
        path = self.path / RESUME / STATE
        if not path.is_file():
            return None
        state = parse_record(ResumeState, path)
        for name in state.files.values():
            # The names come from a file on disk: they must stay inside resume/.
            if Path(name).name != name or name in ("", ".", ".."):
                raise RunError(f"{path}: damaged (file name {name!r} points outside {RESUME}/); {DAMAGED}")
        return state

    def save_resume(self, state: ResumeState, tensors: dict[str, dict], objects: dict[str, Any]) -> None:
        """Epoch-tagged files first, then `state.json` naming them, then the old files go.

        `tensors` are state dicts (safetensors), `objects` are torch-saved
        state such as the optimizer's (read back with weights_only=True).
        A kill at any point leaves a consistent previous state."""
        if not self.writer:
            return  # the tensors are not even serialised on a rank that writes nothing
        d = self.path / RESUME
        self._disk.mkdir(d)
        tag = f"s{state.stage}-e{state.epoch:04d}"
        files = {}
        for kind, tensor_dict in tensors.items():
            files[kind] = f"{kind}-{tag}.safetensors"
            self._disk.write(d / files[kind], tensors_bytes(tensor_dict))
        for kind, obj in objects.items():
            files[kind] = f"{kind}-{tag}.pt"
            self._disk.write(d / files[kind], torch_bytes(obj))
        self._disk.write(d / STATE, _json(state.model_copy(update={"files": files}).model_dump(mode="json")), commit=True)
        for f in d.iterdir():
            if f.name != STATE and f.name not in files.values():
                self._disk.remove(f)

    def resume_tensors(self, state: ResumeState, kind: str) -> Optional[dict]:
        if kind not in state.files:
            return None
        return _load_tensors(self.path / RESUME / state.files[kind])

    def resume_object(self, state: ResumeState, kind: str) -> Any:
        import torch

        path = self.path / RESUME / state.files[kind]
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a truncated or tampered file: the run's damage, not our bug
            raise RunError(f"{path}: damaged ({err}); {DAMAGED}") from None

    # -- the finished run

    def save_checkpoint(self, state: dict, meta: CheckpointMeta) -> None:
        """Weights first, then `checkpoint.json`; then the resume state goes."""
        if not self.writer:
            return
        self._disk.write(self.path / WEIGHTS, tensors_bytes(state))
        self._disk.write(self.path / CHECKPOINT, _json(meta.model_dump(mode="json")), commit=True)
        self._disk.remove(self.path / RESUME)

    def read_meta(self) -> CheckpointMeta:
        if not self.path.exists():
            raise RunError(f"{self.path}: no finished run here (the directory does not exist); run `tl fit` first")
        if not self.path.is_dir():
            raise RunError(f"{self.path}: not a directory; give a run directory or a recipe")
        if not self.is_run():
            raise RunError(f"{self.path}: not a tl run directory (no {MARKER}); give the output_dir of a `tl fit`")
        if not self.finished():
            raise RunError(f"{self.path}: no finished run here ({CHECKPOINT} is missing); run `tl fit` first")
        return parse_record(CheckpointMeta, self.path / CHECKPOINT)

    def read_finished(self, overrides: tuple[str, ...] = ()) -> tuple[CheckpointMeta, dict, Any]:
        """A finished run's three files, each parsed and checked: its checkpoint record, its
        weights (sound tensors only) and its saved recipe (read with `overrides`)."""
        meta = self.read_meta()
        state = self.weights()
        return meta, state, self.read_recipe(overrides)

    def read_recipe(self, overrides: tuple[str, ...] = ()):
        """The run's saved recipe, with `overrides` (from a command line) applied."""
        from tlcli.config.reading import load_recipe

        return load_recipe(self.path / RECIPE, overrides)

    def weights(self) -> dict:
        return _load_tensors(self.path / WEIGHTS)

    def export_path(self, fmt: str) -> Path:
        """Where `tl export` writes by default: inside the run, under a name the run owns."""
        return self.path / EXPORTS[fmt]

    def eval_dir(self, name: Optional[str] = None) -> Path:
        """eval/ for the run's own test split; eval/NAME/ for another data set."""
        d = self.path / EVAL / name if name else self.path / EVAL
        self._disk.mkdir(d)
        return d


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1).encode("utf-8")


def _load_tensors(path: Path) -> dict:
    from tlcli.model.weights import read_tensors, require_sound

    advice = f"; {DAMAGED}"
    state = read_tensors(path, RunError, advice)
    require_sound(state, None, path, RunError, advice)
    return state


def remember_last_run(run_dir: Path, cwd: Optional[Path] = None) -> None:
    from tlcli.files import write_json_atomic

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
        from tlcli.config.reading import load_recipe

        return RunDir(load_recipe(target, overrides).output_dir)
    raise RunError(f"{target}: neither a run directory nor a recipe file")
