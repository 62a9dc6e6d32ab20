"""`dissect` and `dissect_activations`: a threshold pass, a tally pass, assembly.

Pass one runs the model over the probe set and feeds each layer's statistics:
the exact running top-k behind the thresholds (`engine/thresholds.py`) and the
top images (`engine/top_images.py`). Between the passes the statistics are
combined across processes (`engine/sync.py`) and the thresholds read out.
Pass two makes the masks against those thresholds and tallies intersections
and areas (`engine/tally.py`); assembly turns the sums into IoU, labels and
scores (`engine/scores.py`). Between the passes the layers' activations are
kept up to `activation_cache_bytes` (the first batches, in full, copied into one
block per layer: `engine/activation_cache.py`), the next ones spilled to disk
(`engine/spill.py`); pass two runs the model again only for the batches neither
kept nor spilled, so memory never grows with the probe set beyond the threshold
state and that budget. The probe is read batch by
batch (`Probe.stream`: the next batch read ahead while the current one is
computed on), in both passes; see docs/performance.md for what each part costs.

The engine returns its numbers (`DissectionNumbers`); `lightning_dissect.dissect`
returns them as a `Dissection`, which adds their files.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from lightning_dissect.engine.activation_cache import ActivationCache
from lightning_dissect.engine.capture import (
    LayerCapture,
    as_unit_maps,
    cast_to_model,
    check_layers,
    frozen,
    model_device,
    resolve_layers,
)
from lightning_dissect.engine.compiled import plain_names, uncompiled
from lightning_dissect.engine.errors import DissectionError
from lightning_dissect.engine.layouts import (
    Grid,
    Layout,
    OutputLayout,
    decide_output_layout,
    stated_grid,
    validate_grid,
    validate_layouts,
    validate_prefix_tokens,
)
from lightning_dissect.engine.rotation import Rotation, as_rotation, rotate_units
from lightning_dissect.engine.scores import category_best, iou, summarize, unit_labels
from lightning_dissect.engine.spill import ActivationSpill, spill_folder
from lightning_dissect.engine.sync import Synchronizer, default_synchronizer, rank_zero_buffers, sync_states
from lightning_dissect.engine.tally import DENOMINATORS, MASK_IMAGES, Denominator, IoUTally
from lightning_dissect.engine.tally_threads import tally_threads
from lightning_dissect.engine.thresholds import ActivationThresholds, quantile_from_top
from lightning_dissect.engine.top_images import TopImages, unpack_top_images

DEFAULT_ACTIVATION_CACHE_BYTES = 2**31
LABEL_TENSORS = ("label_maps", "image_labels", "present", "image_level_present")


class ProbeBatch(Protocol):
    """One batch of `Probe.stream`: its probe positions, model input and label tensors."""

    @property
    def positions(self) -> list[int]: ...

    @property
    def inputs(self) -> torch.Tensor | None:
        """The model's input `(B, 3, H, W)` on the device; None when images were not asked for."""
        ...

    @property
    def labels(self) -> Sequence[torch.Tensor] | None:
        """The batch's `LABEL_TENSORS` on the device, in that order; None when labels were not asked for."""
        ...


