"""Downloads: stream a URL to a temporary file, check its size and sha256, retry what is transient.

Nothing half-downloaded is ever renamed into place: the bytes go to a
temporary file beside the target, which replaces it only after the length
matches what the server announced and the digest matches the pinned one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from tlcli.errors import DataError


class _Transient(Exception):
    """A failure another attempt may not have: a dropped connection, a short body."""


def download(url: str, dest: Path, sha256: Optional[str], max_bytes: int, retries: int = 3,
             timeout: float = 60, offline_hint: str = "") -> Path:
    """`dest`, fetched from `url` unless already there. Raises DataError with what to do."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    last: Exception = DataError("no attempt made")
    for attempt in range(retries):
        try:
            _fetch(url, dest, sha256, max_bytes, timeout)
            return dest
        except _Transient as err:
            last = err
            time.sleep(min(2**attempt, 8) * 0.25)
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise DataError(f"cannot download {url} ({reason}).{offline_hint}") from None
    raise DataError(f"cannot download {url}: {last} (after {retries} attempts).{offline_hint}")


def _fetch(url: str, dest: Path, sha256: Optional[str], max_bytes: int, timeout: float) -> None:
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            announced = response.headers.get("Content-Length")
            announced = int(announced) if announced and announced.isdigit() else None
            if announced is not None and announced > max_bytes:
                raise DataError(f"{url} is {announced:,} bytes; tl refuses downloads over {max_bytes:,}")
            received = _copy(response, out, digest, max_bytes, url)
        if announced is not None and received != announced:
            raise _Transient(f"received {received:,} of the {announced:,} bytes announced")
        if sha256 and digest.hexdigest() != sha256:
            raise DataError(f"{url}: sha256 is {digest.hexdigest()}, expected {sha256} "
                            "(a different or damaged file; nothing was kept)")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _copy(response, out, digest, max_bytes: int, url: str) -> int:
    received = 0
    try:
        while chunk := response.read(1 << 20):
            received += len(chunk)
            if received > max_bytes:
                raise DataError(f"{url} sent more than {max_bytes:,} bytes; refusing the rest")
            digest.update(chunk)
            out.write(chunk)
    except (http.client.IncompleteRead, ConnectionError, TimeoutError) as err:
        raise _Transient(f"the connection broke after {received:,} bytes ({type(err).__name__})") from None
    return received
