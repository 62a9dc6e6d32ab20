"""The fast path of `engine.masks.mask_pixels`: the mask pixels of a batch without upsampling every map.

Masks are sparse by construction: a unit's mask keeps the pixels above its top
0.5% threshold, and a bilinearly upsampled pixel is a convex combination of at
most 2 x 2 raw cells, so it can exceed the threshold only next to a raw cell
that (nearly) does. So only candidates are evaluated: for upsampling by 3x or
more, *tiles* (runs of output rows and columns that read the same two source
rows and columns, so every pixel of a tile combines the same four raw cells)
next to a cell near the threshold, and of those only the rows whose end pixels
reach it (a row is linear in its column weight); otherwise whole maps whose
largest cell is near it.

Exactness. The mask is defined by `F.interpolate` of the layer's `(N, K, h, w)`
output (SEMANTICS §2), whose CPU kernel rounds in its own way (fused
multiply-adds on most builds; for small outputs a channels-last path that
vectorises over units, so a unit's bits can depend on its position in the
tensor). Where the evaluation here may round differently from that, it decides
a pixel only farther from the threshold than any rounding difference could
reach (a *band*, relative to the magnitude of the cells involved); a map with a
pixel inside the band is *unsure* and is decided by `F.interpolate` itself (the
map alone where the kernel gives every layout the same bits, else the image's
whole layer tensor). So the result equals the definition bit for bit, which the
reference path (`engine/reference.py`) computes directly.

What the kernel does is learnt by probing it once per shape and device
(`functools.lru_cache`): `tile_plan` (do the kernel's source cells and weights
match the tiles'?), `layout_free` (does a map alone get the same bits as inside
a layer tensor?) and `layer_kernel` (which cheap layout gives the layer tensor's
bits?). The probes are lazy: a layer pays only for those its shape needs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

# Rounding bands. A bilinear value exceeds the largest of its four cells by at most a few float32
# ulps (weights in [0, 1] summing to 1 up to rounding). A cell counts as near the threshold `T` when
# it exceeds `T - |T| * CELL_BAND - TINY`, far more than that rounding.
CELL_BAND = 2.0**-16
# The tile arithmetic and the kernel's differ by weights within 2^-20 (WEIGHT_TOLERANCE, checked by
# `tile_plan`) and a few roundings: at most about 2^-18 of the largest |cell|. Pixels within 2^-16 of
# it from the threshold are left to `F.interpolate`; so are those where a map alone and the layer
# tensor may differ. With the kernel's own weights only the roundings differ (about 10 float32
# roundings, < 2^-20): the band narrows to 2^-19.
DECISION_BAND = 2.0**-16
EXACT_WEIGHTS_BAND = 2.0**-19
WEIGHT_TOLERANCE = 2.0**-20
# How far a pixel inside a tile may, by rounding, exceed the largest of the tile's corner pixels, relative
# to the largest |cell|: exactly never in real arithmetic (a bilinear function peaks at a corner of a box);
# the float32 roundings and weights `1 - w1` that are off by an ulp reach about 20 ulps (2^-19); 2^-16 is ample.
CORNER_SLACK = 2.0**-16
# Keeps bands positive around a threshold of 0.
TINY = 2.0**-126
# Values held at once by one step (upsampled maps or tile pixels), in float32 elements.
CHUNK_ELEMENTS = 2**23


def float32_below(values: torch.Tensor) -> torch.Tensor:
    """The largest float32 `<= values` (float64), so that `x > values <=> x > result` for float32 `x`."""
    rounded = values.float()
    return torch.where(rounded.double() > values, torch.nextafter(rounded, torch.full_like(rounded, -math.inf)),
                       rounded)


def float32_above(values: torch.Tensor) -> torch.Tensor:
    """The smallest float32 `>= values` (float64)."""
    rounded = values.float()
    return torch.where(rounded.double() < values, torch.nextafter(rounded, torch.full_like(rounded, math.inf)),
                       rounded)


def upsample_masks(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`M_u(x) = upsample(A[x, u]) > T_u` for a stack of raw maps (SEMANTICS §2).

    Each map is upsampled on its own, as `(n, 1, h, w)`. This equals the upsampled layer
    tensor of SEMANTICS §2 wherever ATen's kernel does not depend on the layout (on CPU,
    outputs with `sh + sw > 128`, such as Broden's 112 and 113; see `layout_free`). On
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


# ---------------------------------------------------------------------------------------------- kernel probes

# `(i0, i1, w0, w1)` of one axis: source cells and weights of every output position.
AxisWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def axis_weights(in_size: int, out_size: int, fused: bool = True) -> AxisWeights:
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
class Axis:
    """One axis cut into bands of at most `S` outputs that read the same two source cells."""

    source0: torch.Tensor  # (bands,) long
    source1: torch.Tensor  # (bands,) long
    output: torch.Tensor  # (bands, S) long, 0 where padded
    weight0: torch.Tensor  # (bands, S) float32, NaN where padded: padded pixels compare False
    weight1: torch.Tensor  # (bands, S) float32
    bands_of_source: torch.Tensor  # (in_size, most bands per cell) long: the bands with source0 == cell, -1 pads
    # (2, bands) float32: weight0 and weight1 of each band's first (row 0) and last (row 1) output. The
    # weights run monotonically along a band, so these are its extremes.
    ends0: torch.Tensor
    ends1: torch.Tensor

    @staticmethod
    def build(i0: torch.Tensor, i1: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, width: int,
              device: torch.device, in_size: int) -> Axis:
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
        last = torch.tensor([members[-1] for members in bands])
        ends0, ends1 = torch.stack([w0[first], w0[last]]), torch.stack([w1[first], w1[last]])
        return Axis(source0.to(device), i1[first].to(device), output.to(device), weight0.to(device),
                    weight1.to(device), bands_of_source.to(device), ends0.to(device), ends1.to(device))


@dataclass
class TilePlan:
    """The tiles of one `(h, w) -> (sh, sw)` upsampling on one device."""

    rows: Axis
    cols: Axis
    # How far (relative to the largest |cell| of a tile) the tile arithmetic may be from the kernel's.
    band: float
    # (row bands * column bands, S * S): the output pixel `row * sw + column` of each tile position.
    pixels: torch.Tensor

    @staticmethod
    def build(rows: Axis, cols: Axis, band: float, width: int) -> TilePlan:
        pixels = rows.output.view(-1, 1, rows.output.shape[1], 1) * width + cols.output.view(1, -1, 1,
                                                                                            cols.output.shape[1])
        return TilePlan(rows, cols, band, pixels.reshape(rows.output.shape[0] * cols.output.shape[0], -1))


@functools.cache
def tile_plan(in_size: tuple[int, int], out_size: tuple[int, int], device: torch.device) -> TilePlan | None:
    """The tiles of `(h, w) -> (sh, sw)` upsampling, or None where tiles do not pay or do not match.

    The plan is trusted only after one-hot probes through `F.interpolate` on `device` show that
    every output pixel reads exactly the cells the plan says, with weights within
    `WEIGHT_TOLERANCE` (tried with fused and with unfused position arithmetic). Where the
    probes show the kernel's 1-d weights bit for bit, the decision band narrows to
    `EXACT_WEIGHTS_BAND`.
    """
    (h, w), (sh, sw) = in_size, out_size
    # Tiles pay when each raw cell spreads over several output pixels (measured: at 2x, e.g.
    # 56 -> 112, upsampling the candidate maps whole is faster; at 4x and 8x tiles are 2 to 3 times faster).
    if not (sh >= 3 * h and sw >= 3 * w and h * w <= 64 * 64):
        return None
    for fused in (True, False):
        rows, cols = axis_weights(h, sh, fused), axis_weights(w, sw, fused)
        match = _kernel_match(rows, cols, in_size, out_size, device)
        if match is not None:
            band = EXACT_WEIGHTS_BAND if match == "exact" else DECISION_BAND
            return TilePlan.build(Axis.build(*rows, math.ceil(sh / h), device, h),
                                  Axis.build(*cols, math.ceil(sw / w), device, w), band, sw)
    return None


def _axis_matrix(i0: torch.Tensor, i1: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, in_size: int,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """`(out, in)`: the weight of every source cell in every output (both weights added where `i0 == i1`)."""
    matrix = torch.zeros(i0.shape[0], in_size, dtype=dtype)
    rows = torch.arange(i0.shape[0])
    matrix.index_put_((rows, i0), w0.to(dtype), accumulate=True)
    matrix.index_put_((rows, i1), w1.to(dtype), accumulate=True)
    return matrix


def _kernel_match(rows: AxisWeights, cols: AxisWeights, in_size: tuple[int, int],
                  out_size: tuple[int, int], device: torch.device) -> Literal["exact", "close"] | None:
    """Compare the plan with `F.interpolate` of one-hot probes: None (no match), "close" (the same
    cells, weights within `WEIGHT_TOLERANCE`) or "exact" (the 1-d weights bit for bit).

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
        if (kernel[number].double() - predicted).abs().max() > WEIGHT_TOLERANCE:
            return None
        if py == 0:
            exact = exact and torch.equal(kernel[number, 0], horizontal32[:, px::3].sum(1))
        if px == 0:
            exact = exact and torch.equal(kernel[number, :, 0], vertical32[:, py::3].sum(1))
    return "exact" if exact else "close"