class Probe(Protocol):
    """What the engine reads of a probe set (`lightning_dissect.probe.ProbeSet` is one).

    The whole-probe tensors are small, `(C,)` per label; images and label maps come batch by batch
    through `stream`, which reads ahead and moves them to the device (or indexes a copy kept there).
    """

    categories: list[str]
    label_names: list[str]
    fingerprint: str
    label_category: torch.Tensor  # long (C,): primary category index of each label, -1: never scored
    label_area: torch.Tensor  # long (C,): G(c)

    def __len__(self) -> int: ...

    def stream(self, batches: Iterable[Sequence[int]], device: torch.device | str, images: bool = True,
               labels: bool = True, prefetch: int = 2) -> Iterator[ProbeBatch]:
        """Each batch's model input and labels on `device`, in order (see `ProbeSet.stream`)."""
        ...

    def model_input(self, positions: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """The model input of the images at `positions` (the check pass reads two)."""
        ...


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


@dataclass(frozen=True)
class Options:
    """The options of one dissection (see `dissect`), validated on construction."""

    quantile: float = 0.005
    iou_threshold: float = 0.04
    denominator: Denominator = "paper"
    batch_size: int = 64
    rotation: Rotation | None = None
    prefix_tokens: int | None = None
    top_k: int = 10
    layouts: Mapping[str, Layout] | None = None
    grid: Grid | Mapping[str, Grid] | None = None

    def __post_init__(self) -> None:
        validate_options(self.quantile, self.iou_threshold, self.denominator, self.batch_size, self.top_k)
        validate_prefix_tokens(self.prefix_tokens)
        object.__setattr__(self, "layouts", validate_layouts(self.layouts) or None)
        object.__setattr__(self, "grid", validate_grid(self.grid))

    def settings(self, probe: Probe, layers: Sequence[str],
                 layer_outputs: Mapping[str, OutputLayout] | None = None) -> dict[str, Any]:
        """The options and the probe as recorded with the numbers (`Dissection.settings`); `layer_outputs`
        records how each layer's output was read (layout, token grid and leading tokens), so that strips
        and reports read it again the same way."""
        grid = self.grid
        return {
            "quantile": self.quantile, "iou_threshold": self.iou_threshold, "denominator": self.denominator,
            "batch_size": self.batch_size, "prefix_tokens": self.prefix_tokens, "layers": list(layers),
            "layouts": dict(self.layouts) if self.layouts else None,
            "grid": ({name: list(value) for name, value in grid.items()} if isinstance(grid, Mapping)
                     else list(grid) if grid is not None else None),
            "layer_outputs": {name: layout.describe() for name, layout in (layer_outputs or {}).items()},
            "rotation": self.rotation.describe() if self.rotation is not None else None,
            "probe_fingerprint": probe.fingerprint, "probe_size": len(probe), "categories": list(probe.categories),
        }


@dataclass
class LayerNumbers:
    """Every number of one layer's dissection (SEMANTICS §2 to §5), on the CPU.

    Attributes:
        layer: the module name.
        categories: the dissected categories, in `category.csv` order.
        label_names: label names indexed by global label number.
        label_category: long `(C,)`, primary category index of each label (-1: never scored).
        iou_threshold: `t`, a unit is a detector when its score is above it.
        thresholds: float64 `(K,)`, the activation threshold `T_u` of each unit.
        iou: float64 `(K, C)`, `IoU(u, c)`; column = global label number.
        intersection: long `(K, C)`, `I(u, c)`.
        unit_area: long `(K, n_categories)`, `A_k(u)` under the chosen denominator.
        label_area: long `(C,)`, `G(c)`.
        category_labels: long `(K, n_categories)`, `best_k(u)` (-1: category without labels).
        category_scores: float64 `(K, n_categories)`, `iou_k(u)`.
        labels: long `(K,)`, each unit's label.
        scores: float64 `(K,)`, each unit's score.
        top_images: long `(K, k)`, probe positions of the images with the largest
            per-image maximum activation, most active first.
        top_activations: float32 `(K, k)`, those maxima.
    """

    layer: str
    categories: list[str]
    label_names: list[str]
    label_category: torch.Tensor
    iou_threshold: float
    thresholds: torch.Tensor
    iou: torch.Tensor
    intersection: torch.Tensor
    unit_area: torch.Tensor
    label_area: torch.Tensor
    category_labels: torch.Tensor
    category_scores: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    top_images: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    top_activations: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))

    @property
    def num_units(self) -> int:
        return int(self.thresholds.shape[0])

    @property
    def detectors(self) -> torch.Tensor:
        """bool `(K,)`: units whose score is above `iou_threshold` (strict)."""
        return self.scores > self.iou_threshold

    def label_name(self, unit: int) -> str:
        label = int(self.labels[unit])
        return self.label_names[label] if label >= 0 else ""

    def unit_category(self, unit: int) -> str:
        """The category of a unit's label."""
        label = int(self.labels[unit])
        k = int(self.label_category[label]) if label >= 0 else -1
        return self.categories[k] if k >= 0 else ""

    def summary(self) -> dict[str, float]:
        """Counts of SEMANTICS §5: `units`, `detectors`, `detectors/<category>`,
        `unique_concepts`, `unique_concepts/<category>`, `unique_top_concepts`, `mean_score`."""
        return summarize(self.labels, self.scores, self.category_labels, self.category_scores,
                         self.label_category, self.categories, self.iou_threshold)


