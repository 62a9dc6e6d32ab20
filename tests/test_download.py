"""download_broden against a local HTTP server: success, resumable failure, unsafe archives, checksums."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_dissect import broden
from lightning_dissect.broden import Broden, BrodenError, download_broden
from tests.test_broden import write_broden  # the same tiny dataset the reader is tested on


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 serving ``files`` (URL path -> bytes)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.truncate_next = False  # answer the next request with half the body, then hang up
        # (first, step, interval): send the first bytes, then `step` bytes every `interval` seconds (nothing
        # when step is 0), for at most 5 s: a slow or stalled server.
        self.paced: tuple[int, int, float] | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.truncate_next:
                    server.truncate_next = False
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                if server.paced is not None:
                    self.send_paced(body, *server.paced)
                    return
                self.wfile.write(body)

            def send_paced(self, body: bytes, first: int, step: int, interval: float) -> None:
                self.close_connection = True
                stop = time.monotonic() + 5
                try:
                    self.wfile.write(body[:first])
                    sent = first
                    while sent < len(body) and time.monotonic() < stop:
                        time.sleep(interval)
                        self.wfile.write(body[sent : sent + step])
                        sent += step
                except OSError:  # the client gave up
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    # A proxy from the environment would take 127.0.0.1 elsewhere.
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.delenv("LIGHTNING_DISSECT_BRODEN_URL", raising=False)
    server = Server()
    yield server
    if server.thread.is_alive():
        server.stop()


def zip_folder(folder: Path, prefix: str) -> bytes:
    """The files under ``folder`` as a zip archive, each name prefixed by ``prefix``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(folder).as_posix())
    return buffer.getvalue()


@pytest.fixture
def archive(tmp_path: Path) -> bytes:
    """The tiny dataset zipped like the NetDissect archives: inside a top-level broden1_224/ folder."""
    return zip_folder(write_broden(tmp_path / "source"), "broden1_224/")


def leftovers(dest: Path) -> list[str]:
    return sorted(path.name for path in dest.iterdir()) if dest.exists() else []


def test_download_installs_dataset_and_marker_then_stays_offline(
    server: Server, archive: bytes, tmp_path: Path
) -> None:
    server.files["/data/broden1_224.zip"] = archive
    dest = tmp_path / "dest"
    digest = hashlib.sha256(archive).hexdigest()
    url = server.base + "/data/broden1_224.zip"

    root = download_broden(dest, url=url, progress=False, expected_size=len(archive), sha256=digest)

    assert root == dest / "broden1_224"
    assert leftovers(dest) == ["broden1_224"]  # no .part file, no staging folder
    marker = json.loads((root / ".complete").read_text())
    assert marker["sha256"] == digest and marker["bytes"] == len(archive) and marker["url"] == url
    assert marker["fingerprint"] == Broden(root).fingerprint()
    assert Broden(root).read_segmentation(0)[1] == [4]
    assert server.requests == ["/data/broden1_224.zip"]

    server.stop()
    assert download_broden(dest, url=url, progress=False) == root


def test_archive_without_top_level_folder(server: Server, tmp_path: Path) -> None:
    server.files["/broden1_224.zip"] = zip_folder(write_broden(tmp_path / "source"), "")
    root = download_broden(tmp_path / "dest", url=server.base + "/broden1_224.zip", progress=True)
    assert len(Broden(root)) == 3 and (root / ".complete").is_file()


