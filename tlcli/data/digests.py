"""File digests: each image's content hash, remembered by (path, size, mtime_ns, ctime_ns, inode) beside the cache.

The data fingerprint hashes every image's bytes, never mtimes alone (they lie
after a copy or checkout); this index only saves reading files that did not
change. Where it lives is decided here too: `digests.sqlite` in the cache dir.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from pathlib import Path
from typing import Optional

from tlcli.errors import DataError
from tlcli.files import file_digest

INDEX = "digests.sqlite"
_DIGEST = re.compile(r"[0-9a-f]{32}")


def index_path(cache_dir: str) -> Path:
    """Where image digests are remembered between commands: beside the caches they key."""
    return Path(cache_dir) / INDEX


class DigestIndex:
    """Content digests of image files, remembered by (path, size, mtime_ns, ctime_ns, inode).

    A rewrite changes the ctime even when the mtime is put back (Ludwig #1078's
    trap), so a changed file is always read again. Without an index file
    every file is read. SQLite keeps concurrent commands consistent."""

    def __init__(self, path: Optional[Path]):
        self.path = path

    def digests(self, files: list[str]) -> dict[str, str]:
        stats = {f: _stat_key(f) for f in dict.fromkeys(files)}
        known = self._load() if self.path is not None else {}
        out, fresh = {}, []
        for f, key in stats.items():
            if known.get(f, (None,))[:-1] == key:
                out[f] = known[f][-1]
            else:
                out[f] = _read_digest(f)
                fresh.append((f, *key, out[f]))
        if fresh and self.path is not None:
            self._store(fresh)
        return out

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=60)
        # Paths are stored as the file system's bytes: a name that is not UTF-8 (surrogates in
        # Python) is still a name. (The older `digests` table kept text; it is left unread.)
        db.execute("CREATE TABLE IF NOT EXISTS file_digests (path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                   "ctime_ns INTEGER, inode INTEGER, digest TEXT)")
        return db

    def _load(self) -> dict[str, tuple]:
        try:
            with contextlib.closing(self._connect()) as db:
                return {os.fsdecode(row[0]): tuple(row[1:]) for row in db.execute("SELECT * FROM file_digests")
                        if isinstance(row[0], bytes) and _is_digest(row[-1])}
        except (sqlite3.Error, OSError):
            return {}  # an unreadable index only costs the re-hashing it would have saved

    def _store(self, rows: list[tuple]) -> None:
        try:
            with contextlib.closing(self._connect()) as db, db:
                db.executemany("INSERT OR REPLACE INTO file_digests VALUES (?, ?, ?, ?, ?, ?)",
                               [(os.fsencode(path), *rest) for path, *rest in rows])
        except (sqlite3.Error, OSError):
            pass  # read-only cache directory: digests are still right, just not remembered


def _is_digest(value) -> bool:
    """A row read back from the index is trusted only if its digest has the right form."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def _stat_key(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError as err:
        raise DataError(f"{path}: cannot read image: {err.strerror or err}") from None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _read_digest(path: str) -> str:
    try:
        return file_digest(path)
    except OSError as err:
        raise DataError(f"{path}: cannot read image: {err.strerror or err}") from None