Layer = TypeVar("Layer", bound=LayerNumbers)


class DissectionNumbers(Mapping[str, Layer]):
    """The numbers of every dissected layer, in the order requested, and the settings that made them.

    Args:
        layers: layer name -> its numbers.
        settings: the options used (quantile, denominator, ...) and the probe's fingerprint and size.
    """

    def __init__(self, layers: Mapping[str, Layer], settings: Mapping[str, Any] | None = None) -> None:
        self.layers = dict(layers)
        self.settings = dict(settings or {})

    def __getitem__(self, name: str) -> Layer:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"no layer {name!r} in this dissection; layers: {list(self.layers)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={list(self.layers)}, settings={self.settings})"

    def summary(self) -> dict[str, dict[str, float]]:
        """`LayerNumbers.summary()` of every layer."""
        return {name: layer.summary() for name, layer in self.layers.items()}


class LayerState:
    """One layer on its way through the passes: its shape, its basis change and its statistics.

    Args:
        name: the layer's name.
        shape: `(K, h, w)`, from the first batch.
        num_images: the probe size (over all processes).
        options: the dissection's options.
        device: where the statistics live.
    """

    def __init__(self, name: str, shape: tuple[int, ...], num_images: int, options: Options,
                 device: torch.device) -> None:
        self.name, self.shape, self.options = name, shape, options
        units, height, width = shape
        self.rotation = options.rotation.resolve(units).to(device) if options.rotation is not None else None
        # The engine syncs explicitly, through its synchronizer, once per pass.
        self.thresholds: ActivationThresholds | None = ActivationThresholds(
            units, num_images * height * width, options.quantile, sync_on_compute=False).to(device)
        self.top_images = TopImages(units, options.top_k, sync_on_compute=False).to(device)
        self.tally: IoUTally | None = None

    def unit_maps(self, raw: torch.Tensor) -> torch.Tensor:
        """The maps dissected: the layer's `(B, K, h, w)` in the chosen basis (SEMANTICS §6)."""
        return rotate_units(raw, self.rotation) if self.rotation is not None else raw

    def observe(self, raw: torch.Tensor, positions: list[int], index: torch.Tensor) -> torch.Tensor:
        """Pass one: check a batch and add it to the threshold state and the top images.

        Returns:
            The batch's unit maps (for the activation cache).

        Raises:
            DissectionError: the layer changed shape, or produced NaN or inf.
        """
        if tuple(raw.shape[1:]) != self.shape:
            raise DissectionError(f"layer {self.name!r} changed shape from {self.shape} to {tuple(raw.shape[1:])}")
        maps = self.unit_maps(raw)
        # One reduction instead of an elementwise test: a finite sum has no NaN or inf (an overflowing
        # sum of finite values is told apart by the exact test).
        if not torch.isfinite(maps.sum()) and not torch.isfinite(maps).all():
            raise DissectionError(f"layer {self.name!r} produced non-finite activations (NaN or inf) on probe images "
                                  f"{positions[0]}..{positions[-1]}")
        assert self.thresholds is not None, "pass one ends with start_tally"
        self.thresholds.update(maps)
        self.top_images.update(maps, index)
        return maps

    def start_tally(self, synchronizer: Synchronizer, label_category: torch.Tensor, num_categories: int) -> None:
        """Between the passes: read out the thresholds over every process and set up the tally."""
        assert self.thresholds is not None, "start_tally runs once"
        sync_states(self.thresholds, synchronizer)
        # The states' readout, as `compute` gives it but keeping the (K,) shape of a single unit.
        thresholds = quantile_from_top(self.thresholds.top, int(self.thresholds.seen), self.options.quantile)
        # The top-k state, the one part that grows with the probe, is not needed in pass two.
        self.thresholds = None
        self.tally = IoUTally(thresholds, label_category, num_categories, self.options.denominator,
                              sync_on_compute=False).to(thresholds.device)

    def count(self, maps: torch.Tensor, labels: Sequence[torch.Tensor], workers: Executor | None = None) -> None:
        """Pass two: add a batch's unit maps to the tally; `labels` are its `LABEL_TENSORS`, `workers` the
        tally's threads (`engine.tally_threads`)."""
        assert self.tally is not None, "start_tally runs between the passes"
        label_maps, image_labels, present, image_level_present = labels
        self.tally.update(maps, label_maps, image_labels, present, image_level_present, workers=workers)

    def numbers(self, synchronizer: Synchronizer, probe: Probe, data: Mapping[str, torch.Tensor]) -> LayerNumbers:
        """Assembly: every number of SEMANTICS §4 and §5 from the sums over every process."""
        assert self.tally is not None, "start_tally runs between the passes"
        sync_states(self.top_images, synchronizer)
        sync_states(self.tally, synchronizer)
        top_activations, top_images = unpack_top_images(self.top_images.top, int(self.top_images.images))
        intersection, unit_area = self.tally.intersection, self.tally.unit_area
        label_area, label_category = data["label_area"], data["label_category"]
        scores = iou(intersection, unit_area, label_area, label_category)
        category_labels, category_scores = category_best(scores, label_category, len(probe.categories))
        labels, unit_scores = unit_labels(category_labels, category_scores)
        return LayerNumbers(
            layer=self.name, categories=list(probe.categories), label_names=list(probe.label_names),
            label_category=label_category.cpu(), iou_threshold=float(self.options.iou_threshold),
            thresholds=self.tally.thresholds.cpu(), iou=scores.cpu(), intersection=intersection.cpu(),
            unit_area=unit_area.cpu(), label_area=label_area.cpu(), category_labels=category_labels.cpu(),
            category_scores=category_scores.cpu(), labels=labels.cpu(), scores=unit_scores.cpu(),
            top_images=top_images.cpu(), top_activations=top_activations.cpu(),
        )


