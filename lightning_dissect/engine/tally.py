"""Masks, intersections and unit areas, accumulated over a probe set (SEMANTICS §2, §4).

Masks are sparse by construction: a unit's mask keeps the pixels above its top
0.5% threshold, and a bilinearly upsampled pixel is a convex combination of at
most 2 x 2 raw cells, so it can exceed the threshold only next to a raw cell
that (nearly) does. The tally never upsamples whole maps. It cuts the output
grid into *tiles*: runs of output rows (and columns) that read the same two
source rows (columns), so every pixel of a tile is a combination of the same
four raw cells. Only tiles with a cell near the threshold are evaluated.

Exactness. The mask is defined by `F.interpolate` of the layer's `(N, K, h, w)`
output (SEMANTICS §2), whose CPU kernel rounds in its own way (fused
multiply-adds on most builds; for small outputs a channels-last path that
vectorises over units, so a unit's bits can depend on its position in the
tensor). The tile evaluation recomputes the interpolation with its own float32
arithmetic and decides a pixel only where it is farther from the threshold
than any rounding difference could reach (`_DECISION_SLACK`, relative to the
four cells' magnitude). A map with a pixel inside that band is decided by
`F.interpolate` itself: the map alone where probes show the kernel gives every
layout the same bits (`_layout_free`; always so for Broden's 112 and 113),
else the image's whole layer tensor. So the result equals the dense definition
bit for bit. Before the tiles are trusted for a layer shape, the kernel's
source cells and weights are checked against one-hot probes on the device
(`_tile_plan`); where they do not match, the tally upsamples candidate maps
whole. The intersections are then counted from the mask pixels alone, with one
`bincount` over `unit * C + label`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Denominator = Literal["paper", "lite", "global"]
DENOMINATORS: tuple[str, ...] = ("paper", "lite", "global")

# A bilinear value exceeds the largest of its four cells by at most a few float32 ulps (weights in
# [0, 1] summing to 1 up to rounding). A cell counts as near the threshold `T` when it exceeds
# `T - |T| * _HOT_SLACK - _TINY`, far more than that rounding.
_HOT_SLACK = 2.0**-16
# The tile arithmetic and the kernel's differ by weights within 2^-20 (checked in `_tile_plan`) and
# a few roundings: at most about 2^-18 of the largest |cell|. Pixels within 2^-16 of it from the
# threshold are left to `F.interpolate`. With the kernel's own weights only the roundings differ
# (about 10 float32 roundings, < 2^-20): the band narrows to 2^-19.
_DECISION_SLACK = 2.0**-16
_EXACT_WEIGHTS_SLACK = 2.0**-19
_WEIGHT_TOLERANCE = 2.0**-20
_TINY = 2.0**-126
# Values held at once by one step (upsampled maps or tile pixels), in float32 elements.
_CHUNK_ELEMENTS = 2**23


def upsample_masks(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`M_u(x) = upsample(A[x, u]) > T_u` for a stack of raw maps (SEMANTICS §2).

    Each map is upsampled on its own, as `(n, 1, h, w)`. This equals the upsampled layer
    tensor of SEMANTICS §2 wherever ATen's kernel does not depend on the layout (on CPU,
    outputs with `sh + sw > 128`, such as Broden's 112 and 113; see `_layout_free`). On
    CPU, smaller outputs of tensors with 8 or more units go through a vectorised path
    whose last bit can differ; `mask_pixels` follows the layer tensor there.

    Args:
        maps: float32 `(n, h, w)` raw activation maps.
        thresholds: float64 `(n,)`, the threshold of each map's unit.
        size: `(sh, sw)`, the segmentation size.

    Returns:
        bool `(n, sh * sw)`.
    """
    upsampled = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    # Against the float64 threshold, compared in float32: x > T <=> x > the largest float32 <= T.
    return upsampled.flatten(1) > float32_below(thresholds).unsqueeze(1)


def float32_below(values: torch.Tensor) -> torch.Tensor:
    """The largest float32 `<= values` (float64), so that `x > values <=> x > result` for float32 `x`."""
    rounded = values.float()
    return torch.where(rounded.double() > values, torch.nextafter(rounded, torch.full_like(rounded, -math.inf)),
                       rounded)


def _float32_above(values: torch.Tensor) -> torch.Tensor:
    """The smallest float32 `>= values` (float64)."""
    rounded = values.float()
    return torch.where(rounded.double() < values, torch.nextafter(rounded, torch.full_like(rounded, math.inf)),
                       rounded)


