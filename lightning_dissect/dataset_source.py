"""Any segmentation dataset as a concept source: its items checked, indexed once, fingerprinted.

`DatasetSource` makes a `ConceptDataset` (`concept_source.py`) readable by a probe set exactly as a
Broden directory is (SEMANTICS §1): the same label numbers, the same primary categories, the same
decoded arrays. A Broden directory carries its statistics in its csv files; a dataset's are computed,
once, by an *index* pass over every item's labels:

- **Coverage and primary categories.** For each category and label, the number of items where the
  label occurs in that category (`frequency`) and the mean fraction of the segmentation it covers
  there (1.0 for an image-level label), over *every* item of the dataset, not only a probe's: exactly
  the numbers `write_broden` writes into `label.csv` and the `c_<category>.csv` files, rounded as they
  are written (6 decimals). Primary categories follow SEMANTICS §1 from these coverages, so a probe of
  a dataset and a probe of its Broden copy score every label in the same category. A label that never
  occurs is listed in no `c_` file and is never scored; a category in which no label occurs does not
  exist (write_broden leaves it out of `category.csv`).
- **Layout.** Per item, the segmentation size and the number of maps and image-level labels in each
  category, so a probe lays out its arrays before decoding (as a Broden probe does from `index.csv`).
  An item without label maps takes the segmentation size shared by the other items' maps, or half its
  image size when no item has a map (Broden's convention); maps of several sizes and an item without
  any is an error naming the item.
- **Fingerprint.** What identifies the data: the dataset's own `fingerprint()` (an adapter's: its
  arguments, file names and annotation files; or the string a user passes) with the label names,
  categories, number of items and splits. A dataset without one is hashed: the index pass then reads
  every item's image and labels (not only the labels) and hashes their decoded content, each time a
  probe is built, since nothing else can tell that the data changed.

With a fingerprint, the index is kept in the cache folder (`dataset-<key>.npz` beside the probe
caches) and reused while the files the dataset lists (`ConceptDataset.files`) keep their sizes and
modification times; a dataset without files is trusted on its fingerprint alone. The index pass runs
in worker processes, chunk by chunk (`workers.ordered_chunks`), like the probe's decoding.

Every problem an item can have (an image that is not an image, a map of the wrong size or type, a
label not in the list, a category not in the list) is a `DatasetError` naming the item.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lightning_dissect.broden import MAX_LABEL_NUMBER
from lightning_dissect.cache import cache_root
from lightning_dissect.concept_source import ConceptDataset, DatasetError, ItemLayout
from lightning_dissect.io import atomic_write
from lightning_dissect.probe_storage import files_stats
from lightning_dissect.workers import chunked, default_workers, ordered_chunks

__all__ = ["DatasetSource", "DecodedItem", "LabelStatistics", "decode_image", "decode_labels", "decode_pixels",
           "label_fractions", "resolve_segmentation_sizes", "segmentation_size"]

# Label maps hold numbers, so only modes whose pixels are numbers are label maps: 8-bit grey (L), palette
# indices (P), 32-bit (I) and 16-bit integers (I;16 and its byte orders).
_MAP_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")
_INDEX_FORMAT = 1
_INDEX_CHUNK = 64
# The fixed columns of index.csv, and the characters a category name cannot hold (label.csv writes
# `name(count)` lists joined by ";"; a category names a file c_<name>.csv).
_RESERVED_CATEGORIES = ("image", "split", "ih", "iw", "sh", "sw")
_CATEGORY_FORBIDDEN = ";()/\\,\n\r\0"

Cell = list[Any]  # items of a category: np.ndarray label maps (int32) and int image-level labels


# ---------------------------------------------------------------------- one item


def decode_pixels(value: Any, where: str) -> np.ndarray:
    """An item's image as uint8 RGB `(H, W, 3)` (what `decode_image` holds, in PIL's layout).

    Args:
        value: a PIL image (any mode, converted to RGB), or a `(3, H, W)` tensor or array, uint8 or float
            in [0, 1] (stored as `round(255 * x)`).
        where: how messages name the item.

    Raises:
        DatasetError: anything else, naming the item.
    """
    if isinstance(value, Image.Image):
        try:
            rgb = value if value.mode == "RGB" else value.convert("RGB")
            return np.array(rgb, dtype=np.uint8)  # decodes a lazily opened file, here
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as error:
            raise DatasetError(f"{where}: its image cannot be decoded ({error})") from None
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise DatasetError(f"{where}: its image is a {type(value).__name__}; an image is a PIL image or a "
                           f"(3, H, W) tensor, float in [0, 1] or uint8")
    if value.ndim != 3 or value.shape[0] != 3 or min(value.shape) == 0:
        raise DatasetError(f"{where}: its image has shape {tuple(value.shape)}; an image tensor is (3, H, W), "
                           f"channels first")
    value = value.detach().cpu()
    if value.dtype != torch.uint8:
        if not value.is_floating_point():
            raise DatasetError(f"{where}: its image tensor is {value.dtype}; it must be float in [0, 1] or uint8")
        if not bool(((value >= 0) & (value <= 1)).all()):  # NaN fails both comparisons
            raise DatasetError(f"{where}: its image holds values outside [0, 1] (min {value.min().item():g}, "
                               f"max {value.max().item():g}); a float image is in [0, 1]: undo any normalisation")
        # float64: round(255 * x) recovers k exactly for every x that is a float32 of k / 255
        value = (value.double() * 255).round_().to(torch.uint8)
    return np.ascontiguousarray(value.numpy().transpose(1, 2, 0))


def decode_image(value: Any, where: str) -> torch.Tensor:
    """An item's image as uint8 RGB `(3, H, W)` (see `decode_pixels` for what it accepts).

    Raises:
        DatasetError: not an image, naming the item.
    """
    # numpy transposes: torch's parallel copy of a small uint8 permute costs milliseconds on a busy machine
    return torch.from_numpy(np.ascontiguousarray(decode_pixels(value, where).transpose(2, 0, 1)))


def _label_map(value: Any, where: str, category: str, num_labels: int) -> np.ndarray:
    if isinstance(value, Image.Image):
        if value.mode not in _MAP_MODES:
            raise DatasetError(
                f"{where}: {category} label map is a PIL image of mode {value.mode}; a label map holds a label "
                f"number at each pixel (modes {', '.join(_MAP_MODES)}): convert a colour-coded mask to numbers")
        try:
            array = np.asarray(value)
        except (OSError, ValueError) as error:
            raise DatasetError(f"{where}: {category} label map cannot be decoded ({error})") from None
    elif isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
    else:
        array = np.asarray(value)
    if array.ndim != 2 or min(array.shape) == 0:
        raise DatasetError(f"{where}: {category} label map has shape {array.shape}; a label map is 2-D (h, w)")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise DatasetError(f"{where}: {category} label map is of type {array.dtype}; it must hold integer label "
                           f"numbers")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= num_labels:
        bad = np.unique(array[(array < 0) | (array >= num_labels)])
        shown = ", ".join(str(v) for v in bad[:10].tolist()) + (", ..." if len(bad) > 10 else "")
        raise DatasetError(f"{where}: {category} label map holds label number(s) {shown} not in the label list "
                           f"(1 to {num_labels - 1}; 0 is no label)")
    return np.array(array, dtype=np.int32)  # a copy: writable (torch wants it), and never the caller's


def _image_label(value: Any, where: str, category: str, num_labels: int) -> int:
    number = int(value)
    if not 1 <= number < num_labels:
        raise DatasetError(f"{where}: {category} image-level label {number} is not in the label list "
                           f"(1 to {num_labels - 1})")
    return number


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim == 0 and not value.dtype == torch.bool and not value.dtype == bool and (
            (isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex())
            or (isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.integer)))
    return isinstance(value, numbers.Integral)


def decode_labels(labels: Any, where: str, categories: Sequence[str], num_labels: int) -> dict[str, Cell]:
    """An item's labels checked: per category (all of `categories`, in order), its maps and image-level labels.

    Args:
        labels: the item's mapping from category to labels (see `concept_source`).
        where: how messages name the item.
        categories: the dataset's categories.
        num_labels: `len(label_names)`: label numbers are 1 to `num_labels - 1`.

    Returns:
        category -> list of int32 `(h, w)` arrays and int labels, in the item's order.

    Raises:
        DatasetError: a category not in the list, a map that is not 2-D integers, a label not in the list,
            or maps of different sizes in the item.
    """
    if not isinstance(labels, Mapping):
        raise DatasetError(f"{where}: its labels are a {type(labels).__name__}; they must be a mapping from "
                           f"category to label maps and image-level labels")
    unknown = [key for key in labels if key not in categories]
    if unknown:
        raise DatasetError(f"{where}: category {unknown[0]!r} is not in the dataset's categories {list(categories)}")
    cells: dict[str, Cell] = {}
    size = None
    for category in categories:
        value = labels.get(category)
        if value is None:
            items: Iterable[Any] = []
        elif _is_integer(value):
            items = [value]
        elif isinstance(value, (list, tuple)):
            items = value
        elif isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 1:
            items = value.tolist()  # a vector of image-level labels
        else:
            items = [value]  # one label map
        cell: Cell = []
        for item in items:
            if _is_integer(item):
                cell.append(_image_label(item, where, category, num_labels))
                continue
            array = _label_map(item, where, category, num_labels)
            if size is not None and array.shape != size:
                raise DatasetError(f"{where}: {category} label map is {array.shape[0]}x{array.shape[1]} (h x w), "
                                   f"another map of the item is {size[0]}x{size[1]}; an item's maps share one size")
            size = array.shape
            cell.append(array)
        cells[category] = cell
    return cells


def segmentation_size(cells: Mapping[str, Cell]) -> tuple[int, int] | None:
    """The size of an item's label maps (they share one), or None when it has none."""
    for cell in cells.values():
        for item in cell:
            if isinstance(item, np.ndarray):
                return int(item.shape[0]), int(item.shape[1])
    return None


