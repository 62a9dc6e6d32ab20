"""ProbeSet: a fixed, seeded subset of a Broden dataset, decoded once into compact tensors.

Decoding JPEGs and PNG label maps is the slow part of a dissection, and the
labels never change, so a probe set decodes its images once, writes the
tensors to a cache file keyed by the dataset's fingerprint and the selection,
and keeps them in memory (and on the device between dissections). The
model-independent quantities of SEMANTICS §3 and §4 (canonical labels, label
areas `G(c)`, category presence) are computed here, once.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lightning_dissect.broden import Broden, BrodenError
from lightning_dissect.engine.labels import canonical_labels, category_presence, label_area
from lightning_dissect.io import atomic_write

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_ENV = "LIGHTNING_DISSECT_CACHE"
_CACHE_FORMAT = 1
_CHUNK_IMAGES = 256


def cache_root() -> Path:
    """The cache directory: `$LIGHTNING_DISSECT_CACHE`, else `~/.cache/lightning_dissect`."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_dissect"


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
        return (images - mean) / std

    def __repr__(self) -> str:
        return f"ImageTransform(mean={self.mean}, std={self.std}, size={self.size})"


def _image_size(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"image_size={value!r} must be a positive int or (height, width)")
    return size  # type: ignore[return-value]


class ProbeSet:
    """A fixed subset of a Broden dataset, decoded into tensors, in probe order.

    Args:
        broden: a `Broden`, or the path of a Broden directory.
        size: number of images; None for all (of the split).
        seed: seed of the subset draw; the same seed gives the same rows.
        split: keep only rows of this `split` value (e.g. "val"); None for all.
        categories: dissect only these categories (SEMANTICS §1); None for all.
        image_size: resize images to this size for the model; segmentations keep theirs.
        cache_dir: where decoded probe sets are cached; default `cache_root() / "probes"`.
            Pass False to disable the cache.
        transform: float images in [0, 1] -> model input; default ImageNet mean/std
            (and the `image_size` resize).
        progress: show a progress bar while decoding.

    Attributes:
        rows: 0-based `index.csv` rows, in probe order (ascending).
        images: uint8 `(N, 3, ih, iw)`.
        label_maps: canonical pixel labels `(N, M, sh, sw)` (int16, or int32 for large label sets).
        image_labels: canonical image-level labels, long `(N, L)`, 0-padded.
        label_category: long `(C,)`, primary category index per label (-1: never scored).
        label_area: long `(C,)`, `G(c)`.
        category_present, image_level_present: bool `(N, n_categories)`.
        fingerprint: identifies the data and the selection; results record it.

    Raises:
        ValueError: an argument out of range (names it).
        BrodenError: the dataset is broken (names the file and row).

    Example:
        >>> probe = ProbeSet("data/broden1_224", size=2000, seed=0)   # doctest: +SKIP
        >>> probe.images.shape                                          # doctest: +SKIP
        torch.Size([2000, 3, 224, 224])
    """

    def __init__(self, broden: Broden | str | os.PathLike, size: int | None = None, seed: int = 0,
                 split: str | None = None, categories: Sequence[str] | None = None,
                 image_size: int | Sequence[int] | None = None, cache_dir: str | os.PathLike | bool | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: bool = False) -> None:
        self.broden = broden if isinstance(broden, Broden) else Broden(broden)
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"size={size!r} must be a positive integer or None (all images)")
        if not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer")
        self.image_size = _image_size(image_size)
        self.transform = transform if transform is not None else ImageTransform(size=self.image_size)
        primary = self.broden.primary_categories(categories)  # validates the names
        selected = set(categories) if categories is not None else set(self.broden.categories)
        self.categories = [name for name in self.broden.categories if name in selected]
        self.label_names = list(self.broden.label_names)
        self.label_category = torch.tensor(
            [self.categories.index(name) if name is not None else -1 for name in primary], dtype=torch.long
        )
        candidates = list(range(len(self.broden)))
        if split is not None:
            splits = sorted(set(self.broden.splits))
            if split not in splits:
                raise ValueError(f"split={split!r} is not a split of {self.broden.root}; splits: {splits}")
            candidates = [i for i in candidates if self.broden.splits[i] == split]
        if size is not None and size > len(candidates):
            where = f"split {split!r} of " if split is not None else ""
            raise ValueError(f"size={size} but {where}{self.broden.root} has only {len(candidates)} images")
        if size is not None and size < len(candidates):
            order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:size]
            candidates = sorted(candidates[i] for i in order.tolist())
        self.rows = candidates
        self.seed, self.split = seed, split
        self.fingerprint = hashlib.sha256(json.dumps({
            "format": _CACHE_FORMAT, "dataset": self.broden.fingerprint(), "rows": self.rows,
            "categories": self.categories,
        }).encode()).hexdigest()
        self._device_tensors: dict[str, Any] = {}
        self._load(cache_dir, progress)

    # ------------------------------------------------------------------ decoding and caching

    def _cache_path(self, cache_dir: str | os.PathLike | bool | None) -> Path | None:
        if cache_dir is False:
            return None
        root = Path(cache_dir) if cache_dir not in (None, True) else cache_root() / "probes"
        return root / f"probe-{self._cache_key()[:32]}.pt"

    def _cache_key(self) -> str:
        """The fingerprint plus the size and modification time of every file the probe decodes.

        The fingerprint hashes the csv files only (reading every image would cost as much as
        decoding); the file stats make a replaced image or label map invalidate the cache too.
        """
        digest = hashlib.sha256(self.fingerprint.encode())
        images = self.broden.root / "images"
        for i in self.rows:
            row = self.broden.row(i)
            paths = [row.image] + [item for category in self.categories for item in row.cells[category]
                                   if isinstance(item, str)]
            for path in paths:
                try:
                    info = os.stat(images / path)
                    digest.update(f"{path}:{info.st_size}:{info.st_mtime_ns};".encode())
                except OSError:
                    digest.update(f"{path}:missing;".encode())  # decoding will name the file
        return digest.hexdigest()

    def _load(self, cache_dir: str | os.PathLike | bool | None, progress: bool) -> None:
        path = self._cache_path(cache_dir)
        if path is not None and path.exists():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if state.get("fingerprint") == self.fingerprint:
                    self._set(state)
                    return
            except Exception as error:  # a corrupt cache is rebuilt, never trusted
                warnings.warn(f"probe cache {path} is unreadable ({error}); decoding again", stacklevel=3)
        state = self._decode(progress)
        self._set(state)
        if path is not None:
            with atomic_write(path, "wb") as handle:
                torch.save(state, handle)

    def _decode(self, progress: bool) -> dict[str, Any]:
        broden, rows = self.broden, self.rows
        if not rows:
            raise ValueError(f"the probe set of {broden.root} is empty")
        first = broden.row(rows[0])
        for i in rows:
            row = broden.row(i)
            if (row.image_size, row.segmentation_size) != (first.image_size, first.segmentation_size):
                raise BrodenError(
                    f"{broden.where(i)}: image/segmentation size "
                    f"{row.image_size}/{row.segmentation_size} differs from row {rows[0]}'s "
                    f"{first.image_size}/{first.segmentation_size}; a probe set needs one size. "
                    "Select rows of one size (split=, size=)."
                )

        def read(i: int) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
            maps, image_labels = broden.read_segmentation(i, self.categories)
            return broden.read_image(i), maps, image_labels

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            decoded = pool.map(read, rows)
            if progress:
                from tqdm.auto import tqdm

                decoded = tqdm(decoded, total=len(rows), desc="decode probe", unit="image")
            decoded = list(decoded)
        n = len(rows)
        sh, sw = first.segmentation_size
        num_maps = max(1, max(len(maps) for _, maps, _ in decoded))
        num_image_labels = max(1, max(len(labels) for _, _, labels in decoded))
        dtype = torch.int16 if len(self.label_names) <= 2**15 else torch.int32
        images = torch.stack([image for image, _, _ in decoded])
        label_maps = torch.zeros(n, num_maps, sh, sw, dtype=dtype)
        image_labels = torch.zeros(n, num_image_labels, dtype=torch.long)
        for position, (_, maps, labels) in enumerate(decoded):
            for slot, label_map in enumerate(maps):
                label_maps[position, slot] = label_map
            image_labels[position, : len(labels)] = torch.tensor(labels, dtype=torch.long)
        del decoded
        num_categories = len(self.categories)
        areas = torch.zeros(len(self.label_names), dtype=torch.long)
        present = torch.zeros(n, num_categories, dtype=torch.bool)
        image_level = torch.zeros(n, num_categories, dtype=torch.bool)
        for start in range(0, n, _CHUNK_IMAGES):
            part = slice(start, start + _CHUNK_IMAGES)
            label_maps[part], image_labels[part] = canonical_labels(label_maps[part], image_labels[part],
                                                                    self.label_category)
            areas += label_area(label_maps[part], image_labels[part], len(self.label_names))
            present[part], image_level[part] = category_presence(label_maps[part], image_labels[part],
                                                                 self.label_category, num_categories)
        return {
            "fingerprint": self.fingerprint, "images": images, "label_maps": label_maps,
            "image_labels": image_labels, "label_area": areas, "category_present": present,
            "image_level_present": image_level,
        }

    def _set(self, state: dict[str, Any]) -> None:
        self.images: torch.Tensor = state["images"]
        self.label_maps: torch.Tensor = state["label_maps"]
        self.image_labels: torch.Tensor = state["image_labels"]
        self.label_area: torch.Tensor = state["label_area"]
        self.category_present: torch.Tensor = state["category_present"]
        self.image_level_present: torch.Tensor = state["image_level_present"]

    # ------------------------------------------------------------------ use

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"ProbeSet({len(self)} images of {self.broden.root}, categories={self.categories}, "
                f"segmentation {self.segmentation_size}, fingerprint {self.fingerprint[:12]})")

    @property
    def segmentation_size(self) -> tuple[int, int]:
        return int(self.label_maps.shape[-2]), int(self.label_maps.shape[-1])

    def tensors(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The probe's tensors on `device`, copied there once and kept for later dissections."""
        device = torch.device(device)
        if self._device_tensors.get("device") != device:
            self._device_tensors = {
                "device": device, "images": self.images.to(device), "label_maps": self.label_maps.to(device),
                "image_labels": self.image_labels.to(device), "label_area": self.label_area.to(device),
                "present": self.category_present.to(device), "label_category": self.label_category.to(device),
                "image_level_present": self.image_level_present.to(device),
            }
        return self._device_tensors

    def model_input(self, positions: Sequence[int] | torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """The transformed images at probe `positions`, float32 on `device`."""
        images = self.tensors(device)["images"]
        index = torch.as_tensor(positions, device=images.device, dtype=torch.long)
        return self.transform(images[index].float().div_(255))

    def release(self) -> None:
        """Drop the device copies (the CPU tensors stay)."""
        self._device_tensors = {}
