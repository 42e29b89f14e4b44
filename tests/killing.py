"""The one kill harness: start `tl` as a real process and SIGKILL it (or one of its ranks) at an
observed event — a file appeared, a file changed — never after a guessed delay, so that a kill
lands mid-work however busy the machine is."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

Event = Callable[[], bool]


def seeded(name: str) -> tuple[int, random.Random]:
    """A fresh seed per run (or TL_KILL_SEED to replay one), for the caller to print."""
    seed = int(os.environ.get("TL_KILL_SEED") or random.SystemRandom().randrange(2**32))
    return seed, random.Random(f"{name}:{seed}")


def start(args: list, cwd: Optional[Path] = None, env: Optional[dict] = None, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "tlcli", *map(str, args)]
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(command, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, **popen)


def kill_when(proc: subprocess.Popen, event: Event, target: Optional[Callable[[], int]] = None,
              timeout: float = 900) -> bool:
    """Wait for `event()`, then SIGKILL `target()` (default: the process itself) if `proc` is
    still running. True when the kill landed mid-work: the event had happened and the
    process had not finished. `proc` is left running only if a rank was the target."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if event():
            if proc.poll() is not None:
                return False
            os.kill(target() if target else proc.pid, signal.SIGKILL)
            if target is None:
                proc.wait()
                return proc.returncode == -signal.SIGKILL
            return True
        time.sleep(0.005)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        raise AssertionError(f"no event within {timeout:.0f} s; the process was killed")
    return False


def files_appeared(directory_glob: Callable[[], list[Path]], k: int) -> Event:
    """The k-th file has appeared among those `directory_glob()` lists."""
    return lambda: len(directory_glob()) >= k


class Changes:
    """Counts the times a file is replaced (inode, mtime or size differ from the last look).
    tl replaces its state files atomically, so each write is a new inode."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.count, self.last = 0, self._stat()

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def at_least(self, k: int) -> Event:
        def event() -> bool:
            now = self._stat()
            if now is not None and now != self.last:
                self.count += 1
            self.last = now
            return self.count >= k
        return event


def rank_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the workers a torchrun launcher started (read from /proc: RANK in their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((int(e.split(b"=")[1]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None and _descends(int(entry.name), launcher):
            found[rank] = int(entry.name)
    return found


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        pid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
        if pid == ancestor:
            return True
    return False
