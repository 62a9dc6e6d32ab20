"""write_broden: any segmentation dataset written in the exact Broden layout (SEMANTICS §1).

The result opens with `Broden(root)` and with the readers of NetDissect and NetDissect-Lite
(`loader/data_loader.py`): `index.csv` with one row per item, the label maps as PNGs holding
`R + 256 * G`, the images as JPEG (or PNG), `label.csv` with the categories a label occurs in and
their item counts (`material(36);object(3)`), `category.csv`, and one `c_<category>.csv` per
category with the dense codes and each label's coverage in that category, written in fixed point
with 6 decimals (NetDissect's readers parse `^\\d+\\.\\d*$` only). The statistics are those of
`dataset_source.LabelStatistics`, the same numbers a probe built with `ProbeSet.from_dataset`
decides its primary categories from, so both probes score every label alike.

What a reader of the copy sees, and what differs from the dataset:
- Images: JPEG (quality `jpeg_quality`, no chroma subsampling) by default, as Broden's are; JPEG is
  lossy, so a model sees slightly different pixels than in the dataset. `image_format="png"` keeps
  them exactly (then a probe of the copy equals a probe of the dataset, bit for bit).
- Files: `images/<name>.jpg` and `images/<name>_<category>.png`, numbered `_<category>_<k>.png`
  (k from 1) when an item has several maps in the category or the category is `part` (as in the
  release); `<name>` is the dataset's `name(i)`.
- Labels: `label.csv` lists every label of the list, numbered as in the dataset. A label that
  occurs in no item has an empty `category` cell and is in no `c_` file (never scored, SEMANTICS §1).
  NetDissect-Lite's reader cannot parse a row with an empty `category` cell: for Lite, leave labels
  that never occur out of the list.
- Categories: `index.csv` has a column per category of the dataset; `category.csv` and the `c_`
  files list only the categories in which some label occurs (NetDissect's readers cannot read an
  empty `c_` file).

The copy is written into a staging folder beside `root` and renamed into place when complete, so an
interrupted write leaves no dataset behind, and an existing non-empty folder is never overwritten.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lightning_dissect.concept_source import ConceptDataset, DatasetError
from lightning_dissect.dataset_source import (
    LabelStatistics,
    check_categories,
    check_label_names,
    decode_labels,
    decode_pixels,
    label_fractions,
    resolve_segmentation_sizes,
    segmentation_size,
)
from lightning_dissect.workers import chunked, default_workers, ordered_chunks

__all__ = ["NUMBERED_CATEGORIES", "label_png", "write_broden"]

# Categories whose maps are always numbered `_part_1.png`, `_part_2.png` (the release's part hierarchies).
NUMBERED_CATEGORIES = ("part",)
IMAGE_FORMATS = {"jpeg": "jpg", "png": "png"}
_WRITE_CHUNK = 16
# What an item's name may not hold: index.csv joins paths with ";", and an all-digit item is a label number.
_NAME_PROBLEMS = ((re.compile(r"[;\0\\\n\r]"), "holds ';', a backslash, a NUL or a line break"),
                  (re.compile(r"^/|^[A-Za-z]:"), "is absolute"),
                  (re.compile(r"(^|/)\.\.(/|$)"), "climbs out of images/ with '..'"),
                  (re.compile(r"^$|/$|//"), "is empty or has an empty part"))


def label_png(labels: np.ndarray) -> Image.Image:
    """Broden's label-map encoding of integer labels `(h, w)`: label = R + 256 * G, blue 0 (SEMANTICS §1)."""
    rgb = np.zeros(labels.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    return Image.fromarray(rgb, mode="RGB")


def _map_names(stem: str, category: str, count: int) -> list[str]:
    if count == 1 and category not in NUMBERED_CATEGORIES:
        return [f"{stem}_{category}.png"]
    return [f"{stem}_{category}_{k}.png" for k in range(1, count + 1)]


@dataclass
class _Row:
    """One written item, as the csv files need it."""

    image: str
    split: str
    image_size: tuple[int, int]
    segmentation_size: tuple[int, int] | None
    cells: list[str]
    fractions: dict[tuple[str, int], float]


@dataclass(frozen=True, eq=False)
class _WriteTask:
    """Reads a chunk of items and writes their image and label-map files (in a worker process)."""

    dataset: ConceptDataset
    categories: list[str]
    num_labels: int
    images: Path
    extension: str
    jpeg_quality: int

    def __call__(self, items: Sequence[int]) -> list[_Row]:
        rows = []
        for i in items:
            where = self.dataset.where(i)
            stem = self.dataset.name(i)
            problem = next((text for pattern, text in _NAME_PROBLEMS if isinstance(stem, str) and pattern.search(stem)),
                           None if isinstance(stem, str) else "is not a string")
            if problem:
                raise DatasetError(f"{where}: its name {stem!r} {problem}; name(i) gives each item a file stem "
                                   f"under images/")
            image, labels = self.dataset[i]
            pixels = decode_pixels(image, where)
            cells = decode_labels(labels, where, self.categories, self.num_labels)
            image_path = f"{stem}.{self.extension}"
            (self.images / image_path).parent.mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(pixels, mode="RGB")
            if self.extension == "jpg":
                # Full-resolution chroma (no 4:2:0 subsampling) keeps small images' colours true.
                picture.save(self.images / image_path, format="JPEG", quality=self.jpeg_quality, subsampling=0)
            else:
                picture.save(self.images / image_path, format="PNG")
            texts = []
            for category, cell in cells.items():
                maps = [item for item in cell if isinstance(item, np.ndarray)]
                names = iter(_map_names(stem, category, len(maps)))
                parts = []
                for item in cell:  # paths and numbers in the item's order
                    if isinstance(item, np.ndarray):
                        name = next(names)
                        label_png(item).save(self.images / name, format="PNG")
                        parts.append(name)
                    else:
                        parts.append(str(item))
                texts.append(";".join(parts))
            size = segmentation_size(cells)
            rows.append(_Row(image_path, self.dataset.split(i), (pixels.shape[0], pixels.shape[1]), size, texts,
                             label_fractions(cells, size or (1, 1), self.num_labels)))
        return rows


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_broden(dataset: Any, root: str | os.PathLike[str], label_names: Sequence[str] | None = None,
                 categories: Sequence[str] | None = None, *, image_format: str = "jpeg", jpeg_quality: int = 95,
                 synonyms: Mapping[str, Sequence[str]] | None = None, workers: int | None = None,
                 progress: bool = False) -> Path:
    """Write a segmentation dataset in the Broden layout; `Broden(root)` and NetDissect's readers open it.

    Args:
        dataset: a `ConceptDataset` (an adapter of `lightning_dissect.datasets`), or any indexable dataset
            of `(image, labels)` items (see `concept_source`) with `label_names` and `categories`.
        root: the folder to create; it must not exist, or be empty.
        label_names, categories: for a plain dataset: the name of each label number (`[0] == "-"`) and the
            category names, in order.
        image_format: `"jpeg"` (as Broden's images; lossy) or `"png"` (the pixels exactly).
        jpeg_quality: JPEG quality, 1 to 95.
        synonyms: label name -> other names (the `syns` column).
        workers: processes reading the items and writing their files (default one per core, up to 8).
        progress: a progress bar.

    Returns:
        `root` as an absolute `Path`.

    Raises:
        FileExistsError: `root` exists and is not an empty folder (nothing is overwritten).
        DatasetError: a bad label list, category list or item (names the item), or no label anywhere.
        ValueError: an argument out of range.

    Example:
        >>> import tempfile, torch
        >>> items = [(torch.rand(3, 8, 8), {"object": torch.randint(0, 3, (4, 4))}) for _ in range(4)]
        >>> root = write_broden(items, tempfile.mkdtemp() + "/copy", ["-", "cat", "dog"], ["object"])
        >>> from lightning_dissect.broden import Broden
        >>> Broden(root).label_names
        ['-', 'cat', 'dog']
    """
    if isinstance(dataset, ConceptDataset):
        if label_names is not None or categories is not None:
            raise DatasetError(f"label_names or categories given for {dataset!r}, which has its own; pass them "
                               f"only with a plain dataset")
    elif label_names is None or categories is None:
        raise DatasetError('a plain dataset needs label_names=["-", ...] and categories=[...] (a ConceptDataset '
                           'carries its own)')
    else:
        dataset = ConceptDataset.wrap(dataset, label_names, categories)
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format={image_format!r} must be one of {list(IMAGE_FORMATS)}")
    if not isinstance(jpeg_quality, int) or isinstance(jpeg_quality, bool) or not 1 <= jpeg_quality <= 95:
        raise ValueError(f"jpeg_quality={jpeg_quality!r} must be an integer in 1..95")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers={workers!r} must be a positive integer or None (one per core, up to 8)")
    names = check_label_names(dataset.label_names)
    category_names = check_categories(dataset.categories)
    other_names = {name: [value] if isinstance(value, str) else list(value) for name, value in (synonyms or {}).items()}
    root = Path(root).expanduser().absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"write_broden: {root} exists and is not an empty folder; pass a new or empty folder "
                              f"(nothing is overwritten)")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    try:
        (staging / "images").mkdir()
        task = _WriteTask(dataset, category_names, len(names), staging / "images", IMAGE_FORMATS[image_format],
                          jpeg_quality)
        rows = _write_items(task, len(dataset), workers or default_workers(), progress)
        statistics = LabelStatistics(category_names, names)
        for row in rows:
            statistics.add(row.fractions)
        if not statistics.categories:
            raise DatasetError(f"no item of {dataset!r} has a label: every label map is 0 and no item has an "
                               f"image-level label")
        sizes = resolve_segmentation_sizes([row.segmentation_size for row in rows],
                                           lambda i: rows[i].image_size, dataset.where)
        _write_csv(staging / "index.csv", ("image", "split", "ih", "iw", "sh", "sw", *category_names),
                   ([row.image, row.split, *row.image_size, *size.tolist(), *row.cells]
                    for row, size in zip(rows, sizes)))
        _write_csv(staging / "label.csv", ("number", "name", "category", "frequency", "coverage", "syns"),
                   statistics.label_rows(other_names))
        for category in statistics.categories:
            _write_csv(staging / f"c_{category}.csv", ("code", "number", "name", "frequency", "coverage"),
                       statistics.coverage_rows(category))
        _write_csv(staging / "category.csv", ("name", "first", "last", "count", "frequency"),
                   statistics.category_rows())
        if root.exists():
            root.rmdir()  # empty, checked above
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when renamed
    return root


def _write_items(task: _WriteTask, count: int, workers: int, progress: bool) -> list[_Row]:
    """Every item written, its rows in dataset order; two items of one name are refused."""
    rows: list[_Row] = []
    seen: dict[str, int] = {}
    for chunk in ordered_chunks(task, chunked(count, _WRITE_CHUNK), workers, "write broden" if progress else None):
        for row in chunk:
            first = seen.setdefault(row.image, len(rows))
            if first != len(rows):
                raise DatasetError(f"{task.dataset.where(len(rows))} and {task.dataset.where(first)} have one "
                                   f"name, {row.image!r}; name(i) must give each item its own file stem")
            rows.append(row)
    return rows
