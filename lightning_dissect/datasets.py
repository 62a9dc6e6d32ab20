"""Segmentation datasets in the formats people have, as concept dictionaries (`ConceptDataset`s).

Each adapter is a thin layer over the format's own reader: it names the labels, maps the format's
label values to label numbers, and resizes every item to one size (a probe set holds images of one
size, as the released Broden does: 224 px images, 112 px label maps):

- `ImageMaskFolder`: a folder of images and a folder of same-named PNG masks (one folder per
  category for several categories, e.g. objects and parts), with a label list. No dependency.
- `VOCSegmentationConcepts`: PASCAL VOC segmentation through `torchvision.datasets.VOCSegmentation`.
- `CityscapesConcepts`: Cityscapes' fine semantic labels through `torchvision.datasets.Cityscapes`.
- `COCOConcepts`: COCO-format annotation files (COCO-Stuff, instances; RLE or polygons) through
  `pycocotools` (`pip install lightning-dissect[coco]`); one category per file, e.g. things and stuff.
- `COCOPanopticConcepts`: COCO panoptic (a JSON file and PNG segment maps, read as panopticapi defines
  them); things and stuff as two categories. No dependency.

torchvision and pycocotools are imported when an adapter that needs them is made. Images are
resized bilinearly (antialiased) to `image_size`, label maps by nearest neighbour to
`segmentation_size` (default half the image size, as in Broden), so label numbers are never blended.
A mask must have its image's size; a value that is not in the label list, an unreadable image or
mask, and a mask without its image are errors naming the item and the file.

Example:
    >>> from lightning_dissect import ProbeSet                                    # doctest: +SKIP
    >>> folder = ImageMaskFolder("data/images", "data/masks", "data/labels.txt")  # doctest: +SKIP
    >>> probe = ProbeSet.from_dataset(folder, size=500)                            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from lightning_dissect.concept_source import ConceptDataset, DatasetError, relative_files

__all__ = ["COCOConcepts", "COCOPanopticConcepts", "CityscapesConcepts", "ImageMaskFolder", "VOCSegmentationConcepts"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOC_VOID = 255  # the boundary band around VOC's objects: not labelled
_MASK_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")
_ADAPTER_VERSION = 1  # part of every adapter's fingerprint: bump when what an adapter reads changes


def _size_pair(value: int | Sequence[int] | None, argument: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{argument}={value!r} must be a positive int or (height, width), or None")
    return pair[0], pair[1]


class _Resize:
    """Every item to one size: the image bilinearly (antialiased), the label maps by nearest neighbour."""

    def __init__(self, image_size: int | Sequence[int] | None, segmentation_size: int | Sequence[int] | None) -> None:
        self.image_size = _size_pair(image_size, "image_size")
        self.segmentation_size = _size_pair(segmentation_size, "segmentation_size")

    def sizes(self, original: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """The `(h, w)` of the image and of the label maps, for an image of `original` `(h, w)`."""
        image = self.image_size or original
        return image, self.segmentation_size or (image[0] // 2, image[1] // 2)

    def image(self, image: Image.Image, where: str) -> Image.Image:
        size = self.sizes((image.height, image.width))[0]
        if (image.height, image.width) == size:
            return image  # decoded, and checked, by the reader of the item
        try:
            return image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        except (OSError, ValueError) as error:
            raise DatasetError(f"{where}: its image cannot be decoded ({error})") from None

    def label_map(self, labels: np.ndarray, original: tuple[int, int]) -> np.ndarray:
        size = self.sizes(original)[1]
        if labels.shape == size:
            return labels
        resized = Image.fromarray(labels.astype(np.int32), mode="I")
        return np.asarray(resized.resize((size[1], size[0]), Image.Resampling.NEAREST), dtype=np.int32)

    def maps(self, labels: Mapping[str, Sequence[np.ndarray]], image: Image.Image) -> dict[str, list[np.ndarray]]:
        """Per category, the label maps (at the size of `image`, not yet resized) resized."""
        return {name: [self.label_map(m, (image.height, image.width)) for m in maps] for name, maps in labels.items()}

    def item(self, image: Image.Image, labels: Mapping[str, Sequence[np.ndarray]], where: str
             ) -> tuple[Image.Image, dict[str, list[np.ndarray]]]:
        """An item resized: its image, and per category its label maps (at the image's original size)."""
        return self.image(image, where), self.maps(labels, image)

    def state(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "segmentation_size": self.segmentation_size}


def _open_image(path: Path, where: str) -> Image.Image:
    """An image file opened (its header read, its pixels decoded when used)."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise DatasetError(f"{where}: {path} is missing") from None
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        reason = "not an image PIL can identify" if isinstance(error, UnidentifiedImageError) else str(error)
        raise DatasetError(f"{where}: {path} cannot be decoded ({reason})") from None


def _read_mask(path: Path, where: str) -> np.ndarray:
    """The label values of a mask file: a PNG of numbers (modes L, P, I, I;16)."""
    with _open_image(path, where) as mask:
        if mask.mode not in _MASK_MODES:
            raise DatasetError(f"{where}: mask {path} is of mode {mask.mode}; a mask holds a label value at each "
                               f"pixel (modes {', '.join(_MASK_MODES)}): convert a colour-coded mask to values")
        try:
            return np.array(mask, dtype=np.int64)
        except (OSError, ValueError) as error:
            raise DatasetError(f"{where}: mask {path} cannot be decoded ({error})") from None


def _mapped(values: np.ndarray, table: np.ndarray, where: str, what: str, allowed: str) -> np.ndarray:
    """Label numbers of mask `values` through `table` (-1: a value not in the label list)."""
    outside = (values < 0) | (values >= len(table))
    numbers = table[np.where(outside, 0, values)]
    bad = outside | (numbers < 0)
    if bad.any():
        shown = ", ".join(str(v) for v in np.unique(values[bad])[:10].tolist())
        raise DatasetError(f"{where}: {what} holds value(s) {shown} not in the label list ({allowed})")
    return numbers.astype(np.int32)


def _check_size(mask: np.ndarray, image: Image.Image, where: str, what: str) -> None:
    if mask.shape != (image.height, image.width):
        raise DatasetError(f"{where}: {what} is {mask.shape[0]}x{mask.shape[1]} (h x w), its image is "
                           f"{image.height}x{image.width}; a mask has its image's size")


def _fingerprint(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"version": _ADAPTER_VERSION, **parts}, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------- a folder of images and masks


def _label_list(value: str | os.PathLike[str] | Sequence[str], argument: str) -> list[str]:
    """Names of the mask values 0, 1, 2, ...: a list, or a text file of one name per line."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except OSError as error:
            raise DatasetError(f"{argument}: the label list {path} cannot be read ({error})") from None
        while names and not names[-1]:
            names.pop()
        where = f"{path} line"
    else:
        names, where = list(value), f"{argument} item"
    if len(names) < 2:
        raise DatasetError(f"{argument}: the label list names {len(names)} value(s); it names the mask values 0 "
                           f"(no label), 1, 2, ...")
    for number, name in enumerate(names[1:], start=1):
        if not isinstance(name, str) or not name.strip():
            line = number + 1 if where.endswith("line") else number
            raise DatasetError(f"{argument}: {where} {line} names value {number} {name!r}; every value from 1 on "
                               f"needs a name")
    return names


class ImageMaskFolder(ConceptDataset):
    """A folder of images with same-named PNG masks, and a label list: the plainest segmentation format.

    Image `images/a/b.jpg` has the mask `masks/a/b.png` (a PNG of label values: mode L, P, I or I;16).
    Value 0 is no label; the label list names the values 0, 1, 2, ... (a list, or a text file with one name
    per line; the name of value 0, e.g. "background", is not a concept). For several categories (objects
    and parts), pass one masks folder and one label list per category; their values are numbered one after
    the other. An image without a mask in a category is not annotated there; a mask without its image is
    an error.

    Args:
        images: the folder of images (searched recursively: .jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp).
        masks: the folder of masks, or `{category: folder}`.
        labels: the label list (names or a file), or `{category: label list}` with the keys of `masks`.
        image_size: every image resized to this `(h, w)` (an int: square); None keeps the sizes (they must
            then agree for a probe).
        segmentation_size: the label maps' size; default half of the image size.
        ignore_values: mask values that mean no label, like 0 (e.g. 255, the void band of VOC-style masks).
        split: the split of every item.
        category: the category of a single masks folder.

    Raises:
        DatasetError: a missing folder, no image, a mask without its image, no image with a mask, or a
            bad label list.

    Example:
        >>> folder = ImageMaskFolder("data/images", {"object": "data/objects", "part": "data/parts"},
        ...                          {"object": "data/objects.txt", "part": "data/parts.txt"})  # doctest: +SKIP
    """

    root: Path

    def __init__(self, images: str | Path, masks: str | Path | Mapping[str, str | Path],
                 labels: str | Path | Sequence[str] | Mapping[str, str | Path | Sequence[str]],
                 image_size: int | tuple[int, int] | None = 224, segmentation_size: int | tuple[int, int] | None = None,
                 ignore_values: Sequence[int] = (), split: str = "train", category: str = "object") -> None:
        self.resize = _Resize(image_size, segmentation_size)
        self.images_folder = Path(images).expanduser().absolute()
        folders = dict(masks) if isinstance(masks, Mapping) else {category: masks}
        if isinstance(masks, Mapping):
            if not isinstance(labels, Mapping) or set(labels) != set(folders):
                raise DatasetError(f"masks has the categories {list(folders)}; labels must be a mapping with the same "
                                   f"keys, one label list per category")
            lists = {name: _label_list(labels[name], f"labels[{name!r}]") for name in folders}
        else:
            if isinstance(labels, Mapping):
                raise DatasetError("labels is a mapping but masks is one folder; pass masks={category: folder}")
            lists = {category: _label_list(labels, "labels")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ignore_values):
            raise DatasetError(f"ignore_values={list(ignore_values)!r} must be positive ints (0 is no label already)")
        self.ignore_values = sorted(set(ignore_values))
        self._split = split
        self.categories = list(folders)
        self.mask_folders = {name: Path(folder).expanduser().absolute() for name, folder in folders.items()}
        for what, folder in [("images", self.images_folder),
                             *((f"masks of {name}", path) for name, path in self.mask_folders.items())]:
            if not folder.is_dir():
                raise DatasetError(f"the {what} folder {folder} does not exist")
        if self.images_folder in self.mask_folders.values():
            raise DatasetError(f"{self.images_folder} is both the images and a masks folder; keep the masks apart")
        # Value v of category k is label number offset_k + v: the lists are numbered one after the other.
        self.label_names = ["-"]
        self.tables: dict[str, np.ndarray] = {}  # mask value -> label number, -1 for a value not in the list
        self.value_counts = {name: len(names) for name, names in lists.items()}
        for name, names in lists.items():
            table = np.full(max(len(names), max(self.ignore_values, default=0) + 1), -1, dtype=np.int64)
            table[: len(names)] = np.arange(len(names)) + len(self.label_names) - 1
            table[[0, *self.ignore_values]] = 0
            self.tables[name] = table
            self.label_names += names[1:]
        self.items = sorted(path.relative_to(self.images_folder).as_posix() for path in self.images_folder.rglob("*")
                            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())
        if not self.items:
            raise DatasetError(f"{self.images_folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        stems = {os.path.splitext(item)[0]: item for item in self.items}
        if len(stems) != len(self.items):
            raise DatasetError(f"{self.images_folder} holds two images of one name with different extensions; "
                               f"their masks could not be told apart")
        self.masks: dict[str, list[str | None]] = {}
        for name, folder in self.mask_folders.items():
            found = {path.relative_to(folder).with_suffix("").as_posix() for path in folder.rglob("*.png")}
            orphans = sorted(found - set(stems))
            if orphans:
                raise DatasetError(f"mask {folder / orphans[0]}.png has no image {self.images_folder / orphans[0]}.* "
                                   f"({len(orphans)} such mask(s)); masks are named as their images")
            self.masks[name] = [f"{os.path.splitext(item)[0]}.png" if os.path.splitext(item)[0] in found else None
                                for item in self.items]
        if not any(mask for masks_of in self.masks.values() for mask in masks_of):
            raise DatasetError(f"no image of {self.images_folder} has a mask in {', '.join(map(str, folders.values()))}"
                               f"; the mask of images/a.jpg is masks/a.png")
        self.root = Path(os.path.commonpath([self.images_folder, *self.mask_folders.values()]))

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"ImageMaskFolder({str(self.images_folder)!r}, {len(self)} images, categories {self.categories})"

    def where(self, i: int) -> str:
        return f"item {i} ({self.images_folder / self.items[i]}) of {self!r}"

    def split(self, i: int) -> str:
        return self._split

    def name(self, i: int) -> str:
        return os.path.splitext(self.items[i])[0]

    def files(self, i: int) -> list[str]:
        paths = [self.images_folder / self.items[i]]
        paths += [self.mask_folders[name] / mask for name, masks in self.masks.items() if (mask := masks[i])]
        return relative_files(self.root, paths)

    def fingerprint(self) -> str:
        return _fingerprint({"adapter": "ImageMaskFolder", **self.resize.state(), "labels": self.label_names,
                             "categories": self.categories, "ignore": self.ignore_values, "split": self._split,
                             "items": self.items, "masks": self.masks})

    def _labels(self, i: int, image: Image.Image) -> dict[str, Any]:
        where, labels = self.where(i), {}
        for name, masks in self.masks.items():
            mask = masks[i]
            if mask is None:
                continue  # not annotated in this category
            path = self.mask_folders[name] / mask
            values = _read_mask(path, where)
            _check_size(values, image, where, f"mask {path}")
            ignored = f", and ignored {', '.join(map(str, self.ignore_values))}" if self.ignore_values else ""
            numbers = _mapped(values, self.tables[name], where, f"mask {path}",
                              f"{name} values 0 to {self.value_counts[name] - 1}{ignored}")
            labels[name] = [numbers]
        return labels

    def labels(self, i: int) -> dict[str, Any]:
        with _open_image(self.images_folder / self.items[i], self.where(i)) as image:  # the header: its size
            return self.resize.maps(self._labels(i, image), image)

    def __getitem__(self, i: int) -> tuple[Image.Image, dict[str, Any]]:
        image = _open_image(self.images_folder / self.items[i], self.where(i))
        return self.resize.item(image, self._labels(i, image), self.where(i))


# ---------------------------------------------------------------------- torchvision


def _torchvision_datasets() -> Any:
    try:
        import torchvision.datasets
    except ImportError as error:
        raise ImportError(f"this adapter reads the dataset with torchvision, which is not installed ({error}); "
                          f"pip install torchvision") from None
    return torchvision.datasets


class _TorchvisionPairs(ConceptDataset):
    """A torchvision dataset of `(image, target)` pairs whose target values map to objects through a table.

    Subclasses set `reader` (the torchvision dataset), `order` (the reader's items in path order: the
    readers list folders in the file system's order, which differs between machines), `table` (target
    value -> label number, -1 for a value that is not in the label list), `allowed` (the values, for
    messages), `label_names`, `root`, `split_name`, and the file paths `image_path(i)`, `target_path(i)`.
    """

    categories = ["object"]
    root: Path
    reader: Any
    order: list[int]
    table: np.ndarray
    allowed: str
    split_name: str
    resize: _Resize

    def image_path(self, i: int) -> str:
        raise NotImplementedError

    def target_path(self, i: int) -> str:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.reader)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, {self.split_name}, {len(self)} images)"

    def where(self, i: int) -> str:
        return f"item {i} ({self.image_path(i)}) of {self!r}"

    def split(self, i: int) -> str:
        return self.split_name

    def files(self, i: int) -> list[str]:
        return relative_files(self.root, [self.image_path(i), self.target_path(i)])

    def fingerprint(self) -> str:
        return _fingerprint({"adapter": type(self).__name__, **self.resize.state(), "split": self.split_name,
                             "labels": self.label_names, "table": self.table.tolist(),
                             "files": [self.files(i) for i in range(len(self))]})

    def __getitem__(self, i: int) -> tuple[Image.Image, dict[str, Any]]:
        where = self.where(i)
        try:
            image, target = self.reader[self.order[i]]
        except (OSError, UnidentifiedImageError) as error:  # PIL's, as the reader opens the files
            raise DatasetError(f"{where}: its image or {self.target_path(i)} cannot be decoded ({error})") from None
        values = np.array(target, dtype=np.int64)
        _check_size(values, image, where, f"target {self.target_path(i)}")
        numbers = _mapped(values, self.table, where, f"target {self.target_path(i)}", self.allowed)
        return self.resize.item(image, {"object": [numbers]}, where)


