"""Where a decoded probe's arrays live: fixed-size files on disk, mapped (the probe cache), or memory.

A decoded probe is a handful of arrays with one row per image (uint8 images, int16/int32 label maps,
image-level labels, category presence) and the label areas. For the released Broden that is about
15 GiB, so the arrays are written to disk chunk by chunk while decoding, never held whole, and read
back by mapping the files (`torch.from_file`, copy-on-write: nothing is read until it is touched,
and a write to a mapped tensor never reaches the file) or, per batch, with `os.preadv` straight into
the batch's (pinned) tensor, which keeps the process's resident memory at one batch however many
batches are read.

The cache of one probe is a folder holding one raw file per array (C order, native byte order),
`files` (the dataset files the arrays were decoded from) and `manifest.json`: the format version,
the probe's fingerprint, each array's file, dtype, shape and byte size, and a hash of the sizes and
modification times the dataset files had when they were decoded. The folder is built in a staging
folder beside it (`.<name>.*.partial`) and renamed into place after the data files are flushed to disk
and the manifest is written (last, atomically, with `atomic_write`), so a folder under the final name
is complete. On reading, the manifest must name this version, and every file must have exactly its
recorded size; anything else is `CacheInvalid`: rebuilt, never trusted (a file changed in place at the
same size cannot be told apart without reading it all; the data is ours to write, not the user's).

A build holds a lock file `<name>.lock` (POSIX `flock`), so that processes asking for the same probe
at once (the ranks of a job, two jobs) decode it once; the others wait and then map the result. A
staging folder found by the lock holder was left by a killed build and is removed: an interrupted
build is never resumed, it starts over. The lock file is removed when the build ends.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_dissect.io import atomic_write

try:  # POSIX; without it builds are not locked (each writes its own staging folder)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CACHE_VERSION", "ArraySpec", "CacheInvalid", "CacheWriteError", "ArrayWriter", "Manifest", "MappedArrays",
    "MemoryArrays", "build_lock", "files_stats", "listed_files", "publish", "read_manifest", "remove_stale_staging",
    "require_free_space", "staging_folder", "write_manifest",
]

CACHE_VERSION = 2
MANIFEST = "manifest.json"
FILES = "files"
_DTYPES = {"uint8": torch.uint8, "bool": torch.bool, "int16": torch.int16, "int32": torch.int32,
           "int64": torch.int64}


@dataclass(frozen=True)
class ArraySpec:
    """The dtype and shape of one array of a decoded probe (the first axis is the image, where it has one)."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one image's slice)."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self, file: str) -> dict[str, Any]:
        return {"file": file, "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape),
                "bytes": self.nbytes}


class CacheInvalid(Exception):
    """A cache folder that must not be used (incomplete, from another version, or not matching its manifest)."""


class CacheWriteError(Exception):
    """The cache could not be written (a full disk, a read-only folder); `__cause__` is the `OSError`."""


def _file_name(name: str) -> str:
    return f"{name}.bin"


@contextlib.contextmanager
def _writing(what: str) -> Iterator[None]:
    """Turn an `OSError` of a cache write into `CacheWriteError`, so callers never mistake it for a read error."""
    try:
        yield
    except OSError as error:
        raise CacheWriteError(f"{what}: {error}") from error


# ---------------------------------------------------------------------- writing