@functools.cache
def layout_free(in_size: tuple[int, int], out_size: tuple[int, int], device: torch.device) -> bool:
    """Whether `F.interpolate` gives a map the same bits alone `(n, 1, h, w)` as inside a layer tensor.

    Probed with 33 random units (vector bodies of 8 and 16 lanes and a scalar tail); where it
    does not, maps near a threshold are decided on their image's whole layer tensor.
    """
    probe = torch.randn(2, 33, *in_size, generator=torch.Generator().manual_seed(0)).to(device)
    whole = F.interpolate(probe, size=out_size, mode="bilinear", align_corners=False)
    alone = F.interpolate(probe.view(-1, 1, *in_size), size=out_size, mode="bilinear", align_corners=False)
    return torch.equal(whole, alone.view_as(whole))


LayerKernel = Literal["identity", "channels_last", "nchw"]


@functools.cache
def layer_kernel(units: int, in_size: tuple[int, int], out_size: tuple[int, int], device: torch.device
                 ) -> LayerKernel:
    """How to get `F.interpolate`'s bits for a `(B, units, h, w)` layer tensor cheaply.

    `"identity"`: equal sizes, where the kernel returns its input (weights 1 and 0);
    `"channels_last"`: the kernel run on a channels-last copy gives the same bits (on CPU,
    small outputs of NCHW tensors go through a channels-last path anyway, and converting the
    output back costs most of the time); `"nchw"`: the layer tensor as it is. Decided by
    running the kernel both ways on random layer tensors of this shape.
    """
    generator = torch.Generator().manual_seed(1)
    probe = torch.randn(3, units, *in_size, generator=generator).to(device)
    probe[1] = probe[1].relu()
    whole = F.interpolate(probe, size=out_size, mode="bilinear", align_corners=False)
    if in_size == out_size and torch.equal(whole, probe):
        return "identity"
    last = F.interpolate(probe.contiguous(memory_format=torch.channels_last), size=out_size,
                         mode="bilinear", align_corners=False)
    return "channels_last" if torch.equal(whole, last) else "nchw"