def label_fractions(cells: Mapping[str, Cell], size: tuple[int, int], num_labels: int) -> dict[tuple[str, int], float]:
    """Per `(category, label)` occurring in an item: the fraction of its segmentation the label covers there.

    The union over the category's maps (SEMANTICS §3), divided by `sh * sw`; 1.0 for an image-level label.
    """
    area = float(size[0] * size[1])
    fractions: dict[tuple[str, int], float] = {}
    for category, cell in cells.items():
        maps = [item.ravel() for item in cell if isinstance(item, np.ndarray)]
        if maps:
            counts = np.bincount(maps[0], minlength=num_labels)
            for later in range(1, len(maps)):  # a pixel carrying the label in an earlier map is counted once
                repeated = np.zeros(maps[later].shape, dtype=bool)
                for earlier in maps[:later]:
                    repeated |= earlier == maps[later]
                counts += np.bincount(maps[later][~repeated], minlength=num_labels)
            for number in (np.flatnonzero(counts[1:]) + 1).tolist():
                fractions[category, number] = float(counts[number]) / area
        for item in cell:
            if not isinstance(item, np.ndarray):
                fractions[category, item] = 1.0  # an image-level label covers every pixel
    return fractions


@dataclass
class DecodedItem:
    """One item, checked: its uint8 image `(3, H, W)` and its labels per category (`decode_labels`)."""

    image: torch.Tensor
    cells: dict[str, Cell]

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])


