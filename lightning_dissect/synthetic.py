"""A procedural concept dataset written in the Broden layout (SEMANTICS §1).

``make_synthetic_broden`` draws images of simple scenes whose concepts are known by construction,
and writes them exactly as the released Broden is written, so the one reader (``broden.py``) serves
both. All six Broden categories carry meaning:

- ``scene`` (image-level): the background layout (``field-s``, ``seaside-s``, ``room-s``, ...).
- ``texture`` (image-level): a pattern covering the whole background (``striped``, ``dotted``, ...).
  An image has either a scene or a texture background, so each cell is empty for some images.
- ``object`` (pixel-level): 1 to 3 foreground shapes (``circle``, ``square``, ``star``, ...) drawn
  back to front, so an occluded pixel carries the shape in front; plus the regions of the scene
  background that Broden also counts as objects (``sky``, ``grass``, ``water``, ``wall``, ...).
- ``part`` (pixel-level, two maps): a coarse hierarchy (``circle-top``/``circle-bottom``,
  ``square-border``/``square-center``, ...) and a finer one that overlaps it (``circle-rim``,
  ``square-corner``, ``star-tip``); images without a shape that has parts leave the cell empty.
- ``material`` (pixel-level): every shape is rendered in a material (``metal``: a gradient with a
  highlight, ``wood``: grain, ``fabric``: a fine weave, ``plastic``, ``stone``); a room's floor is
  ``wood``.
- ``color`` (pixel-level): the names of the rendered pixels' colours (``red-c``, ``blue-c``, ...),
  computed from hue, saturation and value, so they follow the pixels; about one image in ten is
  left without a colour annotation.

``fabric`` is both a material and an object (a hanging cloth, always of fabric) with a smaller
coverage as an object, as in Broden, so the primary-category rule has something to decide.

Label numbers are fixed by the vocabulary (:func:`synthetic_label_names`), whatever the seed or
size: a label that does not occur in a small dataset keeps its number, with frequency 0 and no
category (SEMANTICS §1: it is never scored). Statistics follow NetDissect's ``joinseg.py``
except that ``coverage`` is a mean, not a sum: in ``c_<category>.csv`` it is the mean fraction of
the segmentation covered by the label over the images where it occurs in that category (1.0 for
image-level labels); in ``label.csv`` ``frequency`` sums the per-category image counts and
``coverage`` is the frequency-weighted mean of the per-category coverages. ``category.csv``
``first``/``last`` are the smallest and largest numbers of the labels occurring in the category,
``count`` how many there are, and ``frequency`` the sum of their image counts.

Besides the Broden files the directory holds ``tasks.csv`` (training targets, read back by
:func:`synthetic_targets`) and ``synthetic.json`` (the generation parameters; a directory with the
same parameters is reused, not regenerated).

Example:
    >>> import tempfile
    >>> from lightning_dissect.synthetic import make_synthetic_broden, synthetic_targets
    >>> root = make_synthetic_broden(tempfile.mkdtemp() + "/synth", num_images=8, image_size=32)
    >>> sorted(p.name for p in root.glob("*.csv"))[:3]
    ['c_color.csv', 'c_material.csv', 'c_object.csv']
    >>> synthetic_targets(root)["objects"].shape
    torch.Size([8, 7])
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_dissect.broden import Broden
from lightning_dissect.broden_writer import write_broden
from lightning_dissect.cache import cache_root
from lightning_dissect.concept_source import ConceptDataset

__all__ = [
    "SYNTHETIC_TASKS",
    "make_synthetic_broden",
    "synthetic_broden_path",
    "synthetic_label_names",
    "synthetic_targets",
]

# Bump whenever the rendering or the files change, so cached datasets are regenerated.
FORMAT_VERSION = 3

CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
PIXEL_CATEGORIES = ("color", "object", "part", "material")

COLORS = (
    "black-c", "blue-c", "brown-c", "green-c", "grey-c", "orange-c",
    "pink-c", "purple-c", "red-c", "white-c", "yellow-c",
)  # fmt: skip
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "fabric")
REGIONS = ("sky", "grass", "water", "sand", "wall", "floor")
# Part names per shape: (coarse map, fine map). The fine parts lie inside coarse ones.
SHAPE_PARTS = {
    "circle": (("circle-top", "circle-bottom"), ("circle-rim",)),
    "square": (("square-border", "square-center"), ("square-corner",)),
    "triangle": (("triangle-apex", "triangle-base"), ()),
    "star": (("star-center", "star-point"), ("star-tip",)),
    "cross": (("cross-center", "cross-arm"), ()),
}
MATERIALS = ("metal", "wood", "fabric", "plastic", "stone")
SCENES = ("field-s", "seaside-s", "room-s", "night-s", "desert-s", "studio-s")
TEXTURES = ("striped", "wavy", "zigzagged", "chequered", "dotted", "grid")
SYNONYMS = {"chequered": "checkered;checkerboard", "fabric": "cloth", "grey-c": "gray-c"}

SYNTHETIC_TASKS: dict[str, tuple[str, ...]] = {
    "background": SCENES + TEXTURES,
    "objects": SHAPES,
    "materials": MATERIALS,
}
"""Class names of the targets returned by :func:`synthetic_targets`, in column order."""

_TEXTURE_PROBABILITY = 0.35  # share of images whose background is a texture instead of a scene
_COLOR_UNANNOTATED = 0.1  # share of images whose color cell is left empty
_VAL_FRACTION = 0.3
_NOISE = 0.03  # standard deviation of the pixel noise, on a 0..1 scale
_SHAPE_WEIGHT = {
    # How often each shape appears in each background: scenes favour some shapes, as real scenes
    # favour some objects, so a scene classifier gains from detecting shapes.
    # circle square triangle star ring cross fabric
    "field-s": (3, 1, 1, 3, 1, 1, 0.6),
    "seaside-s": (1, 1, 3, 1, 3, 1, 0.6),
    "room-s": (1, 3, 1, 1, 1, 3, 0.6),
    "night-s": (3, 1, 1, 3, 1, 1, 0.6),
    "desert-s": (1, 3, 3, 1, 1, 1, 0.6),
    "studio-s": (1, 1, 1, 1, 1, 1, 0.6),
    "texture": (1, 1, 1, 1, 1, 1, 0.6),
}
_PALETTE = {
    "red": (0.85, 0.12, 0.10),
    "orange": (0.95, 0.55, 0.10),
    "yellow": (0.95, 0.88, 0.15),
    "green": (0.15, 0.65, 0.20),
    "blue": (0.15, 0.30, 0.85),
    "purple": (0.50, 0.20, 0.70),
    "pink": (0.98, 0.55, 0.75),
    "brown": (0.50, 0.30, 0.12),
    "white": (0.95, 0.95, 0.95),
    "grey": (0.55, 0.55, 0.55),
    "black": (0.07, 0.07, 0.07),
}
_MATERIAL_COLORS = {
    "metal": ("grey", "white", "yellow", "brown", "blue"),
    "wood": ("brown", "brown", "brown", "orange", "yellow", "red"),
    "fabric": tuple(_PALETTE),
    "plastic": ("red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black"),
    "stone": ("grey", "white", "brown", "black"),
}


def _vocabulary() -> tuple[list[str], dict[tuple[str, str], int]]:
    """Label names (index = global number) and the number of each ``(category, name)``."""
    names = ["-"]
    number: dict[tuple[str, str], int] = {}

    def add(category: str, name: str) -> None:
        if name not in names:
            names.append(name)
        number[category, name] = names.index(name)

    for name in COLORS:
        add("color", name)
    # "fabric" is numbered with the materials, where it is most common.
    for name in REGIONS + tuple(s for s in SHAPES if s != "fabric"):
        add("object", name)
    for coarse, fine in SHAPE_PARTS.values():
        for name in coarse + fine:
            add("part", name)
    for name in MATERIALS:
        add("material", name)
    add("object", "fabric")
    for name in SCENES:
        add("scene", name)
    for name in TEXTURES:
        add("texture", name)
    return names, number


_LABEL_NAMES, _NUMBER = _vocabulary()


def synthetic_label_names() -> list[str]:
    """The label names of every synthetic dataset; index = global label number, ``[0] == "-"``.

    Returns:
        A new list of the names in ``label.csv`` order.
    """
    return list(_LABEL_NAMES)


# --------------------------------------------------------------------------------------------
# Rendering. Coordinates are normalised: (0, 0) is the top-left corner of the image, (1, 1) the
# bottom-right one, and a grid of n pixels samples the pixel centres (i + 0.5) / n. The image is
# rendered on the full grid, the label maps on the half grid, by the same geometry.


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    centres = ((np.arange(n, dtype=np.float32) + 0.5) / n).astype(np.float32)
    return centres[None, :], centres[:, None]  # x (1, n), y (n, 1)


def _value_noise(rng: np.random.Generator, cells: int, height: int, width: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random ``cells x cells`` grid resized bilinearly."""
    small = rng.random((cells, cells), dtype=np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((width, height), Image.Resampling.BILINEAR))


