"""Files: writes a kill never leaves half done, chunked hashing, and locks between processes.

Every file tl writes goes through `atomic_write`: the bytes land in a
`.part` file beside the target, are fsynced, and the file is renamed over it.
A reader sees the old file or the new one, never a torn one, even after a
power cut. Imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from tlcli.errors import OutputError


def atomic_write(path: Path, data: bytes, commit: bool = False) -> None:
    """Write `data` to a part file beside `path`, fsync it, then rename it onto `path`.

    The fsync before the rename means a power cut leaves the old file or the new one, never
    a renamed file whose bytes never reached the disk. `commit`: the write that makes the
    others count (a manifest, a checkpoint, a resume state); the directory is fsynced after
    the rename too, so that the rename itself survives a power cut.

    Callers serialise to bytes first (safetensors' `save`, `torch.save` into a buffer), so
    that a full or read-only disk surfaces here as an OSError naming `path`, not as a
    library's own exception type."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
        if commit:
            fsync_directory(path.parent)
    except OSError as err:
        _discard(part)
        raise OSError(err.errno, err.strerror, str(path)) from None
    except BaseException:
        _discard(part)
        raise


def claim_outputs(paths: list[Path], force: bool) -> None:
    """The one rule for files a user names (`-o PATH`, and what tl writes beside it): an
    existing file is never replaced without `--force`, and a directory never is. Checked
    for every path before anything is written, so a refusal leaves all of them as they were."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise OutputError(f"{path} is a directory; name a file to write")
        if (path.exists() or path.is_symlink()) and not force:
            raise OutputError(f"{path} already exists; pass --force to overwrite it")


def fsync_directory(directory: Path) -> None:
    """Make a rename (or a new entry) in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(part: Path) -> None:
    try:
        part.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only directory never got the part file


def tensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def torch_bytes(obj: Any) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_text_atomic(path: Path, text: str, commit: bool = False) -> None:
    # surrogateescape: a file name that is not UTF-8 is written back as the bytes it was read from.
    atomic_write(path, text.encode("utf-8", "surrogateescape"), commit)


def write_json_atomic(path: Path, obj: Any, commit: bool = False) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1), commit)


def file_digest(path: str | Path, algorithm: str = "blake2b", digest_size: int | None = 16) -> str:
    """The hex digest of a file's bytes, read 1 MiB at a time."""
    h = hashlib.blake2b(digest_size=digest_size) if algorithm == "blake2b" else hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """An advisory `flock` on `path` (created if missing), held for the block.

    Yields False instead of blocking when `wait` is False and another process holds it.
    The kernel drops the lock when its holder dies, so a killed run never leaves one behind."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
