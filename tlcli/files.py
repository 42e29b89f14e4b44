"""Files: writes a kill never leaves half done, chunked hashing, and locks between processes.

Every file tl writes goes through `atomic_write`: the bytes land in a
`.part` file beside the target, which is then renamed over it. A reader sees
the old file or the new one, never a torn one. Imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a part file beside `path`, then rename it onto `path`.

    Callers serialise to bytes first (safetensors' `save`, `torch.save` into a buffer), so
    that a full or read-only disk surfaces here as an OSError naming `path`, not as a
    library's own exception type."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "wb") as f:
            f.write(data)
        os.replace(part, path)
    except OSError as err:
        _discard(part)
        raise OSError(err.errno, err.strerror, str(path)) from None
    except BaseException:
        _discard(part)
        raise


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


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


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
