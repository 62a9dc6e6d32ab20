"""`ActivationSpill`: the unit maps of the batches beyond the memory budget, on disk between the passes.

Pass two of a dissection needs every batch's unit maps again, exactly as pass one saw them (the
thresholds were read from those values). The first batches stay in memory up to
`activation_cache_bytes`; the rest are written here, raw, to one anonymous temporary file (unlinked
at once, so nothing is left behind when the process ends, however it ends), by a background thread
while pass one runs the model on the next batch (`write_behind`), and read back in order, the next
batch by a background thread while pass two tallies the current one (`read_ahead`). Disk writes
larger than the page cache absorbs go at the disk's own speed, and reads of a spill larger than the
page cache too: the threads overlap them with the model and the tally instead of adding them. Reading
a batch back costs far less than running the model again for it, keeps memory bounded by three
batches in either pass (one computed, one waiting, one being written or read), and gives pass two
pass one's very bits (a second forward pass need not: cuDNN may choose another algorithm).

The disk is not filled: a batch is written only while the folder's disk keeps `reserve_bytes` free
after it, and a write that fails (a full disk, a quota) is undone. A batch not written is run
through the model again in pass two, as without a spill.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_dissect.engine.prefetch import prefetched

SPILL_RESERVE_BYTES = 2**31  # the free disk a spill leaves to everything else


@dataclass(frozen=True)
class _Stored:
    """Where one layer's unit maps of one batch lie in the file."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


