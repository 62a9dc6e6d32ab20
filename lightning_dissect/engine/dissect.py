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
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_dissect.engine.capture import LayerCapture, as_unit_maps, frozen, model_device, resolve_layers
from lightning_dissect.engine.errors import DissectionError
from lightning_dissect.engine.rotation import Rotation, as_rotation, rotate_units
from lightning_dissect.engine.scores import category_best, iou, unit_labels
from lightning_dissect.engine.tally import DENOMINATORS, IoUTally
from lightning_dissect.engine.thresholds import RunningTopK, quantile_from_top, top_count
from lightning_dissect.result import Dissection, LayerDissection

if TYPE_CHECKING:
    from lightning_dissect.probe import ProbeSet

DEFAULT_ACTIVATION_CACHE_BYTES = 2**31


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
    rotation = as_rotation(rotation)
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
    rotation = as_rotation(rotation)
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