class ArrayWriter:
    """Writes the arrays of a decoded probe into `folder`, chunk by chunk, in image order.

    Args:
        folder: an existing, empty folder.
        specs: name -> shape and dtype of each array.

    Raises:
        CacheWriteError: any failure to write (the caller removes the folder).
    """

    def __init__(self, folder: Path, specs: Mapping[str, ArraySpec]) -> None:
        self.folder, self.specs = folder, dict(specs)
        self.written = dict.fromkeys(self.specs, 0)
        self.handles: dict[str, Any] = {}
        with _writing(f"cannot create the arrays in {folder}"):
            for name in self.specs:
                self.handles[name] = open(folder / _file_name(name), "wb")

    def append(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Append the next rows of some arrays (C-contiguous, of the arrays' dtypes)."""
        for name, array in arrays.items():
            with _writing(f"cannot write {self.folder / _file_name(name)}"):
                self.handles[name].write(np.ascontiguousarray(array).view(np.uint8).data)
            self.written[name] += array.nbytes

    def finish(self) -> None:
        """Check every array is complete, flush it to disk and close it."""
        for name, spec in self.specs.items():
            if self.written[name] != spec.nbytes:  # a bug, not a disk problem: never publish it
                raise RuntimeError(f"{name}: wrote {self.written[name]} bytes of {spec.nbytes}")
            handle = self.handles.pop(name)
            with _writing(f"cannot write {self.folder / _file_name(name)}"):
                with handle:
                    handle.flush()
                    os.fsync(handle.fileno())  # data on disk before the manifest says it is there

    def close(self) -> None:
        """Close what is still open (after a failure)."""
        for handle in self.handles.values():
            with contextlib.suppress(OSError):
                handle.close()
        self.handles = {}


@dataclass(frozen=True)
class Manifest:
    """What a cache folder holds.

    Attributes:
        fingerprint: the probe's fingerprint (data and selection).
        specs: name -> dtype and shape of each array.
        stats: `files_stats` of the dataset files the arrays were decoded from, when they were decoded
            (the files are listed in the folder's `files`, read back by `listed_files`).
    """

    fingerprint: str
    specs: dict[str, ArraySpec]
    stats: str


def files_stats(folder: Path, files: Iterable[str]) -> str:
    """sha256 over the size and modification time of each of `files` (in `folder`); a missing file counts too.

    Reading the files would cost as much as decoding them; their stats tell a replaced file apart. The
    hash is updated every few thousand files, so memory stays flat for any number of them.
    """
    prefix = f"{folder}{os.sep}"  # plain strings: a Path per file triples the cost for 350,000 files
    digest = hashlib.sha256()
    parts: list[str] = []
    for name in files:
        try:
            info = os.stat(prefix + name)
            parts.append(f"{name}:{info.st_size}:{info.st_mtime_ns};")
        except OSError:
            parts.append(f"{name}:missing;")
        if len(parts) == 4096:
            digest.update("".join(parts).encode())
            parts.clear()
    digest.update("".join(parts).encode())
    return digest.hexdigest()


def listed_files(folder: Path) -> Iterator[str]:
    """The dataset files listed in the cache in `folder`, read a block at a time."""
    with open(folder / FILES, "rb") as handle:
        rest = b""
        while block := handle.read(2**20):
            *names, rest = (rest + block).split(b"\0")
            yield from (name.decode() for name in names)
        if rest:
            yield rest.decode()


def write_manifest(folder: Path, manifest: Manifest, files: Sequence[str]) -> None:
    """Write the list of `files`, then `manifest.json`: the last file of a cache, the one that makes it valid."""
    listing = "\0".join(files).encode()  # the one character no path holds
    with _writing(f"cannot write {folder / FILES}"):
        with open(folder / FILES, "wb") as handle:
            handle.write(listing)
            handle.flush()
            os.fsync(handle.fileno())
    content = {
        "version": CACHE_VERSION, "fingerprint": manifest.fingerprint, "byteorder": sys.byteorder,
        "arrays": {name: spec.describe(_file_name(name)) for name, spec in manifest.specs.items()},
        "files": {"file": FILES, "bytes": len(listing), "count": len(files), "stats": manifest.stats},
    }
    with _writing(f"cannot write {folder / MANIFEST}"), atomic_write(folder / MANIFEST) as handle:
        json.dump(content, handle, indent=1)


def staging_folder(root: Path, name: str) -> Path:
    """A new, empty staging folder for the cache `root / name`."""
    with _writing(f"cannot create a folder in {root}"):
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=root))


