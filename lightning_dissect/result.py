"""Dissection results: the numbers of one layer, of several layers, and their files.

`LayerDissection` holds everything SEMANTICS §4 and §5 define for one layer;
`Dissection` maps layer names to them and records the settings and the probe
fingerprint. JSON round-trips exactly (floats are written with `repr`
precision); the CSV follows NetDissect's columns. The numbers themselves come
from the engine (`engine.dissect.LayerNumbers`); `dissect` and
`dissect_activations` here are the engine's, returning a `Dissection`.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, ParamSpec

import torch

from lightning_dissect.engine import dissect as engine
from lightning_dissect.engine.dissect import DissectionNumbers, LayerNumbers
from lightning_dissect.io import atomic_write

FORMAT_VERSION = 1  # of the JSON form; bump when a reader of the old form would misread the new

_TENSOR_FIELDS = {
    "thresholds": torch.float64,
    "iou": torch.float64,
    "intersection": torch.long,
    "unit_area": torch.long,
    "label_area": torch.long,
    "category_labels": torch.long,
    "category_scores": torch.float64,
    "labels": torch.long,
    "scores": torch.float64,
    "top_images": torch.long,
    "top_activations": torch.float32,
    "label_category": torch.long,
}


class LayerDissection(LayerNumbers):
    """The dissection of one layer (SEMANTICS §4, §5): the engine's numbers
    (`engine.dissect.LayerNumbers`, whose docstring lists the fields) and their files."""

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write NetDissect's per-unit table.

        Columns `unit,category,label,score` and, per category,
        `<category>-label,-truth,-activation,-intersect,-iou` (the best label of
        that category, its area `G`, the unit area `A_k`, the intersection and
        the IoU). Units are numbered from 1, as NetDissect's CSV does.
        """
        header = ["unit", "category", "label", "score"]
        for name in self.categories:
            header += [f"{name}-{column}" for column in ("label", "truth", "activation", "intersect", "iou")]
        # Plain lists: indexing tensors element by element costs more than the whole table.
        scores, category_labels = self.scores.tolist(), self.category_labels.tolist()
        category_scores, unit_area = self.category_scores.tolist(), self.unit_area.tolist()
        label_area, intersection = self.label_area.tolist(), self.intersection.tolist()
        rows = []
        for unit in range(self.num_units):
            row: list[Any] = [unit + 1, self.unit_category(unit), self.label_name(unit), repr(float(scores[unit]))]
            for k in range(len(self.categories)):
                label = int(category_labels[unit][k])
                if label < 0:
                    row += ["", 0, int(unit_area[unit][k]), 0, 0.0]
                    continue
                row += [self.label_names[label], int(label_area[label]), int(unit_area[unit][k]),
                        int(intersection[unit][label]), repr(float(category_scores[unit][k]))]
            rows.append(row)
        with atomic_write(path) as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "layer": self.layer,
            "categories": list(self.categories),
            "label_names": list(self.label_names),
            "iou_threshold": self.iou_threshold,
        }
        for name in _TENSOR_FIELDS:
            data[name] = getattr(self, name).cpu().tolist()
        return data

    @classmethod
    def from_numbers(cls, numbers: LayerNumbers) -> LayerDissection:
        """The engine's numbers of one layer, with their files."""
        return cls(**{item.name: getattr(numbers, item.name) for item in fields(numbers)})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerDissection:
        tensors = {}
        for name, dtype in _TENSOR_FIELDS.items():
            tensors[name] = torch.tensor(data[name], dtype=dtype)
        # Empty nested lists lose their second dimension; restore it.
        for name in ("intersection", "iou", "unit_area", "category_labels", "category_scores",
                     "top_images", "top_activations"):
            if tensors[name].ndim == 1:
                tensors[name] = tensors[name].reshape(tensors[name].shape[0], 0)
        return cls(layer=data["layer"], categories=list(data["categories"]),
                   label_names=list(data["label_names"]), iou_threshold=float(data["iou_threshold"]), **tensors)

    def to_html(self, path: str | os.PathLike, **options: Any) -> Path:
        """Write the HTML report of this layer into the folder `path`, or as the file `path` when it ends in
        `.html`; see `lightning_dissect.report.write_report`."""
        from lightning_dissect.report.html import write_report

        return write_report(self, path, **options)

    def to(self, device: torch.device | str) -> LayerDissection:
        values = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        return LayerDissection(layer=self.layer, categories=self.categories, label_names=self.label_names,
                               iou_threshold=self.iou_threshold, **values)


class Dissection(DissectionNumbers[LayerDissection]):
    """The dissection of several layers over one probe set: the engine's numbers
    (`engine.dissect.DissectionNumbers`) and their files.

    Args:
        layers: layer name -> `LayerDissection`, in the order requested.
        settings: the options used (quantile, denominator, ...) and the probe's
            fingerprint and size, recorded with the numbers.
    """

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "settings": self.settings,
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
        }

    @classmethod
    def from_numbers(cls, numbers: DissectionNumbers) -> Dissection:
        """The engine's numbers (`engine.dissect.dissect`), with their files."""
        return cls({name: LayerDissection.from_numbers(layer) for name, layer in numbers.layers.items()},
                   numbers.settings)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Dissection:
        """Read `to_dict()`'s form.

        Raises:
            ValueError: a `format_version` newer than this version of the package reads.
        """
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"format_version {version!r}: written by a newer lightning_dissect (this one reads up to "
                             f"{FORMAT_VERSION}); upgrade the package to read it")
        return cls({name: LayerDissection.from_dict(layer) for name, layer in data["layers"].items()},
                   data.get("settings", {}))

    def to_html(self, path: str | os.PathLike, **options: Any) -> Path:
        """Write the HTML report into the folder `path`, or as the file `path` when it ends in `.html` (its
        pages and images then in `<name>_files/` beside it); `model=`, `probe=` draw the unit strips. See
        `lightning_dissect.report.write_report`. Returns the path of the index page."""
        from lightning_dissect.report.html import write_report

        return write_report(self, path, **options)

    def to_json(self, path: str | os.PathLike) -> None:
        """Write every number and setting; `Dissection.from_json` reads it back exactly."""
        text = json.dumps(self.to_dict())  # dumps, not dump: one call into the C encoder
        with atomic_write(path) as handle:
            handle.write(text)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Dissection:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a readable dissection JSON file ({error})") from error
        if not isinstance(data, dict) or "layers" not in data:
            raise ValueError(f"{path}: not a dissection JSON file (no 'layers' key)")
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error


P = ParamSpec("P")


def _returning_dissection(run: Callable[P, DissectionNumbers]) -> Callable[P, Dissection]:
    @functools.wraps(run)
    def dissect(*args: P.args, **kwargs: P.kwargs) -> Dissection:
        return Dissection.from_numbers(run(*args, **kwargs))

    return dissect


# `ld.dissect` and `ld.dissect_activations`: the engine's functions (same arguments, documented
# there), their numbers returned as a `Dissection`.
dissect = _returning_dissection(engine.dissect)
dissect_activations = _returning_dissection(engine.dissect_activations)
