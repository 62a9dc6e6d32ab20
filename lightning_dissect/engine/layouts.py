"""How a layer's output is read as the `(B, K, h, w)` maps SEMANTICS §2 dissects.

A layer's output is one of three layouts:

- `"NCHW"`: `(B, K, h, w)`, convolutional feature maps (the default representation);
- `"NHWC"`: `(B, h, w, K)`, channels-last outputs (Swin stages, the normalisation and MLP
  layers inside ConvNeXt blocks): the same maps, permuted;
- `"NLC"`: `(B, T, K)` tokens: `prefix_tokens` leading class/register tokens, then the
  `h x w` patch grid in row-major order.

The layout of a 4-D output is known from the model or stated (`layouts={"features.7": "NHWC"}`),
never guessed from its shape alone (`decide_layout`): a module's own type tells it where its
definition does (a convolution, a batch norm, a pooling: NCHW; `nn.Linear` and `nn.LayerNorm`
acting on the last axis, a `Permute` to `(0, 2, 3, 1)`: NHWC; a `LayerNorm2d`: NCHW; a timm patch
embedding that does not flatten, by its `output_fmt`); any other
module (a block, a stage, an activation, a dropout) has the layout of the latest output of the same
shape that a module of known layout produced before it finished in the forward pass (inside it or
before it). What nothing explains is read as NCHW in a model without channels-last or token outputs,
and refused otherwise, with an error that says how to state it.

The grid of a token output (`decide_grid`) is stated (`grid=(h, w)`), or the model's patch grid
(timm's `patch_embed.grid_size`, from the input size when `dynamic_img_size` is set; torchvision's
`VisionTransformer.patch_size` and the input size; found by attribute, no import); the leading
tokens are the rest (`T - h * w`, checked against `prefix_tokens` when given). Only for square
model inputs, when nothing states a grid, the fewest leading tokens that leave a square are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_dissect.engine.errors import DissectionError

Layout = Literal["NCHW", "NHWC", "NLC"]
LAYOUTS: tuple[Layout, ...] = ("NCHW", "NHWC", "NLC")
Grid = tuple[int, int]

# Modules whose output is NCHW by definition of the module (on a 4-D input).
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                   nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm, nn.Dropout2d,
                   nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                   nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                   nn.PixelShuffle, nn.PixelUnshuffle, nn.Upsample)


@dataclass(frozen=True)
class OutputLayout:
    """How one layer's output becomes `(B, K, h, w)`.

    Attributes:
        layout: `"NCHW"`, `"NHWC"` or `"NLC"` (tokens).
        grid: `(h, w)`, the patch grid of a token output (None otherwise).
        prefix_tokens: the leading tokens of a token output dropped before the grid.
    """

    layout: Layout
    grid: Grid | None = None
    prefix_tokens: int = 0

    def describe(self) -> dict[str, Any]:
        """JSON values, as recorded in `Dissection.settings["layer_outputs"]`."""
        if self.layout != "NLC":
            return {"layout": self.layout}
        assert self.grid is not None
        return {"layout": self.layout, "grid": list(self.grid), "prefix_tokens": self.prefix_tokens}

    @classmethod
    def of(cls, value: OutputLayout | Mapping[str, Any] | str) -> OutputLayout:
        """From an `OutputLayout`, its `describe()` or a layout name (`"NCHW"`, `"NHWC"`)."""
        if isinstance(value, OutputLayout):
            return value
        if isinstance(value, str):
            if value == "NLC" or value not in LAYOUTS:
                raise ValueError(f"layout {value!r}: pass 'NCHW' or 'NHWC' (token layouts need a grid)")
            return cls(value)  # type: ignore[arg-type]
        grid = value.get("grid")
        return cls(value["layout"], (int(grid[0]), int(grid[1])) if grid is not None else None,
                   int(value.get("prefix_tokens") or 0))

    def read(self, output: torch.Tensor) -> torch.Tensor:
        """`output` as float32 contiguous `(B, K, h, w)`."""
        if self.layout == "NCHW":
            return output.float().contiguous()
        if self.layout == "NHWC":
            return output.permute(0, 3, 1, 2).float().contiguous()
        assert self.grid is not None
        batch, _, units = output.shape
        tokens = output[:, self.prefix_tokens:, :].reshape(batch, self.grid[0], self.grid[1], units)
        return tokens.permute(0, 3, 1, 2).float().contiguous()


# ---------------------------------------------------------------------- options


def validate_layouts(layouts: Any, argument: str = "layouts") -> dict[str, Layout]:
    """`layouts={layer: "NCHW" | "NHWC" | "NLC"}` checked; `ValueError` naming the argument."""
    if layouts is None:
        return {}
    if not isinstance(layouts, Mapping) or not all(isinstance(name, str) and name for name in layouts):
        raise ValueError(f"{argument}={layouts!r} must be a dict of layer name -> 'NCHW' or 'NHWC' (or 'NLC' for "
                         f"tokens), e.g. {argument}={{'features.7': 'NHWC'}}")
    for name, value in layouts.items():
        if value not in LAYOUTS:
            raise ValueError(f"{argument}[{name!r}]={value!r} must be one of {list(LAYOUTS)}: 'NCHW' for (N, K, h, w) "
                             "outputs, 'NHWC' for channels-last (N, h, w, K), 'NLC' for tokens (N, T, K)")
    return dict(layouts)


def _grid_value(value: Any) -> Grid | None:
    if (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    return None


def validate_grid(grid: Any, argument: str = "grid") -> Grid | dict[str, Grid] | None:
    """`grid=(h, w)` for every token layer, or `{layer: (h, w)}`; `ValueError` naming the argument."""
    if grid is None:
        return None
    if isinstance(grid, Mapping):
        checked = {}
        for name, value in grid.items():
            size = _grid_value(value)
            if not isinstance(name, str) or size is None:
                raise ValueError(f"{argument}[{name!r}]={value!r} must be (h, w), two positive integers: the patch "
                                 "grid of that token layer")
            checked[name] = size
        return checked
    size = _grid_value(grid)
    if size is None:
        raise ValueError(f"{argument}={grid!r} must be (h, w), two positive integers (the patch grid of the token "
                         "layers, e.g. (14, 20) for 16-pixel patches of 224x320 images), or {layer: (h, w)}")
    return size


def validate_prefix_tokens(prefix_tokens: Any) -> None:
    if prefix_tokens is not None and (not isinstance(prefix_tokens, int) or isinstance(prefix_tokens, bool)
                                      or prefix_tokens < 0):
        raise ValueError(f"prefix_tokens={prefix_tokens!r} must be a non-negative integer or None")


def stated_grid(grid: Grid | Mapping[str, Grid] | None, layer: str) -> Grid | None:
    """The grid stated for `layer` by the `grid` option (global or per layer)."""
    if isinstance(grid, Mapping):
        return grid.get(layer)
    return grid


# ---------------------------------------------------------------------- 4-D layouts


def own_layout(module: nn.Module, shape: Sequence[int]) -> Layout | None:
    """The layout of a module's 4-D output where its type tells it, else None."""
    name = type(module).__name__
    if name == "LayerNorm2d":  # timm's and torchvision's: a LayerNorm over the channels of NCHW input
        return "NCHW"
    fmt = getattr(module, "output_fmt", None)  # timm's PatchEmbed: Format.NHWC under dynamic_img_size
    if fmt is not None and getattr(module, "flatten", None) is False:
        fmt = str(getattr(fmt, "value", fmt))
        if fmt in ("NCHW", "NHWC"):
            return "NHWC" if fmt == "NHWC" else "NCHW"
    if name == "Permute":  # torchvision.ops.misc.Permute
        dims = [int(d) for d in getattr(module, "dims", ())]
        return "NHWC" if dims == [0, 2, 3, 1] else "NCHW" if dims == [0, 3, 1, 2] else None
    if isinstance(module, nn.Linear):  # acts on the last axis: the features
        return "NHWC" if module.out_features == shape[3] else None
    if isinstance(module, nn.LayerNorm):
        normalized = tuple(module.normalized_shape)
        if type(module) is nn.LayerNorm:
            return "NHWC" if normalized == (shape[3],) else "NCHW" if normalized == tuple(shape[1:]) else None
        # A subclass may permute inside: only an unambiguous channel axis tells.
        if len(normalized) == 1 and (normalized[0] == shape[3]) != (normalized[0] == shape[1]):
            return "NHWC" if normalized[0] == shape[3] else "NCHW"
        return None
    if isinstance(module, _CHANNELS_FIRST):
        return "NCHW"
    return None


