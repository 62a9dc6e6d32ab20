"""The Broden dataset on disk: read, validate, download (SEMANTICS §1).

A Broden directory holds ``index.csv`` (one row per image), ``label.csv`` (one
row per concept), ``category.csv`` (one row per category), one
``c_<category>.csv`` per category, and ``images/`` with the JPEG images and the
PNG label maps (label = R + 256 * G).

:class:`Broden` reads and checks the csv files eagerly (one pass, well under a
second for the released 63,305 rows) and the images lazily, in
:meth:`Broden.read_image` and :meth:`Broden.read_segmentation`. Every problem a
user can cause is a :class:`BrodenError` that names the file, the row and the
way out. Every path of ``index.csv`` must name a regular file inside ``images/``
(checked as written in ``Broden()``, and again with symbolic links resolved when the
file is read); label numbers stop at :data:`MAX_LABEL_NUMBER`. :func:`download_broden`
refuses archives that expand implausibly before extracting anything, gives up on a
stalled transfer, and lets concurrent calls take turns on a lock file. The whole
list: ``docs/data.md``.

Example:
    >>> broden = Broden(download_broden("~/data"))            # doctest: +SKIP
    >>> broden.categories                                     # doctest: +SKIP
    ['color', 'object', 'part', 'material', 'scene', 'texture']
    >>> maps, image_labels = broden.read_segmentation(0)      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.client
import io
import json
import math
import operator
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from lightning_dissect.concept_source import ItemLayout
from lightning_dissect.io import atomic_write
from lightning_dissect.progress import show_progress

__all__ = ["Broden", "BrodenError", "BrodenRow", "download_broden"]

# The fixed columns of index.csv; every other column that category.csv names is a category.
_INDEX_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
_SIZE_COLUMNS = ("ih", "iw", "sh", "sw")

_DEFAULT_BASE_URL = "http://netdissect.csail.mit.edu/data/"
BASE_URL_ENV = "LIGHTNING_DISSECT_BRODEN_URL"
_RESOLUTIONS = (224, 227)
_COMPLETE_MARKER = ".complete"
_CHUNK_BYTES = 1 << 20
_TIMEOUT_SECONDS = 60.0  # the longest wait for any one read of the connection
_LOCK_POLL_SECONDS = 0.2  # how often a download waiting for another one tries its lock
# A transfer stalls when fewer than STALL_MIN_BYTES arrive in STALL_WINDOW_SECONDS (measured over
# consecutive windows, so a stall is noticed within two windows); the read timeout never exceeds the window.
# Read at each call, so a test can shorten them.
STALL_WINDOW_SECONDS = 60.0
STALL_MIN_BYTES = 64 << 10

# What an archive may expand to, checked on its zip directory before anything is extracted. JPEG images and
# PNG label maps do not compress (ratio about 1) and the csv files of a release are a few MB (ratio about
# 10): an archive that expands much further is a zip bomb, not a Broden dataset.
ZIP_MAX_RATIO = 100  # uncompressed / compressed bytes, for each member larger than ZIP_RATIO_FREE_BYTES
ZIP_RATIO_FREE_BYTES = 4 << 20  # a smaller member may compress better (a blank label map, a short csv)
ZIP_MAX_TOTAL_RATIO = 10  # all members, uncompressed: at most this many times the archive's size ...
ZIP_TOTAL_SLACK_BYTES = 64 << 20  # ... plus this, so a small archive of csv files is not refused
# Deflate (what the releases use) decompresses in bounded steps; zipfile's bzip2 and lzma readers do not.
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}

# Sizes and sha256 of the released archives, by resolution. Deliberately empty: no value here has been
# verified against the files on the NetDissect site, and a wrong entry would reject a good download.
# Pass ``expected_size``/``sha256`` to download_broden to pin an archive; the byte count is always checked
# against the server's Content-Length, and every zip member against its CRC.
_KNOWN_ARCHIVES: dict[int, tuple[int | None, str | None]] = {}

# The largest label number: a label map holds R + 256 * G with 8-bit channels (SEMANTICS §1). The released
# Broden numbers its labels 1..1197; a larger number could only be a typo, and would make every table indexed
# by label number (here and in the engine) that long.
MAX_LABEL_NUMBER = 65535
# A coverage cell: a plain decimal >= 0 (float() would also take "1_2", " 1", "-0.5", "nan").
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# An item of an index.csv cell that looks like a signed label number ("-3"), in a cell joined with ";".
_SIGNED_NUMBER = re.compile(r"(?:^|;)([+-][0-9]+)(?=;|$)")

# Label maps must be lossless: JPEG data or a grey-level PNG would alter the label numbers R + 256 * G.
_LABEL_MAP_MODES = ("RGB", "RGBA", "P")
# Images are opened without following a final symbolic link (the path is resolved and checked first) and
# without blocking (opening a FIFO for reading would wait for a writer).
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)

_FIX_CSV = "fix the file, or download the dataset again with download_broden()"
_FIX_IMAGES = (
    "restore the file (download the dataset again with download_broden()) or fix this row of index.csv"
)


class BrodenError(ValueError):
    """A Broden directory or archive that cannot be used as it is.

    The message names the file and, where one is at fault, the row
    (``index.csv row 17 (line 19)``: the 0-based data row and the 1-based line
    of the file), and says how to fix it.
    """


@dataclass(frozen=True)
class BrodenRow:
    """One row of ``index.csv``.

    Attributes:
        image: path of the JPEG image, relative to ``images/``.
        split: the row's split (``train`` or ``val`` in the released sets).
        image_size: ``(ih, iw)``.
        segmentation_size: ``(sh, sw)``, the size of every label map of the row.
        cells: per category (``category.csv`` order), the items of its cell: a PNG path relative to
            ``images/`` (pixel-level) or a global label number (image-level). Each item is decided on its
            own: all ASCII digits is a label number. An empty cell is an empty list.
    """

    image: str
    split: str
    image_size: tuple[int, int]
    segmentation_size: tuple[int, int]
    cells: dict[str, list[str | int]]


@dataclass
class _Table:
    """A csv file as read: header positions, data rows, their 1-based line numbers."""

    path: Path
    columns: dict[str, int]
    rows: list[list[str]]
    lines: Sequence[int]
    sha256: bytes

    def where(self, row: int) -> str:
        return f"{self.path} row {row} (line {self.lines[row]})"


def _is_label_number(item: str) -> bool:
    # str.isdigit alone accepts characters such as "²" that int() refuses; int() alone accepts "1_2", " 1".
    return item.isascii() and item.isdigit()


def _shown(cell: str, quoted: bool = True) -> str:
    """``repr(cell)`` (or the cell itself), cut short: a cell can be as long as the file."""
    shown = repr if quoted else str
    return shown(cell) if len(cell) <= 40 else shown(cell[:40]) + f"... ({len(cell)} characters)"


def _path_problem(item: str) -> str | None:
    """Why ``item``, a path of index.csv, could name a file outside ``images/`` (lexically), or None.

    Symbolic links are followed when a file is opened (:meth:`Broden._open`), since they can change later.
    """
    if "\0" in item:
        return "holds a NUL character"
    if "\\" in item:
        return "holds a backslash (paths in index.csv use '/')"
    if item.startswith("/") or re.match("[A-Za-z]:", item):
        return "is absolute"
    if ".." in item.split("/"):
        return "climbs out of images/ with '..'"
    return None


def _not_regular(info: os.stat_result) -> str | None:
    """Why a file of this ``stat`` cannot be read as an image (it is not a regular file), or None."""
    if stat.S_ISREG(info.st_mode):
        return None
    kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a directory" if stat.S_ISDIR(info.st_mode) else "a device"
    return f"is {kind}, not a regular file"


def _split_cell(cell: str) -> list[str | int]:
    # Empty items ("a.png;" or ";;") carry nothing; dropping them keeps "empty cell -> empty list" simple.
    return [int(item) if _is_label_number(item) else item for item in cell.split(";") if item]


def _read_table(path: Path, required: Iterable[str], exact_width: bool) -> _Table:
    """Reads one csv file with the csv module (real Broden quotes cells that hold commas).

    The table keeps the sha256 of the bytes it parsed, so the fingerprint describes exactly what was read.
    """
    try:
        problem = _not_regular(path.stat())  # reading a FIFO would wait for a writer
        if problem:
            raise BrodenError(f"{path} {problem}; {_FIX_CSV}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise BrodenError(
            f"{path} is missing; a Broden directory holds index.csv, label.csv, category.csv and one "
            f"c_<category>.csv per category; pass the folder that holds them, or download it with "
            f"download_broden()"
        ) from None
    except OSError as error:
        raise BrodenError(f"{path} cannot be read ({error}); check its permissions") from error
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise BrodenError(f"{path} is not UTF-8 text ({error}); {_FIX_CSV}") from None

    try:
        return _parse_table(path, text, required, exact_width, hashlib.sha256(data).digest())
    except csv.Error as error:  # e.g. a cell over csv.field_size_limit(): a quote that never closes
        raise _csv_error(path, text, error) from None


def _csv_error(path: Path, text: str, error: csv.Error) -> BrodenError:
    """The csv module's ``error`` as a BrodenError naming the row and line where it happened."""
    reader = csv.reader(io.StringIO(text, newline=""))
    records, start = 0, 1  # records read so far, header included; line where the next one starts
    try:
        for cells in reader:
            records += bool(cells)
            start = reader.line_num + 1
    except csv.Error:
        pass
    where = f"{path} row {records - 1} (line {start})" if records else f"{path} line {start} (the header)"
    return BrodenError(
        f"{where}: the csv module cannot read it ({error}); a quoted cell that never closes makes the rest of "
        f"the file one cell; {_FIX_CSV}"
    )