class VOCSegmentationConcepts(_TorchvisionPairs):
    """PASCAL VOC's segmentation set, read by `torchvision.datasets.VOCSegmentation`: its 20 classes as objects.

    Mask value 0 (background) and 255 (the void band around objects) are no label; 1 to 20 are the
    classes, label numbers 1 to 20 in VOC's order.

    Args:
        root: the folder holding `VOCdevkit/VOC<year>` (torchvision's `root`).
        year, image_set: as for `VOCSegmentation` (e.g. "2012", "val"); `image_set` is the items' split.
        image_size, segmentation_size: the size of every item (see `ImageMaskFolder`).

    Raises:
        ImportError: torchvision is not installed.
        RuntimeError: torchvision finds no dataset at `root` (its message).
    """

    label_names = ["-", *VOC_CLASSES]

    def __init__(self, root: str | Path, year: str = "2012", image_set: str = "val",
                 image_size: int | tuple[int, int] | None = 224,
                 segmentation_size: int | tuple[int, int] | None = None) -> None:
        self.resize = _Resize(image_size, segmentation_size)
        self.reader = _torchvision_datasets().VOCSegmentation(str(root), year=year, image_set=image_set,
                                                              download=False)
        self.order = list(range(len(self.reader)))  # the order of ImageSets/Segmentation/<image_set>.txt
        self.split_name = image_set
        self.year = year
        self.root = Path(root).expanduser().absolute()
        self.table = np.full(256, -1, dtype=np.int64)
        self.table[: len(VOC_CLASSES) + 1] = np.arange(len(VOC_CLASSES) + 1)
        self.table[VOC_VOID] = 0
        self.allowed = f"VOC values 0 to {len(VOC_CLASSES)}, and {VOC_VOID}"

    def image_path(self, i: int) -> str:
        return self.reader.images[self.order[i]]

    def target_path(self, i: int) -> str:
        return self.reader.masks[self.order[i]]

    def name(self, i: int) -> str:
        return Path(self.image_path(i)).stem

    def fingerprint(self) -> str:
        return _fingerprint({"base": super().fingerprint(), "year": self.year})


