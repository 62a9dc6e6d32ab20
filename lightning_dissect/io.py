"""Atomic file writes: the one way this package writes a file that someone may read at any moment.

A file is written to a temporary file with a unique name in the same folder and renamed over the
target (`os.replace`), so a reader sees the old file or the whole new one, never half a file, even
after a crash. The temporary file gets the permissions a plain `open()` would give
(`0o666 & ~umask`, not `mkstemp`'s `0o600`) and is removed on every failure, including one that only
shows when the file is closed (a full disk raises `ENOSPC` at `close()`).

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_write(folder / "numbers.csv") as handle:
    ...     _ = handle.write("unit,iou\\n1,0.25\\n")
    >>> (folder / "numbers.csv").read_text()
    'unit,iou\\n1,0.25\\n'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing; on success it replaces `path`.

    Args:
        path: the file to write; its folder is created when missing.
        mode: `"w"` (text, UTF-8, newlines written as given, as the csv module wants) or `"wb"`.

    Yields:
        The open file.

    Raises:
        ValueError: a mode other than `"w"` or `"wb"`.
        OSError: the folder cannot be made or written (nothing is left behind).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r} must be 'w' or 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode == "w":
            handle: IO[Any] = os.fdopen(descriptor, "w", encoding="utf-8", newline="")
        else:
            handle = os.fdopen(descriptor, "wb")
    except BaseException:
        os.close(descriptor)
        os.unlink(temporary)
        raise
    try:
        with handle:  # closed here: a write error that only shows at close() still lands in `except`
            yield handle
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