@dataclass
class _Background:
    """The drawn background of one image: a scene layout or a texture, with its parameters."""

    kind: str  # a scene or texture name
    horizon: float = 0.5
    phase: float = 0.0
    angle: float = 0.0
    period: float = 0.1
    colors: tuple[np.ndarray, ...] = ()

    def horizon_at(self, x: np.ndarray) -> np.ndarray:
        amplitude = 0.05 if self.kind == "desert-s" else 0.015
        return self.horizon + amplitude * np.sin(2 * math.pi * (1.5 * x + self.phase))

    def regions(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The region object numbers (``sky``, ``grass``, ...) on a grid; 0 where none."""
        shape = np.broadcast_shapes(x.shape, y.shape)
        out = np.zeros(shape, dtype=np.int32)
        if self.kind in ("field-s", "seaside-s", "desert-s"):
            below = ("grass", "water", "sand")[("field-s", "seaside-s", "desert-s").index(self.kind)]
            ground = y >= self.horizon_at(x)
            out[:] = np.where(ground, _NUMBER["object", below], _NUMBER["object", "sky"])
            if self.kind == "seaside-s":  # a beach at the bottom
                beach = np.broadcast_to(y >= 0.88 + 0.02 * np.sin(9 * x + self.phase), shape)
                out[beach] = _NUMBER["object", "sand"]
        elif self.kind == "room-s":
            out[:] = np.where(y >= self.horizon, _NUMBER["object", "floor"], _NUMBER["object", "wall"])
        elif self.kind == "night-s":
            out[:] = _NUMBER["object", "sky"]
        return out

    def render(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """The RGB background ``(size, size, 3)`` in [0, 1]."""
        x, y = _grid(size)
        if self.kind in TEXTURES:
            return self._texture(x, y)
        regions = self.regions(x, y)
        image = np.empty((size, size, 3), dtype=np.float32)
        noise = _value_noise(rng, 6, size, size)[..., None]
        sky = regions == _NUMBER["object", "sky"]
        if self.kind == "night-s":
            image[:] = _mix((0.02, 0.03, 0.12), (0.10, 0.10, 0.28), y[..., None])
            stars = rng.random((size, size)) < 0.004
            image[stars] = (0.95, 0.95, 0.85)
            return image
        if self.kind == "studio-s":
            radius = np.sqrt((x - 0.5) ** 2 + (y - 0.45) ** 2)[..., None]
            image[:] = _mix(self.colors[0], 0.45 * self.colors[0], np.clip(radius * 1.6, 0, 1))
            return image
        if self.kind == "room-s":
            wall = regions == _NUMBER["object", "wall"]
            image[:] = self.colors[0] * (0.92 + 0.08 * noise)
            # Floorboards converge to a vanishing point above the horizon.
            depth = np.maximum(y - self.horizon + 0.25, 1e-3)
            boards = np.sin(2 * math.pi * ((x - 0.5) / depth * 2.5 + self.phase))
            floor = _mix((0.36, 0.20, 0.08), (0.62, 0.40, 0.18), (0.5 + 0.5 * boards)[..., None] ** 2)
            image[~wall] = floor[~wall]
            return image
        # Outdoor scenes: a sky above the horizon.
        horizon = self.horizon_at(x)
        height = np.clip(y / np.maximum(horizon, 1e-3), 0, 1)[..., None]
        top, low = ((0.30, 0.50, 0.90), (0.70, 0.82, 0.97))
        if self.kind == "desert-s":
            top, low = ((0.55, 0.72, 0.95), (0.85, 0.90, 0.96))
        sky_colour = _mix(top, low, height)
        if self.kind == "field-s":
            grass = _mix((0.10, 0.35, 0.08), (0.30, 0.68, 0.20), noise)
            image[:] = grass
        elif self.kind == "seaside-s":
            ripples = np.sin(2 * math.pi * (y * 18 + 0.3 * np.sin(2 * math.pi * (3 * x + self.phase))))
            water = _mix((0.05, 0.25, 0.55), (0.20, 0.45, 0.75), (0.5 + 0.5 * ripples)[..., None])
            image[:] = water
            sand = regions == _NUMBER["object", "sand"]
            image[sand] = _mix((0.80, 0.68, 0.40), (0.92, 0.80, 0.52), noise)[sand]
        else:  # desert-s
            dunes = np.sin(2 * math.pi * (4 * y + 1.2 * x + self.phase))
            image[:] = _mix((0.78, 0.55, 0.22), (0.95, 0.75, 0.40), (0.5 + 0.5 * dunes)[..., None])
        image[sky] = sky_colour[sky]
        return image

    def _texture(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        a = (x * cos + y * sin) / self.period + self.phase
        b = (-x * sin + y * cos) / self.period + self.phase
        if self.kind == "striped":
            on = (a % 1.0) < 0.5
        elif self.kind == "wavy":
            on = ((a + 0.45 * np.sin(2 * math.pi * b / 2.5)) % 1.0) < 0.5
        elif self.kind == "zigzagged":
            zig = np.abs((b / 1.5) % 1.0 - 0.5) * 2  # a triangle wave in [0, 1]
            on = ((a + 0.9 * zig) % 1.0) < 0.5
        elif self.kind == "chequered":
            on = (np.floor(a) + np.floor(b)) % 2 == 0
        elif self.kind == "dotted":
            on = (a % 1.0 - 0.5) ** 2 + (b % 1.0 - 0.5) ** 2 < 0.3**2
        else:  # grid
            on = ((a % 1.0) < 0.18) | ((b % 1.0) < 0.18)
        return np.where(on[..., None], self.colors[1], self.colors[0]).astype(np.float32)


def _mix(low: Sequence[float] | np.ndarray, high: Sequence[float] | np.ndarray, t: np.ndarray) -> np.ndarray:
    low_, high_ = np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)
    return (low_ + (high_ - low_) * t).astype(np.float32)


def _sample_background(rng: np.random.Generator) -> _Background:
    if rng.random() < _TEXTURE_PROBABILITY:
        kind = TEXTURES[rng.integers(len(TEXTURES))]
        first, second = rng.choice(len(_PALETTE), size=2, replace=False)
        colours = list(_PALETTE.values())
        return _Background(
            kind=kind,
            phase=float(rng.random()),
            angle=float(rng.uniform(0, math.pi)),
            period=float(rng.uniform(0.09, 0.15)),
            colors=(np.asarray(colours[first], np.float32), np.asarray(colours[second], np.float32)),
        )
    kind = SCENES[rng.integers(len(SCENES))]
    if kind == "night-s":
        horizon = 1.0  # all sky
    elif kind == "room-s":
        horizon = rng.uniform(0.55, 0.7)  # where the wall meets the floor
    else:
        horizon = rng.uniform(0.4, 0.6)
    # Clear of the colour-name boundaries (saturation 0.22, value 0.22 and 0.78), so that the
    # shading and the brightness jitter do not split a plain wall between two colour names.
    walls = ((0.95, 0.93, 0.88), (0.62, 0.74, 0.92), (0.70, 0.85, 0.62), (0.55, 0.55, 0.57))
    studio = ((0.62, 0.62, 0.62), (0.42, 0.50, 0.70), (0.70, 0.58, 0.42))
    base = {"room-s": walls, "studio-s": studio}.get(kind, ((0.5, 0.5, 0.5),))
    return _Background(
        kind=kind,
        horizon=float(horizon),
        phase=float(rng.random()),
        colors=(np.asarray(base[rng.integers(len(base))], np.float32),),
    )


@dataclass
class _Shape:
    kind: str
    material: str
    color: np.ndarray
    cx: float
    cy: float
    radius: float
    angle: float
    phase: float

    def box(self, n: int) -> tuple[slice, slice]:
        """The rows and columns of an ``n``-pixel grid that the shape may cover."""
        reach = 1.05 * self.radius

        def span(centre: float) -> slice:
            return slice(max(int((centre - reach) * n), 0), min(int(math.ceil((centre + reach) * n)), n))

        return span(self.cy), span(self.cx)

    def local(self, n: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
        """The box on an ``n``-grid and the shape's own coordinates ``(a, b)`` there, in radii."""
        rows, cols = self.box(n)
        x, y = _grid(n)
        dx, dy = x[:, cols] - self.cx, y[rows, :] - self.cy
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        a = (dx * cos + dy * sin) / self.radius
        b = (-dx * sin + dy * cos) / self.radius
        return (rows, cols), a, b

    def geometry(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mask, coarse-part numbers and fine-part numbers (0: none) in shape coordinates."""
        d = np.sqrt(a * a + b * b)
        zero = np.zeros(d.shape, dtype=np.int32)
        coarse, fine = zero, zero.copy()
        names = SHAPE_PARTS.get(self.kind, ((), ()))
        part = [[_NUMBER["part", n] for n in level] for level in names]
        if self.kind == "circle":
            mask = d < 1
            coarse = np.where(b < 0, part[0][0], part[0][1])
            fine = np.where(d > 0.75, part[1][0], 0)
        elif self.kind == "square":
            edge = np.maximum(np.abs(a), np.abs(b))
            mask = edge < 0.85
            coarse = np.where(edge > 0.5, part[0][0], part[0][1])
            fine = np.where((np.abs(a) > 0.55) & (np.abs(b) > 0.55), part[1][0], 0)
        elif self.kind == "triangle":
            mask = (b < 0.5) & (b > -1 + math.sqrt(3) * np.abs(a))
            coarse = np.where(b < -0.2, part[0][0], part[0][1])
        elif self.kind == "star":
            sector = 2 * math.pi / 5
            turn = (np.arctan2(b, a) + math.pi / 2) % sector / sector
            valley = 2 * np.minimum(turn, 1 - turn)  # 0 on a tip's ray, 1 between two tips
            mask = d < 1 - 0.58 * valley
            coarse = np.where(d < 0.42, part[0][0], part[0][1])
            fine = np.where(d > 0.68, part[1][0], 0)
        elif self.kind == "ring":
            mask = (d > 0.55) & (d < 1)
        elif self.kind == "cross":
            width = 0.33
            horizontal, vertical = np.abs(b) < width, np.abs(a) < width
            mask = (horizontal & (np.abs(a) < 1)) | (vertical & (np.abs(b) < 1))
            coarse = np.where(horizontal & vertical, part[0][0], part[0][1])
        else:  # fabric: a hanging cloth with a wavy hem
            hem = 0.55 + 0.15 * np.sin(3 * math.pi * a + 2 * math.pi * self.phase)
            mask = (np.abs(a) < 0.95) & (b > -0.75) & (b < hem)
        mask = np.broadcast_to(mask, d.shape)
        return mask, np.where(mask, coarse, 0), np.where(mask, fine, 0)

    def render(self, rng: np.random.Generator, a: np.ndarray, b: np.ndarray, size: int) -> np.ndarray:
        """The shape's RGB in its box at full resolution, textured by its material."""
        colour = self.color
        d2 = a * a + b * b
        if self.material == "metal":
            grey = colour.mean()
            tint = 0.5 * colour + 0.5 * grey
            shade = 0.55 + 0.55 * np.clip((a * 0.6 - b * 0.8 + 1) / 2, 0, 1)
            highlight = 0.75 * np.exp(-((a + 0.35) ** 2 + (b + 0.35) ** 2) / 0.06)
            rgb = tint * shade[..., None] + highlight[..., None]
        elif self.material == "wood":
            along = a * math.cos(self.phase * 6) + b * math.sin(self.phase * 6)
            across = -a * math.sin(self.phase * 6) + b * math.cos(self.phase * 6)
            grain = np.sin(2 * math.pi * (2.2 * along + 0.35 * np.sin(2.5 * across + 6 * self.phase)))
            rgb = colour * (0.62 + 0.38 * (0.5 + 0.5 * grain) ** 2)[..., None]
        elif self.material == "fabric":
            rows, cols = self.box(size)
            pitch = max(2, round(size / 56))
            yy = np.arange(rows.start, rows.stop)[:, None] // pitch
            xx = np.arange(cols.start, cols.stop)[None, :] // pitch
            weave = ((yy + xx) % 2).astype(np.float32)
            fuzz = rng.normal(0, 0.04, size=weave.shape).astype(np.float32)
            rgb = colour * (0.72 + 0.28 * weave + fuzz)[..., None]
        elif self.material == "plastic":
            grey = colour.mean()
            vivid = np.clip(grey + 1.15 * (colour - grey), 0, 1)
            rgb = vivid * (1.0 - 0.22 * np.clip(d2, 0, 1))[..., None]
        else:  # stone
            blotch = _value_noise(rng, 5, *a.shape)
            speckle = rng.normal(0, 0.07, size=a.shape).astype(np.float32)
            grey = colour.mean()
            dull = 0.6 * colour + 0.4 * grey
            rgb = dull * (0.65 + 0.4 * blotch + speckle)[..., None]
        return rgb.astype(np.float32)


def _sample_shape(rng: np.random.Generator, background: _Background) -> _Shape:
    weights = np.asarray(_SHAPE_WEIGHT.get(background.kind, _SHAPE_WEIGHT["texture"]), np.float64)
    kind = SHAPES[rng.choice(len(SHAPES), p=weights / weights.sum())]
    material = "fabric" if kind == "fabric" else MATERIALS[rng.integers(len(MATERIALS))]
    radius = float(rng.uniform(0.13, 0.25)) * (0.8 if kind == "fabric" else 1.0)
    choices = _MATERIAL_COLORS[material]
    colour = np.asarray(_PALETTE[choices[rng.integers(len(choices))]], np.float32)
    colour = np.clip(colour + rng.normal(0, 0.03, size=3), 0, 1).astype(np.float32)
    tilt = {"circle": 0.0, "ring": 0.0, "fabric": 0.15}.get(kind, 0.35)
    return _Shape(
        kind=kind,
        material=material,
        color=colour,
        cx=float(rng.uniform(0.75 * radius, 1 - 0.75 * radius)),
        cy=float(rng.uniform(0.75 * radius, 1 - 0.75 * radius)),
        radius=radius,
        angle=float(rng.uniform(-tilt, tilt)),
        phase=float(rng.random()),
    )


# Hue bounds in degrees and the colour below each bound; hues from 340 on are red again.
_HUE_BOUNDS = np.asarray([15, 45, 70, 165, 260, 295, 340], dtype=np.float32)
_HUE_NAMES = ("red-c", "orange-c", "yellow-c", "green-c", "blue-c", "purple-c", "pink-c", "red-c")


def _color_names(rgb: np.ndarray) -> np.ndarray:
    """Name the colour of each pixel from its hue, saturation and value.

    Args:
        rgb: ``(..., 3)`` array in [0, 1].

    Returns:
        ``(...)`` int32 array of global label numbers of the ``*-c`` colour labels.
    """
    rgb = np.asarray(rgb, dtype=np.float32)
    high, low = rgb.max(-1), rgb.min(-1)
    chroma = high - low
    saturation = chroma / np.maximum(high, 1e-6)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(
        high == r, ((g - b) / safe) % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    hue = hue * 60.0
    number = {name: _NUMBER["color", name] for name in COLORS}
    by_hue = np.asarray([number[n] for n in _HUE_NAMES], dtype=np.int32)
    out = by_hue[np.searchsorted(_HUE_BOUNDS, hue, side="right")]
    # Light desaturated red is pink, dark orange or yellow is brown, dark pink is purple.
    out[(out == number["red-c"]) & (high > 0.75) & (saturation < 0.55)] = number["pink-c"]
    out[(out == number["orange-c"]) & (high < 0.6)] = number["brown-c"]
    out[(out == number["yellow-c"]) & (high < 0.45)] = number["brown-c"]
    out[(out == number["pink-c"]) & (high < 0.5)] = number["purple-c"]
    out[saturation < 0.22] = number["grey-c"]
    out[(saturation < 0.22) & (high > 0.78)] = number["white-c"]
    out[high < 0.22] = number["black-c"]
    return out


@dataclass
class _Example:
    """One rendered image with its labels (global numbers)."""

    image: np.ndarray  # uint8 (S, S, 3)
    maps: dict[str, list[np.ndarray]]  # pixel-level category -> int32 (S/2, S/2) maps
    image_labels: dict[str, list[int]]  # image-level category -> label numbers


def _render_example(seed: int, index: int, size: int) -> _Example:
    """Render image ``index`` of the dataset of ``seed``; its own generator makes it order-free."""
    # The layout is drawn first, from its own stream, so that one seed gives the same scenes at
    # every image size; the pixel noise comes from a second stream.
    layout = np.random.default_rng([seed, index, 0])
    background = _sample_background(layout)
    shapes = [_sample_shape(layout, background) for _ in range(int(layout.integers(1, 4)))]
    color_annotated = layout.random() >= _COLOR_UNANNOTATED
    rng = np.random.default_rng([seed, index, 1])

    half = size // 2
    image = background.render(rng, size)
    objects = background.regions(*_grid(half))
    material = np.zeros((half, half), dtype=np.int32)
    material[objects == _NUMBER["object", "floor"]] = _NUMBER["material", "wood"]  # floorboards
    coarse = np.zeros((half, half), dtype=np.int32)
    fine = np.zeros((half, half), dtype=np.int32)
    for shape in shapes:  # back to front: a later shape occludes the earlier ones
        box, a, b = shape.local(size)
        mask, _, _ = shape.geometry(a, b)
        image[box][mask] = shape.render(rng, a, b, size)[mask]
        box, a, b = shape.local(half)
        mask, shape_coarse, shape_fine = shape.geometry(a, b)
        objects[box][mask] = _NUMBER["object", shape.kind]
        material[box][mask] = _NUMBER["material", shape.material]
        coarse[box][mask] = shape_coarse[mask]
        fine[box][mask] = shape_fine[mask]

    image = np.clip(image * np.float32(rng.uniform(0.9, 1.1)), 0, 1)
    noisy = image + rng.normal(0, _NOISE, size=image.shape).astype(np.float32)
    pixels = np.clip(np.rint(noisy * 255), 0, 255).astype(np.uint8)

    maps: dict[str, list[np.ndarray]] = {}
    if color_annotated:
        # Name the colours of the rendered pixels before the noise, averaged over each 2x2 block
        # of the half-size segmentation grid: the noise would only speckle the names.
        blocks = image.reshape(half, 2, half, 2, 3).mean(axis=(1, 3))
        maps["color"] = [_color_names(blocks)]
    maps["object"] = [objects]
    maps["part"] = [m for m in (coarse, fine) if m.any()]
    maps["material"] = [material] if material.any() else []

    image_labels: dict[str, list[int]] = {"scene": [], "texture": []}
    category = "texture" if background.kind in TEXTURES else "scene"
    image_labels[category] = [_NUMBER[category, background.kind]]
    return _Example(image=pixels, maps=maps, image_labels=image_labels)


# --------------------------------------------------------------------------------------------
# Writing: the rendered images are a ConceptDataset, written by write_broden.


class _SyntheticDataset(ConceptDataset):
    """The rendered images of one seed as a concept dataset: item ``i`` is rendered when read."""

    label_names = _LABEL_NAMES
    categories = list(CATEGORIES)

    def __init__(self, num_images: int, size: int, seed: int) -> None:
        self.num_images, self.size, self.seed = num_images, size, seed
        self.digits = max(5, len(str(num_images)))
        # An exact 70/30 split, drawn from its own stream so that it does not depend on the images.
        order = np.random.default_rng([seed, num_images, 7030]).permutation(num_images)
        self.splits = ["train"] * num_images
        for index in order[: round(_VAL_FRACTION * num_images)]:
            self.splits[index] = "val"

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int) -> tuple[Image.Image, dict[str, list]]:
        example = _render_example(self.seed, i, self.size)
        return Image.fromarray(example.image, mode="RGB"), {**example.maps, **example.image_labels}

    def split(self, i: int) -> str:
        return self.splits[i]

    def name(self, i: int) -> str:
        return f"synthetic/synthetic_{i + 1:0{self.digits}d}"


def _write_tasks(directory: Path) -> None:
    """Write tasks.csv: each image's background, visible shapes and materials, read back from its labels."""
    broden = Broden(directory)
    number = {name: index for index, name in enumerate(_LABEL_NAMES)}

    def visible(i: int, category: str) -> set[int]:
        if category not in broden.categories:  # no label of it in the whole (tiny) dataset
            return set()
        return set().union(*(set(m.unique().tolist()) for m in broden.read_segmentation(i, [category])[0]))

    rows = []
    for i in range(len(broden)):
        row = broden.row(i)
        background = _LABEL_NAMES[int([*row.cells.get("scene", []), *row.cells.get("texture", [])][0])]
        objects, materials = visible(i, "object"), visible(i, "material")
        rows.append([row.image, background, ";".join(s for s in SHAPES if number[s] in objects),
                     ";".join(m for m in MATERIALS if number[m] in materials)])
    with open(directory / "tasks.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("image", "background", "objects", "materials"))
        writer.writerows(rows)


def _parameters(num_images: int, image_size: int, seed: int, jpeg_quality: int) -> dict[str, object]:
    return {
        "generator": "lightning_dissect.synthetic",
        "format_version": FORMAT_VERSION,
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
        "jpeg_quality": jpeg_quality,
    }


_MARKER = "synthetic.json"
JPEG_QUALITY = 90


def _read_marker(directory: Path) -> dict[str, object] | None:
    try:
        return json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def make_synthetic_broden(
    root: str | os.PathLike[str],
    num_images: int = 500,
    image_size: int = 224,
    seed: int = 0,
    jpeg_quality: int = JPEG_QUALITY,
    workers: int = 1,
) -> Path:
    """Write a synthetic concept dataset in the Broden layout (SEMANTICS §1), or reuse it.

    The dataset is a pure function of ``(num_images, image_size, seed, jpeg_quality)``: the same
    arguments give byte-identical csv files and identical pixels, whatever ``workers``. It is
    written into a temporary directory beside ``root`` and renamed into place when complete;
    a ``root`` already holding a complete dataset with the same parameters is returned untouched,
    one holding a synthetic dataset with other parameters is replaced.

    Args:
        root: The dataset directory to create.
        num_images: How many images (rows of ``index.csv``); 70% are ``train``, 30% ``val``.
        image_size: Height and width of the images; even and at least 32. The label maps are
            ``image_size // 2`` square, as in the released Broden (224 -> 112).
        seed: Seed of the generator.
        jpeg_quality: Quality of the JPEG images, 1 to 95.
        workers: Processes rendering images; 1 renders in this process.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: An argument is out of range.
        FileExistsError: ``root`` exists, is not empty and is not a synthetic dataset.

    Example:
        >>> import tempfile
        >>> root = make_synthetic_broden(tempfile.mkdtemp() + "/synth", num_images=4, image_size=32)
        >>> (root / "index.csv").read_text().splitlines()[0]
        'image,split,ih,iw,sh,sw,color,object,part,material,scene,texture'
    """
    for name, value, low in (
        ("num_images", num_images, 1),
        ("image_size", image_size, 32),
        ("workers", workers, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"make_synthetic_broden: {name}={value!r} must be an integer >= {low}")
    if image_size % 2:
        raise ValueError(f"make_synthetic_broden: image_size={image_size} must be even")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"make_synthetic_broden: seed={seed!r} must be a non-negative integer")
    if not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 95:
        raise ValueError(f"make_synthetic_broden: jpeg_quality={jpeg_quality!r} must be an integer in 1..95")

    root = Path(root).expanduser().absolute()
    parameters = _parameters(num_images, image_size, seed, jpeg_quality)
    if _read_marker(root) == parameters:
        return root
    if root.exists() and _read_marker(root) is None and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(
            f"make_synthetic_broden: {root} exists and is not a synthetic dataset "
            f"(no {_MARKER}); pass an empty or new directory"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        _generate(staging, num_images, image_size, seed, jpeg_quality, workers)
        (staging / _MARKER).write_text(json.dumps(parameters, indent=2) + "\n")
        _move_into_place(staging, root, parameters)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _generate(directory: Path, num_images: int, size: int, seed: int, quality: int, workers: int) -> None:
    dataset = _SyntheticDataset(num_images, size, seed)
    synonyms = {name: names.split(";") for name, names in SYNONYMS.items()}
    write_broden(dataset, directory, image_format="jpeg", jpeg_quality=quality, synonyms=synonyms, workers=workers)
    _write_tasks(directory)


def _move_into_place(staging: Path, root: Path, parameters: dict[str, object]) -> None:
    """Rename the finished ``staging`` directory to ``root``, replacing an outdated dataset."""
    if root.exists():
        if _read_marker(root) == parameters:  # another process finished first
            return
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        else:  # an outdated synthetic dataset: move it aside, then delete it
            outdated = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
            os.replace(root, outdated / "dataset")
            shutil.rmtree(outdated, ignore_errors=True)
    try:
        os.replace(staging, root)
    except OSError:
        if _read_marker(root) != parameters:
            raise


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root()


SECONDS_PER_IMAGE = 2.5e-3
SECONDS_PER_PIXEL = 2.5e-7
"""The generator's measured cost in one process: `SECONDS_PER_IMAGE + SECONDS_PER_PIXEL * size**2` per
image, fitted to the CPU time it took on the two-core machine the package is tested on (3.5 ms an
image at 64 px, 15 ms at 224 px)."""


def estimated_seconds(num_images: int, image_size: int, workers: int = 1) -> float:
    """About how long :func:`make_synthetic_broden` takes: the measured cost per image
    (`SECONDS_PER_IMAGE`, `SECONDS_PER_PIXEL`), shared by the worker processes up to the machine's
    cores. An estimate: a slower or busier machine takes longer.

    Example:
        >>> round(estimated_seconds(500, 224, workers=1), 1)
        7.5
    """
    parallel = max(1, min(workers, os.cpu_count() or 1))
    return num_images * (SECONDS_PER_IMAGE + SECONDS_PER_PIXEL * image_size**2) / parallel


def synthetic_broden_path(
    num_images: int = 500,
    image_size: int = 224,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 1,
    info: Callable[[str], None] | None = None,
) -> Path:
    """The directory of a cached synthetic dataset, generated on first use.

    Args:
        num_images: As for :func:`make_synthetic_broden`.
        image_size: As for :func:`make_synthetic_broden`.
        seed: As for :func:`make_synthetic_broden`.
        cache_dir: The cache root; default ``lightning_dissect.cache.cache_root()``
            (``$LIGHTNING_DISSECT_CACHE``, else ``~/.cache/lightning_dissect``).
        workers: As for :func:`make_synthetic_broden`.
        info: Told, before the dataset is generated (not when it is reused), what is generated,
            where, and about how long it takes (:func:`estimated_seconds`).

    Returns:
        ``<cache root>/synthetic/v<version>-n<num_images>-s<image_size>-seed<seed>``.
    """
    name = f"v{FORMAT_VERSION}-n{num_images}-s{image_size}-seed{seed}"
    root = _cache_root(cache_dir) / "synthetic" / name
    if info is not None and _read_marker(root.expanduser().absolute()) != _parameters(num_images, image_size, seed,
                                                                                       JPEG_QUALITY):
        seconds = estimated_seconds(num_images, image_size, workers)
        info(f"generating the synthetic dataset ({num_images} images of {image_size} px) into {root}, once: later "
             f"runs reuse it; about {max(1, round(seconds))} s with {workers} worker process"
             f"{'es' if workers > 1 else ''} (an estimate: a busy machine takes longer)")
    return make_synthetic_broden(
        root, num_images=num_images, image_size=image_size, seed=seed, workers=workers
    )


def synthetic_targets(root: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Training targets of a synthetic dataset, in ``index.csv`` row order.

    Args:
        root: A directory written by :func:`make_synthetic_broden`.

    Returns:
        A dict of tensors with one row per image:

        - ``"background"``: ``long (N,)``, the scene or texture drawn behind the shapes, an index
          into ``SYNTHETIC_TASKS["background"]`` (a single-label classification task);
        - ``"objects"``: ``float32 (N, 7)``, 1 where a shape of ``SYNTHETIC_TASKS["objects"]`` is
          visible (a multi-label task);
        - ``"materials"``: ``float32 (N, 5)``, 1 where a material of
          ``SYNTHETIC_TASKS["materials"]`` is visible on a shape or the floor;
        - ``"train"``: ``bool (N,)``, True for the rows whose split is ``train``.

    Raises:
        FileNotFoundError: ``root`` has no ``tasks.csv`` (it is not a synthetic dataset).
        ValueError: ``tasks.csv`` names an unknown class or disagrees with ``index.csv``.
    """
    root = Path(root)
    tasks_path = root / "tasks.csv"
    if not tasks_path.is_file():
        raise FileNotFoundError(f"{tasks_path} not found: {root} was not written by make_synthetic_broden")
    with open(tasks_path, newline="") as handle:
        tasks = list(csv.DictReader(handle))
    with open(root / "index.csv", newline="") as handle:
        index = list(csv.DictReader(handle))
    if [t["image"] for t in tasks] != [r["image"] for r in index]:
        raise ValueError(f"{tasks_path}: its images differ from index.csv; regenerate {root}")
    lookup = {task: {name: k for k, name in enumerate(names)} for task, names in SYNTHETIC_TASKS.items()}
    n = len(tasks)
    background = torch.zeros(n, dtype=torch.long)
    multi_hot = {task: torch.zeros(n, len(SYNTHETIC_TASKS[task])) for task in ("objects", "materials")}
    for i, task_row in enumerate(tasks):
        try:
            background[i] = lookup["background"][task_row["background"]]
            for task, target in multi_hot.items():
                for name in filter(None, task_row[task].split(";")):
                    target[i, lookup[task][name]] = 1.0
        except KeyError as error:
            raise ValueError(f"{tasks_path} row {i} (line {i + 2}): unknown class {error}") from None
    train = torch.tensor([r["split"] == "train" for r in index], dtype=torch.bool)
    return {"background": background, **multi_hot, "train": train}