class CityscapesConcepts(_TorchvisionPairs):
    """Cityscapes' fine semantic labels, read by `torchvision.datasets.Cityscapes`: its 19 evaluated classes.

    The classes Cityscapes evaluates (road, sidewalk, building, ... bicycle) are label numbers 1 to 19 in
    their train-id order; every other label id (unlabeled, ego vehicle, ...) is no label.

    Args:
        root: the folder holding `leftImg8bit/` and `gtFine/` (torchvision's `root`).
        split: "train", "val" or "test".
        image_size, segmentation_size: the size of every item; Cityscapes is 1024 x 2048, so e.g.
            `image_size=(256, 512)` keeps its shape (see `ImageMaskFolder`).

    Raises:
        ImportError: torchvision is not installed.
        RuntimeError, ValueError: torchvision finds no dataset at `root` (its message).
    """

    def __init__(self, root: str | Path, split: str = "val", image_size: int | tuple[int, int] | None = 224,
                 segmentation_size: int | tuple[int, int] | None = None) -> None:
        datasets = _torchvision_datasets()
        self.resize = _Resize(image_size, segmentation_size)
        self.reader = datasets.Cityscapes(str(root), split=split, mode="fine", target_type="semantic")
        self.order = sorted(range(len(self.reader)), key=lambda i: self.reader.images[i])
        self.split_name = split
        self.root = Path(root).expanduser().absolute()
        classes = datasets.Cityscapes.classes
        evaluated = sorted((c for c in classes if not c.ignore_in_eval), key=lambda c: c.train_id)
        self.label_names = ["-", *(c.name for c in evaluated)]
        self.table = np.zeros(max(c.id for c in classes) + 1, dtype=np.int64)
        for number, cityscapes_class in enumerate(evaluated, start=1):
            self.table[cityscapes_class.id] = number
        self.allowed = f"Cityscapes label ids 0 to {len(self.table) - 1}"

    def image_path(self, i: int) -> str:
        return self.reader.images[self.order[i]]

    def target_path(self, i: int) -> str:
        return self.reader.targets[self.order[i]][0]

    def name(self, i: int) -> str:
        path = Path(self.image_path(i))
        return f"{path.parent.name}/{path.stem}"


