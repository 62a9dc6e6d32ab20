"""`dissect` and `dissect_activations`: two streaming passes over a probe set.

Pass one runs the model over the probe set and keeps, per unit, the running
top values that the exact threshold needs (and the top images). Pass two makes
the masks against those thresholds and tallies intersections and areas. Between
the passes the layers' raw activations are kept up to `activation_cache_bytes`
(the first batches, in full); pass two runs the model again for the batches
beyond it, so memory never grows with the probe set beyond the threshold state
and that budget. See docs/performance.md for what each part costs.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_dissect.engine.rotation import Rotation, rotate_units
from lightning_dissect.engine.scores import category_best, iou, unit_labels
from lightning_dissect.engine.tally import DENOMINATORS, IoUTally
from lightning_dissect.engine.thresholds import RunningTopK, quantile_from_top, top_count
from lightning_dissect.result import Dissection, LayerDissection

if TYPE_CHECKING:
    from lightning_dissect.probe import ProbeSet

DEFAULT_ACTIVATION_CACHE_BYTES = 2**31


class DissectionError(ValueError):
    """A configuration or input error that names the layer or argument at fault."""


def validate_options(quantile: float, iou_threshold: float, denominator: str, batch_size: int,
                     top_k: int = 10) -> None:
    """Raise `ValueError` naming the argument when an option is out of range."""
    if not isinstance(quantile, (int, float)) or not 0 < quantile < 1:
        raise ValueError(f"quantile={quantile!r} must be a number in (0, 1), e.g. 0.005 for the top 0.5%")
    if not isinstance(iou_threshold, (int, float)) or not 0 <= iou_threshold < 1:
        raise ValueError(f"iou_threshold={iou_threshold!r} must be a number in [0, 1), e.g. 0.04")
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator={denominator!r} must be one of {list(DENOMINATORS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be a non-negative integer")


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


class LayerCapture:
    """Forward hooks that capture the outputs of named modules for one forward pass.

    Hooks are registered on entry and always removed on exit. Once every layer
    has produced its output, the rest of the forward pass is skipped. A captured
    output that the pass goes on with is kept without a copy; when a later
    operation of the pass changes it in place (an in-place ReLU after a
    BatchNorm: the tensor's version counter moves), the batch is run again, and
    from then on this capture keeps copies.
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


def model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


class _Synchronizer:
    """Combines per-shard state; the single-process version does nothing.

    The distributed implementation (`lightning_dissect.distributed`) gathers
    top values and sums tallies over ranks.
    """

    def shard(self, num_images: int) -> list[int]:
        return list(range(num_images))

    def merge_top(self, values: torch.Tensor, k: int) -> torch.Tensor:
        return values

    def merge_top_images(
        self, values: torch.Tensor, indices: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return values, indices

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _default_synchronizer() -> _Synchronizer:
    """Shard over the process group when `torch.distributed` runs several ranks, else the no-op one."""
    from lightning_dissect.distributed import default_synchronizer  # imports this module

    return default_synchronizer()


def _top_images_update(values: torch.Tensor, indices: torch.Tensor, new_values: torch.Tensor,
                       new_indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `k` largest per-image maxima of each unit; ties go to the lower probe position."""
    all_values = torch.cat([values, new_values], dim=1)
    all_indices = torch.cat([indices, new_indices], dim=1)
    # Sort by index first, then stably by value: equal values stay in index order.
    by_index = all_indices.argsort(dim=1, stable=True)
    all_values, all_indices = all_values.gather(1, by_index), all_indices.gather(1, by_index)
    order = all_values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return all_values.gather(1, order), all_indices.gather(1, order)


def _run(
    activation_batches: Callable[[list[int]], dict[str, torch.Tensor]],
    layers: Sequence[str],
    probe: ProbeSet,
    *,
    quantile: float,
    iou_threshold: float,
    denominator: str,
    batch_size: int,
    device: torch.device,
    rotation: Rotation | None,
    top_k: int,
    activation_cache_bytes: int,
    progress: bool,
    synchronizer: _Synchronizer,
    settings: dict[str, Any],
) -> Dissection:
    started = time.perf_counter()
    positions = synchronizer.shard(len(probe))
    num_images = len(probe)
    batches = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
    data = probe.tensors(device)

    def unit_maps(batch: list[int]) -> dict[str, torch.Tensor]:
        maps = activation_batches(batch)
        if rotation is not None:
            maps = {name: rotate_units(value, rotations[name]) for name, value in maps.items()}
        return maps

    rotations: dict[str, torch.Tensor] = {}
    tops: dict[str, RunningTopK] = {}
    top_values: dict[str, torch.Tensor] = {}
    top_indices: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, int, int]] = {}
    cache: list[dict[str, torch.Tensor] | None] = []
    cached_bytes = 0
    bar = _progress(len(batches) * 2, progress)
    for number, batch in enumerate(batches):
        raw = activation_batches(batch)
        if not shapes:
            shapes = {name: tuple(value.shape[1:]) for name, value in raw.items()}
            if rotation is not None:
                rotations = {name: rotation.resolve(shape[0]).to(device) for name, shape in shapes.items()}
            for name, (units, height, width) in shapes.items():
                tops[name] = RunningTopK(units, top_count(num_images * height * width, quantile), device=device)
                top_values[name] = torch.empty(units, 0, device=device)
                top_indices[name] = torch.empty(units, 0, dtype=torch.long, device=device)
        maps = {name: rotate_units(value, rotations[name]) for name, value in raw.items()} if rotations else raw
        index = torch.tensor(batch, device=device)
        for name, value in maps.items():
            if tuple(value.shape[1:]) != shapes[name]:
                raise DissectionError(f"layer {name!r} changed shape from {shapes[name]} to {tuple(value.shape[1:])}")
            # One reduction instead of an elementwise test: a finite sum has no NaN or inf (an overflowing
            # sum of finite values is told apart by the exact test).
            if not torch.isfinite(value.sum()) and not torch.isfinite(value).all():
                raise DissectionError(f"layer {name!r} produced non-finite activations (NaN or inf) on probe images "
                                      f"{batch[0]}..{batch[-1]}")
            tops[name].add_maps(value)
            if top_k:
                peaks = value.amax(dim=(2, 3)).t()
                top_values[name], top_indices[name] = _top_images_update(
                    top_values[name], top_indices[name], peaks, index.expand_as(peaks), top_k)
        # Keep the first batches up to the budget; pass two runs the model again only for the rest.
        batch_bytes = sum(value.numel() * value.element_size() for value in maps.values())
        if len(cache) == number and cached_bytes + batch_bytes <= activation_cache_bytes:
            cache.append(maps)
            cached_bytes += batch_bytes
        bar.update(1)
    if not shapes:
        raise DissectionError("the probe set is empty: nothing to dissect")

    thresholds = {}
    for name, top in tops.items():
        units, height, width = shapes[name]
        merged = synchronizer.merge_top(top.values, top.k)
        thresholds[name] = quantile_from_top(merged, num_images * height * width, quantile)
        if top_k:
            top_values[name], top_indices[name] = synchronizer.merge_top_images(
                top_values[name], top_indices[name], top_k
            )

    tallies = {name: IoUTally(shapes[name][0], data["label_category"], len(probe.categories), denominator, device)
               for name in shapes}
    for number, batch in enumerate(batches):
        if number < len(cache):
            maps, cache[number] = cache[number], None  # freed as soon as it is tallied
        else:
            maps = unit_maps(batch)
        index = torch.tensor(batch, device=device)
        labels = [data[key][index] for key in ("label_maps", "image_labels", "present", "image_level_present")]
        for name, value in maps.items():
            tallies[name].add(value, thresholds[name], *labels)
        bar.update(1)
    bar.close()

    label_area = data["label_area"]
    results = {}
    for name in layers:
        tally = tallies[name]
        intersection, unit_area = synchronizer.sum(tally.intersection), synchronizer.sum(tally.unit_area)
        scores = iou(intersection, unit_area, label_area, data["label_category"])
        category_labels, category_scores = category_best(scores, data["label_category"], len(probe.categories))
        labels, unit_scores = unit_labels(category_labels, category_scores)
        results[name] = LayerDissection(
            layer=name, categories=list(probe.categories), label_names=list(probe.label_names),
            label_category=data["label_category"].cpu(), iou_threshold=float(iou_threshold),
            thresholds=thresholds[name].cpu(), iou=scores.cpu(), intersection=intersection.cpu(),
            unit_area=unit_area.cpu(), label_area=label_area.cpu(), category_labels=category_labels.cpu(),
            category_scores=category_scores.cpu(), labels=labels.cpu(), scores=unit_scores.cpu(),
            top_images=top_indices[name].cpu() if top_k else torch.zeros(shapes[name][0], 0, dtype=torch.long),
            top_activations=top_values[name].cpu() if top_k else torch.zeros(shapes[name][0], 0),
        )
    settings = dict(settings, seconds=time.perf_counter() - started, activations_cached=len(cache) == len(batches))
    return Dissection(results, settings)


def _progress(total: int, enabled: bool) -> Any:
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="dissect", unit="batch", leave=False)
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _settings(probe: ProbeSet, **options: Any) -> dict[str, Any]:
    rotation = options.pop("rotation")
    return dict(options, rotation=rotation.describe() if rotation is not None else None,
                probe_fingerprint=probe.fingerprint, probe_size=len(probe), categories=list(probe.categories))


def _as_rotation(rotation: Rotation | Mapping[str, Any] | torch.Tensor | None) -> Rotation | None:
    if rotation is None or isinstance(rotation, Rotation):
        return rotation
    if isinstance(rotation, torch.Tensor):
        return Rotation(matrix=rotation)
    if isinstance(rotation, Mapping):
        unknown = set(rotation) - {"seed", "alpha", "matrix"}
        if unknown:
            raise ValueError(f"rotation has unknown keys {sorted(unknown)}; use seed, alpha or matrix")
        return Rotation(**rotation)
    raise ValueError(f"rotation={rotation!r} must be None, a Rotation, a dict(seed=, alpha=) or a K x K tensor")


def dissect(
    model: nn.Module,
    probe: ProbeSet,
    layers: str | Sequence[str],
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    denominator: str = "paper",
    batch_size: int = 64,
    device: torch.device | str | None = None,
    rotation: Rotation | Mapping[str, Any] | torch.Tensor | None = None,
    *,
    prefix_tokens: int | None = None,
    top_k: int = 10,
    activation_cache_bytes: int = DEFAULT_ACTIVATION_CACHE_BYTES,
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    progress: bool = False,
    synchronizer: _Synchronizer | None = None,
) -> Dissection:
    """Dissect layers of `model` over a probe set (SEMANTICS §2 to §6).

    The model is run in eval mode without gradients; every submodule's train
    flag is restored afterwards and no parameter or buffer changes.

    Args:
        model: any `nn.Module` taking a batch of images `(B, 3, H, W)`.
        probe: the `ProbeSet` of images and labels.
        layers: module names from `model.named_modules()`, nested names included.
        quantile: `q`, the fraction of each unit's activations above its threshold.
        iou_threshold: a unit with a score above it is a detector.
        denominator: `"paper"` (default), `"lite"` (NetDissect-Lite's) or `"global"` (SEMANTICS §4).
        batch_size: probe images per forward pass.
        device: where to run; default the model's device.
        rotation: a basis change (SEMANTICS §6): `Rotation(seed, alpha)`,
            `dict(seed=0, alpha=0.5)` or an explicit `K x K` tensor.
        prefix_tokens: class/register tokens to drop from `(N, T, K)` outputs.
        top_k: how many top-activating images to keep per unit.
        activation_cache_bytes: keep activations between the passes up to this
            size (the first batches); the model runs again only for the batches
            beyond it. 0 bounds memory by the threshold state alone.
        forward_context: a context manager factory wrapped around every forward
            (for example the trainer's precision context).
        progress: show a progress bar.

    Returns:
        A `Dissection`, one `LayerDissection` per layer.

    Raises:
        DissectionError: unknown layer, an output without spatial axes, non-finite activations.
        ValueError: an option out of range.

    Example:
        >>> result = dissect(model, probe, ["layer4"])          # doctest: +SKIP
        >>> result["layer4"].summary()["unique_concepts"]        # doctest: +SKIP
    """
    validate_options(quantile, iou_threshold, denominator, batch_size, top_k)
    rotation = _as_rotation(rotation)
    modules = resolve_layers(model, layers)
    names = list(modules)
    device = torch.device(device) if device is not None else model_device(model)
    context = forward_context or contextlib.nullcontext

    capture = LayerCapture(modules)  # one for all batches: it remembers whether outputs need copies

    def activations(batch: list[int]) -> dict[str, torch.Tensor]:
        inputs = probe.model_input(batch, device)
        with capture, context():
            outputs = capture.run(model, inputs)
        return {name: as_unit_maps(outputs[name], name, prefix_tokens) for name in names}

    settings = _settings(probe, quantile=quantile, iou_threshold=iou_threshold, denominator=denominator,
                         batch_size=batch_size, rotation=rotation, prefix_tokens=prefix_tokens, layers=names)
    with frozen(model):
        return _run(activations, names, probe, quantile=quantile, iou_threshold=iou_threshold,
                    denominator=denominator, batch_size=batch_size, device=device, rotation=rotation, top_k=top_k,
                    activation_cache_bytes=activation_cache_bytes, progress=progress,
                    synchronizer=synchronizer or _default_synchronizer(), settings=settings)


def dissect_activations(
    activations: Mapping[str, torch.Tensor],
    probe: ProbeSet,
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    denominator: str = "paper",
    batch_size: int = 64,
    device: torch.device | str | None = None,
    rotation: Rotation | Mapping[str, Any] | torch.Tensor | None = None,
    *,
    prefix_tokens: int | None = None,
    top_k: int = 10,
    progress: bool = False,
    synchronizer: _Synchronizer | None = None,
) -> Dissection:
    """Dissect precomputed activations, `{name: (N, K, h, w) or (N, T, K)}` in probe order.

    Same options and results as :func:`dissect`.

    Raises:
        DissectionError: a tensor whose first axis is not the probe size.
    """
    validate_options(quantile, iou_threshold, denominator, batch_size, top_k)
    rotation = _as_rotation(rotation)
    if not activations:
        raise DissectionError("activations is empty: pass {layer_name: tensor}")
    for name, value in activations.items():
        if not isinstance(value, torch.Tensor) or value.shape[0] != len(probe):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise DissectionError(f"activations[{name!r}] has shape {shape}; its first axis must be the probe size "
                                  f"{len(probe)}, in probe order")
    first = next(iter(activations.values()))
    device = torch.device(device) if device is not None else first.device
    names = list(activations)

    def batches(batch: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(batch, device=activations[names[0]].device)
        return {name: as_unit_maps(activations[name][index].to(device), name, prefix_tokens) for name in names}

    settings = _settings(probe, quantile=quantile, iou_threshold=iou_threshold, denominator=denominator,
                         batch_size=batch_size, rotation=rotation, prefix_tokens=prefix_tokens, layers=names)
    return _run(batches, names, probe, quantile=quantile, iou_threshold=iou_threshold, denominator=denominator,
                batch_size=batch_size, device=device, rotation=rotation, top_k=top_k,
                activation_cache_bytes=0, progress=progress, synchronizer=synchronizer or _default_synchronizer(),
                settings=settings)


# ---------------------------------------------------------------------- choosing and checking layers

# Modules whose output is never a representation worth dissecting on its own.
_NOT_FEATURES = (nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten,
                 nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                 nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def choose_layers(model: nn.Module, inputs: torch.Tensor, count: int = 2) -> list[str]:
    """The deepest modules with spatial output, found by one forward pass.

    Among modules that run once and return a `(B, K, h, w)` tensor with
    `h * w > 1` (not dropout, pooling, flatten or identity), the deepest is the
    one that finishes last before the spatial axes are pooled away: for a
    ResNet `layer4` (a block finishes after the modules inside it). Each
    further layer is the deepest remaining module that is neither inside nor
    around a chosen one and has another output shape (`layer3`).

    Returns:
        Up to `count` module names, shallowest first.

    Raises:
        DissectionError: no module has a spatial output.
    """
    modules = {name: module for name, module in model.named_modules() if name}
    finished: list[tuple[str, tuple[int, ...]]] = []
    calls: Counter[str] = Counter()

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            calls[name] += 1
            if isinstance(output, torch.Tensor):
                finished.append((name, tuple(output.shape)))

        return record

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(hook(name)))
        model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    candidates = [(name, shape) for name, shape in finished
                  if calls[name] == 1 and len(shape) == 4 and shape[2] * shape[3] > 1
                  and not isinstance(modules[name], _NOT_FEATURES)]
    if not candidates:
        raise DissectionError(
            f"layers=None: no module of {type(model).__name__} returns a spatial (N, K, h, w) output; "
            "name the layers to dissect, e.g. layers=['backbone.layer4'] (token layers need explicit names)"
        )
    chosen = [candidates[-1]]
    for name, shape in reversed(candidates):
        if len(chosen) == count:
            break
        if all(not _nested(name, other) and shape != other_shape for other, other_shape in chosen):
            chosen.append((name, shape))
    return [name for name, _ in reversed(chosen)]


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
