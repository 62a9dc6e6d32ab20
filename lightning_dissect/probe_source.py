"""What a user passes as `probe=`, turned into a `ProbeSet`.

The callback and the `Dissector` accept a `ProbeSet` (used as is), a `Broden`, the path of a
Broden directory, `"synthetic"` (the procedural dataset, generated once into the cache) or None:
zero configuration, the Broden dataset of `$LIGHTNING_DISSECT_BRODEN` or of the cache, downloaded
there on first use.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_dissect.broden import Broden, BrodenError, download_broden
from lightning_dissect.engine.dissect import DissectionError
from lightning_dissect.probe import ImageTransform, ProbeSet, cache_root
from lightning_dissect.progress import show_progress

BRODEN_ENV = "LIGHTNING_DISSECT_BRODEN"
DEFAULT_PROBE_SIZE = 1000
SYNTHETIC_IMAGES = 500

ProbeSource = ProbeSet | Broden | str | os.PathLike[str] | None
"""What `probe=` accepts."""


def default_broden() -> Path:
    """The Broden directory of zero configuration: `$LIGHTNING_DISSECT_BRODEN`, else
    `<cache_root()>/broden/broden1_224`, downloaded there on first use.

    Raises:
        DissectionError: the download failed (no network); the message says how
            to point at a local copy or use the synthetic dataset.
    """
    configured = os.environ.get(BRODEN_ENV)
    if configured:
        return Path(configured).expanduser()
    destination = cache_root() / "broden"
    try:
        return download_broden(destination, resolution=224, progress=show_progress())
    except (BrodenError, OSError) as error:
        raise DissectionError(
            f"probe=None: the Broden dataset is not in {destination} and could not be downloaded ({error}). "
            f"Point at a local copy with probe='/path/to/broden1_224' or the environment variable {BRODEN_ENV}, "
            "or dissect on the bundled synthetic dataset with probe='synthetic'."
        ) from error


def load_probe(probe: ProbeSource, probe_size: int | None = None,
               probe_seed: int = 0, image_size: int | None = None) -> ProbeSet:
    """Build the probe set from what the user gave.

    Args:
        probe: a `ProbeSet` (used as is, or cut to `probe_size`), a `Broden`, the
            path of a Broden directory, `"synthetic"` (the procedural dataset,
            generated once into the cache), or None (`default_broden()`).
        probe_size: images in the probe; default all of a `ProbeSet`, else
            `DEFAULT_PROBE_SIZE` (or all images of a smaller dataset).
        probe_seed: seed of the image draw.
        image_size: resize probe images to this size for the model (and the
            image size of the synthetic dataset, default 224).

    Raises:
        DissectionError: no Broden found and none could be downloaded.
        BrodenError: the dataset does not load (names the file and row).
        ValueError: `probe_size` larger than the dataset.
    """
    if isinstance(probe, ProbeSet):
        return probe if probe_size is None or probe_size == len(probe) else resized_probe(probe, probe_size)
    if isinstance(probe, str) and probe == "synthetic":
        from lightning_dissect.synthetic import synthetic_broden_path

        probe = synthetic_broden_path(num_images=SYNTHETIC_IMAGES, image_size=image_size or 224,
                                      workers=min(4, os.cpu_count() or 1))
    elif probe is None:
        probe = default_broden()
    broden = probe if isinstance(probe, Broden) else Broden(probe)
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


def resized_probe(probe: ProbeSet, size: int, image_size: tuple[int, int] | None = None,
                  transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ProbeSet:
    """The same selection of the same dataset with `size` images (same seed, split, categories, transform).

    For a smaller size the images are a subset of the larger probe's (the draw
    is one seeded permutation, cut).
    """
    return ProbeSet(probe.broden, size=size, seed=probe.seed, split=probe.split, categories=probe.categories,
                    image_size=image_size or probe.image_size, transform=transform or probe.transform)