def remove_stale_staging(root: Path, name: str) -> None:
    """Remove the staging folders of `root / name` left by killed builds (call with the build lock held)."""
    if fcntl is None:  # without a lock a staging folder may belong to a live build
        return
    for stale in root.glob(f".{name}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def require_free_space(folder: Path, nbytes: int) -> None:
    """Raise `CacheWriteError` now, rather than after decoding for an hour, when `folder` cannot hold `nbytes`."""
    with _writing(f"cannot check the free space of {folder}"):
        free = shutil.disk_usage(folder).free
    if free < nbytes:
        error = OSError(errno.ENOSPC, f"{nbytes / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free")
        raise CacheWriteError(f"{folder}: {error.strerror}") from error


def publish(staging: Path, final: Path) -> None:
    """Rename a complete `staging` folder to `final`, replacing an invalid cache found there."""
    with _writing(f"cannot rename {staging} to {final}"):
        if final.exists():
            # Move the old folder aside first: a folder cannot be renamed over a non-empty one. Processes
            # that mapped its files keep reading them (the files live on until unmapped).
            outdated = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, outdated / "cache")
            shutil.rmtree(outdated, ignore_errors=True)
        os.replace(staging, final)


@contextlib.contextmanager
def build_lock(root: Path, name: str) -> Iterator[None]:
    """Hold the build lock of the cache `root / name` (a no-op where `fcntl` is missing).

    The lock file is removed on release. A process that waited on a file removed meanwhile sees that
    the path no longer names the file it locked and locks again, so two processes never both hold it.

    Raises:
        CacheWriteError: the lock file cannot be created (a read-only or missing folder).
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    path = root / f"{name}.lock"
    with _writing(f"cannot create the lock file {path}"):
        root.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                opened, current = os.fstat(descriptor), os.stat(path)
            except FileNotFoundError:
                os.close(descriptor)
                continue
            except BaseException:
                os.close(descriptor)
                raise
            if (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino):
                break
            os.close(descriptor)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # before unlocking: a waiter then sees a removed file and locks again
        os.close(descriptor)


# ---------------------------------------------------------------------- reading


def _checked_size(path: Path, expected: object) -> None:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise CacheInvalid(f"{path} is unreadable ({error})") from None
    if size != expected:
        raise CacheInvalid(f"{path} holds {size} bytes, its manifest says {expected}")


def _spec(folder: Path, name: str, entry: Any) -> ArraySpec:
    """The spec of one manifest entry, checked against itself and the size of its file."""
    try:
        spec = ArraySpec(_DTYPES[entry["dtype"]], tuple(int(n) for n in entry["shape"]))
        valid = entry["file"] == _file_name(name) and entry["bytes"] == spec.nbytes and min(spec.shape) >= 0
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise CacheInvalid(f"{folder / MANIFEST}: the entry of {name!r} is malformed")
    _checked_size(folder / _file_name(name), spec.nbytes)
    return spec


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest of the cache in `folder`, or None when there is none; the files are checked against it.

    Raises:
        CacheInvalid: the folder exists but is not a complete cache of this version: no manifest (an
            interrupted build), an unreadable one, another version or byte order, a file missing or of
            another size than recorded.
    """
    if not folder.exists():
        return None
    try:
        content = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheInvalid(f"{folder} has no {MANIFEST}: an interrupted build") from None
    except (OSError, ValueError) as error:
        raise CacheInvalid(f"{folder / MANIFEST} is unreadable ({error})") from None
    version = content.get("version") if isinstance(content, dict) else None
    if version != CACHE_VERSION:
        raise CacheInvalid(f"{folder} is cache version {version!r}, this is version {CACHE_VERSION}")
    arrays, files = content.get("arrays"), content.get("files")
    if content.get("byteorder") != sys.byteorder or not isinstance(arrays, dict) or not isinstance(files, dict) \
            or not isinstance(content.get("fingerprint"), str) or files.get("file") != FILES:
        raise CacheInvalid(f"{folder / MANIFEST} is not a manifest of this version and byte order")
    specs = {name: _spec(folder, name, entry) for name, entry in arrays.items()}
    _checked_size(folder / FILES, files.get("bytes"))
    if not isinstance(files.get("stats"), str):
        raise CacheInvalid(f"{folder / MANIFEST} records no stats of the decoded files")
    return Manifest(content["fingerprint"], specs, files["stats"])


