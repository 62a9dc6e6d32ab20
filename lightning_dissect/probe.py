"""ProbeSet: a fixed, seeded subset of a Broden dataset, decoded once into arrays that live on disk.

Decoding JPEGs and PNG label maps is the slow part of a dissection, and the labels never change, so a
probe set decodes its images once (in worker processes, chunk by chunk) and writes the arrays to a
cache folder named by its fingerprint (the dataset's csv files and the selection), valid while every
file it decoded keeps its size and modification time. The cache is a folder of fixed-size files that
is mapped, not loaded (`probe_storage`), so opening a cached probe takes constant memory and, besides
one `stat` per decoded file, constant time; a dissection reads one batch at a time (`model_input`,
`labels`, `stream`). The model-independent quantities of SEMANTICS §3 and §4 (canonical labels, label
areas `G(c)`, category presence) are computed here, once, chunk by chunk.

Where the probe lives:
- In the cache (`cache_dir`, default `cache_root() / "probes"`), mapped.
- Without a cache (`cache_dir=False`, or a cache folder that cannot be written: read-only, full; a
  warning says so once): in memory when its arrays take at most `MEMORY_PROBE_BYTES` (1 GiB, about
  4,000 images at 224 px), else in files in a temporary folder that are deleted as soon as they are
  mapped (the mapping keeps them until the probe is gone; nothing is left behind, even after a crash).
- On an accelerator: a probe whose per-image arrays take at most `device_budget_bytes` (default
  1 GiB) is copied whole to the device at its first batch and kept there between dissections (until
  `release()`); a larger one is read from the cache batch by batch (`stream`: pinned, copied with
  `non_blocking=True`, the next batches read ahead). On the CPU every probe is read batch by batch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import operator
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from lightning_dissect.broden import Broden, BrodenError
from lightning_dissect.cache import cache_root
from lightning_dissect.concept_source import ConceptDataset, ConceptSource, DatasetError
from lightning_dissect.dataset_source import DatasetSource
from lightning_dissect.engine.labels import canonical_labels, category_presence, label_area
from lightning_dissect.engine.prefetch import prefetched
from lightning_dissect.probe_storage import (
    ArraySpec,
    ArrayWriter,
    CacheInvalid,
    CacheWriteError,
    Manifest,
    MappedArrays,
    MemoryArrays,
    build_lock,
    files_stats,
    listed_files,
    publish,
    read_manifest,
    remove_stale_staging,
    require_free_space,
    staging_folder,
    write_manifest,
)
from lightning_dissect.workers import default_workers, ordered_chunks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEVICE_BUDGET_BYTES = 2**30
MEMORY_PROBE_BYTES = 2**30
# Part of the fingerprint that results record: it names the selection rule, not the cache format
# (probe_storage.CACHE_VERSION), so a new cache format keeps the fingerprints of old results.
_FINGERPRINT_FORMAT = 1
_CHUNK_IMAGES = 64
_PER_IMAGE = ("images", "label_maps", "image_labels", "category_present", "image_level_present")
_LABELS = ("label_maps", "image_labels", "category_present", "image_level_present")
_warned: set[str] = set()


class ImageTransform:
    """Float images in [0, 1] `(B, 3, H, W)` -> model input: optional resize, then mean/std normalisation.

    Args:
        mean, std: per-channel normalisation (ImageNet's by default).
        size: `(height, width)` to resize to (bilinear, antialiased), or None to keep the size.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 size: tuple[int, int] | None = None) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.size = size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        # One new batch-sized tensor, not two: `(images - mean) / std` with the same operations, the same bits.
        return (images - mean).div_(std)

    def __repr__(self) -> str:
        return f"ImageTransform(mean={self.mean}, std={self.std}, size={self.size})"


def _image_size(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"image_size={value!r} must be a positive int or (height, width)")
    return size


def _draw(candidates: Sequence[int], size: int | None, seed: int) -> list[int]:
    """`size` of the candidate rows drawn with `seed`, ascending (all of them for None or more): the first
    `size` of one seeded permutation, so a smaller draw is a subset of a larger one."""
    if size is None or size >= len(candidates):
        return list(candidates)
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:size]
    return sorted(candidates[i] for i in order.tolist())


