"""History entries and concept changes (SEMANTICS §5), on hand-built inputs with hand-written answers."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import lightning_dissect as ld
from lightning_dissect.history import HistoryEntry, read_history, write_history

NAMES = ["-", "sky", "dog", "cat", "red-c", "striped"]


def layer(labels: list[int], scores: list[float], threshold: float = 0.04) -> ld.LayerDissection:
    """A LayerDissection holding only what a comparison reads: each unit's label and score."""
    units = len(labels)
    empty = torch.zeros(units, 0)
    return ld.LayerDissection(
        layer="conv5", categories=["object"], label_names=NAMES,
        label_category=torch.zeros(len(NAMES), dtype=torch.long),
        iou_threshold=threshold, thresholds=torch.zeros(units, dtype=torch.float64), iou=empty.double(),
        intersection=empty.long(), unit_area=empty.long(), label_area=torch.zeros(len(NAMES), dtype=torch.long),
        category_labels=torch.tensor(labels).view(-1, 1), category_scores=torch.tensor(scores).view(-1, 1).double(),
        labels=torch.tensor(labels), scores=torch.tensor(scores, dtype=torch.float64))


# unit:            0      1      2      3      4      5      6      7
BEFORE = layer([2, 2, 1, 3, 4, 5, 1, 2], [0.10, 0.05, 0.20, 0.03, 0.04, 0.30, 0.06, 0.01])
AFTER = layer([3, 2, 1, 3, 5, 4, 2, 3], [0.12, 0.01, 0.25, 0.07, 0.05, 0.041, 0.09, 0.02])
# unit 0: dog -> cat, a detector in both: a switch          unit 4: 0.04 is not above t; 0.05 is: switch in
# unit 1: stops being a detector: switch out                 unit 5: striped -> red-c, both detectors: a switch
# unit 2: sky in both: no change                             unit 6: sky -> dog, both detectors: a switch
# unit 3: becomes a detector (same label): switch in         unit 7: never a detector: nothing, though it changes


def test_concept_changes_of_units_that_switch_in_out_and_between_concepts():
    changes = ld.concept_changes(BEFORE, AFTER)
    assert changes["switched_units"] == [0, 5, 6]
    assert changes["new_units"] == [3, 4]
    assert changes["lost_units"] == [1]
    assert (changes["switches"], changes["switch_in"], changes["switch_out"]) == (3, 2, 1)
    assert changes["transitions"] == Counter({("dog", "cat"): 1, ("striped", "red-c"): 1, ("sky", "dog"): 1})


def test_history_entries_compare_like_the_dissections_they_record():
    first = HistoryEntry.of(BEFORE, step=0)
    second = HistoryEntry.of(AFTER, step=9, epoch=1, probe_size=48, seconds=1.5, previous=first)
    assert first.switches is None and first.changes is None
    assert (second.switches, second.switch_in, second.switch_out) == (3, 2, 1)
    assert (second.switched_units, second.new_units, second.lost_units) == ([0, 5, 6], [3, 4], [1])
    # most frequent first, ties by names
    assert second.transitions == [("dog", "cat", 1), ("sky", "dog", 1), ("striped", "red-c", 1)]
    assert second.label == ["cat", "dog", "sky", "cat", "striped", "red-c", "dog", "cat"]
    assert second.summary["detectors"] == 6 and "units" not in second.summary
    assert ld.concept_changes(first, AFTER) == ld.concept_changes(BEFORE, AFTER)


def test_entries_round_trip_through_json_lines_and_old_lines_still_read(tmp_path):
    first = HistoryEntry.of(BEFORE, step=0)
    second = HistoryEntry.of(AFTER, step=9, epoch=1, previous=first)
    write_history(tmp_path / "history.jsonl", [first, second])
    assert read_history(tmp_path / "history.jsonl") == [first, second]
    old = {key: value for key, value in second.to_dict().items() if key != "iou_threshold"}  # before it was recorded
    (tmp_path / "old.jsonl").write_text(json.dumps(old) + "\n\n")
    [read] = read_history(tmp_path / "old.jsonl", iou_threshold=0.06)
    assert read.iou_threshold == 0.06 and read.transitions == second.transitions


def test_a_line_that_is_not_an_entry_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text(json.dumps(HistoryEntry.of(BEFORE, step=0).to_dict()) + "\n" + json.dumps({"step": 1}) + "\n")
    with pytest.raises(ValueError, match=r"history.jsonl line 2: not a history entry"):
        read_history(path)


def test_layers_of_different_sizes_cannot_be_compared():
    with pytest.raises(ValueError, match="layer 'conv5' has 2 units now, 8 before"):
        ld.concept_changes(BEFORE, layer([1, 2], [0.1, 0.1]))