# ---------------------------------------------------------------------- COCO (pycocotools)


class COCOConcepts(ConceptDataset):
    """COCO-format annotations (COCO-Stuff, instances; RLE or polygon masks), read by `pycocotools`.

    Each annotation file is one category (`{"object": instances.json, "stuff": stuff.json}`, or one file:
    category "object"); its COCO categories, in id order, are the labels, numbered one file after the
    other. The items are the images of the first file, in id order; an image missing from another file is
    not annotated in that category. Every annotation's mask (`COCO.annToMask`) is drawn in the first label
    map of its category where it overlaps no other label (so overlapping instances of different classes
    land in separate maps, and each label's pixels are exactly the union of its masks); crowd regions are
    labelled like the others.

    Args:
        images: the folder of the images (`file_name` of the annotations).
        annotations: a COCO annotation file, or `{category: file}`.
        image_size, segmentation_size: the size of every item (see `ImageMaskFolder`).
        exclude: COCO category names left out (e.g. `["other"]`, COCO-Stuff's label for all things).
        split: the split of every item.

    Raises:
        ImportError: pycocotools is not installed (`pip install lightning-dissect[coco]`).
        DatasetError: a missing folder or file, or an unreadable annotation file.
    """

    root: Path

    def __init__(self, images: str | Path, annotations: str | Path | Mapping[str, str | Path],
                 image_size: int | tuple[int, int] | None = 224, segmentation_size: int | tuple[int, int] | None = None,
                 exclude: Sequence[str] = (), split: str = "val") -> None:
        try:
            from pycocotools.coco import COCO
        except ImportError as error:
            raise ImportError(f"COCOConcepts reads annotations with pycocotools, which is not installed ({error}); "
                              f"pip install lightning-dissect[coco]") from None
        self.resize = _Resize(image_size, segmentation_size)
        self.images_folder = Path(images).expanduser().absolute()
        if not self.images_folder.is_dir():
            raise DatasetError(f"the images folder {self.images_folder} does not exist")
        files = dict(annotations) if isinstance(annotations, Mapping) else {"object": annotations}
        self.annotation_files = {name: Path(path).expanduser().absolute() for name, path in files.items()}
        self.categories = list(files)
        self.exclude = sorted(set(exclude))
        self._split = split
        self.cocos: dict[str, Any] = {}
        self.numbers: dict[str, dict[int, int]] = {}  # per category: COCO category id -> label number
        self.label_names = ["-"]
        for name, path in self.annotation_files.items():
            if not path.is_file():
                raise DatasetError(f"the annotation file {path} of {name} does not exist")
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
                    coco = COCO(str(path))
            except (ValueError, KeyError, TypeError, AssertionError) as error:
                raise DatasetError(f"the annotation file {path} is not a COCO annotation file ({error!r})") from None
            self.cocos[name] = coco
            self.numbers[name] = {}
            for category in sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"]):
                if category["name"] not in self.exclude:
                    self.numbers[name][category["id"]] = len(self.label_names)
                    self.label_names.append(category["name"])
        first = self.cocos[self.categories[0]]
        self.image_ids = sorted(first.getImgIds())
        if not self.image_ids:
            raise DatasetError(f"the annotation file {self.annotation_files[self.categories[0]]} lists no image")
        self.root = Path(os.path.commonpath([self.images_folder, *(p.parent for p in self.annotation_files.values())]))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"COCOConcepts({str(self.images_folder)!r}, {len(self)} images, categories {self.categories})"

    def _file_name(self, i: int) -> str:
        return self.cocos[self.categories[0]].imgs[self.image_ids[i]]["file_name"]

    def where(self, i: int) -> str:
        return f"item {i} (image id {self.image_ids[i]}, {self.images_folder / self._file_name(i)}) of {self!r}"

    def split(self, i: int) -> str:
        return self._split

    def name(self, i: int) -> str:
        return os.path.splitext(self._file_name(i))[0]

    def files(self, i: int) -> list[str]:
        return relative_files(self.root, [self.images_folder / self._file_name(i)])

    def fingerprint(self) -> str:
        return _fingerprint({"adapter": "COCO", **self.resize.state(), "exclude": self.exclude, "split": self._split,
                             "annotations": {name: _file_sha256(path) for name, path in self.annotation_files.items()}})

    def _labels(self, i: int, image: Image.Image) -> dict[str, Any]:
        where, image_id = self.where(i), self.image_ids[i]
        labels: dict[str, Any] = {}
        for name, coco in self.cocos.items():
            if image_id not in coco.imgs:
                continue  # not annotated in this category
            maps: list[np.ndarray] = []
            for annotation in sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: a["id"]):
                category_id = annotation.get("category_id")
                number = self.numbers[name].get(category_id)
                if number is None:
                    if category_id in coco.cats:
                        continue  # excluded
                    raise DatasetError(f"{where}: annotation {annotation.get('id')} in "
                                       f"{self.annotation_files[name]} has category_id {category_id}, not one of its "
                                       f"categories")
                try:
                    mask = coco.annToMask(annotation).astype(bool)
                except (ValueError, TypeError, KeyError, IndexError) as error:
                    raise DatasetError(f"{where}: annotation {annotation.get('id')} in {self.annotation_files[name]} "
                                       f"has no readable segmentation ({error!r})") from None
                _check_size(mask, image, where, f"the mask of annotation {annotation.get('id')}")
                for labels_map in maps:  # the first map where the mask meets no other label
                    under = labels_map[mask]
                    if bool(((under == 0) | (under == number)).all()):
                        labels_map[mask] = number
                        break
                else:
                    maps.append(np.where(mask, number, 0).astype(np.int32))
            labels[name] = maps
        return labels

    def labels(self, i: int) -> dict[str, Any]:
        with _open_image(self.images_folder / self._file_name(i), self.where(i)) as image:  # the header: its size
            return self.resize.maps(self._labels(i, image), image)

    def __getitem__(self, i: int) -> tuple[Image.Image, dict[str, Any]]:
        image = _open_image(self.images_folder / self._file_name(i), self.where(i))
        return self.resize.item(image, self._labels(i, image), self.where(i))