def test_environment_variable_replaces_the_base_url(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/mirror/broden1_227.zip"] = zip_folder(write_broden(tmp_path / "source"), "broden1_227/")
    monkeypatch.setenv("LIGHTNING_DISSECT_BRODEN_URL", server.base + "/mirror/")
    root = download_broden(tmp_path / "dest", resolution=227, progress=False)
    assert root == tmp_path / "dest" / "broden1_227"
    assert server.requests == ["/mirror/broden1_227.zip"]


def test_interrupted_transfer_installs_nothing_and_a_retry_succeeds(
    server: Server, archive: bytes, tmp_path: Path
) -> None:
    server.files["/broden1_224.zip"] = archive
    server.truncate_next = True
    dest = tmp_path / "dest"
    url = server.base + "/broden1_224.zip"
    with pytest.raises(
        BrodenError, match=rf"transfer ended after {len(archive) // 2} of {len(archive)} bytes"
    ):
        download_broden(dest, url=url, progress=False)
    assert leftovers(dest) == []  # no dataset, no marker, no .part, no staging folder

    root = download_broden(dest, url=url, progress=False)
    assert (root / ".complete").is_file() and len(Broden(root)) == 3


def symlink_member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("member", "problem"),
    [
        ("broden1_224/../evil.txt", "climbs out of the archive"),
        ("../../evil.txt", "climbs out of the archive"),
        ("{tmp}/evil.txt", "has an absolute path"),
        ("C:\\evil.txt", "has an absolute path"),
        ("broden1_224/evil.txt -> symlink", "is a symbolic link"),
    ],
)
def test_unsafe_member_is_refused_before_anything_is_written(
    server: Server, tmp_path: Path, member: str, problem: str
) -> None:
    source = write_broden(tmp_path / "source")
    buffer = io.BytesIO(zip_folder(source, "broden1_224/"))
    with zipfile.ZipFile(buffer, "a") as archive:
        if member.endswith(" -> symlink"):
            member = member.removesuffix(" -> symlink")
            archive.writestr(symlink_member(member), "/etc/passwd")
        else:
            member = member.format(tmp=tmp_path)
            archive.writestr(zipfile.ZipInfo(member), "evil")
    server.files["/broden1_224.zip"] = buffer.getvalue()
    dest = tmp_path / "deep" / "dest"

    with pytest.raises(BrodenError, match="member") as error:
        download_broden(dest, url=server.base + "/broden1_224.zip", progress=False)

    assert repr(member) in str(error.value) and problem in str(error.value)
    assert leftovers(dest) == []
    assert list(tmp_path.rglob("*evil*")) == []


def test_checksum_mismatch_installs_nothing(server: Server, archive: bytes, tmp_path: Path) -> None:
    server.files["/broden1_224.zip"] = archive
    dest = tmp_path / "dest"
    with pytest.raises(BrodenError, match=r"sha256 is [0-9a-f]{64}, expected 0{64}"):
        download_broden(dest, url=server.base + "/broden1_224.zip", progress=False, sha256="0" * 64)
    assert leftovers(dest) == []


def test_size_other_than_expected_is_refused(server: Server, archive: bytes, tmp_path: Path) -> None:
    server.files["/broden1_224.zip"] = archive
    with pytest.raises(BrodenError, match=rf"announces {len(archive)} bytes, expected 5"):
        download_broden(
            tmp_path / "dest", url=server.base + "/broden1_224.zip", progress=False, expected_size=5
        )
    assert leftovers(tmp_path / "dest") == []


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/missing.zip", None, "HTTP 404"),
        ("/page.zip", b"<html>not found</html>", "not a valid zip archive"),
        ("/other.zip", "other", "holds no index.csv"),
        ("/broken.zip", "broken", r"not a valid Broden dataset: .*label.csv is missing"),
    ],
)
def test_unusable_download_installs_nothing(
    server: Server, tmp_path: Path, path: str, body: bytes | str | None, message: str
) -> None:
    source = write_broden(tmp_path / "source")
    if body == "other":
        body = zip_folder(source / "images", "")
    elif body == "broken":
        (source / "label.csv").unlink()
        body = zip_folder(source, "broden1_224/")
    if body is not None:
        server.files[path] = body
    dest = tmp_path / "dest"
    with pytest.raises(BrodenError, match=message):
        download_broden(dest, url=server.base + path, progress=False)
    assert leftovers(dest) == []


def test_existing_folder_without_marker_is_not_touched(tmp_path: Path) -> None:
    (tmp_path / "broden1_224").mkdir()
    with pytest.raises(BrodenError, match=r"broden1_224 exists but has no .complete marker.*remove it"):
        download_broden(tmp_path, url="http://127.0.0.1:9/unused.zip", progress=False)


@pytest.mark.parametrize("resolution", [225, "224", True])
def test_resolution_must_be_224_or_227(tmp_path: Path, resolution: object) -> None:
    with pytest.raises(ValueError, match=r"resolution must be one of \(224, 227\)"):
        download_broden(tmp_path, resolution=resolution)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- archives that expand implausibly


