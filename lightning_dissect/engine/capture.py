"""Getting a layer's output out of a model: the one place forward hooks are made.

Everything that reads activations from a model goes through here: `LayerCapture`
(hooks registered on entry, always removed on exit, the rest of the forward pass
skipped once every layer has produced its output), `frozen` (evaluate without
changing the model), the layer names (`resolve_layers`, `check_layers`;
`layer_choice.choose_layers` picks them when the user names none) and
`as_unit_maps`, which turns an output into the `(B, K, h, w)` tensor that
SEMANTICS §2 dissects.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_dissect.engine.errors import DissectionError
from lightning_dissect.engine.layouts import (
    Grid,
    Layout,
    OutputLayout,
    decide_output_layout,
    effective_layouts,
    model_grids,
    stated_grid,
)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model without either)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Evaluate `model` without changing it: eval mode, no gradients, every
    submodule's `training` flag restored afterwards (even on error)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> dict[str, nn.Module]:
    """Look up layer names in `model.named_modules()`.

    Raises:
        DissectionError: for an unknown name, with the closest matches.
    """
    if isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise DissectionError("layers is empty: name at least one module, e.g. layers=['layer4']")
    modules = dict(model.named_modules())
    found = {}
    for name in layers:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [m for m in modules if m], n=5, cutoff=0.5)
            hint = f" Did you mean {close}?" if close else f" Modules: {[m for m in modules if m][:20]}"
            raise DissectionError(f"layer {name!r} is not a module of {type(model).__name__}.{hint}")
        found[name] = modules[name]
    return found


def as_unit_maps(output: Any, layer: str, layout: OutputLayout | Mapping[str, Any] | str | None = None,
                 prefix_tokens: int | None = None) -> torch.Tensor:
    """A layer's output as float32 `(B, K, h, w)` (SEMANTICS §2).

    Args:
        output: the layer's output.
        layer: its name, for messages.
        layout: how to read it, as `check_layers` decided it (an `OutputLayout`, its `describe()`, or
            `"NCHW"` / `"NHWC"`). None (outputs of dissections recorded before layouts were): a 4-D
            output is `(B, K, h, w)`; tokens `(B, T, K)` become a square grid after dropping
            `prefix_tokens` leading tokens, or the fewest that leave a square when it is None.

    Raises:
        DissectionError: for an output that is not a tensor, has no spatial axes, or does not fit `layout`.
    """
    if not isinstance(output, torch.Tensor):
        raise DissectionError(
            f"layer {layer!r} returned {type(output).__name__}, not a tensor; dissect a module whose output is "
            "a (N, K, h, w) feature map or (N, T, K) tokens"
        )
    if layout is None:
        shape = tuple(output.shape)
        layout = decide_output_layout(layer, shape, prefix_tokens=prefix_tokens,
                                      input_size=(1, 1) if output.ndim == 3 else None)
    else:
        layout = OutputLayout.of(layout)
    expected = 3 if layout.layout == "NLC" else 4
    if output.ndim != expected or (layout.grid is not None
                                   and output.shape[1] != layout.prefix_tokens + layout.grid[0] * layout.grid[1]):
        raise DissectionError(f"layer {layer!r} output has shape {tuple(output.shape)}, which does not fit its "
                              f"layout {layout.describe()} (decided on the first batch)")
    return layout.read(output)


class _StopForward(Exception):
    """Raised by a hook once every requested layer has produced its output."""


class LayerCapture:
    """Forward hooks that capture the outputs of named modules for one forward pass.

    Hooks are registered on entry and always removed on exit. Once every layer
    has produced its output, the rest of the forward pass is skipped. A captured
    output that the pass goes on with is kept without a copy; when a later
    operation of the pass changes it in place (an in-place ReLU after a
    BatchNorm: the tensor's version counter moves), the batch is run again, and
    from then on this capture keeps copies.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
        >>> with torch.no_grad(), LayerCapture(resolve_layers(model, ["0"])) as capture:
        ...     outputs = capture.run(model, torch.randn(1, 3, 8, 8))
        >>> tuple(outputs["0"].shape)
        (1, 4, 6, 6)
    """

    def __init__(self, modules: Mapping[str, nn.Module], stop_early: bool = True) -> None:
        self.modules = modules
        self.stop_early = stop_early
        self.copy = False
        self.outputs: dict[str, Any] = {}
        self.versions: dict[str, tuple[torch.Tensor, int]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> LayerCapture:
        try:
            for name, module in self.modules.items():
                self.handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if name in self.outputs:
                raise DissectionError(f"layer {name!r} ran twice in one forward pass; dissect a module that runs once")
            last = self.stop_early and len(self.outputs) + 1 == len(self.modules)
            if isinstance(output, torch.Tensor) and not last:
                # The forward pass goes on with this tensor and may change it in place.
                version = None if self.copy else _version(output)
                if version is None:
                    output = output.clone()
                else:
                    self.versions[name] = (output, version)
            self.outputs[name] = output
            if last:
                raise _StopForward

        return hook

    def run(self, model: nn.Module, inputs: torch.Tensor) -> dict[str, Any]:
        """Run `model(inputs)` and return every layer's output, keyed by layer name.

        Raises:
            DissectionError: a layer that did not run or ran twice.
        """
        self.outputs, self.versions = {}, {}
        try:
            model(inputs)
        except _StopForward:
            pass
        missing = [name for name in self.modules if name not in self.outputs]
        if missing:
            raise DissectionError(f"layers {missing} did not run in the model's forward pass")
        if any(tensor._version != version for tensor, version in self.versions.values()):
            self.copy = True  # changed in place after the hook: capture the batch again, with copies
            return self.run(model, inputs)
        return self.outputs


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter (None for inference tensors, which have none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def check_layers(model: nn.Module, inputs: torch.Tensor, layers: Sequence[str],
                 prefix_tokens: int | None = None, *, layouts: Mapping[str, Layout] | None = None,
                 grid: Grid | Mapping[str, Grid] | None = None) -> dict[str, OutputLayout]:
    """The check pass: one full forward of `inputs` (no early stop) that decides how each layer's
    output is read, once for the whole dissection (SEMANTICS §2).

    Every module's calls are counted and every 4-D output's layout followed (`engine/layouts.py`).
    A layer must run exactly once per forward pass; its output must be `(N, K, h, w)`,
    channels-last `(N, h, w, K)` (known from the model or stated in `layouts`) or tokens `(N, T, K)`
    (grid from `grid`, the model or, for square inputs only, the fewest leading tokens that leave a
    square), with more than one spatial position.

    Args:
        model: the model, in the mode it is dissected in (eval, no gradients).
        inputs: one batch of model input (its size decides token grids that follow the input).
        layers: module names.
        prefix_tokens: the leading tokens of token outputs, when stated.
        layouts: layer -> `"NCHW"`, `"NHWC"` or `"NLC"`, stated.
        grid: the patch grid `(h, w)` of token outputs, or layer -> grid.

    Returns:
        layer -> its `OutputLayout`, in the order of `layers`.

    Raises:
        DissectionError: an unknown layer (with close matches); a layer that does not run, or runs
            more than once (naming the enclosing module that runs once); an output without two
            spatial axes or with one position; a layout or token grid that is not known and not
            stated (saying how to state it).
    """
    modules = resolve_layers(model, layers)
    stated = dict(layouts or {})
    named = dict(model.named_modules())
    for name in stated:
        if name not in named or not name:
            close = difflib.get_close_matches(name, [m for m in named if m], n=5, cutoff=0.5)
            raise DissectionError(f"layouts names {name!r}, which is not a module of {type(model).__name__}"
                                  + (f"; did you mean {close}?" if close else ""))
    calls: list[tuple[str, nn.Module, tuple[int, ...] | None]] = []
    returned: dict[str, str] = {}  # the type a module returned, when not a tensor

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            # Shapes only: nothing of the output is kept.
            calls.append((name, module, tuple(output.shape) if isinstance(output, torch.Tensor) else None))
            if not isinstance(output, torch.Tensor):
                returned[name] = type(output).__name__

        return record

    handles = []
    try:
        for name, module in model.named_modules():
            try:
                handles.append(module.register_forward_hook(hook(name)))
            except (RuntimeError, AttributeError):  # a module that takes no hooks (TorchScript)
                if name in modules:
                    raise
        model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    events = effective_layouts(calls)
    counts: dict[str, int] = {}
    for event in events:
        counts[event.name] = counts.get(event.name, 0) + 1
    shapes = {event.name: event.shape for event in events}
    input_size = (int(inputs.shape[-2]), int(inputs.shape[-1])) if inputs.ndim == 4 else None
    grids = model_grids(model, input_size)
    decided = {}
    for name, module in modules.items():
        ran = counts.get(name, 0)
        if ran == 0:
            raise DissectionError(f"layer {name!r} did not run in the model's forward pass; dissect a module the "
                                  "forward pass calls")
        if ran > 1:
            raise DissectionError(_ran_more_than_once(name, ran, counts, shapes))
        shape = shapes[name]
        if shape is None:
            raise DissectionError(
                f"layer {name!r} returned {returned[name]}, not a tensor; dissect a module whose output is a "
                "(N, K, h, w) feature map or (N, T, K) tokens")
        if len(shape) >= 1 and inputs.ndim >= 1 and shape[0] != inputs.shape[0]:
            raise DissectionError(
                f"layer {name!r} returns shape {shape} for a batch of {inputs.shape[0]} images: its first axis is "
                "not the batch (attention windows or heads, a reshaped output). Dissect a module whose output "
                "has one row per image, e.g. the block around it")
        decided[name] = decide_output_layout(
            name, shape, module=module, stated=stated.get(name), grid=stated_grid(grid, name),
            prefix_tokens=prefix_tokens, model_grid=grids, input_size=input_size, events=events)
    return decided


def _ran_more_than_once(name: str, ran: int, counts: Mapping[str, int],
                        shapes: Mapping[str, tuple[int, ...] | None]) -> str:
    """The message for a layer that ran `ran` times, naming the nearest enclosing module that runs once."""
    parts = name.split(".")
    enclosing = next((parent for parent in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
                      if counts.get(parent) == 1 and len(shapes.get(parent) or ()) in (3, 4)), None)
    instead = (f"Dissect the module that encloses it and runs once, e.g. {enclosing!r}, or give each use its own "
               "module" if enclosing is not None else
               "Give each use its own module (e.g. one nn.ReLU per place it is applied) and dissect one of them, "
               "or dissect a module that runs once")
    return (f"layer {name!r} ran {ran} times in one forward pass (a module used in several places); each call's "
            f"output is a different representation, so the layer has no single output to dissect. {instead}")


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of the model's first floating parameter (or buffer); None when it has none."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def cast_to_model(inputs: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Floating `inputs` in the model's floating dtype (a bf16 or fp16 model takes bf16 or fp16 input).

    Under a Lightning precision plugin the input was converted already (its `convert_input`): the
    weights' dtype is then the one it converts to, and this changes nothing.
    """
    dtype = model_dtype(model)
    if dtype is not None and inputs.is_floating_point() and inputs.dtype != dtype:
        return inputs.to(dtype)
    return inputs
