"""Unit strips: a unit's top-activating probe images with its mask drawn over them.

A strip is what NetDissect's report shows for each unit: the `k` probe images
where the unit fires most (the engine's running top-k of per-image maxima,
`LayerDissection.top_images`), each with the unit's mask `M_u(x)` kept bright
and the rest dimmed, the mask's border drawn, and a caption naming the unit,
its concept, category and IoU.

The mask drawn is exactly the one that was counted (SEMANTICS §2): the raw map
upsampled bilinearly to the *segmentation* size and compared with the float64
threshold; it is then scaled to the image size by nearest neighbour, so a pixel
shown bright is a pixel that entered the tally. Images smaller than `MIN_TILE`
pixels are shown enlarged by a whole factor (a 64-pixel image as a 128-pixel
tile), image and mask by the same nearest-neighbour repetition, so each image
pixel becomes a square block and the counted mask stays exact. The caption is
set in DejaVu Sans, the font matplotlib ships, so it reads the same on every
machine. Raw maps are recomputed by
running the model on the few top images (`activation_maps`), or taken from
precomputed activations (`activations=`).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from lightning_dissect.engine.capture import (
    LayerCapture,
    as_unit_maps,
    cast_to_model,
    frozen,
    model_device,
    resolve_layers,
)
from lightning_dissect.engine.compiled import plain_name, uncompiled
from lightning_dissect.engine.errors import DissectionError
from lightning_dissect.engine.layouts import OutputLayout
from lightning_dissect.engine.masks import upsample_masks
from lightning_dissect.engine.rotation import Rotation, as_rotation, rotate_units

if TYPE_CHECKING:
    from lightning_dissect.engine.dissect import LayerNumbers
    from lightning_dissect.probe import ProbeSet

DIM = 0.25
BORDER_COLOR = (255, 214, 0)
GAP = 2
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
MIN_TILE = 112
"""The smallest tile side in pixels: smaller images are enlarged by a whole factor to reach it."""


@dataclass
class UnitStrip:
    """The strip of one unit.

    Attributes:
        layer: the module name.
        unit: the unit index (0-based, as in the result tensors).
        label, category, score: the unit's concept, its category and IoU (SEMANTICS §5).
        detector: whether the score is above the layer's `iou_threshold`.
        positions: probe positions of the shown images, most active first.
        activations: the unit's per-image maximum on each of them.
        masks: bool `(k, ih, iw)`, the unit's mask at image size.
        scale: the whole factor images and masks are enlarged by in the tiles (1 for images of
            `MIN_TILE` pixels or more).
        tiles: uint8 `(k, scale * ih, scale * iw, 3)`, each image with its mask drawn: image and
            mask enlarged by repeating each pixel `scale` times along both axes.
        tile_boxes: `(top, left)` of each tile inside `image`.
        caption: the text drawn above the tiles.
        image: uint8 `(H, W, 3)`, the whole strip.
    """

    layer: str
    unit: int
    label: str
    category: str
    score: float
    detector: bool
    positions: list[int]
    activations: list[float]
    masks: np.ndarray
    scale: int
    tiles: np.ndarray
    tile_boxes: list[tuple[int, int]]
    caption: str
    image: np.ndarray

    def save(self, path: Any) -> None:
        """Write the strip; the format follows the file name (`.png`, `.jpg`)."""
        Image.fromarray(self.image).save(path)


def activation_maps(
    model: nn.Module,
    probe: ProbeSet,
    layer: str,
    positions: Sequence[int],
    *,
    rotation: Rotation | Mapping[str, Any] | torch.Tensor | None = None,
    prefix_tokens: int | None = None,
    layout: OutputLayout | Mapping[str, Any] | str | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """The raw maps `A[x]` of `layer` on the probe images at `positions`, as `dissect` sees them.

    The model runs frozen (eval mode, no gradients, flags restored) on input in its floating
    dtype; a rotation is applied as in the dissection (SEMANTICS §6). Pass the `layout` the
    dissection read the layer with (`Dissection.settings["layer_outputs"][layer]`); without it
    a 4-D output is `(N, K, h, w)` and tokens use `prefix_tokens` (see `as_unit_maps`).

    Returns:
        float32 `(len(positions), K, h, w)` on the CPU.
    """
    layer = plain_name(layer)
    maps = layers_activation_maps(model, probe, {layer: positions}, rotation=rotation, prefix_tokens=prefix_tokens,
                                  layouts={layer: layout}, device=device, batch_size=batch_size,
                                  forward_context=forward_context)[layer]
    if not maps:
        return torch.zeros(0, 0, 0, 0)
    return torch.stack([maps[int(p)] for p in positions])


def layers_activation_maps(
    model: nn.Module,
    probe: ProbeSet,
    positions: Mapping[str, Sequence[int]],
    *,
    rotation: Rotation | Mapping[str, Any] | torch.Tensor | None = None,
    prefix_tokens: int | None = None,
    layouts: Mapping[str, OutputLayout | Mapping[str, Any] | str | None] | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, dict[int, torch.Tensor]]:
    """`activation_maps` of several layers in one forward pass over the union of their positions.

    Args:
        positions: layer -> the probe positions whose maps it needs.
        layouts: layer -> the layout the dissection read it with (see `activation_maps`).

    Returns:
        layer -> {position: float32 `(K, h, w)` on the CPU}, for the positions asked of that layer.
    """
    wanted = {plain_name(layer): sorted({int(p) for p in given}) for layer, given in positions.items()}
    layouts = {plain_name(layer): layout for layer, layout in (layouts or {}).items()}
    every = sorted({p for given in wanted.values() for p in given})
    needed_by = {layer: set(given) for layer, given in wanted.items()}
    rotation = as_rotation(rotation)
    context = forward_context or contextlib.nullcontext
    maps: dict[str, dict[int, torch.Tensor]] = {layer: {} for layer in wanted}
    if not every:
        return maps
    with uncompiled(model) as plain, frozen(plain):
        modules = resolve_layers(plain, list(wanted))
        device = torch.device(device) if device is not None else model_device(plain)
        for start in range(0, len(every), batch_size):
            batch = every[start : start + batch_size]
            with LayerCapture(modules) as capture, context():
                outputs = capture.run(plain, cast_to_model(probe.model_input(batch, device), plain))
            for layer, needed in needed_by.items():
                rows = [i for i, p in enumerate(batch) if p in needed]
                if not rows:
                    continue
                layer_maps = as_unit_maps(outputs[layer], layer, layouts.get(layer), prefix_tokens)[rows]
                if rotation is not None:
                    layer_maps = rotate_units(layer_maps, rotation.resolve(layer_maps.shape[1]))
                layer_maps = layer_maps.cpu()
                maps[layer].update({batch[i]: layer_maps[j] for j, i in enumerate(rows)})
    return maps


def draw_mask(image: np.ndarray, mask: np.ndarray, dim: float = DIM, border: int = 1,
              border_color: tuple[int, int, int] = BORDER_COLOR, scale: int = 1) -> np.ndarray:
    """An image with the pixels outside `mask` dimmed and the mask's outline drawn.

    The outline is drawn on the `border` pixels just *outside* the mask (a square
    dilation), so every mask pixel keeps its original value.

    Args:
        image: uint8 `(..., H, W, 3)`: one image, or a stack of them.
        mask: bool `(..., H, W)`.
        scale: enlarge image and mask by this whole factor (pixel replication) before the
            outline is drawn; the dimming is done at the image's own size first, which gives
            the same pixels as dimming the enlarged image.

    Returns:
        uint8 `(..., scale H, scale W, 3)`.
    """
    dimmed = np.rint(np.arange(256) * dim).astype(np.uint8)
    tile = np.take(dimmed, image)
    # Masks are small (a unit's top 0.5%): copy the pixels inside and colour the outline by index.
    pixels, original = tile.reshape(-1, 3), np.ascontiguousarray(image).reshape(-1, 3)
    inside = np.flatnonzero(mask)
    pixels[inside] = original[inside]
    if scale != 1:
        tile, mask = _enlarge_rows_columns(tile, scale, -3), _enlarge_rows_columns(mask, scale, -2)
        pixels = tile.reshape(-1, 3)
    if border > 0 and inside.size:
        pixels[np.flatnonzero(_dilate(mask, border) & ~mask)] = border_color
    return tile


def _enlarge_rows_columns(array: np.ndarray, scale: int, rows: int) -> np.ndarray:
    """Repeat each element `scale` times along axis `rows` (negative) and the axis after it."""
    return array.repeat(scale, axis=rows).repeat(scale, axis=rows + 1)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of the last two axes by a `(2 radius + 1)` square, as two separable passes of shifted ORs."""
    height, width = mask.shape[-2:]
    padded = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(radius, radius), (radius, radius)])
    rows = np.zeros(mask.shape[:-2] + (height + 2 * radius, width), dtype=bool)
    for shift in range(2 * radius + 1):
        rows |= padded[..., :, shift : shift + width]
    dilated = np.zeros(mask.shape, dtype=bool)
    for shift in range(2 * radius + 1):
        dilated |= rows[..., shift : shift + height, :]
    return dilated


