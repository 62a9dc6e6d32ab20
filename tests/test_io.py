"""`atomic_write`: the one writer of files that readers may open at any moment."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from lightning_dissect import io as ld_io
from lightning_dissect.io import atomic_write


def leftovers(folder):
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_writes_text_and_bytes_with_the_permissions_of_a_plain_open(tmp_path):
    with atomic_write(tmp_path / "a" / "table.csv") as handle:
        handle.write("unit,label\r\n1,dög\r\n")  # newlines kept as written, UTF-8
    with atomic_write(tmp_path / "a" / "image.png", "wb") as handle:
        handle.write(b"\x89PNG")
    assert (tmp_path / "a" / "table.csv").read_bytes() == "unit,label\r\n1,dög\r\n".encode()
    assert (tmp_path / "a" / "image.png").read_bytes() == b"\x89PNG"
    with open(tmp_path / "plain", "w") as handle:
        handle.write("")
    plain = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    for name in ["table.csv", "image.png"]:
        assert stat.S_IMODE(os.stat(tmp_path / "a" / name).st_mode) == plain
    assert leftovers(tmp_path / "a") == []


def test_a_failure_inside_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "history.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("half of the new")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old\n"
    assert leftovers(tmp_path) == []


def test_a_full_disk_that_only_shows_at_close_leaves_no_temporary(tmp_path, monkeypatch):
    """ENOSPC often comes when buffered data is flushed at close(), after the last write succeeded."""
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            return len(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ld_io.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space left"), atomic_write(tmp_path / "r.json") as handle:
        handle.write("{}")
    assert not (tmp_path / "r.json").exists()
    assert leftovers(tmp_path) == []


def test_two_writers_of_one_file_use_distinct_temporaries(tmp_path):
    target = tmp_path / "same.txt"
    with atomic_write(target) as first, atomic_write(target) as second:
        first.write("first")
        second.write("second")
    assert target.read_text() == "first"  # the outer one is renamed last
    assert leftovers(tmp_path) == []


def test_refuses_other_modes(tmp_path):
    with pytest.raises(ValueError, match="mode='a'"), atomic_write(tmp_path / "x", "a"):
        pass
