"""What a probe set decodes: the concept-source protocol, and the dataset interface any segmentation data meets.

A probe set (`probe.py`) decodes items of a *concept source*: something with numbered labels in
named categories, items that each hold an image and its labels, and a fingerprint. Two kinds
implement `ConceptSource`: `Broden` (a directory in the Broden layout, SEMANTICS §1) and
`DatasetSource` (`dataset_source.py`: any `ConceptDataset`, indexed once). The probe's decoding,
cache and fingerprint are the same code for both.

A `ConceptDataset` is the plain interface a user's data meets: an indexable dataset whose item `i`
is `(image, labels)`, with the label names and the categories. The adapters of `datasets.py`
(VOC, Cityscapes, COCO, a folder of images and masks) are `ConceptDataset`s, and any indexable
dataset becomes one with `ConceptDataset.wrap`.

Items (checked by `dataset_source.decode_item`, which names the item on any problem):
- `image`: a PIL image (converted to RGB), or a `(3, H, W)` tensor or array, float in [0, 1]
  (stored as `round(255 * x)`, exact for images that came from 8 bits) or uint8.
- `labels`: a mapping from category name to that category's labels in the item: a list whose items
  are label maps (2-D integer tensors, arrays or PIL images of mode L, P, I or I;16: the global label
  number at each pixel, 0 for none) and image-level labels (ints), or one map, or one int. A
  category left out, `None` or `[]` is not annotated in that item (an empty Broden cell).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

__all__ = ["ConceptDataset", "ConceptSource", "DatasetError", "ItemLayout"]


class DatasetError(ValueError):
    """A dataset item, label list or argument that cannot be used as it is; the message names the item."""


class ItemLayout(NamedTuple):
    """What a probe needs to know of one item before decoding it.

    Attributes:
        image_size: `(ih, iw)`, or None when only decoding the image tells (a dataset item).
        segmentation_size: `(sh, sw)`, the size of the item's label maps.
        num_maps, num_image_labels: how many label maps and image-level labels the item has in the
            selected categories.
        files: the files the item is read from, relative to the source's `files_root` (a probe's cache
            is valid while they keep their sizes and modification times).
    """

    image_size: tuple[int, int] | None
    segmentation_size: tuple[int, int]
    num_maps: int
    num_image_labels: int
    files: list[str]


class ConceptSource(Protocol):
    """What a probe set reads (`Broden` and `DatasetSource` implement it)."""

    categories: list[str]
    label_names: list[str]
    splits: list[str]

    def __len__(self) -> int: ...

    def primary_categories(self, categories: Iterable[str] | None = None) -> list[str | None]:
        """Per label number, the category it is scored in among `categories` (SEMANTICS §1)."""
        ...

    def fingerprint(self) -> str:
        """Identifies the data (labels, categories, items)."""
        ...

    def where(self, i: int) -> str:
        """Item `i` as messages name it."""
        ...

    def describe(self) -> str:
        """The source as messages name it (a folder, a dataset)."""
        ...

    @property
    def files_root(self) -> Path:
        """The folder the files of `item_layout` are relative to."""
        ...

    def item_layout(self, i: int, categories: Sequence[str]) -> ItemLayout: ...

    def read_item(self, i: int, categories: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        """The image (uint8 `(3, ih, iw)`), the label maps (int32 `(sh, sw)`) and the image-level labels of
        item `i` in the selected `categories`, in category order, then the order the item gives."""
        ...


class ConceptDataset:
    """A segmentation dataset as a concept dictionary: items `(image, labels)`, label names and categories.

    Subclasses (the adapters of `datasets.py`) set `label_names` and `categories` and define `__len__` and
    `__getitem__`; the other methods have defaults they may override. `ConceptDataset.wrap` makes one of
    any indexable dataset.

    Attributes:
        label_names: the name of each global label number (the list index); `label_names[0]` is `"-"`,
            no label (pixels that are 0).
        categories: the category names, in the order categories are listed (ties of the primary
            category go to the first, SEMANTICS §1).
        root: the folder of the files the items are read from (see `files`), or None.
    """

    label_names: list[str]
    categories: list[str]
    root: Path | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Any, Mapping[str, Any]]:
        """Item `i`: `(image, labels)` (see the module docstring)."""
        raise NotImplementedError

    def labels(self, i: int) -> Mapping[str, Any]:
        """The labels of item `i` alone: indexing reads only these (an adapter skips decoding the image)."""
        return self[i][1]

    def split(self, i: int) -> str:
        """The split of item `i` (the `split` column of `index.csv`)."""
        return "train"

    def name(self, i: int) -> str:
        """A file stem for item `i`, unique in the dataset (`write_broden` names its files after it)."""
        return f"{i + 1:0{max(6, len(str(len(self))))}d}"

    def files(self, i: int) -> list[str]:
        """The files item `i` is read from, relative to `root` (none by default)."""
        return []

    def fingerprint(self) -> str | None:
        """A string that changes whenever the items change, or None: unknown, so the content is hashed.

        An adapter over files returns what identifies them without reading them (its arguments, the file
        names, the annotation files' bytes); a probe's cache also checks the sizes and modification times
        of `files`.
        """
        return None

    def where(self, i: int) -> str:
        """Item `i` as error messages name it."""
        return f"item {i} of {self!r}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} items)"

    @staticmethod
    def wrap(dataset: Any, label_names: Sequence[str], categories: Sequence[str], split: str = "train",
             fingerprint: str | None = None) -> ConceptDataset:
        """Any indexable dataset (`len(dataset)`, `dataset[i] -> (image, labels)`) as a `ConceptDataset`.

        Args:
            dataset: the items (a torch `Dataset`, a list, ...).
            label_names: the name of each label number, `[0] == "-"`.
            categories: the category names, in order.
            split: the split of every item.
            fingerprint: a string you change whenever the data changes; None hashes every item's content
                when a probe is built (each time, since nothing else tells a change).

        Example:
            >>> items = [(torch.rand(3, 8, 8), {"object": torch.ones(4, 4, dtype=torch.long)})]
            >>> ConceptDataset.wrap(items, ["-", "thing"], ["object"])
            WrappedDataset(1 items of list, categories ['object'])
        """
        return WrappedDataset(dataset, label_names, categories, split, fingerprint)


class WrappedDataset(ConceptDataset):
    """An indexable dataset of `(image, labels)` items with its label names and categories (`ConceptDataset.wrap`)."""

    def __init__(self, dataset: Any, label_names: Sequence[str], categories: Sequence[str], split: str = "train",
                 fingerprint: str | None = None) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise DatasetError(f"dataset={dataset!r} must support len() and indexing (dataset[i] -> (image, labels))")
        if not isinstance(split, str) or not split:
            raise DatasetError(f"split={split!r} must be a non-empty string")
        if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint):
            raise DatasetError(f"fingerprint={fingerprint!r} must be a non-empty string or None (hash the content)")
        self.dataset = dataset
        self.label_names = list(label_names)
        self.categories = list(categories)
        self._split, self._fingerprint = split, fingerprint

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, Mapping[str, Any]]:
        item = self.dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DatasetError(f"{self.where(i)} is a {type(item).__name__}, not a pair (image, labels)")
        return item[0], item[1]

    def split(self, i: int) -> str:
        return self._split

    def fingerprint(self) -> str | None:
        return self._fingerprint

    def __repr__(self) -> str:
        return f"WrappedDataset({len(self)} items of {type(self.dataset).__name__}, categories {self.categories})"


def relative_files(root: Path, paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """`paths` relative to `root` (as `ConceptDataset.files` returns them), with `/` separators."""
    return [Path(os.path.relpath(path, root)).as_posix() for path in paths]
