"""Result files: what a reader does with a file written by another version."""

from __future__ import annotations

import json

import pytest
import torch

import lightning_dissect as ld
from lightning_dissect.result import FORMAT_VERSION


def tiny_dissection() -> ld.Dissection:
    layer = ld.LayerDissection(
        layer="l", categories=["object"], label_names=["-", "dog"], label_category=torch.tensor([-1, 0]),
        iou_threshold=0.04, thresholds=torch.tensor([0.5], dtype=torch.float64),
        iou=torch.tensor([[0.0, 0.25]], dtype=torch.float64), intersection=torch.tensor([[0, 2]]),
        unit_area=torch.tensor([[4]]), label_area=torch.tensor([0, 6]), category_labels=torch.tensor([[1]]),
        category_scores=torch.tensor([[0.25]], dtype=torch.float64), labels=torch.tensor([1]),
        scores=torch.tensor([0.25], dtype=torch.float64))
    return ld.Dissection({"l": layer}, {"quantile": 0.005})


def test_a_file_of_this_version_reads_back_and_one_of_a_newer_version_is_refused(tmp_path):
    tiny_dissection().to_json(tmp_path / "now.json")
    data = json.loads((tmp_path / "now.json").read_text())
    assert data["format_version"] == FORMAT_VERSION
    assert ld.Dissection.from_json(tmp_path / "now.json")["l"].label_name(0) == "dog"
    (tmp_path / "future.json").write_text(json.dumps(dict(data, format_version=FORMAT_VERSION + 1)))
    newer = rf"future.json: format_version {FORMAT_VERSION + 1}: written by a newer lightning_dissect"
    with pytest.raises(ValueError, match=newer):
        ld.Dissection.from_json(tmp_path / "future.json")