def _symmetric(shape: Sequence[int]) -> bool:
    """Whether moving the channel axis last leaves the shape as it is (K == h == w)."""
    return shape[1] == shape[2] == shape[3]


@dataclass
class Finished:
    """One module's call in the check pass, in the order calls finished."""

    name: str
    shape: tuple[int, ...] | None  # None: not a tensor
    layout: Layout | None  # of a 4-D output: its own, else inherited (see `effective_layouts`)


def effective_layouts(calls: Sequence[tuple[str, nn.Module, tuple[int, ...] | None]]) -> list[Finished]:
    """The layout of every 4-D output of a forward pass, from the calls (name, module, output shape
    or None for a non-tensor) in the order they finished.

    A module's own type tells it (`own_layout`); otherwise it is the layout of the latest earlier
    4-D output of the same shape whose layout is known (the module's last inner output of that
    shape, or what it was given).
    """
    finished: list[Finished] = []
    latest: dict[tuple[int, ...], Layout] = {}
    for name, module, shape in calls:
        if shape is None:
            finished.append(Finished(name, None, None))
            continue
        layout = None
        if len(shape) == 4:
            layout = own_layout(module, shape) or latest.get(shape)
            if layout is not None:
                latest[shape] = layout
        finished.append(Finished(name, shape, layout))
    return finished