# ---------------------------------------------------------------------------------------------- tile geometry

def axis_weights(in_size: int, out_size: int, fused: bool = True) -> tuple[torch.Tensor, ...]:
    """Source cells and weights of 1-d bilinear interpolation, as ATen's CPU kernel computes them.

    `real = max(scale * (o + 0.5) - 0.5, 0)` in float32 with `scale = in / out`
    (`fused`: one rounding, as a fused multiply-add gives); `i0 = min(floor(real), in - 1)`,
    `i1 = i0 + 1` (clamped), `w1 = clamp(real - i0, 0, 1)`, `w0 = 1 - w1`.

    Returns:
        `(i0, i1, w0, w1)`, each `(out_size,)`: long indices, float32 weights.
    """
    if in_size == out_size:
        index = torch.arange(out_size)
        return index, index, torch.ones(out_size), torch.zeros(out_size)
    scale = torch.tensor(float(in_size), dtype=torch.float32) / out_size
    position = torch.arange(out_size, dtype=torch.float64) + 0.5
    if fused:  # the float64 product and difference are exact; one rounding to float32
        real = (scale.double() * position - 0.5).float()
    else:
        real = scale * position.float() - 0.5
    real = real.clamp(min=0)
    i0 = real.floor().long().clamp(max=in_size - 1)
    w1 = (real - i0.float()).clamp(0, 1)
    i1 = i0 + (i0 < in_size - 1).long()
    return i0, i1, 1 - w1, w1


@dataclass
class _Axis:
    """One axis cut into bands of at most `S` outputs that read the same two source cells."""

    source0: torch.Tensor  # (bands,) long
    source1: torch.Tensor  # (bands,) long
    output: torch.Tensor  # (bands, S) long, 0 where padded
    weight0: torch.Tensor  # (bands, S) float32, NaN where padded: padded pixels compare False
    weight1: torch.Tensor  # (bands, S) float32
    bands_of_source: torch.Tensor  # (in_size, most bands per cell) long: the bands with source0 == cell, -1 pads

    @staticmethod
    def build(i0: torch.Tensor, i1: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, width: int,
              device: torch.device, in_size: int) -> _Axis:
        bands: list[list[int]] = []
        for o in range(i0.shape[0]):
            if bands and (i0[o], i1[o]) == (i0[bands[-1][0]], i1[bands[-1][0]]) and len(bands[-1]) < width:
                bands[-1].append(o)
            else:
                bands.append([o])
        output = torch.zeros(len(bands), width, dtype=torch.long)
        weight0 = torch.full((len(bands), width), math.nan)
        weight1 = torch.full((len(bands), width), math.nan)
        for b, members in enumerate(bands):
            output[b, : len(members)] = torch.tensor(members)
            weight0[b, : len(members)] = w0[members]
            weight1[b, : len(members)] = w1[members]
        first = torch.tensor([members[0] for members in bands])
        source0 = i0[first]
        per_source = [(source0 == cell).nonzero().squeeze(1).tolist() for cell in range(in_size)]
        bands_of_source = torch.full((len(per_source), max(1, *map(len, per_source))), -1, dtype=torch.long)
        for cell, members in enumerate(per_source):
            bands_of_source[cell, : len(members)] = torch.tensor(members, dtype=torch.long)
        return _Axis(source0.to(device), i1[first].to(device), output.to(device), weight0.to(device),
                     weight1.to(device), bands_of_source.to(device))


@dataclass
class _TilePlan:
    rows: _Axis
    cols: _Axis
    # How far (relative to the largest |cell| of a tile) the tile arithmetic may be from the kernel's.
    slack: float
    # (row bands * column bands, S * S): the output pixel `row * sw + column` of each tile position.
    pixels: torch.Tensor

    @staticmethod
    def build(rows: _Axis, cols: _Axis, slack: float, width: int) -> _TilePlan:
        pixels = rows.output.view(-1, 1, rows.output.shape[1], 1) * width + cols.output.view(1, -1, 1,
                                                                                            cols.output.shape[1])
        return _TilePlan(rows, cols, slack, pixels.reshape(rows.output.shape[0] * cols.output.shape[0], -1))


_PLANS: dict[tuple, _TilePlan | None] = {}


