"""A layer's units over a training run: one `HistoryEntry` per dissection and layer, and how they change.

The `Dissector` records an entry for every layer at every dissection: the step, each unit's label,
category and score, the counts of SEMANTICS §5, and the concept changes since the layer's previous
dissection (`concept_changes`: switches, units that become or stop being detectors, and the
label-to-label transitions). Entries are plain data with a JSON form (`to_dict` / `from_dict`): one
line each in a run's `history.jsonl`, and the callback's checkpoint state.

Example:
    >>> before = HistoryEntry(step=0, layer="conv4", label=["dog", "sky"], label_number=[3, 5],
    ...                       score=[0.08, 0.01], iou_threshold=0.04)
    >>> after = HistoryEntry(step=9, layer="conv4", label=["cat", "sky"], label_number=[4, 5],
    ...                      score=[0.06, 0.05], iou_threshold=0.04)
    >>> changes = concept_changes(before, after)
    >>> changes["switches"], changes["switched_units"], changes["new_units"], changes["transitions"]
    (1, [0], [1], Counter({('dog', 'cat'): 1}))
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lightning_dissect.io import atomic_write

if TYPE_CHECKING:
    from lightning_dissect.engine.dissect import LayerNumbers

__all__ = ["HistoryEntry", "Labelling", "concept_changes", "read_history", "write_history"]


class Labelling(Protocol):
    """What a comparison of two dissections reads: `LayerDissection` and `HistoryEntry` both are one."""

    layer: str

    @property
    def num_units(self) -> int: ...

    @property
    def labels(self) -> torch.Tensor: ...

    @property
    def detectors(self) -> torch.Tensor: ...

    def label_name(self, unit: int) -> str: ...


def concept_changes(before: Labelling, after: Labelling) -> dict[str, Any]:
    """Compare two dissections of the same layer (SEMANTICS §5).

    Args:
        before, after: `LayerDissection`s or `HistoryEntry`s of one layer.

    Returns:
        `switches` (detector in both, different label), `switch_in` (becomes a
        detector), `switch_out` (stops being one), their unit lists under
        `switched_units`, `new_units`, `lost_units`, and `transitions`: a
        Counter of `(from_label, to_label)` label-name pairs over the switched units.

    Raises:
        ValueError: the two have different numbers of units.
    """
    if before.num_units != after.num_units:
        raise ValueError(f"layer {after.layer!r} has {after.num_units} units now, {before.num_units} before")
    was, now = before.detectors.cpu(), after.detectors.cpu()
    switched = (was & now & (before.labels.cpu() != after.labels.cpu())).nonzero(as_tuple=True)[0].tolist()
    transitions = Counter((before.label_name(unit), after.label_name(unit)) for unit in switched)
    return {
        "switches": len(switched),
        "switch_in": int((~was & now).sum()),
        "switch_out": int((was & ~now).sum()),
        "switched_units": switched,
        "new_units": (~was & now).nonzero(as_tuple=True)[0].tolist(),
        "lost_units": (was & ~now).nonzero(as_tuple=True)[0].tolist(),
        "transitions": transitions,
    }


@dataclass
class HistoryEntry:
    """One layer at one dissection of a training run.

    Attributes:
        step: optimizer steps taken when it was dissected.
        layer: the module name.
        epoch: the epoch (None when not known).
        probe_size: probe images dissected.
        seconds: wall time of the whole dissection (all its layers; the slowest rank's).
        iou_threshold: `t`, a unit is a detector when its score is above it.
        summary: the counts of SEMANTICS §5 but the unit count (`LayerDissection.summary()`).
        label, category: each unit's label name and its category.
        label_number, score: each unit's global label number and score (IoU).
        switches, switch_in, switch_out: the concept changes since the layer's previous
            dissection (`concept_changes`); None at its first.
        switched_units, new_units, lost_units: the units behind those counts.
        transitions: `[from_label, to_label, units]` of the switched units, most frequent first
            (ties: by names).
    """

    step: int
    layer: str
    epoch: int | None = None
    probe_size: int = 0
    seconds: float = 0.0
    iou_threshold: float = 0.04
    summary: dict[str, float] = field(default_factory=dict)
    label: list[str] = field(default_factory=list)
    category: list[str] = field(default_factory=list)
    label_number: list[int] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    switches: int | None = None
    switch_in: int | None = None
    switch_out: int | None = None
    switched_units: list[int] = field(default_factory=list)
    new_units: list[int] = field(default_factory=list)
    lost_units: list[int] = field(default_factory=list)
    transitions: list[tuple[str, str, int]] = field(default_factory=list)

    @classmethod
    def of(cls, result: LayerNumbers, step: int, epoch: int | None = None, probe_size: int = 0,
           seconds: float = 0.0, previous: Labelling | None = None) -> HistoryEntry:
        """The entry of a dissected layer, with its changes since `previous` (None: its first dissection)."""
        summary = result.summary()
        del summary["units"]  # the layer's size, not a count that changes
        entry = cls(step=step, layer=result.layer, epoch=epoch, probe_size=probe_size, seconds=seconds,
                    iou_threshold=float(result.iou_threshold), summary=summary,
                    label=[result.label_name(unit) for unit in range(result.num_units)],
                    category=[result.unit_category(unit) for unit in range(result.num_units)],
                    label_number=result.labels.tolist(), score=result.scores.tolist())
        if previous is not None:
            changes = concept_changes(previous, result)
            transitions = sorted(changes["transitions"].items(), key=lambda item: (-item[1], item[0]))
            entry.switches, entry.switch_in, entry.switch_out = (changes["switches"], changes["switch_in"],
                                                                 changes["switch_out"])
            entry.switched_units, entry.new_units, entry.lost_units = (changes["switched_units"],
                                                                       changes["new_units"], changes["lost_units"])
            entry.transitions = [(old, new, count) for (old, new), count in transitions]
        return entry

    # ------------------------------------------------------------------ a Labelling

    @property
    def num_units(self) -> int:
        return len(self.label_number)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self.label_number, dtype=torch.long)

    @property
    def detectors(self) -> torch.Tensor:
        """bool `(K,)`: units whose score is above `iou_threshold` (strict)."""
        return torch.tensor(self.score, dtype=torch.float64) > self.iou_threshold

    def label_name(self, unit: int) -> str:
        return self.label[unit]

    @property
    def changes(self) -> dict[str, int] | None:
        """`switches`, `switch_in`, `switch_out`; None at the layer's first dissection."""
        if self.switches is None:
            return None
        return {"switches": self.switches, "switch_in": int(self.switch_in or 0),
                "switch_out": int(self.switch_out or 0)}

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """The entry as plain JSON values (transitions as lists)."""
        data = dataclasses.asdict(self)
        data["transitions"] = [list(row) for row in self.transitions]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], iou_threshold: float = 0.04) -> HistoryEntry:
        """Read `to_dict()`'s form; keys an older version did not write keep their defaults
        (`iou_threshold` the one given).

        Raises:
            ValueError: `step` or `layer` missing or not of their type.
        """
        try:
            step, layer = int(data["step"]), str(data["layer"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a history entry (step and layer: {error!r})") from error
        names = {item.name for item in dataclasses.fields(cls)} - {"step", "layer"}
        values = {name: data[name] for name in names if name in data}
        values.setdefault("iou_threshold", iou_threshold)
        values["transitions"] = [(str(old), str(new), int(count)) for old, new, count in values.get("transitions", [])]
        return cls(step=step, layer=layer, **values)


def write_history(path: str | os.PathLike[str], entries: Iterable[HistoryEntry]) -> None:
    """Write entries as JSON lines, replacing the file atomically."""
    lines = [json.dumps(entry.to_dict()) + "\n" for entry in entries]  # all serialised before the file opens
    with atomic_write(path) as handle:
        handle.writelines(lines)


def read_history(path: str | os.PathLike[str], iou_threshold: float = 0.04) -> list[HistoryEntry]:
    """Read a `history.jsonl`; blank lines are skipped.

    Raises:
        ValueError: a line that is not a history entry, naming the file and line.
    """
    path = Path(path)
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(HistoryEntry.from_dict(json.loads(line), iou_threshold))
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"{path} line {number}: not a history entry ({error})") from error
    return entries


def entries_of(entries: Sequence[HistoryEntry], layer: str) -> list[HistoryEntry]:
    """The entries of one layer, in the order given."""
    return [entry for entry in entries if entry.layer == layer]