def decide_layout(layer: str, shape: tuple[int, ...], stated: Layout | None, module: nn.Module | None,
                  events: Sequence[Finished]) -> Layout:
    """The layout of `layer`'s 4-D output of `shape` (see the module docstring).

    Args:
        stated: the `layouts` option for this layer.
        module: the layer's module (None for precomputed activations: NCHW unless stated).
        events: every module call of the check pass (`effective_layouts`); the layer's own is among them.

    Raises:
        DissectionError: a stated layout that does not fit the shape, or an output whose layout
            nothing in the model tells, in a model with channels-last or token outputs.
    """
    if stated is not None:
        if stated == "NLC":
            raise DissectionError(f"layouts[{layer!r}]='NLC' but the layer's output has shape {shape}; 'NLC' is for "
                                  "token outputs (N, T, K). State 'NCHW' or 'NHWC'")
        return stated
    if module is None:
        return "NCHW"
    own = own_layout(module, shape)
    if own is not None:
        return own
    mine = next((event for event in reversed(events) if event.name == layer), None)
    inherited = mine.layout if mine is not None else None
    channels_last = any(event.layout == "NHWC" for event in events)
    permuted = (shape[0], shape[3], shape[1], shape[2])
    permuted_known = any(event.shape == permuted and event.layout == "NCHW" for event in events)
    if inherited is not None and not (channels_last and _symmetric(shape)):
        return inherited
    tokens = next((event.shape for event in events
                   if event.shape is not None and len(event.shape) == 3 and event.shape[0] == shape[0]), None)
    if not channels_last and tokens is None and not (permuted_known and shape[1] != shape[3]):
        return "NCHW"
    reasons = []
    if channels_last:
        reasons.append("the model has channels-last outputs")
    if tokens is not None:
        reasons.append(f"the model has token outputs (N, T, K), e.g. of shape {tokens}, and a 4-D output that no "
                       "module of known layout explains may be attention (N, heads, T, d) rather than maps")
    if not reasons:
        reasons.append(f"its last axis could be the {shape[3]} channels of an output of shape {permuted}")
    why = "; ".join(reasons)
    raise DissectionError(
        f"layer {layer!r} ({type(module).__name__}) returns shape {shape}, and nothing in the model tells whether "
        f"it is (N, K, h, w) or channels-last (N, h, w, K): {why}. State it: layouts={{{layer!r}: 'NHWC'}} when "
        f"its last axis holds the units, layouts={{{layer!r}: 'NCHW'}} when the second does"
    )


# ---------------------------------------------------------------------- token grids