Activations = Callable[[list[int], torch.Tensor | None], dict[str, torch.Tensor]]


def _read(probe: Probe, batches: list[list[int]], device: torch.device, images: bool, labels: bool
          ) -> Generator[tuple[list[int], torch.Tensor | None, Sequence[torch.Tensor] | None], None, None]:
    """`(positions, model input, label tensors)` of each batch, read through `probe.stream` (the next
    batches read ahead) when anything is to be read; the stream stops when this generator is closed."""
    if not (images or labels):
        yield from ((batch, None, None) for batch in batches)
        return
    if not batches:
        return
    stream = probe.stream(batches, device, images=images, labels=labels)
    try:
        for item in stream:
            yield item.positions, item.inputs, item.labels
    finally:  # a generator's close() stops its read-ahead now, not when the traceback is freed
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _run(activations: Activations, probe: Probe, options: Options, *, device: torch.device,
         synchronizer: Synchronizer, activation_cache_bytes: int, activation_spill: Path | None, progress: bool,
         layer_outputs: Mapping[str, OutputLayout], images: bool = True) -> DissectionNumbers:
    """The two passes over this process's shard of the probe set; `activations(positions, inputs)`
    gives every layer's raw `(B, K, h, w)` for a batch (`inputs`: its model input, read only when
    `images`). The batches beyond `activation_cache_bytes` are spilled to a file in `activation_spill`
    (None: not spilled, run again).

    The probe is read batch by batch through `probe.stream`: pass one reads the images, pass two
    the label tensors (and the images of the batches whose activations were not kept). Of the
    whole probe only `label_category` and `label_area` are held, `(C,)` each.
    """
    started = time.perf_counter()
    positions = synchronizer.shard(len(probe))
    batches = [positions[i : i + options.batch_size] for i in range(0, len(positions), options.batch_size)]
    label_category, label_area = probe.label_category.to(device), probe.label_area.to(device)
    bar = _progress(len(batches) * 2, progress)
    layers: dict[str, LayerState] = {}
    # Pass two needs pass one's unit maps again: the first batches' stay in memory up to the budget, the
    # next ones go to the spill file while the disk takes them, and only the rest are computed again.
    cache = ActivationCache(activation_cache_bytes, [len(batch) for batch in batches])
    with contextlib.ExitStack() as resources:
        spill = resources.enter_context(ActivationSpill(activation_spill)) if activation_spill is not None else None
        first_pass = resources.enter_context(contextlib.closing(
            _read(probe, batches, device, images=images, labels=False)))
        # The spill's writes run behind the model (a thread), all done when the block ends.
        with spill.write_behind() if spill is not None else contextlib.nullcontext() as spill_write:
            for number, (batch, inputs, _) in enumerate(first_pass):
                raw = activations(batch, inputs)
                if not layers:
                    layers = {name: LayerState(name, tuple(value.shape[1:]), len(probe), options, device)
                              for name, value in raw.items()}
                index = torch.tensor(batch, device=device)
                maps = {name: layers[name].observe(value, batch, index) for name, value in raw.items()}
                del raw, inputs
                if not cache.keep(number, maps) and spill_write is not None:
                    spill_write(number, maps)
                del maps
                bar.update(1)
        if not layers:
            raise DissectionError("the probe set is empty: nothing to dissect")

        for layer in layers.values():
            layer.start_tally(synchronizer, label_category, len(probe.categories))
        kept = len(cache)
        # Once a batch did not fit the spill none after it was written: the rest is one run of batches.
        stored = kept + (len(spill) if spill is not None else 0)
        assert spill is None or all(number in spill for number in range(kept, stored))
        # The stored batches need their labels only; the others their images too, to run the model again.
        first_part = resources.enter_context(contextlib.closing(
            _read(probe, batches[:stored], device, images=False, labels=True)))
        second_part = resources.enter_context(contextlib.closing(
            _read(probe, batches[stored:], device, images=images, labels=True)))
        # The spilled batches come back in order, the next one read from the disk while this one is tallied.
        spilled = (resources.enter_context(contextlib.closing(spill.read_ahead(range(kept, stored), device)))
                   if spill is not None and stored > kept else None)
        workers = resources.enter_context(tally_threads(device, -(-options.batch_size // MASK_IMAGES)))
        for number, (batch, inputs, labels) in enumerate(itertools.chain(first_part, second_part)):
            assert labels is not None
            if number < kept:
                maps = cache.take(number)
            elif number < stored:
                assert spilled is not None
                maps = next(spilled)
            else:
                maps = {name: layers[name].unit_maps(value) for name, value in activations(batch, inputs).items()}
            for name, value in maps.items():
                layers[name].count(value, labels, workers)
            del maps, inputs, labels
            bar.update(1)
    bar.close()

    whole = {"label_area": label_area, "label_category": label_category}
    numbers = {name: layer.numbers(synchronizer, probe, whole) for name, layer in layers.items()}
    settings = dict(options.settings(probe, list(layers), layer_outputs), seconds=time.perf_counter() - started,
                    activations_cached=len(cache) == len(batches),
                    activations_spilled=stored - kept, activations_recomputed=len(batches) - stored,
                    unit_maps={name: list(layer.shape) for name, layer in layers.items()})
    return DissectionNumbers(numbers, settings)


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


def dissect(
    model: nn.Module,
    probe: Probe,
    layers: str | Sequence[str],
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    denominator: Denominator = "paper",
    batch_size: int = 64,
    device: torch.device | str | None = None,
    rotation: Rotation | Mapping[str, Any] | torch.Tensor | None = None,
    *,
    prefix_tokens: int | None = None,
    layouts: Mapping[str, str] | None = None,
    grid: Grid | Mapping[str, Grid] | None = None,
    top_k: int = 10,
    activation_cache_bytes: int = DEFAULT_ACTIVATION_CACHE_BYTES,
    activation_spill: bool | str | os.PathLike = True,
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    progress: bool = False,
    synchronizer: Synchronizer | None = None,
) -> DissectionNumbers:
    """Dissect layers of `model` over a probe set (SEMANTICS §2 to §6).

    The model is run in eval mode without gradients; every submodule's train
    flag is restored afterwards and no parameter or buffer changes. The probe
    input is cast to the model's floating dtype (a bf16 or fp16 model gets
    bf16 or fp16 input); unit maps are float32 for the engine.

    Before the passes, one check pass (a full forward of the first probe
    images, `engine.capture.check_layers`) decides how each layer's output is
    read, once for the whole dissection (SEMANTICS §2): a layer must run once
    per forward pass and have more than one spatial position; a channels-last
    output is known from the model or stated in `layouts`; a token output's
    grid comes from `grid`, the model, or (square inputs only) the fewest
    leading tokens that leave a square. `settings["layer_outputs"]` records it.

    Args:
        model: any `nn.Module` taking a batch of images `(B, 3, H, W)`.
        probe: the `ProbeSet` of images and labels.
        layers: module names from `model.named_modules()`, nested names included. For a compiled
            model or submodule (`torch.compile`), with or without the wrapper's `_orig_mod.`; the
            dissection runs the original modules and names the layers without it.
        quantile: `q`, the fraction of each unit's activations above its threshold.
        iou_threshold: a unit with a score above it is a detector.
        denominator: `"paper"` (default), `"lite"` (NetDissect-Lite's) or `"global"` (SEMANTICS §4).
        batch_size: probe images per forward pass.
        device: where to run; default the model's device.
        rotation: a basis change (SEMANTICS §6): `Rotation(seed, alpha)`,
            `dict(seed=0, alpha=0.5)` or an explicit `K x K` tensor.
        prefix_tokens: class/register tokens before the grid in `(N, T, K)` outputs; None: the
            rest once the grid is known (`T - h * w`). When given, it must equal that rest.
        layouts: layer -> `"NCHW"` (`(N, K, h, w)`) or `"NHWC"` (channels-last `(N, h, w, K)`)
            (or `"NLC"`, tokens), for outputs whose layout the model does not tell.
        grid: the patch grid `(h, w)` of token outputs, or layer -> `(h, w)`; default: the model's
            (timm `patch_embed.grid_size`, torchvision `patch_size` and the input size).
        top_k: how many top-activating images to keep per unit.
        activation_cache_bytes: keep activations between the passes up to this
            size (the first batches). 0 bounds memory by the threshold state alone.
        activation_spill: where the activations of the batches beyond `activation_cache_bytes`
            wait for pass two: True (default) a temporary file in the system's temporary folder
            (`TMPDIR`), a folder path one there, False none (the model runs again for those
            batches). The file has no name and is gone when the dissection ends; a batch is
            written only while the disk keeps `engine.spill.SPILL_RESERVE_BYTES` (2 GiB) free, and
            the batches the disk did not take are run again. `settings["activations_spilled"]` and
            `["activations_recomputed"]` count the batches of each kind.
        forward_context: a context manager factory wrapped around every forward
            (for example the trainer's precision context).
        progress: show a progress bar.
        synchronizer: how this process takes part in a distributed dissection;
            default `engine.sync.default_synchronizer()`.

    Returns:
        The numbers of every layer; `lightning_dissect.dissect` returns them as a
        `Dissection` (one `LayerDissection` per layer, with their files).

    Raises:
        DissectionError: unknown layer, a layer that runs more than once per forward pass, an output
            without two spatial axes or with one position, a layout or token grid the model does not
            tell and no option states, non-finite activations.
        ValueError: an option out of range.

    Example:
        >>> result = ld.dissect(model, probe, ["layer4"])        # doctest: +SKIP
        >>> result["layer4"].summary()["unique_concepts"]        # doctest: +SKIP
    """
    options = Options(quantile, iou_threshold, denominator, batch_size, as_rotation(rotation),
                      prefix_tokens=prefix_tokens, top_k=top_k, layouts=validate_layouts(layouts) or None,
                      grid=grid)
    spill_to = spill_folder(activation_spill)
    synchronizer = synchronizer or default_synchronizer()
    context = forward_context or contextlib.nullcontext
    # A compiled model (or submodule) runs as its original: its compiled code, cache and guards are untouched.
    with uncompiled(model) as plain:
        modules = resolve_layers(plain, plain_names(layers))
        names = list(modules)
        run_on = torch.device(device) if device is not None else model_device(plain)
        capture = LayerCapture(modules)  # one for all batches: it remembers whether outputs need copies
        outputs_read: dict[str, OutputLayout] = {}

        def layer_activations(batch: list[int], inputs: torch.Tensor | None) -> dict[str, torch.Tensor]:
            assert inputs is not None, "_run reads the images"
            inputs = cast_to_model(inputs, plain)
            with capture, context():
                outputs = capture.run(plain, inputs)
            return {name: as_unit_maps(outputs[name], name, outputs_read[name]) for name in names}

        # Several processes dissect one model: rank zero's buffers on every rank (engine.sync), restored after.
        with frozen(plain), rank_zero_buffers(plain, synchronizer):
            if len(probe):
                # The check pass: how each layer's output is read, decided once (the same on every rank).
                first = cast_to_model(probe.model_input(list(range(min(2, len(probe)))), run_on), plain)
                with context():
                    outputs_read.update(check_layers(plain, first, names, options.prefix_tokens,
                                                     layouts=options.layouts, grid=options.grid))
            return _run(layer_activations, probe, options, device=run_on, synchronizer=synchronizer,
                        activation_cache_bytes=activation_cache_bytes, activation_spill=spill_to,
                        progress=progress, layer_outputs=outputs_read)


def dissect_activations(
    activations: Mapping[str, torch.Tensor],
    probe: Probe,
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    denominator: Denominator = "paper",
    batch_size: int = 64,
    device: torch.device | str | None = None,
    rotation: Rotation | Mapping[str, Any] | torch.Tensor | None = None,
    *,
    prefix_tokens: int | None = None,
    layouts: Mapping[str, str] | None = None,
    grid: Grid | Mapping[str, Grid] | None = None,
    top_k: int = 10,
    progress: bool = False,
    synchronizer: Synchronizer | None = None,
) -> DissectionNumbers:
    """Dissect precomputed activations, `{name: (N, K, h, w) or (N, T, K)}` in probe order.

    Same options and results as :func:`dissect`. Without a model to tell, a 4-D tensor is
    `(N, K, h, w)` unless `layouts` says `"NHWC"`; a token tensor's grid is `grid`, or, for a probe
    of square images only, the fewest leading tokens that leave a square.

    Raises:
        DissectionError: a tensor whose first axis is not the probe size, or that no layout or grid reads.
    """
    options = Options(quantile, iou_threshold, denominator, batch_size, as_rotation(rotation),
                      prefix_tokens=prefix_tokens, top_k=top_k, layouts=validate_layouts(layouts) or None,
                      grid=grid)
    if not activations:
        raise DissectionError("activations is empty: pass {layer_name: tensor}")
    for name, value in activations.items():
        if not isinstance(value, torch.Tensor) or value.shape[0] != len(probe):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise DissectionError(f"activations[{name!r}] has shape {shape}; its first axis must be the probe size "
                                  f"{len(probe)}, in probe order")
    stated = options.layouts or {}
    unknown = [name for name in stated if name not in activations]
    if unknown:
        raise DissectionError(f"layouts names {unknown}, which are not keys of activations {list(activations)}")
    first = next(iter(activations.values()))
    run_on = torch.device(device) if device is not None else first.device
    names = list(activations)
    input_size = probe_image_size(probe)
    outputs_read = {name: decide_output_layout(name, tuple(value.shape), stated=stated.get(name),
                                               grid=stated_grid(options.grid, name),
                                               prefix_tokens=options.prefix_tokens, input_size=input_size)
                    for name, value in activations.items()}

    def batch_activations(batch: list[int], inputs: torch.Tensor | None) -> dict[str, torch.Tensor]:
        index = torch.tensor(batch, device=activations[names[0]].device)
        return {name: as_unit_maps(activations[name][index].to(run_on), name, outputs_read[name]) for name in names}

    return _run(batch_activations, probe, options, device=run_on, synchronizer=synchronizer or default_synchronizer(),
                activation_cache_bytes=0, activation_spill=None, progress=progress, layer_outputs=outputs_read,
                images=False)


def probe_image_size(probe: Probe) -> Grid | None:
    """The `(H, W)` of the probe's model input (its `image_size`, else its images'), None when unknown."""
    size = getattr(probe, "image_size", None)
    if size is not None:
        return int(size[0]), int(size[1])
    images = getattr(probe, "images", None)
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return int(images.shape[-2]), int(images.shape[-1])
    return None