class ProbeLabels(NamedTuple):
    """The label tensors of a batch of probe images, in the order the tally takes them (SEMANTICS §3)."""

    label_maps: torch.Tensor
    image_labels: torch.Tensor
    present: torch.Tensor
    image_level_present: torch.Tensor


class ProbeBatch(NamedTuple):
    """One batch of `ProbeSet.stream`: the probe positions, the model input and the labels (None when not asked)."""

    positions: list[int]
    inputs: torch.Tensor | None
    labels: ProbeLabels | None


def _nbytes(specs: dict[str, ArraySpec]) -> int:
    return sum(spec.nbytes for spec in specs.values())


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


# ---------------------------------------------------------------------- decoding


@dataclass(frozen=True, eq=False)
class _ChunkDecoder:
    """Decodes rows of the dataset into the probe's arrays: canonical labels, label areas, presence."""

    source: ConceptSource
    categories: list[str]
    label_category: torch.Tensor
    specs: dict[str, ArraySpec]

    def __call__(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        n, specs = len(rows), self.specs
        images = torch.empty((n, *specs["images"].shape[1:]), dtype=torch.uint8)
        label_maps = torch.zeros((n, *specs["label_maps"].shape[1:]), dtype=specs["label_maps"].dtype)
        image_labels = torch.zeros((n, specs["image_labels"].shape[1]), dtype=torch.long)
        for position, i in enumerate(rows):
            image, maps, labels = self.source.read_item(i, self.categories)
            if image.shape != images.shape[1:]:  # a dataset's items tell their size when decoded
                raise DatasetError(
                    f"{self.source.where(i)}: its image is {image.shape[1]}x{image.shape[2]} (h x w), the probe's "
                    f"images are {images.shape[2]}x{images.shape[3]} (the first row's); a probe set needs one size: "
                    f"resize the images (the adapters of lightning_dissect.datasets take image_size=)")
            if len(maps) > label_maps.shape[1] or len(labels) > image_labels.shape[1]:
                raise DatasetError(f"{self.source.where(i)} has more labels than when it was indexed: the dataset "
                                   f"changed while it was read")
            images[position] = image
            for slot, label_map in enumerate(maps):
                label_maps[position, slot] = label_map
            image_labels[position, : len(labels)] = torch.tensor(labels, dtype=torch.long)
        label_maps, image_labels = canonical_labels(label_maps, image_labels, self.label_category)
        num_categories = specs["category_present"].shape[1]
        present, image_level = category_presence(label_maps, image_labels, self.label_category, num_categories)
        area = label_area(label_maps, image_labels, specs["label_area"].shape[0])
        return {"images": images.numpy(), "label_maps": label_maps.numpy(), "image_labels": image_labels.numpy(),
                "category_present": present.numpy(), "image_level_present": image_level.numpy(),
                "label_area": area.numpy()}


# ---------------------------------------------------------------------- streaming


class _DeviceCopier:
    """Moves CPU batches to the device. On CUDA the copies run on their own stream, from pinned memory,
    issued by the prefetch thread, so the next batch travels while the current one is computed on."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def send(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        """In the producing thread: start the copies; returns the device tensors and their ready event."""
        if self.stream is None:
            return tensors, None
        with torch.cuda.stream(self.stream):
            moved = {name: value.to(self.device, non_blocking=True) for name, value in tensors.items()}
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return moved, ready

    def receive(self, tensors: dict[str, torch.Tensor], ready: Any) -> dict[str, torch.Tensor]:
        """In the consuming thread: the tensors on the device, usable on its current stream."""
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for value in tensors.values():
                value.record_stream(current)  # freed memory is not reused while `current` still reads it
            return tensors
        return {name: value.to(self.device) for name, value in tensors.items()}


class ProbeSet:
    """A fixed subset of a Broden dataset (or of any segmentation dataset), decoded into arrays on disk, in probe order.

    Args:
        source: a `Broden`, the path of a Broden directory, or a `DatasetSource` (see `from_dataset`).
        size: number of images; None for all (of the split).
        seed: seed of the subset draw; the same seed gives the same rows.
        split: keep only rows of this `split` value (e.g. "val"); None for all.
        categories: dissect only these categories (SEMANTICS §1); None for all.
        image_size: resize images to this size for the model; segmentations keep theirs.
        cache_dir: where decoded probe sets are cached; default `cache_root() / "probes"`.
            Pass False to disable the cache (the probe then lives in memory up to
            `MEMORY_PROBE_BYTES`, beyond that in deleted temporary files).
        transform: float images in [0, 1] -> model input; default ImageNet mean/std
            (and the `image_size` resize).
        progress: show a progress bar (images/s) while decoding.
        workers: processes decoding (threads where processes cannot be forked); default
            `min(8, os.cpu_count())`; 1 decodes in this process.
        device_budget_bytes: a probe whose per-image arrays take at most this many bytes is kept
            whole on an accelerator between dissections; a larger one is read batch by batch (as
            every probe is on the CPU). Default `DEVICE_BUDGET_BYTES` (1 GiB: about 4,000 images
            at 224 px with Broden's label maps).

    Attributes:
        source: what the probe was drawn from (`broden`: the same when it is a `Broden`, else None).
        rows: 0-based `index.csv` rows (dataset items), in probe order (ascending).
        images: uint8 `(N, 3, ih, iw)`.
        label_maps: canonical pixel labels `(N, M, sh, sw)` (int16, or int32 for large label sets).
        image_labels: canonical image-level labels, long `(N, L)`, 0-padded.
        label_category: long `(C,)`, primary category index per label (-1: never scored).
        label_area: long `(C,)`, `G(c)`.
        category_present, image_level_present: bool `(N, n_categories)`.
        fingerprint: identifies the data and the selection; results record it.
        cache_folder: the cache folder the arrays are mapped from; None when the probe is not cached.

        The arrays are mapped from the cache: reading a slice reads those bytes only, and writing to
        them changes this process's copy, never the cache.

    Raises:
        ValueError: an argument out of range (names it).
        BrodenError: the dataset is broken (names the file and row); `DatasetError` for a dataset's item.

    Example:
        >>> probe = ProbeSet("data/broden1_224", size=2000, seed=0)   # doctest: +SKIP
        >>> probe.images.shape                                          # doctest: +SKIP
        torch.Size([2000, 3, 224, 224])
        >>> batch = probe.model_input(range(64), "cuda")                # doctest: +SKIP
    """

    def __init__(self, source: ConceptSource | str | os.PathLike, size: int | None = None, seed: int = 0,
                 split: str | None = None, categories: Sequence[str] | None = None,
                 image_size: int | Sequence[int] | None = None, cache_dir: str | os.PathLike | bool | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: bool = False,
                 workers: int | None = None, device_budget_bytes: int = DEVICE_BUDGET_BYTES) -> None:
        self.source: ConceptSource = Broden(source) if isinstance(source, (str, os.PathLike)) else source
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"size={size!r} must be a positive integer or None (all images)")
        if not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer")
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
            raise ValueError(f"workers={workers!r} must be a positive integer or None (one per core, up to 8)")
        if not isinstance(device_budget_bytes, int) or isinstance(device_budget_bytes, bool) or device_budget_bytes < 0:
            raise ValueError(f"device_budget_bytes={device_budget_bytes!r} must be a non-negative integer")
        self.image_size = _image_size(image_size)
        self.transform = transform if transform is not None else ImageTransform(size=self.image_size)
        data = self.source
        primary = data.primary_categories(categories)  # validates the names
        selected = set(categories) if categories is not None else set(data.categories)
        self.categories = [name for name in data.categories if name in selected]
        self.label_names = list(data.label_names)
        self.label_category = torch.tensor(
            [self.categories.index(name) if name is not None else -1 for name in primary], dtype=torch.long
        )
        candidates = list(range(len(data)))
        if split is not None:
            splits = sorted(set(data.splits))
            if split not in splits:
                raise ValueError(f"split={split!r} is not a split of {data.describe()}; splits: {splits}")
            candidates = [i for i in candidates if data.splits[i] == split]
        if size is not None and size > len(candidates):
            where = f"split {split!r} of " if split is not None else ""
            raise ValueError(f"size={size} but {where}{data.describe()} has only {len(candidates)} images")
        if not candidates:
            raise ValueError(f"the probe set of {data.describe()} is empty")
        self._candidates = candidates
        self.rows = _draw(candidates, size, seed)
        self.seed, self.split = seed, split
        self.fingerprint = self._fingerprint()
        self.workers = workers if workers is not None else default_workers()
        self.device_budget_bytes = device_budget_bytes
        self._device_tensors: dict[str, Any] = {}
        first = data.item_layout(self.rows[0], self.categories)
        image_size_of_first = first.image_size
        if image_size_of_first is None:  # known once decoded (a dataset's item)
            image = data.read_item(self.rows[0], [])[0]
            image_size_of_first = (int(image.shape[1]), int(image.shape[2]))
        self._sizes = (image_size_of_first, first.segmentation_size)
        self._storage, self.cache_folder = self._load(cache_dir, progress)
        self._specs = self._storage.specs
        self._set_arrays()

    @classmethod
    def from_dataset(cls, dataset: Any, label_names: Sequence[str] | None = None,
                     categories: Sequence[str] | None = None, *, fingerprint: str | None = None,
                     size: int | None = None, seed: int = 0, split: str | None = None,
                     image_size: int | Sequence[int] | None = None,
                     cache_dir: str | os.PathLike | bool | None = None,
                     transform: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: bool = False,
                     workers: int | None = None, device_budget_bytes: int = DEVICE_BUDGET_BYTES) -> ProbeSet:
        """A probe set of any segmentation dataset: the same arrays, cache and numbers as its Broden copy.

        The dataset is indexed first (`dataset_source.DatasetSource`: one pass over every item's labels,
        kept in the cache while its files are unchanged) for the label statistics that decide the primary
        categories (SEMANTICS §1) exactly as `write_broden` writes them, so
        `ProbeSet.from_dataset(dataset, ...)` and `ProbeSet(write_broden(dataset, root, image_format="png"),
        ...)` hold the same arrays and give the same dissection.

        Args:
            dataset: a `ConceptDataset` (an adapter of `lightning_dissect.datasets`), or any indexable dataset
                whose items are `(image, labels)` (see `concept_source`), with `label_names` and `categories`.
            label_names: for a plain dataset: the name of each label number, `[0] == "-"` (no label).
            categories: for a plain dataset: its category names, in order.
            fingerprint: for a plain dataset: a string you change whenever the data changes; None hashes
                every item's content each time the probe is built (the index pass then reads the images too).
            size, seed, split, image_size, cache_dir, transform, progress, workers, device_budget_bytes:
                as for `ProbeSet` (`workers` also index the dataset; `cache_dir=False` keeps no index).

        Raises:
            DatasetError: a bad label list, category list or item (names the item).
            ValueError: an argument out of range (names it).

        Example:
            >>> items = [(torch.rand(3, 8, 8), {"object": torch.randint(0, 3, (4, 4))}) for _ in range(4)]
            >>> probe = ProbeSet.from_dataset(items, ["-", "cat", "dog"], ["object"], cache_dir=False)
            >>> probe.label_maps.shape, probe.categories
            (torch.Size([4, 1, 4, 4]), ['object'])
        """
        if isinstance(dataset, ConceptDataset):
            given = [name for name, value in (("label_names", label_names), ("categories", categories),
                                              ("fingerprint", fingerprint)) if value is not None]
            if given:
                raise DatasetError(f"{', '.join(given)} given for {dataset!r}, which has its own; pass them only "
                                   f"with a plain dataset")
        else:
            if label_names is None or categories is None:
                raise DatasetError("a plain dataset needs label_names=[\"-\", ...] and categories=[...] (a "
                                   "ConceptDataset carries its own)")
            dataset = ConceptDataset.wrap(dataset, label_names, categories, fingerprint=fingerprint)
        source = DatasetSource(dataset, cache_dir=cache_dir, workers=workers, progress=progress)
        return cls(source, size=size, seed=seed, split=split, image_size=image_size, cache_dir=cache_dir,
                   transform=transform, progress=progress, workers=workers, device_budget_bytes=device_budget_bytes)

    def _fingerprint(self) -> str:
        return hashlib.sha256(json.dumps({
            "format": _FINGERPRINT_FORMAT, "dataset": self.source.fingerprint(), "rows": self.rows,
            "categories": self.categories,
        }).encode()).hexdigest()

    def subset(self, size: int, seed: int | None = None) -> ProbeSet:
        """The probe of `size` images of the same seeded draw, without decoding anything.

        The same as `resized(size)` (a smaller draw is a subset of a larger one: one seeded
        permutation, cut), taken from this probe's arrays: a probe held in memory when its arrays
        fit `device_budget_bytes`, else `resized(size)` (decoded, and cached, on its own).

        Args:
            size: the number of images.
            seed: draw with another seed (the same as `ProbeSet(source, size, seed)`); only from a
                probe that holds every candidate row (`size=None`). None keeps this probe's seed.

        Raises:
            ValueError: `size` not a positive integer; another `seed` from a probe that is a draw.
        """
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size={size!r} must be a positive integer")
        seed = self.seed if seed is None else seed
        if seed != self.seed and len(self) < len(self._candidates):
            raise ValueError(f"subset(seed={seed}) draws from every candidate row, but this probe holds a draw of "
                             f"{len(self)} of {len(self._candidates)}: build it with size=None")
        if size >= len(self) and seed == self.seed:
            return self
        rows = _draw(self._candidates, size, seed)
        where = {row: position for position, row in enumerate(self.rows)}
        positions = [where[row] for row in rows]
        if self.nbytes * size > self.device_budget_bytes * len(self):
            return self.resized(size, seed=seed)
        arrays = {name: self._storage.gather(name, positions) for name in _PER_IMAGE}
        arrays["label_area"] = label_area(arrays["label_maps"], arrays["image_labels"], len(self.label_names))
        view = copy.copy(self)
        view.rows, view.seed = rows, seed
        view.fingerprint = view._fingerprint()
        view._storage, view.cache_folder = MemoryArrays(arrays), None
        view._specs = view._storage.specs
        view._device_tensors = {}
        view._set_arrays()
        return view

    @property
    def broden(self) -> Broden | None:
        """The Broden dataset the probe was drawn from, or None for a probe of another dataset (`source`)."""
        return self.source if isinstance(self.source, Broden) else None

    def resized(self, size: int, image_size: Sequence[int] | None = None,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int | None = None) -> ProbeSet:
        """The same selection of the same data with `size` images (same seed, split, categories, transform).

        For a smaller size the images are a subset of this probe's (the draw is one seeded permutation,
        cut). Works alike for a Broden probe and a dataset probe: the source is kept, not read again.
        `seed` draws with another seed instead. A new `image_size` with this probe's default
        `ImageTransform` resizes to it (same mean and std); another transform is kept as it is.
        """
        if transform is None:
            transform = self.transform
            if image_size is not None and isinstance(transform, ImageTransform):
                transform = ImageTransform(transform.mean, transform.std, _image_size(image_size))
        return ProbeSet(self.source, size=size, seed=self.seed if seed is None else seed, split=self.split,
                        categories=self.categories,
                        image_size=image_size or self.image_size, transform=transform)

    # ------------------------------------------------------------------ layout, decoding and caching

    def _layout(self, num_maps: int, num_image_labels: int) -> dict[str, ArraySpec]:
        """The dtypes and shapes of the probe's arrays, with `M` label maps and `L` image-level labels per image."""
        n, (ih, iw), (sh, sw) = len(self.rows), *self._sizes
        num_categories = len(self.categories)
        return {
            "images": ArraySpec(torch.uint8, (n, 3, ih, iw)),
            "label_maps": ArraySpec(torch.int16 if len(self.label_names) <= 2**15 else torch.int32,
                                    (n, num_maps, sh, sw)),
            "image_labels": ArraySpec(torch.long, (n, num_image_labels)),
            "category_present": ArraySpec(torch.bool, (n, num_categories)),
            "image_level_present": ArraySpec(torch.bool, (n, num_categories)),
            "label_area": ArraySpec(torch.long, (len(self.label_names),)),
        }

    def _scan(self) -> tuple[dict[str, ArraySpec], list[str]]:
        """The layout of the probe's arrays and the files it decodes, before decoding anything.

        `M` and `L` are the largest numbers of label maps and image-level labels of a probe item in the
        selected categories (from the csv files of a Broden, from the index of a dataset).
        """
        data, rows = self.source, self.rows
        files: list[str] = []
        num_maps = num_image_labels = 1
        for i in rows:
            layout = data.item_layout(i, self.categories)
            sizes = (layout.image_size or self._sizes[0], layout.segmentation_size)
            if sizes != self._sizes:
                error = BrodenError if isinstance(data, Broden) else DatasetError
                raise error(
                    f"{data.where(i)}: image/segmentation size {sizes[0]}/{sizes[1]} differs from "
                    f"{data.where(rows[0])}'s {self._sizes[0]}/{self._sizes[1]}; a probe set needs one size. "
                    "Select rows of one size (split=, size=)."
                )
            num_maps = max(num_maps, layout.num_maps)
            num_image_labels = max(num_image_labels, layout.num_image_labels)
            files += layout.files
        return self._layout(num_maps, num_image_labels), files

    def _decode(self, sink: ArrayWriter | MemoryArrays, specs: dict[str, ArraySpec], progress: bool) -> None:
        """Decode the probe chunk by chunk into `sink`, in probe order; the label areas last."""
        decoder = _ChunkDecoder(self.source, self.categories, self.label_category, specs)
        chunks = [self.rows[start : start + _CHUNK_IMAGES] for start in range(0, len(self.rows), _CHUNK_IMAGES)]
        area = torch.zeros(specs["label_area"].shape, dtype=torch.long)
        # closing(): a failing sink stops the workers now, not when the traceback is freed.
        decoded = ordered_chunks(decoder, chunks, self.workers, "decode probe" if progress else None, "image")
        with contextlib.closing(decoded):
            for chunk in decoded:
                area += torch.from_numpy(chunk.pop("label_area"))
                sink.append(chunk)
        sink.append({"label_area": area.numpy()})

    def _decode_to_files(self, folder: Path, specs: dict[str, ArraySpec], progress: bool) -> None:
        writer = ArrayWriter(folder, specs)
        try:
            self._decode(writer, specs, progress)
            writer.finish()
        finally:
            writer.close()

    def _load(self, cache_dir: str | os.PathLike | bool | None, progress: bool
              ) -> tuple[MappedArrays | MemoryArrays, Path | None]:
        if cache_dir is False:
            return self._uncached(self._scan()[0], progress), None
        root = cache_root() / "probes" if cache_dir is None or cache_dir is True else Path(cache_dir)
        folder = root / f"probe-{self.fingerprint[:32]}"
        try:
            mapped = self._open_cached(folder)
            if mapped is not None:
                return mapped, folder
        except CacheInvalid as problem:
            _warn_once(f"invalid:{folder}", f"probe cache {folder} is unreadable or incomplete ({problem}); "
                                            "decoding again")
        try:
            return self._build_cache(root, folder, progress), folder
        except CacheWriteError as error:
            specs = self._scan()[0]
            where = "memory" if _nbytes(specs) <= MEMORY_PROBE_BYTES else \
                f"deleted files in a temporary folder in {tempfile.gettempdir()}"
            _warn_once(f"unwritable:{root}", f"probe cache at {root} cannot be written ({error}); the probe runs "
                                             f"from {where}")
        return self._uncached(specs, progress), None

    def _open_cached(self, folder: Path) -> MappedArrays | None:
        """The cache in `folder` mapped; None when there is none or the dataset's files changed since.

        Raises:
            CacheInvalid: a folder that is not a complete cache of this probe.
        """
        manifest = read_manifest(folder)
        if manifest is None:
            return None
        if manifest.fingerprint != self.fingerprint or not self._is_layout(manifest.specs):
            raise CacheInvalid(f"{folder / 'manifest.json'} does not describe this probe's arrays")
        if files_stats(self.source.files_root, listed_files(folder)) != manifest.stats:
            return None  # an image or label map was replaced: a cache miss, rebuilt in place
        try:
            return MappedArrays(folder, manifest.specs)
        except OSError as error:
            raise CacheInvalid(f"{folder} cannot be mapped ({error})") from None

    def _is_layout(self, specs: dict[str, ArraySpec]) -> bool:
        try:
            num_maps, num_image_labels = specs["label_maps"].shape[1], specs["image_labels"].shape[1]
        except (KeyError, IndexError):
            return False
        return num_maps >= 1 and num_image_labels >= 1 and specs == self._layout(num_maps, num_image_labels)

    def _build_cache(self, root: Path, folder: Path, progress: bool) -> MappedArrays:
        with build_lock(root, folder.name):
            try:  # another process may have built it while this one waited for the lock
                mapped = self._open_cached(folder)
                if mapped is not None:
                    return mapped
            except CacheInvalid:
                pass  # warned about already; replaced below
            specs, files = self._scan()
            manifest = Manifest(self.fingerprint, specs, files_stats(self.source.files_root, files))
            remove_stale_staging(root, folder.name)
            require_free_space(root, _nbytes(specs))
            staging = staging_folder(root, folder.name)
            try:
                self._decode_to_files(staging, specs, progress)
                write_manifest(staging, manifest, files)
                publish(staging, folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # gone already when published
        mapped = self._open_cached(folder)
        assert mapped is not None
        return mapped

    def _uncached(self, specs: dict[str, ArraySpec], progress: bool) -> MappedArrays | MemoryArrays:
        """The probe without a cache: in memory when small, else in deleted temporary files."""
        if _nbytes(specs) > MEMORY_PROBE_BYTES:
            temporary = Path(tempfile.gettempdir())
            try:
                require_free_space(temporary, _nbytes(specs))
                folder = staging_folder(temporary, "lightning_dissect-probe")
                try:
                    self._decode_to_files(folder, specs, progress)
                    mapped = MappedArrays(folder, specs)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)  # POSIX: the mapping keeps the data
                mapped.detach()
                return mapped
            except CacheWriteError as error:
                _warn_once(f"unwritable:{temporary}", f"the temporary folder {temporary} cannot hold the probe "
                                                      f"({error}); the probe runs from memory")
        memory = MemoryArrays.empty(specs)
        self._decode(memory, specs, progress)
        return memory

    def _set_arrays(self) -> None:
        tensors = self._storage.tensors
        self.images: torch.Tensor = tensors["images"]
        self.label_maps: torch.Tensor = tensors["label_maps"]
        self.image_labels: torch.Tensor = tensors["image_labels"]
        self.label_area: torch.Tensor = tensors["label_area"]
        self.category_present: torch.Tensor = tensors["category_present"]
        self.image_level_present: torch.Tensor = tensors["image_level_present"]

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (ddp_spawn): the storage pickles as a reference to the cache folder when there is
        # one; the device copies stay behind.
        state = {name: value for name, value in self.__dict__.items() if name not in (*_PER_IMAGE, "label_area")}
        state["_device_tensors"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._set_arrays()

    # ------------------------------------------------------------------ use

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"ProbeSet({len(self)} images of {self.source.describe()}, categories={self.categories}, "
                f"segmentation {self.segmentation_size}, fingerprint {self.fingerprint[:12]})")

    @property
    def segmentation_size(self) -> tuple[int, int]:
        return int(self.label_maps.shape[-2]), int(self.label_maps.shape[-1])

    @property
    def nbytes(self) -> int:
        """Bytes of the per-image arrays (what `device_budget_bytes` is compared with)."""
        return sum(self._specs[name].nbytes for name in _PER_IMAGE)

    @property
    def fits_device(self) -> bool:
        """Whether the probe is kept whole on an accelerator (`nbytes <= device_budget_bytes`; see `kept_on`)."""
        return self.nbytes <= self.device_budget_bytes

    def tensors(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The whole probe on `device`, copied there once and kept for later dissections.

        On the CPU these are the mapped arrays themselves (nothing is copied or read). On another
        device this copies every array whatever its size: for a probe beyond `device_budget_bytes`
        use `model_input`, `labels` or `stream`, which move one batch at a time.
        """
        device = torch.device(device)
        if self._device_tensors.get("device") != device:
            self._device_tensors = {
                "device": device, "images": self.images.to(device), "label_maps": self.label_maps.to(device),
                "image_labels": self.image_labels.to(device), "label_area": self.label_area.to(device),
                "present": self.category_present.to(device), "label_category": self.label_category.to(device),
                "image_level_present": self.image_level_present.to(device),
            }
        return self._device_tensors

    def _positions(self, positions: Sequence[int] | torch.Tensor) -> list[int]:
        listed = positions.tolist() if isinstance(positions, torch.Tensor) else [operator.index(p) for p in positions]
        for position in listed:
            if not 0 <= position < len(self):
                raise IndexError(f"probe position {position} is out of range: the probe has positions 0 to "
                                 f"{len(self) - 1}")
        return listed

    def kept_on(self, device: torch.device | str) -> bool:
        """Whether batches for `device` are indexed from a whole copy of the probe kept there: on an
        accelerator when the probe `fits_device`; never on the CPU, where batches are read from the
        cache files (or the in-memory arrays) one at a time, so that a dissection's resident memory
        does not grow with the probe (pages read through the mapping would stay in it)."""
        return torch.device(device).type != "cpu" and self.fits_device

    def _read(self, names: Sequence[str], positions: list[int], device: torch.device, pin: bool = False
              ) -> dict[str, torch.Tensor]:
        """Rows `positions` of arrays `names`: on `device` when the probe is kept there, else on the CPU."""
        if self.kept_on(device):
            data = self.tensors(device)
            index = torch.tensor(positions, dtype=torch.long, device=device)
            return {name: data["present" if name == "category_present" else name][index] for name in names}
        return {name: self._storage.gather(name, positions, pin=pin) for name in names}

    def _batch(self, positions: list[int], arrays: dict[str, torch.Tensor]) -> ProbeBatch:
        inputs = self.transform(arrays["images"].float().div_(255)) if "images" in arrays else None
        labels = ProbeLabels(*(arrays[name] for name in _LABELS)) if "label_maps" in arrays else None
        return ProbeBatch(positions, inputs, labels)

    def model_input(self, positions: Sequence[int] | torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """The transformed images at probe `positions`, float32 on `device`.

        Raises:
            IndexError: a position outside `range(len(probe))`.
        """
        device = torch.device(device)
        listed = self._positions(positions)
        images = self._read(["images"], listed, device, pin=device.type == "cuda")["images"]
        inputs = self._batch(listed, {"images": images.to(device, non_blocking=True)}).inputs
        assert inputs is not None
        return inputs

    def labels(self, positions: Sequence[int] | torch.Tensor, device: torch.device | str) -> ProbeLabels:
        """The canonical label tensors of the images at probe `positions`, on `device` (SEMANTICS §3).

        Raises:
            IndexError: a position outside `range(len(probe))`.
        """
        device = torch.device(device)
        arrays = self._read(_LABELS, self._positions(positions), device, pin=device.type == "cuda")
        return ProbeLabels(*(arrays[name].to(device, non_blocking=True) for name in _LABELS))

    def stream(self, batches: Iterable[Sequence[int]], device: torch.device | str, images: bool = True,
               labels: bool = True, prefetch: int = 2) -> Iterator[ProbeBatch]:
        """The batches' model input and labels on `device`, the next batches read ahead in the background.

        A probe kept on the device (see `kept_on`) is indexed there. Otherwise a thread reads the
        next `prefetch` batches from the cache (into pinned memory and onto the device on a copy
        stream, on CUDA) while the caller works on the current one. The tensors equal those of
        `model_input` and `labels`, bit for bit.

        Args:
            batches: probe positions of each batch.
            device: where the tensors go.
            images, labels: what to read: `ProbeBatch.inputs` and `ProbeBatch.labels` are None when not.
            prefetch: batches read ahead (at least 1).

        Yields:
            `ProbeBatch(positions, inputs, labels)` per batch, in order.

        Raises:
            ValueError: neither images nor labels asked for, or `prefetch < 1`.
            IndexError: a position outside `range(len(probe))` (before anything is read).

        Example:
            >>> for batch in probe.stream([[0, 1], [2, 3]], "cpu"):   # doctest: +SKIP
            ...     outputs = model(batch.inputs)
        """
        if not (images or labels):
            raise ValueError("stream(images=False, labels=False) reads nothing; ask for images, labels or both")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch={prefetch!r} must be a positive integer")
        device = torch.device(device)
        listed = [self._positions(batch) for batch in batches]
        names = (["images"] if images else []) + (list(_LABELS) if labels else [])
        if self.kept_on(device):
            return (self._batch(positions, self._read(names, positions, device)) for positions in listed)
        return self._streamed(listed, names, device, prefetch)

    def _streamed(self, batches: list[list[int]], names: list[str], device: torch.device, prefetch: int
                  ) -> Iterator[ProbeBatch]:
        copier = _DeviceCopier(device)

        def read(positions: list[int]) -> tuple[list[int], dict[str, torch.Tensor], Any]:
            return (positions, *copier.send(self._read(names, positions, device, pin=copier.cuda)))

        for positions, arrays, ready in prefetched(read, batches, depth=prefetch, name="probe-prefetch"):
            yield self._batch(positions, copier.receive(arrays, ready))

    def release(self) -> None:
        """Drop the device copies (the arrays on disk or in memory stay)."""
        self._device_tensors = {}
