"""Downloads against a server on 127.0.0.1 that misbehaves on purpose; archive extraction limits."""

import hashlib
import http.server
import io
import tarfile
import threading

import pytest

from tlcli.data.download import FLOWERS_SHA256, FLOWERS_URL, safe_extract
from tlcli.data.download import download
from tlcli.errors import DataError

BODY = bytes(range(256)) * 64  # 16 KiB
SHA = hashlib.sha256(BODY).hexdigest()


class Misbehaving:
    """Serves BODY; `mode` says how to lie. Counts requests."""

    def __init__(self, mode: str):
        self.mode, self.requests = mode, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                """Quiet: a test server's access log is noise in pytest's output."""

            def do_GET(self):
                outer.requests += 1
                mode = outer.mode
                if mode == "flaky" and outer.requests == 1:
                    mode = "truncated"
                body, length = BODY, len(BODY)
                if mode == "truncated":
                    body = BODY[: len(BODY) // 2]  # announce all, send half, hang up
                elif mode == "short_length":
                    length = len(BODY) // 4  # announce less than the file: the rest is never read
                elif mode == "no_length":
                    length = None
                self.send_response(200)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file.bin"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_good_download_is_checked_and_kept(tmp_path):
    with Misbehaving("ok") as srv:
        path = download(srv.url, tmp_path / "f.bin", SHA, max_bytes=1 << 20)
    assert path.read_bytes() == BODY and list(tmp_path.iterdir()) == [path]


def test_a_truncated_download_is_retried_then_refused_leaving_nothing(tmp_path):
    with Misbehaving("truncated") as srv, pytest.raises(DataError, match="after 3 attempts") as err:
        download(srv.url, tmp_path / "f.bin", SHA, max_bytes=1 << 20, offline_hint=" HINT")
    assert srv.requests == 3 and str(err.value).endswith("HINT")
    assert list(tmp_path.iterdir()) == []


def test_a_dropped_connection_recovers_on_retry(tmp_path):
    with Misbehaving("flaky") as srv:
        assert download(srv.url, tmp_path / "f.bin", SHA, max_bytes=1 << 20).read_bytes() == BODY
    assert srv.requests == 2


def test_a_lying_content_length_fails_the_checksum(tmp_path):
    with Misbehaving("short_length") as srv, pytest.raises(DataError, match="sha256 is .* expected"):
        download(srv.url, tmp_path / "f.bin", SHA, max_bytes=1 << 20)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["ok", "no_length"])
def test_a_download_over_the_size_limit_is_refused(tmp_path, mode):
    with Misbehaving(mode) as srv, pytest.raises(DataError, match="refus"):
        download(srv.url, tmp_path / "f.bin", None, max_bytes=1000)
    assert list(tmp_path.iterdir()) == []


def test_plain_http_is_refused_before_any_connection(tmp_path, monkeypatch):
    import urllib.request

    from tlcli.data.download import download

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("connected"))
    with pytest.raises(DataError, match="https only"):
        download(FLOWERS_URL.replace("https://", "http://"), tmp_path / "f.tgz", FLOWERS_SHA256, max_bytes=1 << 20)
    assert list(tmp_path.iterdir()) == []


def _tgz(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_an_archive_that_unpacks_too_large_is_refused(tmp_path):
    archive = _tgz(tmp_path / "bomb.tgz", {"flower_photos/a/zeros.png": b"\0" * (4 << 20)})
    assert archive.stat().st_size < 64 << 10  # a few KiB that would grow to 4 MiB
    with pytest.raises(DataError, match="unpacks to more than"):
        safe_extract(archive, tmp_path / "out", max_bytes=1 << 20)
    assert not (tmp_path / "out").exists()


def test_an_archive_with_too_many_files_is_refused(tmp_path):
    archive = _tgz(tmp_path / "many.tgz", {f"flower_photos/a/{i}.png": b"x" for i in range(50)})
    with pytest.raises(DataError, match="more than 20 files"):
        safe_extract(archive, tmp_path / "out", max_files=20)