def resolve_segmentation_sizes(sizes: Sequence[tuple[int, int] | None], image_size: Callable[[int], tuple[int, int]],
                               where: Callable[[int], str]) -> np.ndarray:
    """Every item's segmentation size `(N, 2)`: its maps', else the one all maps share, else half its image size.

    Args:
        sizes: per item, the size of its maps, or None when it has none.
        image_size: the image size of item `i` (asked only when no item has a map).
        where: how messages name item `i`.

    Raises:
        DatasetError: an item without maps in a dataset whose maps have several sizes.
    """
    known = {size for size in sizes if size is not None}
    out = np.zeros((len(sizes), 2), dtype=np.int32)
    for i, size in enumerate(sizes):
        if size is None:
            if len(known) > 1:
                raise DatasetError(
                    f"{where(i)} has no label map, and the other items' maps have several sizes "
                    f"({', '.join(f'{h}x{w}' for h, w in sorted(known))}): its segmentation size is unknown; "
                    f"give it an all-zero map of its size")
            if known:
                size = next(iter(known))
            else:  # no item has a map: Broden's convention, half the image size
                height, width = image_size(i)
                size = (height // 2, width // 2)
        out[i] = size
    return out


# ---------------------------------------------------------------------- the dataset's statistics


def coverage_cell(value: float) -> str:
    """A coverage as the csv files hold it: fixed point, 6 decimals (NetDissect's readers parse `^\\d+\\.\\d*$`)."""
    return f"{value:.6f}"


class LabelStatistics:
    """Per category and label: in how many items the label occurs (`frequency`) and its mean coverage there.

    Items are added in dataset order, so the sums, and the files written from them, are the same
    whatever the order the items were read in. The rules follow NetDissect's `joinseg.py`, except that
    `coverage` is a mean, not a sum (as the synthetic dataset has always written it).
    """

    def __init__(self, categories: Sequence[str], label_names: Sequence[str]) -> None:
        self.dataset_categories = list(categories)
        self.label_names = list(label_names)
        self.frequency: dict[tuple[str, int], int] = {}
        self.coverage_sum: dict[tuple[str, int], float] = {}

    def add(self, fractions: Mapping[tuple[str, int], float]) -> None:
        """Count one item (its `label_fractions`)."""
        for key, value in fractions.items():
            self.frequency[key] = self.frequency.get(key, 0) + 1
            self.coverage_sum[key] = self.coverage_sum.get(key, 0.0) + value

    def coverage(self, key: tuple[str, int]) -> float:
        """The mean fraction covered by label `key[1]` in category `key[0]`, over the items where it occurs."""
        return self.coverage_sum[key] / self.frequency[key]

    @property
    def categories(self) -> list[str]:
        """The categories in which some label occurs, in the dataset's order (those `category.csv` lists)."""
        present = {category for category, _ in self.frequency}
        return [category for category in self.dataset_categories if category in present]

    def category_keys(self, category: str) -> list[tuple[str, int]]:
        """The labels of `category` in `c_<category>.csv` order: by decreasing frequency, then coverage, then
        number (dense codes as NetDissect's `joinseg.py` numbers them)."""
        keys = [key for key in self.frequency if key[0] == category]
        keys.sort(key=lambda key: (-self.frequency[key], -self.coverage(key), key[1]))
        return keys

    def written_coverage(self) -> dict[str, dict[int, float]]:
        """Per category, `{label: coverage}` as a reader of the written `c_` files gets it (rounded)."""
        return {category: {key[1]: float(coverage_cell(self.coverage(key))) for key in self.category_keys(category)}
                for category in self.categories}

    def label_rows(self, synonyms: Mapping[str, Sequence[str]]) -> list[list[object]]:
        """The rows of `label.csv`: `number,name,category,frequency,coverage,syns`, one per label 1, 2, ...

        `category` lists the categories where the label occurs with their item counts, most frequent first
        (`material(36);object(3)`); empty for a label that occurs nowhere.
        """
        rows: list[list[object]] = []
        for number, name in enumerate(self.label_names[1:], start=1):
            keys = sorted((k for k in self.frequency if k[1] == number), key=lambda k: (-self.frequency[k], k[0]))
            total = sum(self.frequency[k] for k in keys)
            mean = sum(self.coverage_sum[k] for k in keys) / total if total else 0.0
            rows.append([number, name, ";".join(f"{k[0]}({self.frequency[k]})" for k in keys), total,
                         coverage_cell(mean), ";".join(synonyms.get(name, ()))])
        return rows

    def category_rows(self) -> list[list[object]]:
        """The rows of `category.csv`: `name,first,last,count,frequency` of each category with labels."""
        rows: list[list[object]] = []
        for category in self.categories:
            keys = [key for key in self.frequency if key[0] == category]
            numbers = [key[1] for key in keys]
            rows.append([category, min(numbers), max(numbers), len(numbers), sum(self.frequency[k] for k in keys)])
        return rows

    def coverage_rows(self, category: str) -> list[list[object]]:
        """The rows of `c_<category>.csv`: `code,number,name,frequency,coverage`."""
        return [[code, key[1], self.label_names[key[1]], self.frequency[key], coverage_cell(self.coverage(key))]
                for code, key in enumerate(self.category_keys(category), start=1)]

    def state(self) -> dict[str, Any]:
        """The counts as plain JSON (floats round-trip exactly)."""
        return {"frequency": [[c, n, v] for (c, n), v in self.frequency.items()],
                "coverage_sum": [[c, n, v] for (c, n), v in self.coverage_sum.items()]}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.frequency = {(c, int(n)): int(v) for c, n, v in state["frequency"]}
        self.coverage_sum = {(c, int(n)): float(v) for c, n, v in state["coverage_sum"]}


# ---------------------------------------------------------------------- checks of the dataset itself


def check_label_names(label_names: Any) -> list[str]:
    """The label list of a dataset, checked: `["-", name1, name2, ...]`, names non-empty strings."""
    if isinstance(label_names, str) or not isinstance(label_names, Sequence):
        raise DatasetError(f"label_names={label_names!r} must be a list of names: label_names[n] names label n, "
                           f"label_names[0] is '-' (no label)")
    names = list(label_names)
    if len(names) < 2:
        raise DatasetError(f"label_names={names!r} names no label: label_names[0] is '-' (no label), the labels "
                           f"are 1, 2, ...")
    if names[0] != "-":
        raise DatasetError(f"label_names[0] is {names[0]!r}; label 0 means no label (pixels that are 0) and is named "
                           f"'-', as in Broden: put your first label at number 1")
    if len(names) - 1 > MAX_LABEL_NUMBER:
        raise DatasetError(f"label_names has {len(names) - 1} labels; a label map holds at most {MAX_LABEL_NUMBER} "
                           f"(R + 256 * G)")
    for number, name in enumerate(names[1:], start=1):
        if not isinstance(name, str) or not name or name != name.strip() or "\n" in name or "\r" in name:
            raise DatasetError(f"label_names[{number}] is {name!r}; a label name is a non-empty string without "
                               f"surrounding spaces or line breaks")
    return names


def check_categories(categories: Any) -> list[str]:
    """The category list of a dataset, checked: unique names that can be Broden categories."""
    if isinstance(categories, str) or not isinstance(categories, Sequence) or not categories:
        raise DatasetError(f"categories={categories!r} must be a non-empty list of category names, e.g. "
                           f"['object', 'part']")
    names = list(categories)
    for name in names:
        if not isinstance(name, str) or not name or name != name.strip() or name in _RESERVED_CATEGORIES \
                or any(character in name for character in _CATEGORY_FORBIDDEN):
            raise DatasetError(f"category {name!r} cannot be a category: a category name is a non-empty word, not "
                               f"one of {list(_RESERVED_CATEGORIES)}, without any of {_CATEGORY_FORBIDDEN!r}")
    if len(set(names)) != len(names):
        raise DatasetError(f"categories={names} lists a category twice")
    return names


# ---------------------------------------------------------------------- the index pass


@dataclass(frozen=True, eq=False)
class _IndexTask:
    """Reads a chunk of items' labels (and, to hash them, images): sizes, counts, fractions, digests."""

    dataset: ConceptDataset
    categories: list[str]
    num_labels: int
    hash_content: bool

    def __call__(self, items: Sequence[int]) -> list[tuple[Any, ...]]:
        out = []
        for i in items:
            where = self.dataset.where(i)
            digest = None
            if self.hash_content:
                image, labels = self.dataset[i]
                pixels = decode_image(image, where)
                cells = decode_labels(labels, where, self.categories, self.num_labels)
                digest = _content_digest(pixels, cells)
                image_size: tuple[int, int] | None = (int(pixels.shape[1]), int(pixels.shape[2]))
            else:
                cells = decode_labels(self.dataset.labels(i), where, self.categories, self.num_labels)
                image_size = None
            size = segmentation_size(cells)
            counts = [(sum(isinstance(item, np.ndarray) for item in cell),
                       sum(not isinstance(item, np.ndarray) for item in cell)) for cell in cells.values()]
            # Fractions need the segmentation size; an item without maps has image-level labels only (1.0).
            fractions = label_fractions(cells, size or (1, 1), self.num_labels)
            out.append((size, image_size, counts, fractions, digest))
        return out


def _content_digest(image: torch.Tensor, cells: Mapping[str, Cell]) -> bytes:
    digest = hashlib.sha256()
    digest.update(repr(tuple(image.shape)).encode() + image.numpy().tobytes())
    for category, cell in cells.items():
        digest.update(b"\0" + category.encode())
        for item in cell:
            if isinstance(item, np.ndarray):
                digest.update(repr(item.shape).encode() + item.astype("<i4").tobytes())
            else:
                digest.update(f"#{item}".encode())
    return digest.digest()


class DatasetSource:
    """A `ConceptDataset` indexed for probe sets: implements `concept_source.ConceptSource` as `Broden` does.

    Args:
        dataset: the dataset (`ConceptDataset`; `ConceptDataset.wrap` makes one of any indexable dataset).
        cache_dir: where the index is kept (`cache_root() / "probes"` when None, as the probe caches;
            False: nowhere).
        workers: worker processes of the index pass (default one per core, up to 8).
        progress: a progress bar for the index pass.

    Attributes:
        dataset: the dataset.
        label_names: per label number its name, `[0] == "-"`.
        categories: the categories in which some label occurs, in the dataset's order.
        coverage: per category, `{label: coverage}` as `write_broden` writes them into the `c_` files.
        statistics: the `LabelStatistics` of every item.
        splits: the split of every item.

    Raises:
        DatasetError: a bad label list or category list, an item that cannot be read (names it), or a
            dataset in which no label occurs.
    """

    def __init__(self, dataset: ConceptDataset, cache_dir: str | os.PathLike[str] | bool | None = None,
                 workers: int | None = None, progress: bool = False) -> None:
        if not isinstance(dataset, ConceptDataset):
            raise DatasetError(f"dataset={dataset!r} is not a ConceptDataset; wrap an indexable dataset with "
                               f"ConceptDataset.wrap(dataset, label_names, categories)")
        self.dataset = dataset
        self.label_names = check_label_names(dataset.label_names)
        self.dataset_categories = check_categories(dataset.categories)
        count = len(dataset)
        if count < 1:
            raise DatasetError(f"{dataset!r} has no items")
        self.splits = [dataset.split(i) for i in range(count)]
        for i, split in enumerate(self.splits):
            if not isinstance(split, str) or not split or "\n" in split:
                raise DatasetError(f"{dataset.where(i)}: its split is {split!r}; a split is a non-empty string")
        self.workers = workers if workers is not None else default_workers()
        self.statistics = LabelStatistics(self.dataset_categories, self.label_names)
        self._declared = dataset.fingerprint()
        if self._declared is not None and (not isinstance(self._declared, str) or not self._declared):
            raise DatasetError(f"{dataset!r}.fingerprint() returned {self._declared!r}; it returns a non-empty "
                               f"string, or None to hash the content")
        self._index(cache_dir, progress)
        self.categories = self.statistics.categories
        if not self.categories:
            raise DatasetError(f"no item of {dataset!r} has a label: every label map is 0 and no item has an "
                               f"image-level label")
        self.coverage = self.statistics.written_coverage()
        self.primary_category = self.primary_categories()

    # ------------------------------------------------------------------ the index

    def _index_key(self) -> str:
        return hashlib.sha256(json.dumps({
            "format": _INDEX_FORMAT, "dataset": self._declared, "type": type(self.dataset).__qualname__,
            "label_names": self.label_names, "categories": self.dataset_categories, "items": len(self.splits),
        }).encode()).hexdigest()

    def _all_files(self) -> Iterable[str]:
        for i in range(len(self.splits)):
            yield from self.dataset.files(i)

    def _index(self, cache_dir: str | os.PathLike[str] | bool | None, progress: bool) -> None:
        path = None
        if self._declared is not None and cache_dir is not False:
            root = cache_root() / "probes" if cache_dir is None or cache_dir is True else Path(cache_dir)
            path = root / f"dataset-{self._index_key()[:32]}.npz"
            stats = files_stats(self.files_root, self._all_files())
            if self._load_index(path, stats):
                return
        self._build_index(progress)
        if path is not None:
            self._save_index(path, stats)

    def _build_index(self, progress: bool) -> None:
        count = len(self.splits)
        num_categories = len(self.dataset_categories)
        task = _IndexTask(self.dataset, self.dataset_categories, len(self.label_names), self._declared is None)
        sizes: list[tuple[int, int] | None] = []
        image_sizes: list[tuple[int, int] | None] = []
        self._counts = np.zeros((count, num_categories, 2), dtype=np.int32)
        digests = hashlib.sha256()
        for chunk in ordered_chunks(task, chunked(count, _INDEX_CHUNK), self.workers,
                                    "index dataset" if progress else None):
            for size, image_size, counts, fractions, digest in chunk:
                self._counts[len(sizes)] = counts
                sizes.append(size)
                image_sizes.append(image_size)
                self.statistics.add(fractions)
                if digest is not None:
                    digests.update(digest)
        self._content = digests.hexdigest() if self._declared is None else None
        self._sizes = resolve_segmentation_sizes(
            sizes, lambda i: image_sizes[i] or self._image_size(i), self.dataset.where)

    def _image_size(self, i: int) -> tuple[int, int]:
        return DecodedItem(decode_image(self.dataset[i][0], self.dataset.where(i)), {}).image_size

    def _load_index(self, path: Path, stats: str) -> bool:
        try:
            with np.load(path, allow_pickle=False) as saved:
                meta = json.loads(str(saved["meta"]))
                sizes, counts = saved["sizes"], saved["counts"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return False  # missing, truncated or unreadable: indexed again and replaced
        shapes = ((len(self.splits), 2), (len(self.splits), len(self.dataset_categories), 2))
        if meta.get("key") != self._index_key() or meta.get("files") != stats or (sizes.shape, counts.shape) != shapes:
            return False
        self.statistics.load_state(meta["statistics"])
        self._sizes, self._counts, self._content = sizes.astype(np.int32), counts.astype(np.int32), None
        return True

    def _save_index(self, path: Path, stats: str) -> None:
        meta = {"key": self._index_key(), "files": stats, "statistics": self.statistics.state()}
        try:
            with atomic_write(path, "wb") as handle:
                np.savez(handle, meta=np.array(json.dumps(meta)), sizes=self._sizes, counts=self._counts)
        except OSError:
            pass  # an unwritable cache only costs indexing again next time (the probe cache warns about it)

    # ------------------------------------------------------------------ ConceptSource

    def __len__(self) -> int:
        return len(self.splits)

    def __repr__(self) -> str:
        return f"DatasetSource({self.dataset!r})"

    def describe(self) -> str:
        return repr(self.dataset)

    def where(self, i: int) -> str:
        return self.dataset.where(i)

    @property
    def files_root(self) -> Path:
        return Path(self.dataset.root) if self.dataset.root is not None else Path.cwd()

    def fingerprint(self) -> str:
        """sha256 over the dataset's fingerprint (or its content's hash), label names, categories and splits."""
        return hashlib.sha256(json.dumps({
            "format": _INDEX_FORMAT, "dataset": self._declared, "content": self._content,
            "type": type(self.dataset).__qualname__, "label_names": self.label_names,
            "categories": self.dataset_categories,
            "splits": hashlib.sha256("\n".join(self.splits).encode()).hexdigest(),
        }).encode()).hexdigest()

    def _select(self, categories: Iterable[str] | None) -> list[str]:
        if categories is None:
            return list(self.categories)
        if isinstance(categories, str):
            raise DatasetError(f"categories must be a list of category names, got the string {categories!r}; "
                               f"write categories=[{categories!r}]")
        wanted = set(categories)
        unknown = sorted(name for name in wanted if name not in self.categories)
        if unknown:
            raise DatasetError(f"categories has unknown name(s) {', '.join(map(repr, unknown))}; the categories in "
                               f"which labels of {self.describe()} occur are {', '.join(self.categories)}")
        if not wanted:
            raise DatasetError(f"categories is empty; pass None for all, or some of {', '.join(self.categories)}")
        return [name for name in self.categories if name in wanted]

    def primary_categories(self, categories: Iterable[str] | None = None) -> list[str | None]:
        """Per label number, the category it is scored in among `categories` (SEMANTICS §1, as `Broden`)."""
        primary: list[str | None] = [None] * len(self.label_names)
        best: dict[int, float] = {}
        for name in self._select(categories):
            for number, value in self.coverage[name].items():
                if number not in best or value > best[number]:  # strict: ties keep the first category
                    best[number] = value
                    primary[number] = name
        return primary

    def item_layout(self, i: int, categories: Sequence[str]) -> ItemLayout:
        columns = [self.dataset_categories.index(category) for category in categories]
        counts = self._counts[i, columns].sum(axis=0)
        sh, sw = (int(v) for v in self._sizes[i])
        return ItemLayout(None, (sh, sw), int(counts[0]), int(counts[1]), list(self.dataset.files(i)))

    def read_item(self, i: int, categories: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        item = self.decode(i)
        expected = tuple(int(v) for v in self._sizes[i])
        maps: list[torch.Tensor] = []
        labels: list[int] = []
        for category in categories:
            for value in item.cells[category]:
                if isinstance(value, np.ndarray):
                    if value.shape != expected:
                        raise DatasetError(f"{self.where(i)}: {category} label map is {value.shape[0]}x{value.shape[1]}"
                                           f" but was {expected[0]}x{expected[1]} when the dataset was indexed: the "
                                           f"dataset changed while it was read")
                    maps.append(torch.from_numpy(np.ascontiguousarray(value, dtype=np.int32)))
                else:
                    labels.append(value)
        return item.image, maps, labels

    def decode(self, i: int) -> DecodedItem:
        """Item `i` read and checked."""
        where = self.dataset.where(i)
        image, labels = self.dataset[i]
        return DecodedItem(decode_image(image, where),
                           decode_labels(labels, where, self.dataset_categories, len(self.label_names)))