def with_members(source: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """The tiny dataset zipped like a release, plus ``members`` (name -> content) compressed this way."""
    buffer = io.BytesIO(zip_folder(source, "broden1_224/"))
    with zipfile.ZipFile(buffer, "a") as archive:
        for name, content in members.items():
            archive.writestr(name, content, compress_type=compression)
    return buffer.getvalue()


def patch_directory(data: bytes, name: str, **fields: int) -> bytes:
    """``data`` with the central-directory entry of member ``name`` changed: ``flag_bits``,
    ``compress_type``, ``compress_size`` or ``file_size`` (what a crafted archive can claim)."""
    offsets = {"flag_bits": (8, "<H"), "compress_type": (10, "<H"), "compress_size": (20, "<I"),
               "file_size": (24, "<I")}
    patched = bytearray(data)
    start = patched.find(b"PK\x01\x02")
    while start >= 0:
        length = struct.unpack_from("<H", patched, start + 28)[0]
        if patched[start + 46 : start + 46 + length] == name.encode():
            for field, value in fields.items():
                offset, layout = offsets[field]
                struct.pack_into(layout, patched, start + offset, value)
            return bytes(patched)
        start = patched.find(b"PK\x01\x02", start + 4)
    raise KeyError(name)


def refused(server: Server, tmp_path: Path, body: bytes, match: str) -> str:
    """Serves ``body``, checks download_broden refuses it with ``match`` and leaves nothing; the message."""
    server.files["/broden1_224.zip"] = body
    dest = tmp_path / "dest"
    with pytest.raises(BrodenError, match=match) as error:
        download_broden(dest, url=server.base + "/broden1_224.zip", progress=False)
    assert leftovers(dest) == []  # no dataset, no staging folder, no archive
    return str(error.value)


def test_member_that_expands_a_hundredfold_is_refused_before_extraction(server: Server, tmp_path: Path) -> None:
    body = with_members(write_broden(tmp_path / "source"), {"broden1_224/images/bomb.png": bytes(64 << 20)})
    assert len(body) < 1 << 20  # 64 MiB of zeros deflate to about 64 KiB
    message = refused(server, tmp_path, body, r"member 'broden1_224/images/bomb.png' expands \d+ bytes into 67108864")
    assert "more than 100 times" in message


def test_members_that_together_expand_implausibly_are_refused(server: Server, tmp_path: Path) -> None:
    # Each 3 MiB member is under the per-member ratio's 4 MiB floor; together 72 MiB from about 80 KiB.
    members = {f"broden1_224/images/blank{k}.png": bytes(3 << 20) for k in range(24)}
    body = with_members(write_broden(tmp_path / "source"), members)
    refused(server, tmp_path, body, r"members would expand to \d+ bytes, more than 10 times its \d+ bytes plus 64 MiB")


def test_directory_claiming_more_compressed_bytes_than_the_archive_is_refused(
    server: Server, tmp_path: Path
) -> None:
    name = "broden1_224/images/extra.png"
    body = with_members(write_broden(tmp_path / "source"), {name: b"x" * 1000})
    body = patch_directory(body, name, compress_size=len(body) + 1, file_size=len(body) + 1)
    refused(server, tmp_path, body, r"its directory claims \d+ compressed bytes but the archive holds")


def test_archive_larger_than_the_free_space_is_refused(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = zip_folder(write_broden(tmp_path / "source"), "broden1_224/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12 - 100, free=100))
    refused(server, tmp_path, body, r"its members need \d+ bytes but .*dest has 100 free")


def test_member_whose_header_understates_its_size_is_refused(server: Server, tmp_path: Path) -> None:
    name = "broden1_224/images/extra.png"
    body = with_members(write_broden(tmp_path / "source"), {name: b"x" * 100_000})
    refused(server, tmp_path, patch_directory(body, name, file_size=10), rf"member '{name}' .*CRC")


@pytest.mark.parametrize(
    ("fields", "compression", "problem"),
    [
        ({"flag_bits": 0x1}, zipfile.ZIP_STORED, "is encrypted"),
        ({"compress_type": 9}, zipfile.ZIP_DEFLATED, "is compressed with method 9"),  # deflate64
        ({}, zipfile.ZIP_BZIP2, "is compressed with method 12"),
        ({}, zipfile.ZIP_LZMA, "is compressed with method 14"),
    ],
    ids=["encrypted", "deflate64", "bzip2", "lzma"],
)
def test_member_that_cannot_be_read_safely_is_refused_by_name(
    server: Server, tmp_path: Path, fields: dict[str, int], compression: int, problem: str
) -> None:
    name = "broden1_224/images/extra.png"
    body = with_members(write_broden(tmp_path / "source"), {name: b"x" * 1000}, compression)
    refused(server, tmp_path, patch_directory(body, name, **fields) if fields else body, rf"member '{name}' {problem}")


# ---------------------------------------------------------------------- slow servers: stalls and the deadline


@pytest.fixture
def one_second_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broden, "STALL_WINDOW_SECONDS", 1.0)


def test_silent_server_fails_within_the_window_counting_the_bytes_that_arrived(
    server: Server, tmp_path: Path, one_second_window: None
) -> None:
    server.files["/broden1_224.zip"] = bytes(1 << 20)
    server.paced = (1024, 0, 0.1)  # 1 KiB, then nothing
    dest = tmp_path / "dest"
    with pytest.raises(BrodenError, match=r"the server sent nothing for 1 s, after 1024 bytes; nothing was"):
        download_broden(dest, url=server.base + "/broden1_224.zip", progress=False)
    assert leftovers(dest) == []


def test_trickling_server_is_a_stall(server: Server, tmp_path: Path, one_second_window: None) -> None:
    server.files["/broden1_224.zip"] = bytes(1 << 20)
    server.paced = (1024, 1, 0.1)  # then one byte every 0.1 s: never silent for a whole read timeout
    dest = tmp_path / "dest"
    with pytest.raises(BrodenError) as error:
        download_broden(dest, url=server.base + "/broden1_224.zip", progress=False)
    message = str(error.value)
    assert "the transfer stalled:" in message and "fewer than 65536 in 1 s" in message
    arrived = int(message.split(", after ")[1].split(" bytes")[0])
    assert 1024 < arrived < 1024 + 40  # every trickled byte counted, and the stall seen within two windows
    assert leftovers(dest) == []


def test_timeout_ends_a_transfer_that_never_stalls(server: Server, tmp_path: Path) -> None:
    server.files["/broden1_224.zip"] = bytes(8 << 20)
    server.paced = (0, 16 << 10, 0.05)  # 320 KiB/s, far above the stall threshold: 25 s for the body
    dest = tmp_path / "dest"
    started = time.monotonic()
    with pytest.raises(BrodenError, match=r"did not finish within timeout=1 s, after [1-9]\d* bytes"):
        download_broden(dest, url=server.base + "/broden1_224.zip", progress=False, timeout=1)
    assert time.monotonic() - started < 5  # the deadline, not the 25 s body, ended it
    assert leftovers(dest) == []


def test_download_within_the_timeout_succeeds(server: Server, archive: bytes, tmp_path: Path) -> None:
    server.files["/broden1_224.zip"] = archive
    root = download_broden(tmp_path / "dest", url=server.base + "/broden1_224.zip", progress=False, timeout=60)
    assert len(Broden(root)) == 3


@pytest.mark.parametrize("timeout", [0, -1, "5", True, float("nan")])
def test_timeout_must_be_a_positive_number(tmp_path: Path, timeout: object) -> None:
    with pytest.raises(ValueError, match=r"timeout must be a positive number of seconds or None"):
        download_broden(tmp_path, url="http://127.0.0.1:9/unused.zip", timeout=timeout)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- concurrent downloads

DOWNLOAD_IN_A_PROCESS = """
import sys, time
from pathlib import Path
from lightning_dissect.broden import download_broden
ready, go, dest, url = sys.argv[1:]
Path(ready).touch()
while not Path(go).exists():  # both processes start their download at the same moment
    time.sleep(0.005)
print(download_broden(dest, url=url, progress=False))
"""


def test_concurrent_processes_download_once_and_both_get_the_dataset(
    server: Server, archive: bytes, tmp_path: Path
) -> None:
    server.files["/broden1_224.zip"] = archive
    server.paced = (0, len(archive) // 10 + 1, 0.1)  # about 1 s for the body: the other process must wait
    dest, go = tmp_path / "dest", tmp_path / "go"
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "no_proxy": "*"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", DOWNLOAD_IN_A_PROCESS, str(tmp_path / f"ready{k}"), str(go), str(dest),
             server.base + "/broden1_224.zip"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
        )
        for k in range(2)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{k}").exists() for k in range(2)) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
        assert stdout.strip() == str(dest / "broden1_224")
    assert server.requests == ["/broden1_224.zip"]  # one download, the other process used its result
    assert leftovers(dest) == ["broden1_224"]  # no lock file, no .part, no staging folder
    assert len(Broden(dest / "broden1_224")) == 3


def test_waiting_for_another_download_obeys_the_timeout(server: Server, archive: bytes, tmp_path: Path) -> None:
    server.files["/broden1_224.zip"] = archive
    server.paced = (0, len(archive) // 20 + 1, 0.1)  # about 2 s
    dest, url = tmp_path / "dest", server.base + "/broden1_224.zip"
    results: list[Path] = []
    first = threading.Thread(target=lambda: results.append(download_broden(dest, url=url, progress=False)))
    first.start()
    try:
        while not server.requests:
            time.sleep(0.01)
        with pytest.raises(BrodenError, match=r"another download into .*dest holds .*broden1_224.lock and did not"):
            download_broden(dest, url=url, progress=False, timeout=0.3)
    finally:
        first.join()
    assert results == [dest / "broden1_224"] and server.requests == ["/broden1_224.zip"]
    assert download_broden(dest, url=url, progress=False, timeout=0.3) == dest / "broden1_224"
