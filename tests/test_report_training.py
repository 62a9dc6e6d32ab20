"""Strips and bar graphs during training: the Dissector logs them to TensorBoard and W&B, saves the
strips beside the dissections, and `lightning-dissect report` builds the report from those files."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lightning_dissect as ld
from lightning_dissect.dissector import Dissector
from lightning_dissect.report import select_units, unit_strips
from lightning_dissect.report.run import report_run
from tests.conftest import write_broden
from tests.test_callback_loggers import wandb_records
from tests.test_report_html import Page, assert_links_resolve
from tests.test_report_strips import ChannelBlocks

SIZE = 16


@pytest.fixture
def two_concepts(tmp_path):
    """Label `blob` where red is high, `spot` where blue is high, each a random block rectangle;
    `ChannelBlocks(channels=(0, 2))` detects them with units 0 and 1."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(12):
        image = rng.integers(0, 100, size=(SIZE, SIZE, 3), dtype=np.uint8)
        maps = []
        for channel in (0, 2):
            region = np.zeros((SIZE // 2, SIZE // 2), dtype=bool)
            top, left = rng.integers(0, 5, size=2)
            region[top : top + 3, left : left + 3] = True
            image[..., channel][np.kron(region, np.ones((2, 2), dtype=bool))] = rng.integers(200, 256)
            maps.append(region)
        label = np.where(maps[0], 1, 0)
        rows.append({"image": image, "object": [label, np.where(maps[1], 2, 0)], "split": "train"})
    root = write_broden(tmp_path / "two", {"object": "pixel"}, [("blob", {"object": 1.0}), ("spot", {"object": 1.0})],
                        rows)
    return ld.ProbeSet(root, cache_dir=False)


def test_dissector_logs_strips_and_bar_graphs_and_the_report_reads_its_files(two_concepts, tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    probe = two_concepts
    model = ChannelBlocks(channels=(0, 2))
    writer = SummaryWriter(str(tmp_path / "tb"))
    wandb_run = wandb.init(mode="offline", dir=str(tmp_path), project="lightning-dissect-test")
    dissector = Dissector(probe, layers=["pool"], every_n_steps=1, quantile=0.15, top_k=3,
                          dirpath=tmp_path / "logs" / "dissections", loggers=[writer, wandb_run], figure_budget=None,
                          strips_per_layer=1, max_overhead=None)
    first = dissector.maybe_run(model, 0)
    assert [first.dissection["pool"].label_name(u) for u in (0, 1)] == ["blob", "spot"]
    model.swap()
    second = dissector.maybe_run(model, 1)
    writer.close()
    wandb_run.finish()

    layer = second.dissection["pool"]
    assert [layer.label_name(u) for u in (0, 1)] == ["spot", "blob"]
    assert second.entries["pool"].switched_units == [0, 1]
    # Step 0: the best unit; step 1: the best unit and the switched units, captioned with their former concept.
    assert list(first.strips) == [f"dissect/pool/strips/unit_{select_units(first.dissection['pool'], 1)[0]}"]
    assert sorted(second.strips) == ["dissect/pool/strips/unit_0", "dissect/pool/strips/unit_1"]
    expected = unit_strips(model, probe, layer, [0, 1], num_images=5, notes={0: "(was: blob)", 1: "(was: spot)"})
    for unit in (0, 1):
        np.testing.assert_array_equal(second.strips[f"dissect/pool/strips/unit_{unit}"], expected[unit].image)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    assert {"dissect/pool/bar_graph", "dissect/pool/iou_histogram", "dissect/pool/strips/unit_0",
            "dissect/pool/strips/unit_1"} <= tags
    assert [image.step for image in events.Images("dissect/pool/bar_graph")] == [0, 1]
    strip = events.Images("dissect/pool/strips/unit_1")[-1]
    assert (strip.step, strip.height, strip.width) == (1, *expected[1].image.shape[:2])

    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    logged: dict[str, list[int]] = {}
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            values = {(list(item.nested_key) or [item.key])[0]: item.value_json for item in record.history.item}
            step = json.loads(values["_step"])
            for key in values:
                logged.setdefault(key, []).append(step)
    assert sorted(set(logged["dissect/pool/bar_graph"])) == [0, 1]
    assert 1 in logged["dissect/pool/strips/unit_0"] and 1 in logged["dissect/pool/strips/unit_1"]

    folder = tmp_path / "logs" / "dissections"
    assert sorted(p.name for p in (folder / "step=1" / "strips" / "pool").iterdir()) == ["unit_0.jpg", "unit_1.jpg"]
    index = report_run(tmp_path / "logs")
    page = Page(index.parent / "layer-pool.html")
    assert_links_resolve(page)
    assert [card["data-concept"] for card in page.cards()] == ["spot", "blob"]
    html = page.path.read_text()
    assert "blob <span class=\"muted\">(step 0)</span> → spot <span class=\"muted\">(step 1)</span>" in html
    assert "over training (2 dissections)" in html


def test_a_failing_strip_warns_and_keeps_the_dissection(two_concepts, tmp_path, monkeypatch):
    import lightning_dissect.report.media as media

    def broken(*args, **kwargs):
        raise RuntimeError("no strips today")

    monkeypatch.setattr(media, "strip_media", broken)
    dissector = Dissector(two_concepts, layers=["pool"], every_n_steps=1, quantile=0.15, top_k=3,
                          dirpath=tmp_path / "dissections", max_overhead=None)
    with pytest.warns(UserWarning, match="unit strips at step 0 failed and were skipped .*no strips today"):
        report = dissector.maybe_run(ChannelBlocks(channels=(0, 2)), 0)
    assert report is not None and report.strips == {}
    assert (tmp_path / "dissections" / "step=0" / "dissection.json").is_file()
