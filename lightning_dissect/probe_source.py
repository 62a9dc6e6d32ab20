"""What a user passes as `probe=`, turned into a `ProbeSet`.

The callback and the `Dissector` accept a `ProbeSet` (used as is), a `ConceptDataset` (any
segmentation dataset, e.g. an adapter of `datasets.py`), a `Broden`, the path of a
Broden directory, `"synthetic"` (the procedural dataset, generated once into the cache) or None:
zero configuration, the Broden dataset of `$LIGHTNING_DISSECT_BRODEN` or of the cache, downloaded
there on first use. The first minutes of a new user go through here, so each way it can go wrong
says what to do first: no dataset and no network is one short error that starts with the ways
out, a misspelt `"synthetic"` is named, and the first use of `"synthetic"` says that it generates
the dataset, where, and about how long that takes.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_dissect.broden import Broden, BrodenError, download_broden
from lightning_dissect.cache import cache_root
from lightning_dissect.concept_source import ConceptDataset
from lightning_dissect.engine.errors import DissectionError
from lightning_dissect.probe import ImageTransform, ProbeSet
from lightning_dissect.progress import show_progress

BRODEN_ENV = "LIGHTNING_DISSECT_BRODEN"
SYNTHETIC = "synthetic"
DEFAULT_PROBE_SIZE = 1000
SYNTHETIC_IMAGES = 500

ProbeSource = ProbeSet | ConceptDataset | Broden | str | os.PathLike[str] | None
"""What `probe=` accepts."""

log = logging.getLogger("lightning_dissect")


def default_broden() -> Path:
    """The Broden directory of zero configuration: `$LIGHTNING_DISSECT_BRODEN`, else
    `<cache_root()>/broden/broden1_224`, downloaded there on first use.

    Raises:
        DissectionError: the download failed (no network). The message starts with the ways out
            (the synthetic dataset, a local copy, the environment variable), then names the
            folder looked in and the short reason of the failure; the download's own traceback
            is left out (it says nothing a user offline can act on).
    """
    configured = os.environ.get(BRODEN_ENV)
    if configured:
        return Path(configured).expanduser()
    destination = cache_root() / "broden"
    try:
        return download_broden(destination, resolution=224, progress=show_progress())
    except (BrodenError, OSError) as error:
        reason = short_reason(error)
    raise DissectionError(
        f"No probe dataset: pass probe='synthetic' (a small generated dataset), probe='/path/to/broden1_224' "
        f"(a Broden folder), or set {BRODEN_ENV}=/path/to/broden1_224. With probe=None the Broden dataset is "
        f"looked for in {destination / 'broden1_224'}; it is not there and downloading it failed ({reason})."
    ) from None


def short_reason(error: BaseException) -> str:
    """What went wrong at the bottom of an exception chain, in a few words: `Connection refused`,
    `Temporary failure in name resolution`, or the message of the exception that started it.

    Example:
        >>> import urllib.error
        >>> refused = urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        >>> try:
        ...     raise RuntimeError("the transfer failed") from refused
        ... except RuntimeError as error:
        ...     short_reason(error)
        'Connection refused'
    """
    root = error
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    reason = getattr(root, "reason", None)  # urllib's URLError keeps the socket error here
    if isinstance(reason, BaseException):
        root = reason
    if isinstance(root, OSError) and root.strerror:
        return root.strerror
    return str(root) or type(root).__name__


def dataset_of(probe: Broden | str | os.PathLike[str] | None, image_size: int | None = None,
               info: Callable[[str], None] | None = None, argument: str = "probe") -> Broden | Path:
    """The dataset that `probe=` names, before any image is read.

    Args:
        probe: a `Broden` (returned as is), the path of a Broden directory, `"synthetic"` (the
            procedural dataset of `SYNTHETIC_IMAGES` images, generated once into the cache), or
            None (`default_broden()`).
        image_size: the image size of the synthetic dataset (default 224).
        info: told when the synthetic dataset is generated (the first time): where, and about how
            long it takes; default the `lightning_dissect` logger (level INFO).
        argument: how errors name the value (the command line's `--broden`).

    Raises:
        DissectionError: probe=None, and no Broden found nor downloaded.
        BrodenError: a string that is no existing path but close to `"synthetic"` (the message
            suggests it).
    """
    if isinstance(probe, Broden):
        return probe
    if probe is None:
        return default_broden()
    if isinstance(probe, str) and probe == SYNTHETIC:
        from lightning_dissect.synthetic import synthetic_broden_path

        return synthetic_broden_path(num_images=SYNTHETIC_IMAGES, image_size=image_size or 224,
                                     workers=min(4, os.cpu_count() or 1), info=info or log.info)
    path = Path(probe)
    if isinstance(probe, str) and not path.exists():
        close = difflib.get_close_matches(probe.lower(), [SYNTHETIC], n=1)
        if close:
            raise BrodenError(f"{argument}={probe!r} is not a folder ({path.absolute()} does not exist); did you "
                              f"mean {argument}={close[0]!r}, the generated dataset?")
    return path


def load_probe(probe: ProbeSource, probe_size: int | None = None,
               probe_seed: int = 0, image_size: int | None = None,
               info: Callable[[str], None] | None = None) -> ProbeSet:
    """Build the probe set from what the user gave.

    Args:
        probe: a `ProbeSet` (used as is, or cut to `probe_size`), a `ConceptDataset`
            (`ProbeSet.from_dataset`), or what `dataset_of` takes: a `Broden`, the path of a Broden
            directory, `"synthetic"`, or None.
        probe_size: images in the probe; default all of a `ProbeSet`, else
            `DEFAULT_PROBE_SIZE` (or all images of a smaller dataset).
        probe_seed: seed of the image draw.
        image_size: resize probe images to this size for the model (and the
            image size of the synthetic dataset, default 224).
        info: where the first use of the synthetic dataset says that it generates it (`dataset_of`).

    Raises:
        DissectionError: no Broden found and none could be downloaded.
        BrodenError: the dataset does not load (names the file and row), or a misspelt `"synthetic"`.
        DatasetError: a `ConceptDataset` whose items do not load (names the item).
        ValueError: `probe_size` larger than the dataset.
    """
    if isinstance(probe, ProbeSet):
        return probe if probe_size is None or probe_size == len(probe) else probe.resized(probe_size)
    if isinstance(probe, ConceptDataset):
        size = probe_size if probe_size is not None else min(DEFAULT_PROBE_SIZE, len(probe))
        return ProbeSet.from_dataset(probe, size=size, seed=probe_seed, image_size=image_size)
    dataset = dataset_of(probe, image_size, info)
    broden = dataset if isinstance(dataset, Broden) else Broden(dataset)
    size = probe_size if probe_size is not None else min(DEFAULT_PROBE_SIZE, len(broden))
    return ProbeSet(broden, size=size, seed=probe_seed, image_size=image_size)


def probe_at_input_size(probe: ProbeSet, size: tuple[int, int] | None) -> ProbeSet:
    """The probe feeding the model images of `size` `(height, width)`: its transform resizes first.

    The probe's own transform is kept (a default `ImageTransform` gets the size; any other transform
    gets images already resized); `probe` itself is not changed.
    """
    if size is None or tuple(size) == probe.image_size:
        return probe
    transform = probe.transform
    if isinstance(transform, ImageTransform):
        resized: Callable[[torch.Tensor], torch.Tensor] = ImageTransform(transform.mean, transform.std, size)
    else:
        resize = ImageTransform(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), size=size)

        def resized(images: torch.Tensor) -> torch.Tensor:
            return transform(resize(images))

    view = copy.copy(probe)  # the same decoded images and labels, shared
    view.image_size, view.transform = (int(size[0]), int(size[1])), resized
    return view
