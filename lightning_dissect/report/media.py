"""Images for the loggers and the run directory: the callback's media hook.

At each dissection the callback asks for a bounded set of images:

- `strip_media`: the strips of the most interpretable units of each layer (the
  highest scores) and of the units that switched concept since the previous
  dissection, named `dissect/<layer>/strips/unit_<u>`;
- `bar_graph_media`: per layer the bar graph of detectors per concept and the
  IoU histogram, named `dissect/<layer>/bar_graph` and
  `dissect/<layer>/iou_histogram`.

Each name maps to a uint8 RGB `(H, W, 3)` array, which the logger adapters
hand to TensorBoard (`add_image(..., dataformats="HWC")`) or W&B
(`wandb.Image`). With `directory=`, `strip_media` also writes each strip as
`<directory>/strips/<layer>/unit_<u>.jpg`: that is how a report built later
from the run directory, without the model, shows strips (`report.html`).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from torch import nn

from lightning_dissect.history import concept_changes
from lightning_dissect.io import atomic_write
from lightning_dissect.report.bargraph import bar_graph, iou_histogram
from lightning_dissect.report.strips import UnitStrip, layers_activation_maps, unit_strips

if TYPE_CHECKING:
    from lightning_dissect.engine.dissect import DissectionNumbers, LayerNumbers
    from lightning_dissect.probe import ProbeSet



STRIPS_FOLDER = "strips"
# Strips are photographs: JPEG keeps a run's folder and a report a few times smaller than PNG.
STRIP_SUFFIX = ".jpg"
_UNIT_FILE = re.compile(r"^unit_(\d+)\.(?:jpg|png)$")


def safe_name(layer: str) -> str:
    """A layer name usable as a file or folder name (`features.3` stays, `a/b` becomes `a_b`)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", layer) or "_"


def strip_path(directory: str | os.PathLike[str], layer: str, unit: int) -> Path:
    """Where a saved strip lives: `<directory>/strips/<layer>/unit_<u>.jpg`."""
    return Path(directory) / STRIPS_FOLDER / safe_name(layer) / f"unit_{unit}{STRIP_SUFFIX}"


def saved_strips(directory: str | os.PathLike[str], layer: str) -> dict[int, Path]:
    """The strips saved for `layer` under `directory`: unit -> image path."""
    folder = Path(directory) / STRIPS_FOLDER / safe_name(layer)
    found = {}
    if folder.is_dir():
        for path in folder.iterdir():
            match = _UNIT_FILE.match(path.name)
            if match:
                found[int(match.group(1))] = path
    return found


def select_units(layer_result: LayerNumbers, count: int, switched: Sequence[int] = (),
                 max_switched: int = 4) -> list[int]:
    """The `count` highest-scoring units (ties: lower unit first), then up to
    `max_switched` of the `switched` units not already chosen, in their order."""
    order = sorted(range(layer_result.num_units), key=lambda u: (-float(layer_result.scores[u]), u))
    chosen = order[: max(count, 0)]
    extra = [u for u in dict.fromkeys(int(u) for u in switched) if u not in chosen]
    return chosen + extra[: max(max_switched, 0)]


