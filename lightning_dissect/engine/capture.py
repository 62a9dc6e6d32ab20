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
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_dissect.engine.errors import DissectionError


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


def as_unit_maps(output: Any, layer: str, prefix_tokens: int | None = None) -> torch.Tensor:
    """A layer's output as float32 `(B, K, h, w)` (SEMANTICS §2).

    Token outputs `(B, T, K)` become a square grid after dropping `prefix_tokens`
    leading (class/register) tokens; when `prefix_tokens` is None and `T` is
    not a square, the fewest leading tokens that leave a square are dropped.

    Raises:
        DissectionError: for an output that is not a tensor or has no spatial axes.
    """
    if not isinstance(output, torch.Tensor):
        raise DissectionError(
            f"layer {layer!r} returned {type(output).__name__}, not a tensor; dissect a module whose output is "
            "a (N, K, h, w) feature map or (N, T, K) tokens"
        )
    if output.ndim == 4:
        return output.float().contiguous()
    if output.ndim == 3:
        batch, tokens, units = output.shape
        drop = prefix_tokens
        if drop is None:
            drop = next((d for d in range(tokens) if math.isqrt(tokens - d) ** 2 == tokens - d), None)
        side = math.isqrt(max(tokens - (drop or 0), 0))
        if drop is None or side == 0 or side * side != tokens - drop:
            raise DissectionError(
                f"layer {layer!r} has {tokens} tokens; after dropping prefix_tokens={drop} they do not form a "
                "square grid. Pass prefix_tokens= the number of class/register tokens."
            )
        grid = output[:, drop:, :].reshape(batch, side, side, units).permute(0, 3, 1, 2)
        return grid.float().contiguous()
    raise DissectionError(
        f"layer {layer!r} output has shape {tuple(output.shape)}: no spatial axes to dissect. Choose a "
        "convolutional layer (N, K, h, w) or a token layer (N, T, K) before pooling."
    )


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
                 prefix_tokens: int | None = None) -> None:
    """Run one batch and check that every layer runs once and has a spatial output.

    Raises:
        DissectionError: unknown layer (with close matches), a layer that does not
            run or runs twice, or an output without spatial axes (or one position).
    """
    modules = resolve_layers(model, layers)
    with LayerCapture(modules) as capture:
        outputs = capture.run(model, inputs)
    for name in layers:
        maps = as_unit_maps(outputs[name], name, prefix_tokens)
        if maps.shape[2] * maps.shape[3] < 2:
            raise DissectionError(
                f"layer {name!r} output has shape {tuple(outputs[name].shape)}: a single spatial position, nothing "
                "to segment. Choose a layer before global pooling."
            )