# ---------------------------------------------------------------------- COCO panoptic (JSON + PNG segments)


class COCOPanopticConcepts(ConceptDataset):
    """COCO panoptic annotations: a JSON file and a folder of PNG segment maps (no extra dependency).

    pycocotools does not read the panoptic format; its reference reader (cocodataset/panopticapi) is a
    JSON file and `rgb2id`: a PNG pixel `(R, G, B)` belongs to segment `R + 256 G + 256^2 B`, 0 being no
    segment, and each annotation's `segments_info` gives every segment's `category_id`. That is all this
    adapter reads (json and PIL). The COCO categories, in id order, are the labels; things (`isthing` 1)
    are category "object" and stuff (`isthing` 0) category "stuff", one label map each (panoptic segments
    never overlap). The items are the annotations' images in id order; both categories are annotated on
    every image that has an annotation, crowd segments labelled like the others.

    Args:
        images: the folder of the images (`file_name` of the JSON's images).
        annotations: the panoptic JSON file (`panoptic_val2017.json`).
        segments: the folder of its PNG files (`panoptic_val2017/`; default: the JSON's name without `.json`
            beside it).
        image_size, segmentation_size: the size of every item (see `ImageMaskFolder`).
        exclude: COCO category names left out (their pixels: no label).
        split: the split of every item.

    Raises:
        DatasetError: a missing folder or file, an unreadable annotation file, or (per item, naming it) a
            segment map of the wrong size, a segment id not in `segments_info`, a category id not in the
            JSON's categories.
    """

    root: Path
    CATEGORIES = {1: "object", 0: "stuff"}  # isthing -> the category, in the order categories are listed

    def __init__(self, images: str | Path, annotations: str | Path, segments: str | Path | None = None,
                 image_size: int | tuple[int, int] | None = 224, segmentation_size: int | tuple[int, int] | None = None,
                 exclude: Sequence[str] = (), split: str = "val") -> None:
        self.resize = _Resize(image_size, segmentation_size)
        self.images_folder = Path(images).expanduser().absolute()
        self.annotation_file = Path(annotations).expanduser().absolute()
        self.segments_folder = (Path(segments).expanduser().absolute() if segments is not None
                                else self.annotation_file.with_suffix(""))
        for what, folder in (("images", self.images_folder), ("segments", self.segments_folder)):
            if not folder.is_dir():
                raise DatasetError(f"the {what} folder {folder} does not exist")
        if not self.annotation_file.is_file():
            raise DatasetError(f"the annotation file {self.annotation_file} does not exist")
        self.exclude = sorted(set(exclude))
        self._split = split
        try:
            content = json.loads(self.annotation_file.read_text(encoding="utf-8"))
            images_by_id = {entry["id"]: entry for entry in content["images"]}
            self.annotations = {entry["image_id"]: entry for entry in content["annotations"]}
            categories = sorted(content["categories"], key=lambda c: c["id"])
            self.category_of = {c["id"]: self.CATEGORIES[int(bool(c.get("isthing", 1)))] for c in categories}
            names = {c["id"]: str(c["name"]) for c in categories}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise DatasetError(f"the annotation file {self.annotation_file} is not a COCO panoptic annotation file "
                               f"({error!r})") from None
        self.label_names = ["-"]
        self.numbers: dict[int, int] = {}  # COCO category id -> label number (excluded: 0)
        for category_id, name in names.items():
            if name in self.exclude:
                self.numbers[category_id] = 0
            else:
                self.numbers[category_id] = len(self.label_names)
                self.label_names.append(name)
        self.categories = [name for name in self.CATEGORIES.values() if name in self.category_of.values()]
        self.image_ids = sorted(image_id for image_id in self.annotations if image_id in images_by_id)
        if not self.image_ids:
            raise DatasetError(f"the annotation file {self.annotation_file} annotates no image it lists")
        self.file_names = {image_id: images_by_id[image_id]["file_name"] for image_id in self.image_ids}
        self.root = Path(os.path.commonpath([self.images_folder, self.segments_folder, self.annotation_file.parent]))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"COCOPanopticConcepts({str(self.images_folder)!r}, {len(self)} images)"

    def _image_file(self, i: int) -> Path:
        return self.images_folder / self.file_names[self.image_ids[i]]

    def _segment_file(self, i: int) -> Path:
        return self.segments_folder / self.annotations[self.image_ids[i]]["file_name"]

    def where(self, i: int) -> str:
        return f"item {i} (image id {self.image_ids[i]}, {self._image_file(i)}) of {self!r}"

    def split(self, i: int) -> str:
        return self._split

    def name(self, i: int) -> str:
        return os.path.splitext(self.file_names[self.image_ids[i]])[0]

    def files(self, i: int) -> list[str]:
        return relative_files(self.root, [self._image_file(i), self._segment_file(i)])

    def fingerprint(self) -> str:
        return _fingerprint({"adapter": "COCO panoptic", **self.resize.state(), "exclude": self.exclude,
                             "split": self._split, "annotations": _file_sha256(self.annotation_file),
                             "segments": str(self.segments_folder)})

    def _labels(self, i: int, image: Image.Image) -> dict[str, Any]:
        where, path = self.where(i), self._segment_file(i)
        with _open_image(path, where) as segments_image:
            if segments_image.mode != "RGB":
                raise DatasetError(f"{where}: segment map {path} is of mode {segments_image.mode}; a panoptic PNG is "
                                   f"RGB (segment id R + 256 G + 256^2 B)")
            try:
                rgb = np.array(segments_image, dtype=np.int64)
            except (OSError, ValueError) as error:
                raise DatasetError(f"{where}: segment map {path} cannot be decoded ({error})") from None
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]  # panopticapi's rgb2id
        _check_size(ids, image, where, f"segment map {path.name}")
        maps = {category: np.zeros(ids.shape, np.int32) for category in self.categories}
        listed = set()
        for segment in self.annotations[self.image_ids[i]].get("segments_info", []):
            category_id = segment.get("category_id")
            if category_id not in self.numbers:
                raise DatasetError(f"{where}: segment {segment.get('id')} in {self.annotation_file.name} has "
                                   f"category_id {category_id}, not one of its categories")
            listed.add(segment.get("id"))
            maps[self.category_of[category_id]][ids == segment.get("id")] = self.numbers[category_id]
        unlisted = sorted(set(np.unique(ids).tolist()) - listed - {0})
        if unlisted:
            raise DatasetError(f"{where}: segment map {path} holds segment id(s) "
                               f"{', '.join(map(str, unlisted[:10]))} that its segments_info does not list")
        return {category: [label_map] for category, label_map in maps.items()}

    def labels(self, i: int) -> dict[str, Any]:
        with _open_image(self._image_file(i), self.where(i)) as image:
            return self.resize.maps(self._labels(i, image), image)

    def __getitem__(self, i: int) -> tuple[Image.Image, dict[str, Any]]:
        image = _open_image(self._image_file(i), self.where(i))
        return self.resize.item(image, self._labels(i, image), self.where(i))