def strip_media(
    model: nn.Module | None,
    probe: ProbeSet,
    dissection: DissectionNumbers,
    units_per_layer: int = 4,
    switched: Mapping[str, Sequence[int] | Mapping[int, str]] | None = None,
    *,
    previous: DissectionNumbers | None = None,
    max_switched: int = 4,
    num_images: int | None = 5,
    directory: str | os.PathLike | None = None,
    activations: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, np.ndarray]:
    """Strips of the most interpretable and the switched units of every layer.

    At most `units_per_layer + max_switched` strips per layer, so logs stay small.

    Args:
        model: the dissected model (unchanged since `dissection` was made), or
            None with `activations`.
        probe: the probe set of the dissection.
        dissection: the `Dissection` just made; its settings supply the
            rotation and `prefix_tokens`.
        units_per_layer: how many of the highest-scoring units to draw per layer.
        switched: layer -> units that switched concept, drawn as well; or layer -> {unit:
            previous concept}, drawn with "was: <concept>" in the caption.
        previous: the previous dissection; its switched units (SEMANTICS §5) are
            drawn with "was: <concept>" in the caption. Used when `switched` is None.
        max_switched: how many switched units per layer at most.
        num_images: top images per strip.
        directory: also write the strips under `<directory>/strips/<layer>/unit_<u>.jpg`.
        activations: layer -> activations in probe order, instead of running the model.
        **options: passed to `unit_strips` (`device`, `batch_size`, `forward_context`).

    Returns:
        `dissect/<layer>/strips/unit_<u>` -> uint8 RGB `(H, W, 3)`.
    """
    if units_per_layer < 0:
        raise ValueError(f"units_per_layer={units_per_layer!r} must be a non-negative integer")
    chosen: dict[str, tuple[list[int], dict[int, str]]] = {}
    for name, layer_result in dissection.items():
        notes: dict[int, str] = {}
        if switched is not None:
            given = switched.get(name, ())
            changed = [int(u) for u in given]
            if isinstance(given, Mapping):  # unit -> its previous concept
                notes = {int(u): f"(was: {label})" for u, label in given.items()}
        elif previous is not None and name in previous:
            changed = concept_changes(previous[name], layer_result)["switched_units"]
            notes = {u: f"(was: {previous[name].label_name(u)})" for u in changed}
        else:
            changed = []
        units = select_units(layer_result, units_per_layer, changed, max_switched)
        if units and layer_result.top_images.numel() > 0:
            chosen[name] = (units, notes)
    layouts = dissection.settings.get("layer_outputs") or {}
    maps: dict[str, dict[int, Any]] = {}
    if activations is None and model is not None and chosen:
        # Every layer's top images in one forward pass (not one per layer).
        positions = {name: [int(p) for u in units for p in dissection[name].top_images[u][:num_images].tolist()]
                     for name, (units, _) in chosen.items()}
        running = {key: value for key, value in options.items() if key in ("device", "batch_size", "forward_context")}
        maps = layers_activation_maps(model, probe, positions, rotation=dissection.settings.get("rotation"),
                                      prefix_tokens=dissection.settings.get("prefix_tokens"),
                                      layouts={name: layouts.get(name) for name in chosen}, **running)
    media = {}
    for name, (units, notes) in chosen.items():
        layer_result = dissection[name]
        strips = unit_strips(
            model, probe, layer_result, units, num_images=num_images, notes=notes,
            rotation=dissection.settings.get("rotation"), prefix_tokens=dissection.settings.get("prefix_tokens"),
            layout=layouts.get(name), activations=activations[name] if activations is not None else None,
            maps=maps.get(name), **options,
        )
        if directory is not None:
            save_strips(strips, directory)
        for unit, strip in strips.items():
            media[f"dissect/{name}/strips/unit_{unit}"] = strip.image
    return media


def bar_graph_media(dissection: DissectionNumbers) -> dict[str, np.ndarray]:
    """Per layer, the bar graph of detectors per concept and the IoU histogram.

    Returns:
        `dissect/<layer>/bar_graph` and `dissect/<layer>/iou_histogram` -> uint8 RGB `(H, W, 3)`.
    """
    media = {}
    for name, layer_result in dissection.items():
        # Untrimmed: a dashboard shows the margins, and trimming lays every label out a second time.
        media[f"dissect/{name}/bar_graph"] = bar_graph(layer_result, trim=False)
        media[f"dissect/{name}/iou_histogram"] = iou_histogram(layer_result, trim=False)
    return media


def encode_image(image: np.ndarray, photo: bool) -> bytes:
    """A uint8 RGB array as JPEG bytes (a photograph, such as a strip: quality 90, full-resolution colour) or PNG
    bytes (a figure)."""
    buffer = io.BytesIO()
    picture = Image.fromarray(np.ascontiguousarray(image))
    if photo:
        picture.save(buffer, format="JPEG", quality=90, subsampling=0)  # full-resolution colour: sharp outlines
    else:
        picture.save(buffer, format="PNG")
    return buffer.getvalue()


def save_image(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 RGB array as a PNG, or a JPEG for a `.jpg` path (`encode_image`), through a temporary file,
    so a crash leaves no half image."""
    path = Path(path)
    data = encode_image(image, photo=path.suffix.lower() in (".jpg", ".jpeg"))
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return path


def save_strips(strips: Mapping[int, UnitStrip], directory: str | os.PathLike) -> list[Path]:
    """Write strips as `<directory>/strips/<layer>/unit_<u>.jpg`."""
    return [save_image(strip.image, strip_path(directory, strip.layer, unit)) for unit, strip in strips.items()]