def _runs(positions: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """`(output row, first position, count)` of each run of consecutive positions."""
    start = 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            yield start, positions[start], i - start
            start = i


def _new_rows(spec: ArraySpec, count: int, pin: bool) -> torch.Tensor:
    return torch.empty((count, *spec.shape[1:]), dtype=spec.dtype, pin_memory=pin)


class MappedArrays:
    """The arrays of the files in `folder`, mapped, and read per batch with `os.preadv`.

    Args:
        folder: holds `<name>.bin` for every array of `specs`, each exactly `spec.nbytes` long.
        specs: name -> shape and dtype.

    Attributes:
        tensors: name -> the whole array as a copy-on-write mapped tensor (costs nothing until read).
        folder: where the files are; None once they are deleted (a temporary probe, see `detach`).
    """

    def __init__(self, folder: Path, specs: Mapping[str, ArraySpec]) -> None:
        self.folder: Path | None = folder
        self.specs = dict(specs)
        self.tensors: dict[str, torch.Tensor] = {}
        self.descriptors: dict[str, int] = {}
        try:
            for name, spec in self.specs.items():
                path = str(folder / _file_name(name))
                self.tensors[name] = torch.from_file(path, shared=False, size=math.prod(spec.shape),
                                                     dtype=spec.dtype).view(spec.shape)
                self.descriptors[name] = os.open(path, os.O_RDONLY)
        except BaseException:
            self.close()
            raise

    def gather(self, name: str, positions: Sequence[int], pin: bool = False) -> torch.Tensor:
        """Rows `positions` (valid, in any order) of array `name`, in a new (pinned) CPU tensor."""
        spec = self.specs[name]
        out = _new_rows(spec, len(positions), pin)
        if not hasattr(os, "preadv"):  # pragma: no cover - Windows: read through the mapping
            return out.copy_(self.tensors[name][torch.as_tensor(positions, dtype=torch.long)])
        if out.numel() == 0:
            return out
        buffer = out.view(-1).view(torch.uint8).numpy().data
        row = spec.row_bytes
        for first_out, first, count in _runs(positions):
            done, size, offset = 0, count * row, first * row
            target = buffer[first_out * row : first_out * row + size]
            while done < size:  # preadv may read less than asked (at most 2 GiB a call on Linux)
                read = os.preadv(self.descriptors[name], [target[done:]], offset + done)
                if read == 0:
                    raise OSError(errno.EIO, f"{self.folder}/{_file_name(name)} ended early: truncated after "
                                             "it was opened")
                done += read
        return out

    def detach(self) -> None:
        """Forget the folder (its files were deleted; the mappings and descriptors keep the data)."""
        self.folder = None

    def close(self) -> None:
        for descriptor in self.descriptors.values():
            with contextlib.suppress(OSError):
                os.close(descriptor)
        self.descriptors = {}

    def __del__(self) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # A process that unpickles a probe (ddp_spawn) maps the same files again, or, when they are
        # deleted (a temporary probe), gets the arrays themselves.
        if self.folder is not None:
            return MappedArrays, (self.folder, self.specs)
        return MemoryArrays, ({name: tensor.clone() for name, tensor in self.tensors.items()},)


class MemoryArrays:
    """The arrays of a probe held in memory (a small probe without a cache).

    Args:
        tensors: name -> the whole array.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = dict(tensors)
        self.specs = {name: ArraySpec(t.dtype, tuple(t.shape)) for name, t in self.tensors.items()}
        self.filled = dict.fromkeys(self.tensors, 0)

    @classmethod
    def empty(cls, specs: Mapping[str, ArraySpec]) -> MemoryArrays:
        """Arrays of `specs` to be filled with `append`."""
        return cls({name: torch.empty(spec.shape, dtype=spec.dtype) for name, spec in specs.items()})

    def append(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Fill the next rows of some arrays (as `ArrayWriter.append` writes them)."""
        for name, array in arrays.items():
            start = self.filled[name]
            self.tensors[name][start : start + array.shape[0]] = torch.from_numpy(array)
            self.filled[name] = start + array.shape[0]

    def gather(self, name: str, positions: Sequence[int], pin: bool = False) -> torch.Tensor:
        """Rows `positions` of array `name`, in a new (pinned) CPU tensor."""
        source = self.tensors[name]
        out = _new_rows(self.specs[name], len(positions), pin)
        return torch.index_select(source, 0, torch.as_tensor(positions, dtype=torch.long), out=out)