class ActivationSpill:
    """Batches of unit maps `{layer: tensor}` written to one temporary file and read back by number.

    Args:
        folder: an existing folder, where the temporary file is made.
        reserve_bytes: write a batch only while its disk keeps this much free after it.

    Example:
        >>> import tempfile
        >>> with ActivationSpill(tempfile.gettempdir()) as spill:
        ...     spill.put(0, {"layer4": torch.ones(2, 3, 4, 4)})
        ...     spill.get(0, "cpu")["layer4"].sum().item()
        True
        96.0
    """

    def __init__(self, folder: str | os.PathLike, reserve_bytes: int = SPILL_RESERVE_BYTES) -> None:
        self.folder = Path(folder)
        self.reserve_bytes = reserve_bytes
        self.bytes_written = 0
        self.full = False  # no more batches are written once one did not fit
        self._batches: dict[int, dict[str, _Stored]] = {}
        self._file: io.RawIOBase | None = None  # made by the first `put`: a probe that fits memory never writes

    def __enter__(self) -> ActivationSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give the file's disk space back (it has no name; closing it deletes it)."""
        self._batches.clear()
        if self._file is not None:
            self._file.close()

    def __len__(self) -> int:
        """How many batches are stored."""
        return len(self._batches)

    def __contains__(self, number: int) -> bool:
        return number in self._batches

    def put(self, number: int, maps: dict[str, torch.Tensor]) -> bool:
        """Write batch `number`'s maps; False (and nothing written) when the disk cannot take them."""
        size = sum(value.numel() * value.element_size() for value in maps.values())
        if self.full or shutil.disk_usage(self.folder).free - size < self.reserve_bytes:
            self.full = True
            return False
        if self._file is None:
            try:
                self._file = tempfile.TemporaryFile(dir=self.folder, prefix="lightning-dissect-activations-",
                                                    buffering=0)
            except OSError as error:
                warnings.warn(f"could not make the activation spill file in {self.folder} ({error}); the model runs "
                              f"again for the batches beyond activation_cache_bytes. Pass activation_spill=FOLDER "
                              f"to use another folder", RuntimeWarning, stacklevel=2)
                self.full = True
                return False
        start, stored = self.bytes_written, {}
        try:
            for name, value in maps.items():
                host = value.detach().to("cpu").contiguous()
                _write_all(self._file, _bytes(host).numpy().data)
                stored[name] = _Stored(self.bytes_written, tuple(host.shape), host.dtype,
                                       host.numel() * host.element_size())
                self.bytes_written += stored[name].nbytes
        except OSError:  # a full disk or a quota: the partial batch is cut off, it will be run again
            self._file.truncate(start)
            self._file.seek(start)
            self.bytes_written, self.full = start, True
            return False
        self._batches[number] = stored
        return True

    @contextlib.contextmanager
    def write_behind(self) -> Generator[Callable[[int, dict[str, torch.Tensor]], None], None, None]:
        """`put` on a background thread: `with spill.write_behind() as write: write(number, maps)` copies the
        maps to the host and returns while the thread writes the batch before (a write waits for room only
        while one batch is queued), so the disk's writes overlap the caller's work instead of adding to it.

        The batches are put in the order given, and all of them are once the block ends: then `number in
        spill` says which were written (as `put`'s result would). An error of `put` is raised by the next
        `write` or at the block's end; when the block ends with an error the batches still queued are not
        written. The maps given must not change afterwards (the thread reads them).
        """
        pending: queue.Queue = queue.Queue(maxsize=1)
        failures: list[BaseException] = []
        stop = threading.Event()

        def work() -> None:
            while (item := pending.get()) is not None:
                if not (failures or stop.is_set()):
                    try:
                        self.put(*item)
                    except BaseException as error:  # raised in the caller's thread
                        failures.append(error)

        def write(number: int, maps: dict[str, torch.Tensor]) -> None:
            if failures:
                raise failures[0]
            pending.put((number, {name: value.detach().to("cpu") for name, value in maps.items()}))

        thread = threading.Thread(target=work, name="spill-write", daemon=True)
        thread.start()
        try:
            yield write
        except BaseException:
            stop.set()
            raise
        finally:
            pending.put(None)
            thread.join()
        if failures:
            raise failures[0]

    def get(self, number: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Batch `number`'s maps on `device`, bit for bit as they were put."""
        assert self._file is not None, "get of a batch that was not put"
        maps = {}
        for name, stored in self._batches.pop(number).items():
            value = torch.empty(stored.shape, dtype=stored.dtype)
            self._file.seek(stored.offset)
            _read_all(self._file, _bytes(value).numpy().data, self.folder)
            maps[name] = value.to(device)
        return maps

    def read_ahead(self, numbers: Iterable[int], device: torch.device | str
                   ) -> Generator[dict[str, torch.Tensor], None, None]:
        """`get(number, device)` for each of `numbers` in turn, the next batch read from the file by a
        background thread while the caller works on the current one: the disk's reads (a spill larger than
        the page cache is read back from the disk itself) overlap the caller's work instead of adding to it.
        Close the iterator (or exhaust it) before the spill."""
        with contextlib.closing(prefetched(lambda number: self.get(number, "cpu"), numbers, depth=1,
                                           name="spill-prefetch")) as batches:
            for maps in batches:
                yield {name: value.to(device) for name, value in maps.items()}


def _bytes(value: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as uint8, any dtype (bfloat16 has no NumPy type)."""
    return value.reshape(-1).view(torch.uint8)


def _write_all(file: io.RawIOBase, data: memoryview) -> None:
    while data:  # a raw write may take only part of a large buffer
        written = file.write(data)
        if not written:
            raise OSError("the activation spill file takes no more bytes")
        data = data[written:]


def _read_all(file: io.RawIOBase, buffer: memoryview, folder: Path) -> None:
    while buffer:
        read = file.readinto(buffer)
        if not read:
            raise OSError(f"the activation spill file in {folder} ended early: was it truncated by another process?")
        buffer = buffer[read:]


def spill_folder(activation_spill: bool | str | os.PathLike) -> Path | None:
    """The folder `dissect(activation_spill=...)` names: True, the system's temporary folder
    (`tempfile.gettempdir()`, `TMPDIR`); False, None (no spill: the model runs again).

    Raises:
        ValueError: a path that is not an existing folder.
    """
    if activation_spill is True:
        return Path(tempfile.gettempdir())
    if activation_spill is False:
        return None
    if not isinstance(activation_spill, (str, os.PathLike)) or not Path(activation_spill).is_dir():
        raise ValueError(f"activation_spill={activation_spill!r} must be True (the system's temporary folder), "
                         f"False (run the model again instead) or an existing folder")
    return Path(activation_spill)
