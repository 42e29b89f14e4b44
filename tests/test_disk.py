"""Disk faults, on real filesystems: a full disk and a read-only one give one line that
names the path, and nothing partial is left that a later run would accept."""

import subprocess
import uuid

import pytest

from conftest import tiny_recipe, write_recipe


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs. Mounting needs root and CAP_SYS_ADMIN: CI's machine and ours have both."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_leaves_no_accepted_cache(tmp_path, small_disk, cli):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, cache={"dir": str(small_disk / "cache")}))
    code, out = cli("featurize", path)
    assert code == 1 and "Traceback" not in out
    lines = [line for line in out.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and str(small_disk / "cache") in lines[0] and "No space left on device" in lines[0], out
    assert not list((small_disk / "cache").glob("*/manifest.json"))
    assert not list((small_disk / "cache").glob("*.tmp-*")), "a failed build cleans up after itself"


def test_a_read_only_output_dir_is_one_line(tmp_path, small_disk, cli):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, output_dir=str(small_disk / "run")))
    code, out = cli("fit", path)
    assert code == 1 and "Traceback" not in out
    assert out.strip() == f"error: {small_disk / 'run'}: Read-only file system", out