def tile_scale(image_size: tuple[int, int], min_tile: int = MIN_TILE) -> int:
    """The whole factor that makes the shorter side of an image at least `min_tile` pixels (1 when it is)."""
    return max(1, -(-min_tile // max(1, min(image_size))))


def enlarge(pixels: np.ndarray, scale: int) -> np.ndarray:
    """Repeat each pixel `scale` times along the first two axes (`(H, W, ...)` -> `(scale H, scale W, ...)`)."""
    return pixels if scale == 1 else pixels.repeat(scale, axis=0).repeat(scale, axis=1)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # DejaVu Sans comes with matplotlib (a dependency), so captions do not depend on system fonts;
    # Pillow's default (Aileron since 10.1) sets words too tightly to read at caption sizes.
    import matplotlib

    try:
        return ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")), size)
    except OSError:  # a matplotlib without its fonts
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: a fixed bitmap font
            return ImageFont.load_default()


def _printable(text: str) -> str:
    # The default font covers Latin-1; anything else becomes "?" rather than an error.
    return text.encode("latin-1", "replace").decode("latin-1")


def compose_strip(tiles: np.ndarray, caption: str, gap: int = GAP,
                  font_size: int | None = None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Lay out tiles in a row under a caption.

    Args:
        tiles: uint8 `(k, H, W, 3)`.
        caption: one line of text.

    Returns:
        The strip, uint8 `(height, width, 3)`, and the `(top, left)` of each tile.
    """
    count, height, width = (tiles.shape[0], tiles.shape[1], tiles.shape[2]) if tiles.ndim == 4 else (0, 0, 0)
    font = _font(font_size or max(13, min(18, height // 9 if height else 13)))
    text = _printable(caption)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    right, bottom = measure.textbbox((0, 0), text, font=font)[2:]
    # The line's full height (ascender to descender), so every strip of a run has the same height.
    caption_height = int(max(bottom, measure.textbbox((0, 0), "Ag|", font=font)[3])) + 2 * gap
    row_width = count * width + max(count - 1, 0) * gap
    strip = Image.new("RGB", (max(row_width, int(right) + 2 * gap), caption_height + height), BACKGROUND)
    ImageDraw.Draw(strip).text((gap, gap), text, fill=TEXT_COLOR, font=font)
    boxes = []
    for index in range(count):
        box = (caption_height, index * (width + gap))
        strip.paste(Image.fromarray(tiles[index]), (box[1], box[0]))
        boxes.append(box)
    return np.asarray(strip).copy(), boxes


def unit_caption(layer_result: LayerNumbers, unit: int, note: str = "") -> str:
    """`"layer4 unit 12: dog (object) IoU 0.081"`, with a note appended when given."""
    label = layer_result.label_name(unit) or "-"
    category = layer_result.unit_category(unit) or "-"
    caption = f"{layer_result.layer} unit {unit}: {label} ({category}) IoU {float(layer_result.scores[unit]):.3f}"
    return f"{caption} {note}" if note else caption


def strips_from_maps(
    probe: ProbeSet,
    layer_result: LayerNumbers,
    units: Sequence[int],
    maps: Mapping[int, torch.Tensor],
    *,
    num_images: int | None = None,
    dim: float = DIM,
    border: int | None = None,
    notes: Mapping[int, str] | None = None,
) -> dict[int, UnitStrip]:
    """Strips from raw maps already at hand.

    Args:
        probe: the probe set of the dissection (its images are shown).
        layer_result: the layer's dissection (top images, thresholds, labels).
        units: the units to draw.
        maps: probe position -> float32 `(K, h, w)` raw maps of that image; must
            hold every top image of `units`.
        num_images: show the first `num_images` top images (default: all kept).
        dim: the brightness kept outside the mask.
        border: outline width in tile pixels (default about 1 per 112 pixels).
        notes: unit -> text appended to its caption (e.g. "was: dog").

    Returns:
        unit -> `UnitStrip`, in the order of `units`.
    """
    images = probe.images
    image_size = (int(images.shape[-2]), int(images.shape[-1]))
    scale = tile_scale(image_size)
    border = max(1, round(scale * min(image_size) / 112)) if border is None else border
    notes = notes or {}
    strips = {}
    for unit in _checked_units(layer_result, units):
        positions = [int(p) for p in layer_result.top_images[unit][:num_images].tolist()]
        activations = [float(a) for a in layer_result.top_activations[unit][: len(positions)].tolist()]
        if positions:
            raw = torch.stack([maps[p][unit] for p in positions]).float().contiguous()
            threshold = layer_result.thresholds[unit].double().expand(len(positions))
            counted = upsample_masks(raw, threshold, probe.segmentation_size).reshape(-1, *probe.segmentation_size)
            masks = _nearest(counted.numpy(), image_size)
            pixels = images[positions].permute(0, 2, 3, 1).numpy()
            tiles = draw_mask(pixels, masks, dim, border, scale=scale)
        else:
            masks = np.zeros((0, *image_size), dtype=bool)
            tiles = np.zeros((0, scale * image_size[0], scale * image_size[1], 3), dtype=np.uint8)
        caption = unit_caption(layer_result, unit, notes.get(unit, ""))
        image, boxes = compose_strip(tiles, caption)
        strips[unit] = UnitStrip(
            layer=layer_result.layer, unit=unit, label=layer_result.label_name(unit),
            category=layer_result.unit_category(unit), score=float(layer_result.scores[unit]),
            detector=bool(layer_result.detectors[unit]), positions=positions, activations=activations,
            masks=masks, scale=scale, tiles=tiles, tile_boxes=boxes, caption=caption, image=image,
        )
    return strips


def unit_strips(
    model: nn.Module | None,
    probe: ProbeSet,
    layer_result: LayerNumbers,
    units: Sequence[int] | None = None,
    *,
    activations: torch.Tensor | None = None,
    num_images: int | None = None,
    rotation: Rotation | Mapping[str, Any] | torch.Tensor | None = None,
    prefix_tokens: int | None = None,
    layout: OutputLayout | Mapping[str, Any] | str | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    notes: Mapping[int, str] | None = None,
    dim: float = DIM,
    maps: Mapping[int, torch.Tensor] | None = None,
) -> dict[int, UnitStrip]:
    """The strips of `units` of one dissected layer.

    The raw maps of the units' top images are recomputed by running `model`
    on just those images (one forward pass per `batch_size` images), or read
    from `activations`. Pass the `rotation` and `layout` the dissection used
    (`Dissection.settings` records them: `settings["rotation"]`,
    `settings["layer_outputs"][layer]`). When the recomputed maxima do
    not match the dissection's `top_activations` (the model changed since), a
    warning says so: the strips then show the current model.

    Args:
        model: the dissected model, or None with `activations`.
        probe: the probe set of the dissection.
        layer_result: the layer's `LayerDissection`.
        units: unit indices; default every unit.
        activations: `(N, K, h, w)`, `(N, h, w, K)` or `(N, T, K)` activations of the layer
            in probe order (read with `layout`), instead of running the model.
        num_images: how many top images per strip (default: all the dissection kept).
        maps: probe position -> raw `(K, h, w)` maps of the layer, rotated as in the dissection
            (`layers_activation_maps`), holding every top image of `units`: neither the model
            nor `activations` is read.

    Returns:
        unit -> `UnitStrip`.

    Raises:
        ValueError: a unit out of range, neither `model` nor `activations`, or a
            dissection that kept no top images (`top_k=0`).

    Example:
        >>> strips = unit_strips(model, probe, result["layer4"], units=[0, 7])   # doctest: +SKIP
        >>> strips[7].save("unit7.png")                                          # doctest: +SKIP
    """
    units = list(range(layer_result.num_units)) if units is None else list(units)
    units = _checked_units(layer_result, units)
    if layer_result.top_images.numel() == 0 and layer_result.num_units:
        raise ValueError(f"layer {layer_result.layer!r} was dissected with top_k=0: it kept no top images to "
                         "draw. Dissect again with top_k > 0 (the default keeps 10).")
    positions = sorted({int(p) for u in units for p in layer_result.top_images[u][:num_images].tolist()})
    if positions and max(positions) >= len(probe):
        raise ValueError(f"layer {layer_result.layer!r} names probe position {max(positions)} but the probe has "
                         f"{len(probe)} images: pass the probe set the layer was dissected on")
    if maps is not None:
        missing = [p for p in positions if p not in maps]
        if missing:
            raise ValueError(f"maps= lacks probe position(s) {missing[:10]} of the top images of layer "
                             f"{layer_result.layer!r}")
        raw = torch.stack([maps[p] for p in positions]) if positions else torch.zeros(0, 0, 0, 0)
    elif activations is not None:
        index = torch.tensor(positions, dtype=torch.long, device=activations.device)
        raw = as_unit_maps(activations[index], layer_result.layer, layout, prefix_tokens).cpu()
        rotation = as_rotation(rotation)
        if rotation is not None and len(positions):
            raw = rotate_units(raw, rotation.resolve(raw.shape[1]))
    elif model is not None:
        raw = activation_maps(model, probe, layer_result.layer, positions, rotation=rotation,
                              prefix_tokens=prefix_tokens, layout=layout, device=device, batch_size=batch_size,
                              forward_context=forward_context)
    else:
        raise ValueError("unit_strips needs the model (model=) or the layer's activations (activations=)")
    if positions and raw.shape[1] != layer_result.num_units:
        raise DissectionError(f"layer {layer_result.layer!r} now has {raw.shape[1]} units, the dissection "
                              f"{layer_result.num_units}")
    by_position = {p: raw[i] for i, p in enumerate(positions)}
    _warn_if_changed(layer_result, units, by_position, num_images)
    return strips_from_maps(probe, layer_result, units, by_position, num_images=num_images, dim=dim, notes=notes)


def _nearest(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale `(n, sh, sw)` masks to `size` by nearest neighbour (source index `floor(i * sh / H)`,
    as `F.interpolate(mode="nearest")`)."""
    rows = np.arange(size[0]) * masks.shape[1] // size[0]
    columns = np.arange(size[1]) * masks.shape[2] // size[1]
    return masks[:, rows][:, :, columns]


def _checked_units(layer_result: LayerNumbers, units: Sequence[int]) -> list[int]:
    checked = []
    for unit in units:
        if isinstance(unit, bool) or not 0 <= int(unit) < layer_result.num_units:
            raise ValueError(f"unit {unit!r} is not a unit of layer {layer_result.layer!r} "
                             f"(0 to {layer_result.num_units - 1})")
        checked.append(int(unit))
    return checked


def _warn_if_changed(layer_result: LayerNumbers, units: Sequence[int], maps: Mapping[int, torch.Tensor],
                     num_images: int | None) -> None:
    # Loose on purpose: another batch composition or a reduced-precision forward context moves
    # maxima by far less than 1% of the unit's range; a training step usually moves them more.
    for unit in units:
        recorded_values = layer_result.top_activations[unit].tolist()
        tolerance = 1e-2 * max([abs(v) for v in recorded_values] + [1e-6])
        for position, recorded in zip(layer_result.top_images[unit][:num_images].tolist(), recorded_values):
            peak = float(maps[int(position)][unit].max())
            if abs(peak - recorded) > tolerance:
                warnings.warn(
                    f"layer {layer_result.layer!r} unit {unit}: probe image {position} now peaks at {peak:.6g}, the "
                    f"dissection recorded {recorded:.6g}; the model changed since it was dissected (or another "
                    "rotation/probe was passed), so the strips show the current model", stacklevel=3)
                return
