"""Shared test fixtures: tiny Broden datasets written from explicit arrays."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dissect.probe import ProbeSet

# Tests never touch the user's cache or the network.
os.environ.setdefault("WANDB_MODE", "offline")

# Tests of masks, tallies and the engine's statistics run on every device there is; CUDA rounds its
# own way, so on CUDA they compare with references computed on the same device.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LIGHTNING_DISSECT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def write_broden(root: Path, categories: dict[str, str], labels: list[tuple[str, dict[str, float]]],
                 rows: list[dict]) -> Path:
    """Write a Broden directory from arrays (SEMANTICS §1).

    Args:
        categories: category name -> "pixel" or "image", in category.csv order.
        labels: (name, {category: coverage}) for labels 1, 2, ...; a label's
            c_ files are the categories with a coverage.
        rows: per image, {"image": uint8 (H, W, 3), "split": str, <category>: list of
            int (sh, sw) label maps for pixel categories, or list of label numbers}.
            Images are written as lossless PNG so tests can plant exact pixels.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "category.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "first", "last", "count", "frequency"])
        for name in categories:
            w.writerow([name, 1, len(labels), len(labels), len(rows)])
    with open(root / "label.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        w.writerow([0, "-", "", 0, 0, ""])
        for number, (name, coverage) in enumerate(labels, start=1):
            w.writerow([number, name, ";".join(f"{c}(1)" for c in coverage), 1, 0.5, ""])
    for category in categories:
        with open(root / f"c_{category}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["code", "number", "name", "frequency", "coverage"])
            code = 1
            for number, (name, coverage) in enumerate(labels, start=1):
                if category in coverage:
                    w.writerow([code, number, name, 1, coverage[category]])
                    code += 1
    with open(root / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "split", "ih", "iw", "sh", "sw", *categories])
        for i, row in enumerate(rows):
            image = row["image"]
            Image.fromarray(image).save(root / "images" / f"img{i}.png")
            cells = []
            sh = sw = None
            for category, kind in categories.items():
                items = row.get(category, [])
                if kind == "image":
                    cells.append(";".join(str(n) for n in items))
                    continue
                paths = []
                for m, label_map in enumerate(items):
                    label_map = np.asarray(label_map)
                    sh, sw = label_map.shape
                    rgb = np.zeros((sh, sw, 3), dtype=np.uint8)
                    rgb[..., 0] = label_map % 256
                    rgb[..., 1] = label_map // 256
                    path = f"img{i}_{category}_{m}.png"
                    Image.fromarray(rgb).save(root / "images" / path)
                    paths.append(path)
                cells.append(";".join(paths))
            sh = row.get("sh", sh or image.shape[0] // 2)
            sw = row.get("sw", sw or image.shape[1] // 2)
            w.writerow([f"img{i}.png", row.get("split", "train"), image.shape[0], image.shape[1], sh, sw, *cells])
    return root


RANDOM_CATEGORIES = {"color": "pixel", "object": "pixel", "part": "pixel", "scene": "image", "texture": "image"}
RANDOM_LABELS = [
    ("red", {"color": 0.3}),
    ("blue", {"color": 0.2, "object": 0.2}),          # tie: color (listed first) is primary
    ("dog", {"object": 0.4}),
    ("cat", {"object": 0.1, "part": 0.3}),           # primary part
    ("leg", {"part": 0.2}),
    ("head", {"part": 0.15, "object": 0.05}),
    ("kitchen", {"scene": 1.0}),
    ("beach", {"scene": 1.0, "object": 0.01}),       # also drawn as pixels sometimes
    ("striped", {"texture": 1.0}),
    ("dotted", {"texture": 1.0}),
    ("orphan", {}),                                   # listed in no c_ file: never scored
    ("green", {"color": 0.25}),
]


def random_broden(root: Path, num_images: int = 24, image_size: int = 16, seed: int = 0) -> Path:
    """A small random dataset exercising every cell form: several part maps, empty cells,
    image-level labels, a label in two categories, a label that is both pixel- and image-level
    in one image, repeated labels across maps, and an unscored label."""
    rng = np.random.default_rng(seed)
    s = image_size // 2
    rows = []
    for i in range(num_images):
        row: dict = {"image": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
                     "split": "train" if i % 3 else "val"}
        row["color"] = [rng.choice([0, 1, 2, 12], size=(s, s), p=[0.4, 0.2, 0.2, 0.2])]
        if i % 5 != 4:
            row["object"] = [rng.choice([0, 2, 3, 4, 8, 11], size=(s, s), p=[0.5, 0.1, 0.15, 0.1, 0.1, 0.05])]
        row["part"] = [rng.choice([0, 4, 5, 6], size=(s, s), p=[0.6, 0.15, 0.15, 0.1])
                       for _ in range(int(rng.integers(0, 3)))]
        row["scene"] = [int(v) for v in rng.choice([7, 8], size=int(rng.integers(0, 3)))]
        row["texture"] = [9] if i % 4 == 0 else ([10] if i % 4 == 1 else [])
        rows.append(row)
    return write_broden(root, RANDOM_CATEGORIES, RANDOM_LABELS, rows)


@pytest.fixture
def random_dataset(tmp_path) -> Path:
    return random_broden(tmp_path / "broden")


@pytest.fixture(scope="module")
def probe_112(tmp_path_factory):
    """Eight random 224x224 images with 112x112 label maps: Broden's sizes, every cell form."""
    root = random_broden(tmp_path_factory.mktemp("broden224") / "broden", num_images=8, image_size=224, seed=5)
    return ProbeSet(root, cache_dir=False)