# ---------------------------------------------------------------------------------------------- mask pixels

class MaskPass(NamedTuple):
    """Mask pixels decided so far, and the pixels left to the kernel.

    `maps` `x * K + u` and `pixels` `row * sw + column`, one entry per decided mask pixel; `unsure_maps`
    and `unsure_pixels` the same for the pixels within rounding reach of the threshold, which
    `settle` decides with `F.interpolate`'s own values. The two sets are disjoint."""

    maps: torch.Tensor
    pixels: torch.Tensor
    unsure_maps: torch.Tensor
    unsure_pixels: torch.Tensor


def fast_mask_pixels(activations: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`engine.masks.mask_pixels` without upsampling whole layer tensors where it can (see the module docstring)."""
    batch, units, h, w = activations.shape
    activations = activations.float().contiguous()
    device = activations.device
    plan = tile_plan((h, w), size, device)
    free = layout_free((h, w), size, device)
    if plan is not None:
        first = tile_pass(activations, thresholds, size, plan)
    else:
        kernel = layer_kernel(units, (h, w), size, device)
        downsampling = size[0] * size[1] <= h * w
        if kernel == "identity" or not (free or downsampling):
            # Upsampling with layout-dependent bits: converting the layer tensor for the kernel
            # costs less than upsampling its candidate maps in a band and redoing the unsure ones.
            return layer_tensor_pixels(activations, thresholds, size)
        # Map by map: exact where the layout does not matter, else in a band.
        first = map_by_map_pass(activations.view(-1, h, w), thresholds.repeat(batch), size,
                                None if free else DECISION_BAND)
    return settle(first, activations, thresholds, size, free)


def settle(first: MaskPass, activations: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int],
           free: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`first`'s decided pixels and those of its unsure pixels that the kernel's own values put above
    the threshold: each unsure pixel's value from `F.interpolate` of its map alone where the layout
    does not matter (`free`), else of its image's whole layer tensor. A decided pixel lies farther
    from the threshold than any rounding difference, so only the unsure ones need the kernel."""
    maps, pixels, unsure_maps, unsure_pixels = first
    if not unsure_maps.shape[0]:
        return maps, pixels
    units = activations.shape[1]
    values = kernel_values(activations, unsure_maps, unsure_pixels, size, free)
    above = (values > float32_below(thresholds.index_select(0, unsure_maps % units))).nonzero().squeeze(1)
    return (torch.cat([maps, unsure_maps.index_select(0, above)]),
            torch.cat([pixels, unsure_pixels.index_select(0, above)]))


def kernel_values(activations: torch.Tensor, maps: torch.Tensor, pixels: torch.Tensor, size: tuple[int, int],
                  free: bool) -> torch.Tensor:
    """`F.interpolate`'s own float32 value at each `(map, pixel)` of `activations` `(B, K, h, w)`: of the
    map alone `(n, 1, h, w)` where `free` (the kernel gives every layout the same bits), else of the
    image's whole layer tensor in the layout `layer_kernel` found to give its bits; a few maps or
    images at a time."""
    batch, units, h, w = activations.shape
    sh, sw = size
    values = torch.empty(maps.shape[0], dtype=torch.float32, device=activations.device)
    if free:
        sources, owner = maps.unique(return_inverse=True)
        step = max(1, CHUNK_ELEMENTS // (sh * sw))
        single = activations.view(-1, 1, h, w)
        for start in range(0, sources.shape[0], step):
            upsampled = F.interpolate(single.index_select(0, sources[start : start + step]), size=size,
                                      mode="bilinear", align_corners=False).view(-1)
            wanted = ((owner >= start) & (owner < start + step)).nonzero().squeeze(1)
            at = (owner.index_select(0, wanted) - start) * (sh * sw) + pixels.index_select(0, wanted)
            values[wanted] = upsampled.index_select(0, at)
        return values
    kernel = layer_kernel(units, (h, w), size, activations.device)
    images, owner = (maps // units).unique(return_inverse=True)
    step = max(1, CHUNK_ELEMENTS // (units * sh * sw))
    for start in range(0, images.shape[0], step):
        chunk = activations.index_select(0, images[start : start + step])
        if kernel == "channels_last":
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        upsampled = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False)
        wanted = ((owner >= start) & (owner < start + step)).nonzero().squeeze(1)
        unit, pixel = maps.index_select(0, wanted) % units, pixels.index_select(0, wanted)
        values[wanted] = upsampled[owner.index_select(0, wanted) - start, unit, pixel // sw, pixel % sw]
    return values


def layer_tensor_pixels(activations: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask pixels by upsampling the layer tensor `(B, K, h, w)` whole, a few images at a time: the
    definition itself, in the cheapest layout that gives its bits (`layer_kernel`)."""
    batch, units, h, w = activations.shape
    below = float32_below(thresholds)
    kernel = layer_kernel(units, (h, w), size, activations.device)
    if kernel == "identity":
        image, unit, row, column = (activations > below.view(1, units, 1, 1)).nonzero(as_tuple=True)
        return image * units + unit, row * w + column
    step = max(1, CHUNK_ELEMENTS // (units * size[0] * size[1]))
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


def map_by_map_pass(maps: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int], band: float | None
                    ) -> MaskPass:
    """Mask pixels by upsampling each candidate map alone, `(n, 1, h, w)`.

    A map whose every cell is below its threshold (with rounding slack) has an empty mask and
    is skipped. With `band` None the maps are decided here (the kernel gives a map alone the
    same bits as in its layer tensor). Otherwise pixels within `band` of the map's largest
    |cell| from the threshold are left unsure: the two layouts' results may differ there.

    Args:
        maps: float32 `(n, h, w)`, contiguous.
        thresholds: float64 `(n,)`, each map's threshold.
        size: `(sh, sw)`.
        band: None, or the band relative to each map's largest |cell|.

    Returns:
        A `MaskPass` whose maps index the first axis of `maps`.
    """
    flat = maps.view(maps.shape[0], -1)
    peak = flat.amax(dim=1).double()
    candidates = (peak + peak.abs() * CELL_BAND + TINY > thresholds).nonzero().squeeze(1)
    if band is not None:
        magnitude = torch.maximum(peak, -flat.amin(dim=1).double())  # (two reductions beat aminmax on CPU)
    chunk = max(1, CHUNK_ELEMENTS // (size[0] * size[1]))
    out = Pieces()
    for start in range(0, candidates.shape[0], chunk):
        index = candidates[start : start + chunk]
        if band is None:
            which, pixel = upsample_masks(maps[index], thresholds[index], size).nonzero(as_tuple=True)
            out.add(index[which], pixel)
        else:
            sources = maps.index_select(0, index).unsqueeze(1)
            upsampled = F.interpolate(sources, size=size, mode="bilinear", align_corners=False).flatten(1)
            out.add_banded(upsampled, *band_bounds(thresholds[index], magnitude[index] * band + TINY), index,
                           torch.arange(size[0] * size[1], device=maps.device).view(1, -1),
                           torch.zeros_like(index))
    return out.result(maps.device)


def band_bounds(thresholds: torch.Tensor, band: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 `(lower, upper)` of float64 `thresholds` and `band` `(n,)`: a float32 value `x` lies within
    `band` of its threshold when `lower <= x <= upper`, farther above it when `x > upper`."""
    return float32_below(thresholds - band), float32_above(thresholds + band)


class Pieces:
    """The mask pixels of a pass, gathered chunk by chunk: decided and unsure."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []
        self.pixels: list[torch.Tensor] = []
        self.unsure_maps: list[torch.Tensor] = []
        self.unsure_pixels: list[torch.Tensor] = []

    def add(self, maps: torch.Tensor, pixels: torch.Tensor) -> None:
        self.maps.append(maps)
        self.pixels.append(pixels)

    def add_banded(self, values: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, owners: torch.Tensor,
                   table: torch.Tensor, table_rows: torch.Tensor) -> None:
        """Decide float32 `values` `(n, m)` against their row's `band_bounds` `(n,)`: a value above `upper`
        is a mask pixel, one from `lower` to `upper` is unsure (NaN, a padded pixel, is neither). Row `i`
        holds pixels of map `owners[i]`, its column `j` pixel `table[table_rows[i], j]`. Only the values
        within reach of the threshold (few) are looked at twice."""
        candidate = (values >= lower.unsqueeze(1)).view(-1).nonzero().squeeze(1)
        if not candidate.shape[0]:
            return
        width = values.shape[1]
        row = candidate // width
        above = values.view(-1).index_select(0, candidate) > upper.index_select(0, row)
        owner = owners.index_select(0, row)
        pixel = table.view(-1).index_select(0, table_rows.index_select(0, row) * width + candidate % width)
        decided = above.nonzero().squeeze(1)
        self.add(owner.index_select(0, decided), pixel.index_select(0, decided))
        if decided.shape[0] < candidate.shape[0]:
            unsure = (~above).nonzero().squeeze(1)
            self.unsure_maps.append(owner.index_select(0, unsure))
            self.unsure_pixels.append(pixel.index_select(0, unsure))

    def result(self, device: torch.device) -> MaskPass:
        def joined(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

        return MaskPass(joined(self.maps), joined(self.pixels), joined(self.unsure_maps), joined(self.unsure_pixels))


def tile_pass(activations: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int], plan: TilePlan
              ) -> MaskPass:
    """Mask pixels from the tiles next to a cell near the threshold, evaluated with the tile
    arithmetic; pixels within the plan's band of the threshold are left unsure."""
    batch, units, h, w = activations.shape
    rows, cols = plan.rows, plan.cols
    near = thresholds - thresholds.abs() * CELL_BAND - TINY
    # Cells all <= 0 give pixels <= 0 (every product and sum keeps the sign): none exceeds a T >= 0.
    near = float32_below(torch.where(thresholds >= 0, near.clamp(min=0), near)).view(1, units, 1, 1)
    # Tile (by, bx) reads cells {source0, source1} x {source0, source1} with source1 = source0 + 1 (or the
    # last cell): the 2 x 2 block at (source0[by], source0[bx]). Each tile reads one block, so the tiles
    # of the hot blocks are the hot tiles, each once.
    block = hot_blocks(activations, near)
    cell = block % (h * w)
    row_bands, col_bands = rows.bands_of_source[cell // w], cols.bands_of_source[cell % w]
    tiles_per_map = plan.pixels.shape[0]
    local = row_bands.unsqueeze(2) * cols.source0.shape[0] + col_bands.unsqueeze(1)
    real = (row_bands >= 0).unsqueeze(2) & (col_bands >= 0).unsqueeze(1)
    hot = ((block // (h * w)).view(-1, 1, 1) * tiles_per_map + local)[real]
    flat = activations.view(-1)
    out = Pieces()
    step = max(1, CHUNK_ELEMENTS // plan.pixels.shape[1])
    for start in range(0, hot.shape[0], step):
        tile = hot[start : start + step]
        map_index, local = tile // tiles_per_map, tile % tiles_per_map
        by, bx = local // cols.source0.shape[0], local % cols.source0.shape[0]
        base = map_index * (h * w)
        y0, y1 = base + rows.source0.index_select(0, by) * w, base + rows.source1.index_select(0, by) * w
        x0, x1 = cols.source0.index_select(0, bx), cols.source1.index_select(0, bx)
        cells = torch.stack([flat.index_select(0, index) for index in (y0 + x0, y0 + x1, y1 + x0, y1 + x1)])
        threshold = thresholds.index_select(0, map_index % units)
        # Decided only farther from T than any rounding difference: the band, relative to the largest |cell|.
        magnitude = cells.abs().amax(0).double()
        band = magnitude * plan.band + TINY
        # A tile's pixels are bilinear in its row and column weights, so none exceeds the largest of its
        # four corner pixels by more than rounding (CORNER_SLACK): a tile whose corners are all below
        # T - band has no pixel to decide or leave unsure.
        peaks = _corner_peaks(cells, cols.ends0.index_select(1, bx), cols.ends1.index_select(1, bx),
                              rows.ends0.index_select(1, by), rows.ends1.index_select(1, by))
        reach = peaks.double() + magnitude * CORNER_SLACK >= threshold - band
        if not bool(reach.all()):
            kept = reach.nonzero().squeeze(1)
            cells = cells.index_select(1, kept)
            threshold, band, magnitude, map_index, local, by, bx = (
                t.index_select(0, kept) for t in (threshold, band, magnitude, map_index, local, by, bx))
        # The kernel's order of operations: along the two source rows first (`top`, `bottom`: tiles x columns),
        # then across them, row by row.
        wx0, wx1 = cols.weight0.index_select(0, bx), cols.weight1.index_select(0, bx)
        wy0, wy1 = rows.weight0.index_select(0, by), rows.weight1.index_select(0, by)
        a00, a01, a10, a11 = (cell.unsqueeze(1) for cell in cells)
        top, bottom = a00 * wx0 + a01 * wx1, a10 * wx0 + a11 * wx1
        # A tile's row is linear in its column weight, so none of its pixels exceeds the larger of its two end
        # pixels by more than rounding (CORNER_SLACK): only the rows whose ends reach `T - band` are evaluated,
        # about a third of the rows at the ResNet-18 shapes. Padded rows are NaN: never reached.
        ends = _row_ends(cells, cols.ends0.index_select(1, bx), cols.ends1.index_select(1, bx), wy0, wy1)
        reach = ends.double() + (magnitude * CORNER_SLACK).unsqueeze(1) >= (threshold - band).unsqueeze(1)
        tile, row = reach.nonzero(as_tuple=True)
        values = (top.index_select(0, tile) * wy0[tile, row].unsqueeze(1)
                  + bottom.index_select(0, tile) * wy1[tile, row].unsqueeze(1))
        # Padded columns are NaN: never candidates. Row `r` of tile `local` holds `plan.pixels`' row
        # `local * S + r` once its `(S * S)` pixels are read as `S` rows of `S`.
        lower, upper = (bound.index_select(0, tile) for bound in band_bounds(threshold, band))
        out.add_banded(values, lower, upper, map_index.index_select(0, tile), plan.pixels.view(-1, values.shape[1]),
                       local.index_select(0, tile) * wy0.shape[1] + row)
    return out.result(activations.device)


def _row_ends(cells: torch.Tensor, wx0: torch.Tensor, wx1: torch.Tensor, wy0: torch.Tensor, wy1: torch.Tensor
              ) -> torch.Tensor:
    """The larger of each tile row's two end pixels `(tiles, rows)`, from the tiles' cells `(4, tiles)`, the
    weights of their first and last column `(2, tiles)` and their row weights `(tiles, rows)`: the pixels'
    own arithmetic (along the source rows, then across them), NaN on padded rows."""
    a00, a01, a10, a11 = cells
    top, bottom = a00 * wx0 + a01 * wx1, a10 * wx0 + a11 * wx1  # (2, tiles): at the first and last column
    ends = top.unsqueeze(2) * wy0.unsqueeze(0) + bottom.unsqueeze(2) * wy1.unsqueeze(0)  # (2, tiles, rows)
    return torch.maximum(ends[0], ends[1])


def _corner_peaks(cells: torch.Tensor, wx0: torch.Tensor, wx1: torch.Tensor, wy0: torch.Tensor, wy1: torch.Tensor
                  ) -> torch.Tensor:
    """The largest of each tile's four corner pixels `(tiles,)`, from its cells `(4, tiles)` and the weights of
    its first and last column and row `(2, tiles)`: `_pixels`' arithmetic with the tiles last (two long
    rows, where `_pixels`' layout would be many rows of two: several times slower)."""
    a00, a01, a10, a11 = cells
    top = a00 * wx0 + a01 * wx1
    bottom = a10 * wx0 + a11 * wx1
    return (top.unsqueeze(0) * wy0.unsqueeze(1) + bottom.unsqueeze(0) * wy1.unsqueeze(1)).amax(dim=(0, 1))


def hot_blocks(activations: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    """The 2 x 2 blocks with a cell above `near`, as flat indices `map * h * w + row * w + column` of
    their top-left cell, ascending: `max_pool2d` of `activations` `(B, K, h, w)` padded with -inf on
    the right and bottom (a block past the last row or column reads the cell's own), compared with
    `near` `(1, K, 1, 1)`. Cells above `near` are few, so the blocks come from them: each is in the
    blocks at its own cell and at its upper, left and upper-left neighbours."""
    h, w = activations.shape[-2:]
    cell = (activations > near).view(-1).nonzero().squeeze(1)
    place = cell % (h * w)
    row, column = place // w, place % w
    shift = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], device=activations.device)
    rows, columns = row.unsqueeze(1) - shift[:, 0], column.unsqueeze(1) - shift[:, 1]
    blocks = ((cell - place).unsqueeze(1) + rows * w + columns)[(rows >= 0) & (columns >= 0)]
    return blocks.unique()