def _tile_plan(in_size: tuple[int, int], out_size: tuple[int, int], device: torch.device) -> _TilePlan | None:
    """The tiles of `(h, w) -> (sh, sw)` upsampling, or None where tiles do not pay or do not match.

    The plan is trusted only after one-hot probes through `F.interpolate` on `device` show that
    every output pixel reads exactly the cells the plan says, with weights within
    `_WEIGHT_TOLERANCE` (tried with fused and with unfused position arithmetic). Where the
    probes show the kernel's 1-d weights bit for bit, the decision band narrows to
    `_EXACT_WEIGHTS_SLACK`.
    """
    key = (in_size, out_size, device.type, device.index)
    if key not in _PLANS:
        (h, w), (sh, sw) = in_size, out_size
        plan = None
        # Tiles pay when each raw cell spreads over several output pixels (measured: at 2x, e.g.
        # 56 -> 112, upsampling the candidate maps whole is faster; at 4x and 8x tiles are 2 to 3 times faster).
        if sh >= 3 * h and sw >= 3 * w and h * w <= 64 * 64:
            for fused in (True, False):
                rows, cols = axis_weights(h, sh, fused), axis_weights(w, sw, fused)
                match = _kernel_match(rows, cols, in_size, out_size, device)
                if match is not None:
                    slack = _EXACT_WEIGHTS_SLACK if match == "exact" else _DECISION_SLACK
                    plan = _TilePlan.build(_Axis.build(*rows, math.ceil(sh / h), device, h),
                                           _Axis.build(*cols, math.ceil(sw / w), device, w), slack, sw)
                    break
        _PLANS[key] = plan
    return _PLANS[key]


_LAYOUT_FREE: dict[tuple, bool] = {}


def _layout_free(in_size: tuple[int, int], out_size: tuple[int, int], device: torch.device) -> bool:
    """Whether `F.interpolate` gives a map the same bits alone `(n, 1, h, w)` as inside a layer tensor.

    Probed once per shape and device with 33 random units (vector bodies of 8 and 16 lanes and a
    scalar tail); where it does not, maps near a threshold are decided on their image's whole
    layer tensor.
    """
    key = (in_size, out_size, device.type, device.index)
    if key not in _LAYOUT_FREE:
        probe = torch.randn(2, 33, *in_size, generator=torch.Generator().manual_seed(0)).to(device)
        whole = F.interpolate(probe, size=out_size, mode="bilinear", align_corners=False)
        alone = F.interpolate(probe.view(-1, 1, *in_size), size=out_size, mode="bilinear", align_corners=False)
        _LAYOUT_FREE[key] = torch.equal(whole, alone.view_as(whole))
    return _LAYOUT_FREE[key]


