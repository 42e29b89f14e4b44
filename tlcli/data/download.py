"""Downloads: tl's one downloader (data archives, torchvision weights) and the one archive extractor.

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
import shutil
import tarfile
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path
from typing import Optional

from tlcli.errors import DataError, TLError

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
# The archive's sha256 and size, as TensorFlow Datasets pins them (url_checksums/tf_flowers.txt).
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
FLOWERS_BYTES = 228_813_984
# Extraction bounds: the real archive unpacks to about 230 MB in 3,675 files.
MAX_EXTRACTED_BYTES = 1 << 30
MAX_EXTRACTED_FILES = 20_000

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


# --------------------------------------------------------------------------- the flowers archive


def data_home() -> Path:
    return Path(os.environ.get("TL_DATA_HOME", Path.home() / ".cache" / "tl" / "datasets"))


def download_flowers(url: str, sha256: Optional[str] = FLOWERS_SHA256) -> Path:
    """Download (https, checked against the pinned sha256) and extract flower_photos once."""
    target = data_home() / "flower_photos"
    if (target / ".complete").exists():
        return target
    data_home().mkdir(parents=True, exist_ok=True)
    hint = (f" Offline, extract flower_photos.tgz so that {target}/<class>/ holds the images and create "
            f"{target}/.complete, or use imagefolder: PATH")
    with tempfile.TemporaryDirectory(dir=data_home()) as tmp:
        archive = download(url, Path(tmp) / "flower_photos.tgz", sha256, max_bytes=2 * FLOWERS_BYTES, offline_hint=hint)
        extract_dir = Path(tmp) / "extract"
        safe_extract(archive, extract_dir)
        inner = extract_dir / "flower_photos"
        if not inner.is_dir():
            raise DataError(f"{url}: archive has no flower_photos/ folder")
        if target.exists():
            shutil.rmtree(target)
        os.replace(inner, target)
    (target / ".complete").touch()
    return target


def safe_extract(archive: Path, dest: Path, max_bytes: int = MAX_EXTRACTED_BYTES,
                 max_files: int = MAX_EXTRACTED_FILES) -> None:
    """Extract a tar archive, refusing absolute paths, `..`, links out and devices (tarfile's
    `data` filter), and archives that unpack to more than max_bytes or max_files."""
    try:
        with tarfile.open(archive) as tar:
            members = _bounded_members(tar, archive, max_bytes, max_files)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.FilterError, tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{archive}: refusing to extract: {err}") from None


def _bounded_members(tar: tarfile.TarFile, archive: Path, max_bytes: int, max_files: int) -> list:
    members, total = [], 0
    for member in tar:  # headers only: sizes are known before any byte is written
        members.append(member)
        total += member.size
        if len(members) > max_files:
            raise DataError(f"{archive}: more than {max_files:,} files; refusing to extract")
        if total > max_bytes:
            raise DataError(f"{archive}: unpacks to more than {max_bytes:,} bytes; refusing to extract")
    return members