def _parse_table(path: Path, text: str, required: Iterable[str], exact_width: bool, sha256: bytes) -> _Table:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise BrodenError(f"{path} is empty: its first line must be the header; {_FIX_CSV}")
    columns = {name.strip(): position for position, name in enumerate(header)}
    missing = [name for name in required if name not in columns]
    if missing:
        raise BrodenError(
            f"{path} has no column {', '.join(repr(name) for name in missing)} (header: {','.join(header)}); "
            f"{_FIX_CSV}"
        )
    # index.csv must align cell by cell with its header; the small files only need the columns read here
    # (label.csv carries free-text columns after them).
    width = len(header) if exact_width else max(columns[name] for name in required) + 1
    rows = list(reader)  # in C: the per-row Python loop below would double the time on index.csv
    lines: Sequence[int]
    if reader.line_num == len(rows) + 1 and all(rows):
        lines = range(2, len(rows) + 2)  # one line per row, no blank lines: row i is on line i + 2
    else:  # a quoted cell spans lines, or blank lines: read again, noting where each row starts
        reader = csv.reader(io.StringIO(text, newline=""))
        next(reader)
        rows, starts, start = [], [], 2
        for cells in reader:
            if cells:
                rows.append(cells)
                starts.append(start)
            start = reader.line_num + 1
        lines = starts
    widths = set(map(len, rows))
    if widths - {width} and (exact_width or min(widths) < width):
        bad = next(
            i for i, cells in enumerate(rows) if len(cells) != width and (exact_width or len(cells) < width)
        )
        raise BrodenError(
            f"{path} row {bad} (line {lines[bad]}): {len(rows[bad])} cells where the header has "
            f"{len(header)}; {_FIX_CSV}"
        )
    return _Table(path, columns, rows, lines, sha256)


def _parse_int(table: _Table, row: int, column: str, minimum: int, maximum: int | None = None) -> int:
    """The cell as an integer written in ASCII digits, from ``minimum`` to ``maximum``."""
    cell = table.rows[row][table.columns[column]]
    value = None
    if _is_label_number(cell):
        # int() refuses more than 4300 digits; any such number is above every maximum anyway.
        value = int(cell) if len(cell) <= 4000 else 10**4000
    if value is None or value < minimum:
        raise BrodenError(
            f"{table.where(row)}: {column} is {_shown(cell)}, not an integer >= {minimum} written in digits; "
            f"{_FIX_CSV}"
        )
    if maximum is not None and value > maximum:
        raise BrodenError(
            f"{table.where(row)}: {column} is {_shown(cell)}, above {maximum}, the largest label number a "
            f"label map can hold (R + 256 * G); the released Broden numbers its labels 1..1197: number the "
            f"labels densely from 1; {_FIX_CSV}"
        )
    return value