def _axis_matrix(i0: torch.Tensor, i1: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, in_size: int,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """`(out, in)`: the weight of every source cell in every output (both weights added where `i0 == i1`)."""
    matrix = torch.zeros(i0.shape[0], in_size, dtype=dtype)
    rows = torch.arange(i0.shape[0])
    matrix.index_put_((rows, i0), w0.to(dtype), accumulate=True)
    matrix.index_put_((rows, i1), w1.to(dtype), accumulate=True)
    return matrix


def _kernel_match(rows: tuple[torch.Tensor, ...], cols: tuple[torch.Tensor, ...], in_size: tuple[int, int],
                  out_size: tuple[int, int], device: torch.device) -> str | None:
    """Compare the plan with `F.interpolate` of one-hot probes: None (no match), "close" (the same
    cells, weights within `_WEIGHT_TOLERANCE`) or "exact" (the 1-d weights bit for bit).

    A probe lights every third cell in both axes (9 probes cover all cells). Cells three apart
    are never read by one output pixel, so each output of a probe is the weight of one cell
    (or 0), and any cell the kernel reads beyond the plan shows up. Output row 0 and column 0
    have the other axis's weight exactly 1, so they show the 1-d weights unrounded.
    """
    h, w = in_size
    vertical, horizontal = _axis_matrix(*rows, h), _axis_matrix(*cols, w)
    vertical32, horizontal32 = _axis_matrix(*rows, h, torch.float32), _axis_matrix(*cols, w, torch.float32)
    phases = [(py, px) for py in range(min(3, h)) for px in range(min(3, w))]
    probes = torch.zeros(len(phases), h, w)
    for number, (py, px) in enumerate(phases):
        probes[number, py::3, px::3] = 1
    kernel = F.interpolate(probes.view(-1, 1, h, w).to(device), size=out_size, mode="bilinear",
                           align_corners=False)[:, 0].cpu()
    exact = True
    for number, (py, px) in enumerate(phases):
        column_weights, row_weights = vertical[:, py::3].sum(1), horizontal[:, px::3].sum(1)
        predicted = column_weights.unsqueeze(1) * row_weights.unsqueeze(0)
        if not torch.equal(kernel[number] == 0, predicted == 0):
            return None
        if (kernel[number].double() - predicted).abs().max() > _WEIGHT_TOLERANCE:
            return None
        if py == 0:
            exact = exact and torch.equal(kernel[number, 0], horizontal32[:, px::3].sum(1))
        if px == 0:
            exact = exact and torch.equal(kernel[number, :, 0], vertical32[:, py::3].sum(1))
    return "exact" if exact else "close"


# ---------------------------------------------------------------------------------------------- masks

def mask_pixels(activations: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels of all masks `M_u(x)` of a batch, without upsampling whole maps (SEMANTICS §2).

    Args:
        activations: float32 `(B, K, h, w)`.
        thresholds: float64 `(K,)`.
        size: `(sh, sw)`.

    Returns:
        `(maps, pixels)`: long tensors, one entry per mask pixel: the map `x * K + u`
        and the pixel `row * sw + column`. Their order is unspecified.
    """
    batch, units, h, w = activations.shape
    activations = activations.float().contiguous()
    plan = _tile_plan((h, w), size, activations.device)
    layout_free = _layout_free((h, w), size, activations.device)
    if plan is None:
        kernel = _layer_kernel(units, (h, w), size, activations.device)
        if kernel != "identity" and layout_free:
            return _dense_mask_pixels(activations, thresholds, size)
        if kernel != "identity" and size[0] * size[1] <= h * w:
            # Converting the layer tensor for the kernel costs more than upsampling its candidate maps.
            return _dense_mask_pixels(activations, thresholds, size, layer_bits=True)
        return _layer_mask_pixels(activations, thresholds, size)
    rows, cols = plan.rows, plan.cols
    near = thresholds - thresholds.abs() * _HOT_SLACK - _TINY
    # Cells all <= 0 give pixels <= 0 (every product and sum keeps the sign): none exceeds a T >= 0.
    near = float32_below(torch.where(thresholds >= 0, near.clamp(min=0), near)).view(1, units, 1, 1)
    # Tile (by, bx) reads cells {source0, source1} x {source0, source1} with source1 = source0 + 1 (or the
    # last cell): the 2 x 2 block at (source0[by], source0[bx]). Each tile reads one block, so the tiles
    # of the hot blocks are the hot tiles, each once.
    block_max = _block_max(activations)
    block = (block_max > near).view(-1).nonzero().squeeze(1)
    cell = block % (h * w)
    row_bands, col_bands = rows.bands_of_source[cell // w], cols.bands_of_source[cell % w]
    tiles_per_map = plan.pixels.shape[0]
    local = row_bands.unsqueeze(2) * cols.source0.shape[0] + col_bands.unsqueeze(1)
    real = (row_bands >= 0).unsqueeze(2) & (col_bands >= 0).unsqueeze(1)
    hot = ((block // (h * w)).view(-1, 1, 1) * tiles_per_map + local)[real]
    flat = activations.view(-1)
    redo = torch.zeros(batch * units, dtype=torch.int32, device=activations.device)
    out_maps, out_pixels = [], []
    for start in range(0, hot.shape[0], max(1, _CHUNK_ELEMENTS // plan.pixels.shape[1])):
        tile = hot[start : start + max(1, _CHUNK_ELEMENTS // plan.pixels.shape[1])]
        map_index, local = tile // tiles_per_map, tile % tiles_per_map
        by, bx = local // cols.source0.shape[0], local % cols.source0.shape[0]
        base = map_index * (h * w)
        y0, y1 = base + rows.source0.index_select(0, by) * w, base + rows.source1.index_select(0, by) * w
        x0, x1 = cols.source0.index_select(0, bx), cols.source1.index_select(0, bx)
        a00, a01, a10, a11 = (flat.index_select(0, index) for index in (y0 + x0, y0 + x1, y1 + x0, y1 + x1))
        # The kernel's order of operations: along the row first, then across the two rows.
        wx0, wx1 = cols.weight0.index_select(0, bx), cols.weight1.index_select(0, bx)
        wy0, wy1 = rows.weight0.index_select(0, by).unsqueeze(2), rows.weight1.index_select(0, by).unsqueeze(2)
        top = a00.unsqueeze(1) * wx0 + a01.unsqueeze(1) * wx1
        bottom = a10.unsqueeze(1) * wx0 + a11.unsqueeze(1) * wx1
        values = (top.unsqueeze(1) * wy0 + bottom.unsqueeze(1) * wy1).view(tile.shape[0], -1)
        # Decided here only farther from T than any rounding difference; padded pixels are NaN: False.
        slack = torch.stack([a00, a01, a10, a11]).abs().amax(0).double() * plan.slack + _TINY
        threshold = thresholds[map_index % units]
        above = values > _float32_above(threshold + slack).unsqueeze(1)
        unsure = (values >= float32_below(threshold - slack).unsqueeze(1)) & ~above
        redo.index_add_(0, map_index, unsure.any(1).int())
        which, position = above.nonzero(as_tuple=True)
        out_maps.append(map_index.index_select(0, which))
        out_pixels.append(plan.pixels.view(-1).index_select(0, local.index_select(0, which) * values.shape[1]
                                                            + position))
    maps = torch.cat(out_maps) if out_maps else torch.zeros(0, dtype=torch.long, device=activations.device)
    pixels = torch.cat(out_pixels) if out_pixels else torch.zeros_like(maps)
    # Near the threshold only the kernel itself decides: those maps are upsampled whole.
    redone = redo.nonzero().squeeze(1)
    if redone.shape[0]:
        keep = redo[maps] == 0
        if layout_free:
            exact_maps, exact_pixels = _dense_mask_pixels(activations.view(-1, 1, h, w)[redone],
                                                          thresholds[redone % units], size, per_map=True)
            exact_maps = redone[exact_maps]
        else:  # upsample the images' whole layer tensors, keep the redone maps
            images = (redone // units).unique()
            image_maps, exact_pixels = _layer_mask_pixels(activations[images], thresholds, size)
            exact_maps = images[image_maps // units] * units + image_maps % units
            wanted = redo[exact_maps] > 0
            exact_maps, exact_pixels = exact_maps[wanted], exact_pixels[wanted]
        maps = torch.cat([maps[keep], exact_maps])
        pixels = torch.cat([pixels[keep], exact_pixels])
    return maps, pixels


def _block_max(activations: torch.Tensor) -> torch.Tensor:
    """The largest of each cell's 2 x 2 block (the cell, its right, lower and lower-right
    neighbours; past the last row or column, the cell's own row or column): 2 x 2 max pooling
    with -inf padding, several times faster on CPU than `max_pool2d`."""
    rows = torch.cat([torch.maximum(activations[:, :, :-1], activations[:, :, 1:]), activations[:, :, -1:]], dim=2)
    return torch.cat([torch.maximum(rows[..., :-1], rows[..., 1:]), rows[..., -1:]], dim=3)


_LAYER_KERNEL: dict[tuple, str] = {}


def _layer_kernel(units: int, in_size: tuple[int, int], out_size: tuple[int, int], device: torch.device) -> str:
    """How to get `F.interpolate`'s bits for a `(B, units, h, w)` layer tensor cheaply.

    `"identity"`: equal sizes, where the kernel returns its input (weights 1 and 0);
    `"channels_last"`: the kernel run on a channels-last copy gives the same bits (on CPU,
    small outputs of NCHW tensors go through a channels-last path anyway, and converting the
    output back costs most of the time); `"nchw"`: the layer tensor as it is. Decided once per
    shape and device by running the kernel both ways on random layer tensors of this shape.
    """
    key = (units, in_size, out_size, device.type, device.index)
    if key not in _LAYER_KERNEL:
        generator = torch.Generator().manual_seed(1)
        probe = torch.randn(3, units, *in_size, generator=generator).to(device)
        probe[1] = probe[1].relu()
        whole = F.interpolate(probe, size=out_size, mode="bilinear", align_corners=False)
        if in_size == out_size and torch.equal(whole, probe):
            _LAYER_KERNEL[key] = "identity"
        else:
            last = F.interpolate(probe.contiguous(memory_format=torch.channels_last), size=out_size,
                                 mode="bilinear", align_corners=False)
            _LAYER_KERNEL[key] = "channels_last" if torch.equal(whole, last) else "nchw"
    return _LAYER_KERNEL[key]


def _layer_mask_pixels(activations: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """`mask_pixels` by upsampling the layer tensor `(B, K, h, w)` whole, a few images at a time:
    the definition itself, for shapes where the kernel's bits depend on the layout."""
    batch, units, h, w = activations.shape
    below = float32_below(thresholds)
    kernel = _layer_kernel(units, (h, w), size, activations.device)
    if kernel == "identity":
        image, unit, row, column = (activations > below.view(1, units, 1, 1)).nonzero(as_tuple=True)
        return image * units + unit, row * w + column
    step = max(1, _CHUNK_ELEMENTS // (units * size[0] * size[1]))
    out_maps, out_pixels = [], []
    for start in range(0, batch, step):
        chunk = activations[start : start + step]
        if kernel == "channels_last":
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        # (b, sh, sw, K): a contiguous view of a channels-last result, a strided one of an NCHW result.
        upsampled = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        image, row, column, unit = (upsampled > below).nonzero(as_tuple=True)
        out_maps.append((image + start) * units + unit)
        out_pixels.append(row * size[1] + column)
    if not out_maps:
        empty = torch.zeros(0, dtype=torch.long, device=activations.device)
        return empty, empty
    return torch.cat(out_maps), torch.cat(out_pixels)


def _dense_mask_pixels(activations: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int],
                       per_map: bool = False, layer_bits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`mask_pixels` by upsampling every candidate map alone.

    With `per_map`, `activations` is `(n, 1, h, w)` with one threshold per map, and the maps
    returned index its first axis. With `layer_bits` (shapes where the kernel's bits depend on
    the layout), a map's pixels are decided alone only farther from the threshold than the two
    layouts' results can differ (`_DECISION_SLACK` of the map's largest |cell|); a map with a
    pixel inside that band is decided on its image's layer tensor, as in `mask_pixels`.
    """
    n, units, h, w = activations.shape
    maps = activations.view(-1, h, w)
    flat = maps.view(maps.shape[0], -1)
    map_thresholds = thresholds if per_map else thresholds.repeat(n)
    # A map whose every cell is below the threshold (with rounding slack) has an empty mask.
    peak = flat.amax(dim=1).double()
    candidates = (peak + peak.abs() * _HOT_SLACK + _TINY > map_thresholds).nonzero().squeeze(1)
    if layer_bits:
        magnitude = torch.maximum(peak, -flat.amin(dim=1).double())  # (two reductions beat aminmax on CPU)
    chunk = max(1, _CHUNK_ELEMENTS // (size[0] * size[1]))
    out_maps, out_pixels, redo = [], [], []
    for start in range(0, candidates.shape[0], chunk):
        index = candidates[start : start + chunk]
        if not layer_bits:
            which, pixel = upsample_masks(maps[index], map_thresholds[index], size).nonzero(as_tuple=True)
        else:
            sources = maps.index_select(0, index).unsqueeze(1)
            upsampled = F.interpolate(sources, size=size, mode="bilinear", align_corners=False).flatten(1)
            threshold, slack = map_thresholds[index], magnitude[index] * _DECISION_SLACK + _TINY
            above = upsampled > _float32_above(threshold + slack).unsqueeze(1)
            unsure = (upsampled >= float32_below(threshold - slack).unsqueeze(1)) & ~above
            redo.append(index[unsure.any(1)])
            which, pixel = above.nonzero(as_tuple=True)
        out_maps.append(index[which])
        out_pixels.append(pixel)
    if not out_maps:
        empty = torch.zeros(0, dtype=torch.long, device=activations.device)
        return empty, empty
    found, pixels = torch.cat(out_maps), torch.cat(out_pixels)
    redone = torch.cat(redo) if redo else found[:0]
    if redone.shape[0]:
        flagged = torch.zeros(n * units, dtype=torch.bool, device=activations.device)
        flagged[redone] = True
        images = (redone // units).unique()
        image_maps, exact_pixels = _layer_mask_pixels(activations[images], thresholds, size)
        exact_maps = images[image_maps // units] * units + image_maps % units
        wanted, keep = flagged[exact_maps], ~flagged[found]
        found = torch.cat([found[keep], exact_maps[wanted]])
        pixels = torch.cat([pixels[keep], exact_pixels[wanted]])
    return found, pixels


# ---------------------------------------------------------------------------------------------- tally

class IoUTally:
    """Running sums `I(u, c)` and `A_k(u)` over the probe images (SEMANTICS §4).

    Args:
        num_units: `K`.
        label_category: long `(C,)`, the primary category index of every
            label (-1: never scored).
        num_categories: the number of dissected categories.
        denominator: `"paper"`, `"lite"` or `"global"`, which unit area to sum.
        device: where the sums live.

    Attributes:
        intersection: long `(K, C)`.
        unit_area: long `(K, num_categories)`; for `"global"` all columns are equal.
    """

    def __init__(self, num_units: int, label_category: torch.Tensor, num_categories: int,
                 denominator: Denominator = "paper", device: torch.device | str | None = None) -> None:
        if denominator not in DENOMINATORS:
            raise ValueError(f"denominator={denominator!r} is not one of {DENOMINATORS}")
        self.denominator = denominator
        self.num_units = num_units
        self.num_categories = num_categories
        self.label_category = label_category.to(device)
        self.num_labels = label_category.shape[0]
        self.intersection = torch.zeros(num_units, self.num_labels, dtype=torch.long, device=device)
        self.unit_area = torch.zeros(num_units, num_categories, dtype=torch.long, device=device)

    def add(self, activations: torch.Tensor, thresholds: torch.Tensor, label_maps: torch.Tensor,
            image_labels: torch.Tensor, present: torch.Tensor, image_level_present: torch.Tensor) -> None:
        """Add one batch of images.

        Args:
            activations: float32 `(B, K, h, w)`.
            thresholds: float64 `(K,)`.
            label_maps: canonical integer label maps `(B, M, sh, sw)`.
            image_labels: canonical long `(B, L)`.
            present: bool `(B, num_categories)`, category presence (paper rule).
            image_level_present: bool `(B, num_categories)`, categories of the
                image-level labels (lite rule).
        """
        size = (label_maps.shape[-2], label_maps.shape[-1])
        maps, pixels = mask_pixels(activations, thresholds, size)
        self.add_pixels(maps, pixels, label_maps, image_labels, present, image_level_present)

    def add_pixels(self, maps: torch.Tensor, pixels: torch.Tensor, label_maps: torch.Tensor,
                   image_labels: torch.Tensor, present: torch.Tensor, image_level_present: torch.Tensor) -> None:
        """Add one batch given its mask pixels (`mask_pixels`); the other arguments as in `add`."""
        batch, num_maps = label_maps.shape[0], label_maps.shape[1]
        units, num_labels, num_categories = self.num_units, self.num_labels, self.num_categories
        pixel_count = label_maps.shape[-2] * label_maps.shape[-1]
        image, unit = maps // units, maps % units
        area = torch.bincount(maps, minlength=batch * units).view(batch, units)
        # (mask pixels, M): the M label maps at each mask pixel, gathered without reordering the batch.
        labels = label_maps.reshape(batch, num_maps, pixel_count)[image, :, pixels].long()
        hit = labels > 0
        cells = (unit.unsqueeze(1) * num_labels + labels)[hit]
        self.intersection.view(-1).add_(torch.bincount(cells, minlength=self.intersection.numel()))
        # An image-level label covers every pixel: the whole mask intersects it (padding 0 adds 0).
        image_level = image_labels.long().unsqueeze(1)  # (B, 1, L)
        cells = torch.arange(units, device=maps.device).view(1, units, 1) * num_labels + image_level
        self.intersection.view(-1).index_add_(0, cells.reshape(-1), (area.unsqueeze(2) * (image_level > 0)).reshape(-1))
        if self.denominator == "paper":
            counted = present.unsqueeze(1).expand(batch, units, num_categories)
        elif self.denominator == "global":
            counted = torch.ones(batch, units, num_categories, dtype=torch.bool, device=maps.device)
        else:
            # lite: the mask must touch a pixel label of the category, or the image carry one image-level.
            category = self.label_category[labels]
            touched = (maps.unsqueeze(1) * num_categories + category)[category >= 0]
            counted = torch.bincount(touched, minlength=batch * units * num_categories) > 0
            counted = counted.view(batch, units, num_categories) | image_level_present.unsqueeze(1)
        self.unit_area += (area.unsqueeze(2) * counted).sum(0)

    def merge(self, other_intersection: torch.Tensor, other_unit_area: torch.Tensor) -> None:
        """Add the sums of a disjoint shard of the probe set."""
        self.intersection += other_intersection.to(self.intersection.device)
        self.unit_area += other_unit_area.to(self.unit_area.device)
