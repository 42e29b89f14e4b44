"""Downloads: tl's one downloader, for data archives and torchvision weights alike.

A URL is fetched over https (plain http only from a loopback address: a local
mirror or a test server), streamed to a temporary file beside the target, and
renamed into place only after its length matches what the server announced and
its sha256 (or a torchvision file name's sha256 prefix) matches the pinned one.
A file already at the target with the right digest is not fetched again.
Dropped connections, short bodies, HTTP 5xx answers and timeouts are retried
with backoff; anything else (refused, 404, a wrong digest) fails at once.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

from tlcli.errors import DataError, TLError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class _Transient(Exception):
    """A failure another attempt may not have: a dropped connection, a short body, a 5xx."""


def check_url(url: str, error: type[TLError] = DataError) -> None:
    """https, or http from this machine only: nothing tl trains on comes over plain http."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK):
        return
    raise error(f"{url}: tl downloads over https only (plain http only from a loopback address)")


def download(url: str, dest: Path, sha256: Optional[str], max_bytes: int, retries: int = 3,
             timeout: float = 60, offline_hint: str = "", sha256_prefix: Optional[str] = None,
             error: type[TLError] = DataError) -> Path:
    """`dest`, fetched from `url` unless a file with the right digest is there already.
    Raises `error` with what to do (`offline_hint` says how to place the file by hand)."""
    check_url(url, error)
    dest = Path(dest)
    if dest.is_file() and (sha256 or sha256_prefix) and _matches(_sha256_of(dest), sha256, sha256_prefix):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    last: Exception = error("no attempt made")
    for attempt in range(retries):
        try:
            _fetch(url, dest, sha256, sha256_prefix, max_bytes, timeout, error, offline_hint)
            return dest
        except _Transient as err:
            last = err
            if attempt + 1 < retries:
                time.sleep(min(2**attempt, 8) * 0.25)
        except urllib.error.HTTPError as err:
            raise error(f"cannot download {url} (HTTP {err.code} {err.reason}).{offline_hint}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise error(f"cannot download {url} ({reason}).{offline_hint}") from None
    raise error(f"cannot download {url}: {last} (after {retries} attempts).{offline_hint}")


def _matches(digest: str, sha256: Optional[str], prefix: Optional[str]) -> bool:
    return (sha256 is None or digest == sha256) and (prefix is None or digest.startswith(prefix))


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _open(url: str, timeout: float):
    """The response, with what another attempt may fix raised as `_Transient`."""
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code >= 500:
            raise _Transient(f"the server answered HTTP {err.code}") from None
        raise
    except urllib.error.URLError as err:
        if isinstance(err.reason, (TimeoutError, socket.timeout)):
            raise _Transient(f"no answer within {timeout:g} s") from None
        raise
    except (TimeoutError, socket.timeout):
        raise _Transient(f"no answer within {timeout:g} s") from None


def _fetch(url: str, dest: Path, sha256: Optional[str], prefix: Optional[str], max_bytes: int, timeout: float,
           error: type[TLError], hint: str) -> None:
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, _open(url, timeout) as response:
            announced = response.headers.get("Content-Length")
            announced = int(announced) if announced and announced.isdigit() else None
            if announced is not None and announced > max_bytes:
                raise error(f"{url} is {announced:,} bytes; tl refuses downloads over {max_bytes:,}")
            received = _copy(response, out, digest, max_bytes, url, error)
            out.flush()
            os.fsync(out.fileno())
        if announced is not None and received != announced:
            raise _Transient(f"received {received:,} of the {announced:,} bytes announced")
        if not _matches(digest.hexdigest(), sha256, prefix):
            expected = sha256 or f"{prefix}…"
            raise error(f"{url}: sha256 is {digest.hexdigest()}, expected {expected} "
                        f"(a different or damaged file; nothing was kept).{hint}")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _copy(response, out, digest, max_bytes: int, url: str, error: type[TLError]) -> int:
    received = 0
    try:
        while chunk := response.read(1 << 20):
            received += len(chunk)
            if received > max_bytes:
                raise error(f"{url} sent more than {max_bytes:,} bytes; refusing the rest")
            digest.update(chunk)
            out.write(chunk)
    except (http.client.IncompleteRead, ConnectionError, TimeoutError, socket.timeout) as err:
        raise _Transient(f"the connection broke after {received:,} bytes ({type(err).__name__})") from None
    return received