def _pair(value: Any) -> Grid | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def model_grids(model: nn.Module, input_size: Grid | None) -> list[Grid]:
    """The patch grids the model states for an input of `input_size` `(H, W)`, found by attribute.

    timm's patch embeddings (`patch_size` and `grid_size`): `grid_size`, or the grid of the input
    (`H // p`, rounded up under `dynamic_img_pad`) when the embedding follows the input size (its
    `strict_img_size` is False, or the model that holds it as `patch_embed` has `dynamic_img_size`);
    torchvision's `VisionTransformer` (`patch_size`, `image_size` and `conv_proj`): `H // p`.
    """
    dynamic = {id(module.patch_embed) for module in model.modules()
               if getattr(module, "dynamic_img_size", False) is True
               and isinstance(getattr(module, "patch_embed", None), nn.Module)}
    grids: list[Grid] = []
    for module in model.modules():
        patch = _pair(getattr(module, "patch_size", None))
        if patch is None or patch[0] <= 0 or patch[1] <= 0:
            continue
        grid: Grid | None = None
        if hasattr(module, "grid_size"):  # timm
            follows_input = (id(module) in dynamic or getattr(module, "strict_img_size", True) is False
                             or getattr(module, "dynamic_img_size", False) is True)
            if follows_input and input_size is not None:
                if getattr(module, "dynamic_img_pad", False):
                    grid = (math.ceil(input_size[0] / patch[0]), math.ceil(input_size[1] / patch[1]))
                else:
                    grid = (input_size[0] // patch[0], input_size[1] // patch[1])
            else:
                grid = _pair(getattr(module, "grid_size", None))
        elif hasattr(module, "image_size") and hasattr(module, "conv_proj") and input_size is not None:  # torchvision
            grid = (input_size[0] // patch[0], input_size[1] // patch[1])
        if grid is not None and grid[0] > 0 and grid[1] > 0 and grid not in grids:
            grids.append(grid)
    return grids


def decide_grid(layer: str, tokens: int, stated: Grid | None, prefix_tokens: int | None,
                from_model: Sequence[Grid], input_size: Grid | None) -> tuple[Grid, int]:
    """The patch grid and leading tokens of `layer`'s `(N, tokens, K)` output (see the module docstring).

    Raises:
        DissectionError: a token count that no stated grid explains, or no grid at all for a
            non-square input; the message says how to pass `grid=` and `prefix_tokens=`.
    """
    def explains(grid: Grid) -> bool:
        rest = tokens - grid[0] * grid[1]
        return rest >= 0 and (prefix_tokens is None or rest == prefix_tokens)

    given = f" and prefix_tokens={prefix_tokens}" if prefix_tokens is not None else ""
    how = ("pass grid=(h, w), the patch grid of the input (e.g. (14, 20) for 16-pixel patches of 224x320 images; "
           f"grid={{{layer!r}: (h, w)}} for this layer alone), and prefix_tokens= the number of class/register tokens "
           "before the grid")
    if stated is not None:
        if not explains(stated):
            raise DissectionError(f"layer {layer!r} has {tokens} tokens, which the stated grid={stated}{given} does "
                                  f"not explain ({stated[0] * stated[1]} grid tokens after the leading ones); {how}")
        return stated, tokens - stated[0] * stated[1]
    if from_model:
        fitting = [grid for grid in from_model if explains(grid)]
        if len(fitting) == 1:
            return fitting[0], tokens - fitting[0][0] * fitting[0][1]
        which = "none of" if not fitting else "several of"
        rests = ", ".join(f"{grid} leaves {tokens - grid[0] * grid[1]}" for grid in from_model)
        raise DissectionError(f"layer {layer!r} has {tokens} tokens, and {which} the model's patch grids "
                              f"{list(from_model)}{given} explain them (leading tokens: {rests}); {how}")
    if input_size is None or input_size[0] != input_size[1]:
        size = f"{input_size[0]}x{input_size[1]}" if input_size is not None else "an unknown-size"
        raise DissectionError(f"layer {layer!r} has {tokens} tokens for {size} input, and neither the model nor an "
                              f"option states its patch grid (a square grid is assumed only for square images); {how}")
    drops = [prefix_tokens] if prefix_tokens is not None else range(tokens)
    for drop in drops:
        side = math.isqrt(max(tokens - drop, 0))
        if side > 0 and side * side == tokens - drop:
            return (side, side), drop
    raise DissectionError(f"layer {layer!r} has {tokens} tokens{given}; they leave no square grid after the leading "
                          f"tokens; {how}")


def decide_output_layout(layer: str, shape: tuple[int, ...], *, module: nn.Module | None = None,
                         stated: Layout | None = None, grid: Grid | None = None, prefix_tokens: int | None = None,
                         model_grid: Sequence[Grid] = (), input_size: Grid | None = None,
                         events: Sequence[Finished] = ()) -> OutputLayout:
    """How `layer`'s output of `shape` is read (4-D: `decide_layout`; 3-D tokens: `decide_grid`).

    Raises:
        DissectionError: an output without two spatial axes, or one position; a layout or grid
            that is not known and not stated; a stated one that does not fit.
    """
    if len(shape) == 4:
        layout = decide_layout(layer, shape, stated, module, events)
        positions = shape[2] * shape[3] if layout == "NCHW" else shape[1] * shape[2]
        result = OutputLayout(layout)
    elif len(shape) == 3:
        if stated is not None and stated != "NLC":
            raise DissectionError(f"layouts[{layer!r}]={stated!r} but the layer's output has shape {shape}: a 3-D "
                                  "output is read as tokens (N, T, K); state 'NLC' or nothing")
        if module is not None and own_layout(module, (*shape, 1)) == "NCHW":
            raise DissectionError(f"layer {layer!r} ({type(module).__name__}) returns (N, C, L) of shape {shape}: a "
                                  "1-D signal, no 2-D grid to dissect. Choose a layer with (N, K, h, w) or token "
                                  "(N, T, K) output")
        size, drop = decide_grid(layer, shape[1], grid, prefix_tokens, model_grid, input_size)
        positions = size[0] * size[1]
        result = OutputLayout("NLC", size, drop)
    else:
        raise DissectionError(
            f"layer {layer!r} output has shape {shape}: no spatial axes to dissect. Choose a convolutional layer "
            "(N, K, h, w) or a token layer (N, T, K) before pooling."
        )
    if positions < 2:
        raise DissectionError(
            f"layer {layer!r} output has shape {shape}: a single spatial position, nothing to segment (every unit "
            "would fire on whole images). Choose a layer before global pooling (for a ResNet 'layer4', not "
            "'avgpool')."
        )
    return result