class Broden:
    """A Broden dataset directory (SEMANTICS §1).

    The csv files are read and checked when the object is made; images and label maps are read, and
    checked, when asked for.

    Args:
        root: the directory that holds ``index.csv``, ``label.csv``, ``category.csv``, the
            ``c_<category>.csv`` files and ``images/``.

    Attributes:
        root: the dataset directory.
        categories: category names in ``category.csv`` order.
        label_names: name of each global label number (the list index); ``[0]`` is ``"-"``, numbers that
            ``label.csv`` skips have name ``""``.
        primary_category: per label, the category it is scored in among all categories (see
            :meth:`primary_categories`).
        coverage: per category, ``{label number: coverage}`` from ``c_<category>.csv`` (label 0 left out).
        splits: the split of every ``index.csv`` row.

    Raises:
        BrodenError: a missing file or column, a malformed cell, a duplicate or unknown label number (or one
            above ``MAX_LABEL_NUMBER``), a path that leaves ``images/``, or a category of ``category.csv``
            without its ``index.csv`` column; the message names file and row.

    Example:
        >>> broden = Broden("data/broden1_224")               # doctest: +SKIP
        >>> broden.label_names[broden.row(0).cells["scene"][0]]  # doctest: +SKIP
        'street-s'
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise BrodenError(
                f"Broden directory {self.root} does not exist; download it with download_broden(dest) "
                f"or pass the folder that holds index.csv"
            )
        tables = [self._read_categories(), self._read_labels(), *self._read_coverage(), self._read_index()]
        hasher = hashlib.sha256()
        for table in tables:  # the names keep "which file holds which bytes" part of the fingerprint
            hasher.update(table.path.name.encode() + b"\0" + table.sha256)
        self._fingerprint = hasher.hexdigest()
        self.primary_category = self.primary_categories()

    # ------------------------------------------------------------------ reading the csv files

    def _read_categories(self) -> _Table:
        table = _read_table(self.root / "category.csv", ["name"], exact_width=False)
        names: list[str] = []
        for row in range(len(table.rows)):
            name = table.rows[row][table.columns["name"]].strip()
            problem = None
            if not name:
                problem = "the category name is empty"
            elif name in names:
                problem = f"category {name!r} is listed twice"
            elif name in _INDEX_COLUMNS:
                problem = f"{name!r} cannot be a category: it is a fixed column of index.csv"
            elif any(separator in name for separator in "/\\"):
                problem = f"category {name!r} cannot name a file c_{name}.csv"
            if problem:
                raise BrodenError(f"{table.where(row)}: {problem}; {_FIX_CSV}")
            names.append(name)
        if not names:
            raise BrodenError(f"{table.path} lists no categories; {_FIX_CSV}")
        self.categories: list[str] = names
        return table

    def _read_labels(self) -> _Table:
        table = _read_table(self.root / "label.csv", ["number", "name"], exact_width=False)
        names: dict[int, str] = {}
        for row in range(len(table.rows)):
            number = _parse_int(table, row, "number", minimum=0, maximum=MAX_LABEL_NUMBER)
            if number in names:
                raise BrodenError(f"{table.where(row)}: label number {number} is listed twice; {_FIX_CSV}")
            names[number] = table.rows[row][table.columns["name"]]
        label_names = [""] * (max(names, default=0) + 1)
        for number, name in names.items():
            label_names[number] = name
        label_names[0] = "-"  # SEMANTICS §1: 0 is the unlabeled "-", whatever label.csv says about it
        self.label_names: list[str] = label_names
        # known[n]: n is a label of label.csv (or 0). One extra False slot lets read_segmentation clamp
        # out-of-range pixel values onto it instead of indexing past the end.
        known = np.zeros(len(label_names) + 1, dtype=bool)
        known[list(names)] = True
        known[0] = True
        self._known_labels = known
        return table

    def _read_coverage(self) -> list[_Table]:
        self.coverage: dict[str, dict[int, float]] = {}
        tables = []
        for category in self.categories:
            table = _read_table(self.root / f"c_{category}.csv", ["number", "coverage"], exact_width=False)
            tables.append(table)
            coverage: dict[int, float] = {}
            seen: set[int] = set()
            for row in range(len(table.rows)):
                number = _parse_int(table, row, "number", minimum=0)
                if number in seen:
                    raise BrodenError(
                        f"{table.where(row)}: label number {number} is listed twice; {_FIX_CSV}"
                    )
                seen.add(number)
                if number == 0:  # SEMANTICS §1: a row for label 0 may be present; it is ignored
                    continue
                if not self._is_known(number):
                    raise BrodenError(
                        f"{table.where(row)}: label number {number} is not in label.csv; {_FIX_CSV}"
                    )
                cell = table.rows[row][table.columns["coverage"]]
                value = float(cell) if _DECIMAL.fullmatch(cell) else math.nan
                if not math.isfinite(value):
                    raise BrodenError(
                        f"{table.where(row)}: coverage is {_shown(cell)}, not a finite decimal number >= 0; "
                        f"the primary category of a label is decided by it (SEMANTICS §1); {_FIX_CSV}"
                    )
                coverage[number] = value
            self.coverage[category] = coverage
        return tables

    def _read_index(self) -> _Table:
        path = self.root / "index.csv"
        table = _read_table(path, _INDEX_COLUMNS, exact_width=True)
        missing = [category for category in self.categories if category not in table.columns]
        if missing:
            raise BrodenError(
                f"{path} has no column for the categor{'ies' if len(missing) > 1 else 'y'} "
                f"{', '.join(missing)} listed in {self.root / 'category.csv'}; the category names of "
                f"category.csv must be index.csv columns: fix one of the two files"
            )
        rows = table.rows
        try:
            # column by column, so the loops run in C (map), not in the interpreter
            getters = [operator.itemgetter(table.columns[name]) for name in _SIZE_COLUMNS]
            # int() alone would take "0_8" or " 8": every cell must be ASCII digits (an empty cell fails int)
            digits = "".join("".join(map(get_cell, rows)) for get_cell in getters)
            columns = [list(map(int, map(get_cell, rows))) for get_cell in getters]
            sizes: list[tuple[int, int, int, int]] = list(zip(*columns))
            valid = not sizes or (digits.isascii() and digits.isdigit() and min(map(min, columns)) >= 1)
        except ValueError:
            valid = False
        if not valid:  # rare path: find the row and column at fault, for the message
            for row in range(len(rows)):
                for name in _SIZE_COLUMNS:
                    _parse_int(table, row, name, minimum=1)
        # Image-level label numbers are csv content, so they are checked here, once. Joining a column and
        # splitting it once keeps the check in C: well under a second on the released 63,305 rows.
        for category in self.categories:
            get_cell = operator.itemgetter(table.columns[category])
            joined = ";".join(map(get_cell, rows))
            # the substring tests run at memory speed; the regex (4x slower) only where they hit
            signed = (";-" in joined or ";+" in joined or joined[:1] in ("-", "+")) and _SIGNED_NUMBER.search(
                joined
            )
            if signed:  # rare path: find the row, for the message
                row = next(row for row, cells in enumerate(rows) if _SIGNED_NUMBER.search(get_cell(cells)))
                raise BrodenError(
                    f"{table.where(row)}: {category} item {_shown(signed.group(1))} is not a label number "
                    f"(label numbers are written in digits, 1 to {MAX_LABEL_NUMBER}) nor a path; {_FIX_CSV}"
                )
            self._check_paths(table, category, get_cell, joined)
            items = set(joined.split(";"))
            numbers = {item for item in filter(str.isdigit, items) if _is_label_number(item)}
            # more than 5 significant digits is above MAX_LABEL_NUMBER (and int() refuses > 4300 digits)
            unknown = {item for item in numbers if len(item.lstrip("0")) > 5 or not self._is_known(int(item))}
            if unknown:  # rare path: find the first row that holds one, for the message
                row, item = next(
                    (row, item)
                    for row, cells in enumerate(rows)
                    for item in get_cell(cells).split(";")
                    if item in unknown
                )
                raise BrodenError(
                    f"{table.where(row)}: {category} label number {_shown(item, quoted=False)} is not in label.csv; "
                    f"{_FIX_CSV}"
                )
        get_image = operator.itemgetter(table.columns["image"])
        images = list(map(get_image, rows))
        if "" in images:
            row = images.index("")
            raise BrodenError(f"{table.where(row)}: the image cell is empty; {_FIX_CSV}")
        self._check_paths(table, "image", get_image, "\n".join(images))
        self._index = table
        self._sizes = sizes
        self._image_column = table.columns["image"]
        self._category_columns = {category: table.columns[category] for category in self.categories}
        split_column = table.columns["split"]
        self.splits: list[str] = [cells[split_column] for cells in rows]
        return table

    @staticmethod
    def _check_paths(table: _Table, column: str, get_cell: Callable[[list[str]], str], joined: str) -> None:
        """Refuses a path of ``column`` that could leave ``images/`` (see ``_path_problem``).

        ``joined`` is the column's cells joined by ";" (a line break for the image column, whose cells are
        whole paths). Substring tests on it run in C, about 10 ms per column of the released index.csv; only
        where one hits are the cells checked one by one.
        """
        separator = "\n" if column == "image" else ";"
        if not (
            "\0" in joined
            or "\\" in joined
            or ":" in joined
            or ".." in joined
            or joined.startswith("/")
            or separator + "/" in joined
        ):
            return
        split = (lambda cell: [cell]) if column == "image" else (lambda cell: cell.split(";"))
        for row, cells in enumerate(table.rows):
            for item in split(get_cell(cells)):
                problem = _path_problem(item)
                if problem:
                    raise BrodenError(
                        f"{table.where(row)}: {column} path {_shown(item)} {problem}; every path in index.csv "
                        f"names a file inside {table.path.parent / 'images'}; {_FIX_CSV}"
                    )

    def _is_known(self, number: int) -> bool:
        return number < len(self.label_names) and bool(self._known_labels[number])

    # ------------------------------------------------------------------ labels and categories

    def _select(self, categories: Iterable[str] | None) -> list[str]:
        """The selected categories in ``category.csv`` order (SEMANTICS §1, selecting categories)."""
        if categories is None:
            return list(self.categories)
        if isinstance(categories, str):
            raise BrodenError(
                f"categories must be a list of category names, got the string {categories!r}; "
                f"write categories=[{categories!r}]"
            )
        wanted = set(categories)
        unknown = sorted(name for name in wanted if name not in self.categories)
        if unknown:
            raise BrodenError(
                f"categories has unknown name(s) {', '.join(map(repr, unknown))}; the categories of "
                f"{self.root} are {', '.join(self.categories)}"
            )
        if not wanted:
            raise BrodenError(
                f"categories is empty; pass None for all, or some of {', '.join(self.categories)}"
            )
        return [name for name in self.categories if name in wanted]

    def primary_categories(self, categories: Iterable[str] | None = None) -> list[str | None]:
        """The category each label is scored in, among ``categories`` (SEMANTICS §1, primary category).

        Among the selected categories whose ``c_<category>.csv`` lists the label, the one where its
        coverage is largest; ties go to the category first in ``category.csv``.

        Args:
            categories: category names, in any order; ``None`` for all.

        Returns:
            Per global label number, the primary category, or ``None`` for label 0 and for a label that no
            selected ``c_`` file lists (it is never scored).

        Raises:
            BrodenError: a name that is not a category of this dataset, or an empty selection.
        """
        primary: list[str | None] = [None] * len(self.label_names)
        best: dict[int, float] = {}
        # over the c_ files' rows, not over every number: the work follows the labels, not the largest number
        for name in self._select(categories):
            for number, value in self.coverage[name].items():
                # strict ">" keeps the first category of category.csv on a tie
                if number not in best or value > best[number]:
                    best[number] = value
                    primary[number] = name
        return primary

    # ------------------------------------------------------------------ rows

    def __len__(self) -> int:
        return len(self._sizes)

    def __repr__(self) -> str:
        return (
            f"Broden({str(self.root)!r}: {len(self)} images, {len(self.label_names) - 1} labels, "
            f"categories {self.categories})"
        )

    def where(self, i: int) -> str:
        """Row ``i`` of ``index.csv`` as error messages name it: ``".../index.csv row 17 (line 19)"``.

        The row is the 0-based data row, the line the 1-based line of the file where the row starts (blank
        lines and cells spanning lines make the two differ by more than 2).

        Raises:
            IndexError: ``i`` is not in ``range(len(self))``.
        """
        return self._index.where(self._row_index(i))

    def _row_index(self, i: int) -> int:
        i = operator.index(i)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} is out of range: {self._index.path} has rows 0 to {len(self) - 1}")
        return i

    def row(self, i: int) -> BrodenRow:
        """Row ``i`` (0-based data row) of ``index.csv``, parsed.

        Raises:
            IndexError: ``i`` is not in ``range(len(self))``.
        """
        i = self._row_index(i)
        cells = self._index.rows[i]
        ih, iw, sh, sw = self._sizes[i]
        return BrodenRow(
            image=cells[self._image_column],
            split=self.splits[i],
            image_size=(ih, iw),
            segmentation_size=(sh, sw),
            cells={name: _split_cell(cells[column]) for name, column in self._category_columns.items()},
        )

    def describe(self) -> str:
        """The dataset as messages name it: its directory."""
        return str(self.root)

    @property
    def files_root(self) -> Path:
        """The folder the paths of ``index.csv`` are relative to: ``images/``."""
        return self.root / "images"

    def item_layout(self, i: int, categories: Sequence[str]) -> ItemLayout:
        """Row ``i``'s sizes, its numbers of label maps and image-level labels in ``categories``, and its files.

        From ``index.csv`` alone: nothing is decoded.
        """
        row = self.row(i)
        items = [item for category in categories for item in row.cells[category]]
        maps = [item for item in items if isinstance(item, str)]
        return ItemLayout(row.image_size, row.segmentation_size, len(maps), len(items) - len(maps), [row.image, *maps])

    def read_item(self, i: int, categories: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        """``read_image(i)`` and ``read_segmentation(i, categories)`` at once (the probe's decoding reads this)."""
        return (self.read_image(i), *self.read_segmentation(i, categories))

    def read_image(self, i: int) -> torch.Tensor:
        """The image of row ``i`` as RGB, ``torch.uint8`` of shape ``(3, ih, iw)``.

        Grayscale, palette and RGBA images are converted to RGB.

        Raises:
            BrodenError: the image is missing, unreadable, not a regular file inside ``images/`` (symbolic
                links resolved), or not ``ih x iw``.
        """
        i = self._row_index(i)
        item = self._index.rows[i][self._image_column]
        path = self.root / "images" / item
        pixels = self._decode(i, "image", item)
        ih, iw = self._sizes[i][:2]
        if pixels.shape[:2] != (ih, iw):
            raise BrodenError(
                f"{self._index.where(i)}: image {path} is {pixels.shape[0]}x{pixels.shape[1]} (h x w) but "
                f"ih, iw say {ih}x{iw}; {_FIX_IMAGES}"
            )
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()

    def read_segmentation(
        self, i: int, categories: Iterable[str] | None = None
    ) -> tuple[list[torch.Tensor], list[int]]:
        """The labels of row ``i`` in the selected categories (SEMANTICS §1, §3).

        Only the selected categories' cells are read.

        Args:
            i: 0-based data row of ``index.csv``.
            categories: category names, in any order; ``None`` for all.

        Returns:
            ``(maps, image_labels)``: the pixel-level label maps, each ``torch.int32`` of shape
            ``(sh, sw)`` holding global label numbers (R + 256 * G; 0 is no label), and the image-level
            label numbers; both in ``category.csv`` order, then cell order, as written (no deduplication).

        Raises:
            BrodenError: a PNG is missing, unreadable, not a regular file inside ``images/`` (symbolic
                links resolved), not an RGB PNG, or not ``sh x sw``, or holds a label number that is
                not in ``label.csv``.
        """
        selected = self._select(categories)
        i = self._row_index(i)
        cells = self._index.rows[i]
        maps: list[torch.Tensor] = []
        image_labels: list[int] = []
        for category in selected:
            for item in _split_cell(cells[self._category_columns[category]]):
                if isinstance(item, int):
                    image_labels.append(item)  # checked against label.csv in __init__
                else:
                    maps.append(self._read_label_map(i, category, item))
        return maps, image_labels

    def _read_label_map(self, i: int, category: str, item: str) -> torch.Tensor:
        path = self.root / "images" / item
        rgb = self._decode(i, category, item, label_map=True)
        sh, sw = self._sizes[i][2:]
        if rgb.shape[:2] != (sh, sw):
            raise BrodenError(
                f"{self._index.where(i)}: {category} label map {path} is {rgb.shape[0]}x{rgb.shape[1]} "
                f"(h x w) but sh, sw say {sh}x{sw}; {_FIX_IMAGES}"
            )
        labels = rgb[:, :, 0].astype(np.int32) + 256 * rgb[:, :, 1].astype(np.int32)
        # Clamp onto the spare False slot so any value past the last label reads as unknown.
        known = self._known_labels[np.minimum(labels, len(self._known_labels) - 1)]
        if not known.all():
            unknown = np.unique(labels[~known])
            shown = ", ".join(str(number) for number in unknown[:10])
            raise BrodenError(
                f"{self._index.where(i)}: {category} label map {path} holds label number(s) {shown} that "
                f"are not in label.csv; the label at a pixel is R + 256 * G; {_FIX_IMAGES}"
            )
        return torch.from_numpy(labels)

    def _open(self, i: int, column: str, item: str) -> io.BufferedReader:
        """Opens ``images/<item>``, named in ``column`` of row ``i``: a regular file inside ``images/``.

        Symbolic links are resolved here, when the file is read, not when index.csv is (they can change in
        between). The resolved path is opened without following a link and without blocking (a FIFO would
        hang ``open``), and the file opened must be the regular file that was checked.
        """
        path = self.root / "images" / item

        def refuse(problem: str) -> BrodenError:
            return BrodenError(f"{self._index.where(i)}: {column} file {path} {problem}; {_FIX_IMAGES}")

        images = os.path.realpath(self.root / "images")
        real = os.path.realpath(path)
        if not real.startswith(images + os.sep):
            raise refuse(f"resolves to {real}, outside {images} (a symbolic link?); a dataset reads only its files")
        try:
            info = os.stat(real)
            problem = _not_regular(info)
            if problem:
                raise refuse(problem)
            descriptor = os.open(real, _OPEN_FLAGS)
        except FileNotFoundError:
            raise refuse("is missing") from None
        except OSError as error:
            raise refuse(f"cannot be opened ({error})") from None
        try:
            opened = os.fstat(descriptor)
            if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                raise refuse("was replaced while it was opened")
            return os.fdopen(descriptor, "rb")
        except BaseException:
            os.close(descriptor)
            raise

    def _decode(self, i: int, column: str, item: str, label_map: bool = False) -> np.ndarray:
        """Decodes ``images/<item>`` to an ``(h, w, 3)`` uint8 RGB array, naming row and column on failure.

        A label map must be an RGB (or RGBA, or palette) PNG: lossless, so R + 256 * G is the label.
        """
        path = self.root / "images" / item
        with self._open(i, column, item) as file:
            try:
                with Image.open(file) as image:
                    found, mode = image.format, image.mode
                    if not label_map or (found == "PNG" and mode in _LABEL_MAP_MODES):
                        image.load()  # decode now, so a truncated file fails here and not later
                        rgb = image if image.mode == "RGB" else image.convert("RGB")
                        return np.array(rgb, dtype=np.uint8)  # a copy: torch wants writable memory
            except UnidentifiedImageError:
                # PIL's own message names the open file object, which says nothing here.
                raise BrodenError(f"{self._index.where(i)}: {column} file {path} cannot be decoded (not an image "
                                  f"PIL can identify); {_FIX_IMAGES}") from None
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise BrodenError(
                    f"{self._index.where(i)}: {column} file {path} cannot be decoded ({error}); {_FIX_IMAGES}"
                ) from None
        problem = f"holds {found} data, not PNG" if found != "PNG" else f"is a PNG of mode {mode}"
        raise BrodenError(
            f"{self._index.where(i)}: {column} label map {path} {problem}; a label map is an RGB PNG (lossless), "
            f"its label at a pixel R + 256 * G; {_FIX_IMAGES}"
        )

    def fingerprint(self) -> str:
        """sha256 (hex) over the bytes of the csv files, as read when this object was made.

        Two datasets with the same fingerprint have the same rows, labels and categories, so caches keyed
        by it (``ProbeSet``) stay valid; images are not hashed (that would read the whole dataset).
        """
        return self._fingerprint


# ---------------------------------------------------------------------- download


def download_broden(
    dest: str | os.PathLike[str],
    resolution: int = 224,
    url: str | None = None,
    progress: bool = True,
    expected_size: int | None = None,
    sha256: str | None = None,
    timeout: float | None = None,
) -> Path:
    """Downloads and extracts ``broden1_<resolution>.zip`` into ``dest/broden1_<resolution>``.

    A finished download leaves the marker file ``.complete`` in the dataset directory, and a later call
    returns at once, without touching the network. The archive streams to ``dest/broden1_<res>.zip.part``;
    its byte count is checked against the server's Content-Length and ``expected_size``, its sha256
    against ``sha256``; no size or checksum of the released archives is built in (none has been
    verified), so pass them to pin an archive. The members are checked before anything is extracted
    (none may be absolute, climb out with ``..`` or be a symlink), extracted into a temporary folder inside
    ``dest``, checked with :class:`Broden`, and renamed into place; the marker is written last, and the
    archive is deleted. An interrupted call leaves no dataset directory and no marker, so calling again
    starts over (there is no resume).

    Concurrent calls for the same ``dest`` and resolution (two ranks, two jobs) take turns on the lock file
    ``dest/broden1_<res>.lock``: one downloads, the others wait for it (``timeout`` bounds the wait too)
    and then return its dataset without touching the network; if it failed, the next one tries.

    A transfer that stalls (fewer than ``STALL_MIN_BYTES``, 64 KiB, in ``STALL_WINDOW_SECONDS``, 60 s) or
    whose server sends nothing for 60 s fails; ``timeout`` bounds the whole transfer as well.

    The default URL is ``http://netdissect.csail.mit.edu/data/broden1_<res>.zip``; the environment
    variable ``LIGHTNING_DISSECT_BRODEN_URL`` replaces its base (``.../data/``), e.g. for a mirror.

    Args:
        dest: folder to put the dataset in (made if missing).
        resolution: 224 or 227, the image size of the release.
        url: the archive's full URL; overrides the default and the environment variable.
        progress: show tqdm progress bars.
        expected_size: the archive's size in bytes, if known.
        sha256: the archive's sha256 (hex), if known.
        timeout: seconds the transfer may take in all, or None for no limit. It is checked whenever data
            arrives, and a silent connection is given up within the read timeout (the shorter of 60 s and
            ``STALL_WINDOW_SECONDS``); extracting the archive (local work) is not counted.

    Returns:
        The dataset directory ``dest/broden1_<resolution>``.

    Raises:
        ValueError: ``resolution`` is not 224 or 227, or ``timeout`` is not a positive number.
        BrodenError: the transfer failed, stalled, ran past ``timeout`` or ended early, the size or checksum
            differs, the archive is not a zip, holds an unsafe member or no Broden dataset, or
            ``dest/broden1_<res>`` exists without the marker.

    Example:
        >>> root = download_broden("~/data", resolution=227)  # doctest: +SKIP
        >>> Broden(root)                                      # doctest: +SKIP
    """
    if resolution not in _RESOLUTIONS or isinstance(resolution, bool):
        raise ValueError(f"resolution must be one of {_RESOLUTIONS}, got {resolution!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds or None (no limit), got {timeout!r}")
    deadline = None if timeout is None else time.monotonic() + timeout
    name = f"broden1_{resolution}"
    dest = Path(dest).expanduser()
    final = dest / name
    if (final / _COMPLETE_MARKER).is_file():
        return final
    if url is None:
        # A mirror serves the same file, so the known size and checksum still apply to it.
        known_size, known_sha256 = _KNOWN_ARCHIVES.get(resolution, (None, None))
        expected_size = expected_size if expected_size is not None else known_size
        sha256 = sha256 or known_sha256
        base = os.environ.get(BASE_URL_ENV) or _DEFAULT_BASE_URL
        url = f"{base.rstrip('/')}/{name}.zip"
    sha256 = sha256.lower() if sha256 else None

    dest.mkdir(parents=True, exist_ok=True)
    # One process downloads, the others wait for it here and then find its marker.
    with _download_lock(dest / f"{name}.lock", deadline, timeout, progress):
        if (final / _COMPLETE_MARKER).is_file():
            return final
        if final.exists():
            raise BrodenError(
                f"{final} exists but has no {_COMPLETE_MARKER} marker: an interrupted download, or a folder not "
                f"made by download_broden(); remove it to download again, or pass it to Broden() yourself"
            )
        archive = dest / f"{name}.zip.part"
        try:
            size, digest = _fetch(url, archive, expected_size, progress, deadline, timeout)
            if sha256 is not None and digest != sha256:
                raise BrodenError(
                    f"{url}: the archive's sha256 is {digest}, expected {sha256}; the file is corrupt or not "
                    f"the one expected: download again, or check the sha256 argument"
                )
            fingerprint = _extract(archive, dest, final, url, progress)
        finally:
            archive.unlink(missing_ok=True)
        marker = {"url": url, "bytes": size, "sha256": digest, "fingerprint": fingerprint}
        with atomic_write(final / _COMPLETE_MARKER) as handle:
            handle.write(json.dumps(marker, indent=1) + "\n")
    return final


if sys.platform == "win32":
    import msvcrt

    def _try_lock(descriptor: int) -> bool:
        try:
            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(descriptor: int) -> None:
        msvcrt.locking(descriptor, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(descriptor: int) -> bool:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(descriptor: int) -> None:
        fcntl.flock(descriptor, fcntl.LOCK_UN)


@contextlib.contextmanager
def _download_lock(path: Path, deadline: float | None, timeout: float | None, progress: bool) -> Iterator[None]:
    """Holds the lock file ``path`` for the block, after waiting (until ``deadline``) for its holder.

    The lock is ``flock`` (POSIX; ``msvcrt.locking`` on Windows), so it dies with its process: a crashed
    download never blocks the next one. The holder removes the file before releasing it, so no lock file
    is left behind; a waiter that then holds the removed file (no longer the one at ``path``) opens the
    path again. (Windows refuses to remove an open file; there the file stays, which is harmless.)
    """
    told = False
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            while not _try_lock(descriptor):
                if deadline is not None and time.monotonic() >= deadline:
                    raise BrodenError(
                        f"another download into {path.parent} holds {path} and did not finish within "
                        f"timeout={timeout:g} s; call download_broden() again when it is done"
                    )
                if progress and not told:
                    tqdm.write(f"waiting for another download into {path.parent} (it holds {path})", file=sys.stderr)
                    told = True
                time.sleep(_LOCK_POLL_SECONDS)
            try:
                held = os.path.samestat(os.fstat(descriptor), os.stat(path))
            except FileNotFoundError:
                held = False
        except BaseException:
            os.close(descriptor)
            raise
        if held:
            break
        os.close(descriptor)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            _unlock(descriptor)  # closing releases it too; Windows asks for it first
        os.close(descriptor)


def _fetch(
    url: str, path: Path, expected_size: int | None, progress: bool, deadline: float | None, timeout: float | None
) -> tuple[int, str]:
    """Streams ``url`` to ``path``; returns (bytes, sha256 hex) after checking the byte count.

    ``deadline`` (``time.monotonic()``; ``timeout`` seconds after the call began) ends the transfer, and so
    does a stall (see ``STALL_WINDOW_SECONDS``).
    Every message counts the bytes that had arrived: the loop reads whatever one system call brings
    (``read1``), so a slow server cannot hold bytes in a buffer that no message sees.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "lightning-dissect"})
    hasher = hashlib.sha256()
    received = 0
    announced: int | None = None
    window, minimum = STALL_WINDOW_SECONDS, STALL_MIN_BYTES
    read_timeout = min(_TIMEOUT_SECONDS, window)
    if deadline is not None:
        read_timeout = max(0.001, min(read_timeout, deadline - time.monotonic()))
    again = "nothing was installed, call download_broden() again"

    def ended(problem: str) -> BrodenError:
        return BrodenError(f"{url}: {problem}, after {received} bytes; {again}")

    try:
        with urllib.request.urlopen(request, timeout=read_timeout) as response, path.open("wb") as out:
            length = response.headers.get("Content-Length")
            announced = int(length) if length and length.isdigit() else None
            if announced is not None and expected_size is not None and announced != expected_size:
                raise BrodenError(
                    f"{url}: the server announces {announced} bytes, expected {expected_size}; check the url "
                    f"and expected_size arguments"
                )
            total = announced if announced is not None else expected_size
            read = getattr(response, "read1", response.read)
            window_start, window_bytes = time.monotonic(), 0
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=path.name[: -len(".part")],
                disable=not show_progress(progress),
            ) as bar:
                while chunk := read(_CHUNK_BYTES):
                    received += len(chunk)
                    bar.update(len(chunk))
                    hasher.update(chunk)
                    try:
                        out.write(chunk)
                    except OSError as error:
                        raise BrodenError(f"{url}: cannot write {path} ({error}); {again}") from error
                    now = time.monotonic()
                    if received == total:
                        continue  # all there: the next read ends the loop
                    if deadline is not None and now >= deadline:
                        raise ended(f"the transfer did not finish within timeout={timeout:g} s")
                    if now - window_start >= window:
                        if received - window_bytes < minimum:
                            raise ended(
                                f"the transfer stalled: {received - window_bytes} bytes arrived in the last "
                                f"{now - window_start:.1f} s, fewer than {minimum} in {window:g} s (STALL_MIN_BYTES "
                                f"in STALL_WINDOW_SECONDS)"
                            )
                        window_start, window_bytes = now, received
    except BrodenError:
        raise
    except urllib.error.HTTPError as error:
        raise BrodenError(
            f"{url}: the server answered HTTP {error.code} {error.reason}; check the url (or the "
            f"{BASE_URL_ENV} environment variable)"
        ) from error
    except TimeoutError as error:  # socket.timeout: no byte for read_timeout seconds
        if deadline is not None and time.monotonic() >= deadline:
            raise ended(f"the transfer did not finish within timeout={timeout:g} s") from error
        raise ended(f"the server sent nothing for {read_timeout:g} s") from error
    except (OSError, ValueError, http.client.HTTPException) as error:
        # resets are OSErrors, a broken chunked body an http.client.IncompleteRead
        raise ended(f"the transfer failed ({error!r})") from error
    for what, size in (("the server's Content-Length", announced), ("expected_size", expected_size)):
        if size is not None and received != size:
            raise BrodenError(
                f"{url}: the transfer ended after {received} of {size} bytes ({what}); the connection was "
                f"closed early; {again}"
            )
    return received, hasher.hexdigest()


def _check_member(info: zipfile.ZipInfo, archive: Path, folder: Path) -> None:
    """Refuses a member that could be written outside ``folder`` (resolved), the extraction folder, or that
    cannot be read safely (encrypted, compressed by another method than stored or deflated, a zip bomb)."""
    name = info.filename.replace("\\", "/")
    problem = None
    if name.startswith("/") or PureWindowsPath(info.filename).drive:
        problem = "has an absolute path"
    elif ".." in PurePosixPath(name).parts:
        problem = "climbs out of the archive with '..'"
    elif stat.S_ISLNK(info.external_attr >> 16):
        problem = "is a symbolic link"
    elif folder not in (folder / name).resolve().parents:  # whatever the checks above missed
        problem = "resolves outside the extraction folder"
    elif info.flag_bits & 0x1:
        problem = "is encrypted (a Broden release is not)"
    elif info.compress_type not in _ZIP_METHODS:
        problem = (
            f"is compressed with method {info.compress_type}; only stored and deflated members are read (the "
            f"Broden releases are deflated)"
        )
    elif info.file_size > ZIP_RATIO_FREE_BYTES and info.file_size > ZIP_MAX_RATIO * info.compress_size:
        problem = (
            f"expands {info.compress_size} bytes into {info.file_size}, more than {ZIP_MAX_RATIO} times (the "
            f"limit for members over {ZIP_RATIO_FREE_BYTES >> 20} MiB): images and label maps barely compress"
        )
    if problem:
        raise BrodenError(
            f"{archive}: member {info.filename!r} {problem}; the archive is unsafe or not a Broden release and "
            f"nothing was extracted; check where it came from"
        )


def _check_sizes(members: list[zipfile.ZipInfo], archive: Path, dest: Path) -> None:
    """Refuses an archive whose members expand implausibly, or beyond the free space of ``dest``."""
    archive_bytes = archive.stat().st_size
    total = sum(info.file_size for info in members)
    compressed = sum(info.compress_size for info in members)
    limit = ZIP_MAX_TOTAL_RATIO * archive_bytes + ZIP_TOTAL_SLACK_BYTES
    free = shutil.disk_usage(dest).free
    problem = None
    if compressed > archive_bytes:
        problem = (
            f"its directory claims {compressed} compressed bytes but the archive holds {archive_bytes} (members "
            f"overlap, a zip bomb, or the archive is corrupt)"
        )
    elif total > limit:
        problem = (
            f"its {len(members)} members would expand to {total} bytes, more than {ZIP_MAX_TOTAL_RATIO} times its "
            f"{archive_bytes} bytes plus {ZIP_TOTAL_SLACK_BYTES >> 20} MiB (images and label maps barely compress)"
        )
    elif total > free:
        problem = f"its members need {total} bytes but {dest} has {free} free; free some space and download again"
    if problem:
        raise BrodenError(f"{archive}: {problem}; nothing was extracted")


def _extract_member(zipped: zipfile.ZipFile, info: zipfile.ZipInfo, folder: Path) -> None:
    """Writes one checked member under ``folder``, never more bytes than its directory entry announces."""
    target = folder / info.filename.replace("\\", "/")
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zipped.open(info) as source, target.open("wb") as out:
        while chunk := source.read(_CHUNK_BYTES):
            written += len(chunk)
            # zipfile stops at the announced size itself; this keeps the guarantee whatever reads the data
            if written > info.file_size:
                raise BrodenError(
                    f"member {info.filename!r} holds more than the {info.file_size} bytes its header announces; "
                    f"the archive is unsafe and nothing was installed"
                )
            out.write(chunk)


def _extract(archive: Path, dest: Path, final: Path, url: str, progress: bool) -> str:
    """Extracts ``archive`` safely and renames the dataset to ``final``; returns its fingerprint."""
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", suffix=".tmp", dir=dest))
    try:
        try:
            with zipfile.ZipFile(archive) as zipped:
                members = zipped.infolist()
                # Every member is checked before any is written, so a bad archive leaves nothing behind.
                for info in members:
                    _check_member(info, archive, staging.resolve())
                _check_sizes(members, archive, dest)
                bar = tqdm(members, desc=f"extract {final.name}", unit="file", disable=not show_progress(progress))
                for info in bar:
                    try:
                        _extract_member(zipped, info, staging)
                    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
                        raise BrodenError(
                            f"{url}: member {info.filename!r} cannot be read ({error}); the archive is corrupt: "
                            f"download again"
                        ) from error
                    except OSError as error:
                        raise BrodenError(
                            f"{url}: member {info.filename!r} cannot be written into {dest} ({error}); nothing was "
                            f"installed"
                        ) from error
        except zipfile.BadZipFile as error:
            raise BrodenError(
                f"{url}: the download is not a valid zip archive ({error}); check the url, or download again"
            ) from error
        # The NetDissect archives hold a top-level broden1_<res>/ folder; accept an archive without it too.
        root = staging
        if not (staging / "index.csv").is_file():
            folders = [path for path in staging.iterdir() if path.is_dir()]
            if len(folders) == 1 and (folders[0] / "index.csv").is_file():
                root = folders[0]
            else:
                raise BrodenError(
                    f"{url}: the archive holds no index.csv, neither at its top nor in a single top-level "
                    f"folder; it is not a Broden dataset: check the url"
                )
        try:
            fingerprint = Broden(root).fingerprint()
        except BrodenError as error:
            raise BrodenError(f"{url}: the archive is not a valid Broden dataset: {error}") from error
        os.rename(root, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return fingerprint
