"""Faults a training run meets: names that look like markup, a figure that fails, a folder that cannot be written.

Each was a failure once (issue 13): a label named `$$` made every dissection "failed and skipped" with
no scalars logged, and a read-only `dirpath` recorded dissections reported as skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lightning_dissect as ld
from lightning_dissect import dashboard
from lightning_dissect.report import bar_graph, iou_histogram
from lightning_dissect.report.figures import plain
from tests import test_callback as shared
from tests.conftest import write_broden
from tests.test_callback import fit, steps_of

_in_tmp_path, probe, synthetic_root = shared._in_tmp_path, shared.probe, shared.synthetic_root  # fixtures

MARKUP = ["$$", "$x_1$", "a $ b", r"\$"]  # mathtext, a pair of dollars, one dollar, an escaped one


@pytest.fixture
def markup_probe(tmp_path):
    """Two categories whose label names are matplotlib markup; every image carries every label."""
    rng = np.random.default_rng(0)
    labels = [(name, {"object": 0.5}) for name in MARKUP]
    rows = [{"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
             "object": [np.arange(64).reshape(8, 8) % (len(MARKUP) + 1)]} for _ in range(12)]
    return ld.ProbeSet(write_broden(tmp_path / "markup", {"object": "pixel"}, labels, rows), cache_dir=False)


def test_names_from_the_dataset_are_drawn_as_plain_text(markup_probe, tmp_path):
    activations = torch.randn(len(markup_probe), 6, 4, 4, generator=torch.Generator().manual_seed(0))
    result = ld.dissect_activations({"layer $1$": activations}, markup_probe, quantile=0.2, iou_threshold=0.0)
    layer = result["layer $1$"]
    assert {layer.label_name(unit) for unit in range(6)} & set(MARKUP)
    for image in (bar_graph(layer), iou_histogram(layer)):
        assert image.ndim == 3 and image.shape[0] > 50
    index = result.to_html(tmp_path / "report")
    assert "$$" in index.read_text() or "$$" in next(index.parent.glob("*.html")).read_text()
    assert [plain(name) for name in MARKUP] == [r"\$\$", r"\$x_1\$", r"a \$ b", r"\\$"]


def test_a_figure_that_fails_leaves_scalars_tables_and_files(probe, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def broken(report):
        raise RuntimeError("no figure today")
        yield  # pragma: no cover - a generator, as the producers are

    monkeypatch.setattr(dashboard, "FIGURE_PRODUCERS", [broken, *dashboard.FIGURE_PRODUCERS])
    callback = ld.DissectionCallback(probe, layers="block2", every_n_steps=2, max_overhead=None, figure_budget=None)
    logger = TensorBoardLogger(tmp_path, name="tb")
    with pytest.warns(UserWarning) as caught:
        fit([callback], max_steps=4, logger=logger)
    said = [str(w.message) for w in caught if "could not draw" in str(w.message)]
    assert said == [f"broken could not draw the dissection at step {step} (RuntimeError: no figure today); "
                    "the scalars, tables and files have it" for step in (0, 2, 4)]
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0, "images": 0}).Reload()
    assert [event.step for event in events.Scalars("dissect/block2/detectors")] == [0, 2, 4]
    assert [event.step for event in events.Tensors("dissect/block2/units/text_summary")] == [0, 2, 4]
    assert [event.step for event in events.Images("dissect/block2/emergence")] == [0, 2, 4]  # the others drew
    assert (tmp_path / "tb" / "version_0" / "dissections" / "step=4" / "complete.json").is_file()


def test_a_folder_that_cannot_be_written_keeps_the_dissections_and_says_so_once(probe, tmp_path):
    (tmp_path / "blocker").write_text("a file where the folder would be")
    callback = ld.DissectionCallback(probe, layers="block2", every_n_steps=2, max_overhead=None,
                                     dirpath=tmp_path / "blocker" / "dissections")
    with pytest.warns(UserWarning) as caught:
        fit([callback], max_steps=4)
    messages = [str(w.message) for w in caught]
    assert sum("could not be written" in message for message in messages) == 1
    assert not any("failed and was skipped" in message for message in messages)
    assert steps_of(callback) == [0, 2, 4] and callback.dissector.unwritten == [0, 2, 4]


def test_a_training_run_on_markup_names_logs_every_dissection(markup_probe, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = shared.tiny_cnn()
    model.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
    callback = ld.DissectionCallback(markup_probe, layers="block2", every_n_steps=2, max_overhead=None,
                                     figure_budget=None, iou_threshold=0.0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit([callback], model=model, max_steps=4, logger=logger, strips=True)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0}).Reload()
    assert [event.step for event in events.Scalars("dissect/block2/detectors")] == [0, 2, 4]
    assert [event.step for event in events.Images("dissect/block2/bar_graph")] == [0, 2, 4]


def test_the_report_after_an_interrupted_dissection_shows_the_last_complete_step(probe, tmp_path):
    """A dissection killed while its files were written leaves a step folder without `complete.json`
    (strips come first): the report and the analyses read only the complete steps."""
    from lightning_dissect.analysis import read_run
    from lightning_dissect.report.run import report_run

    callback = ld.DissectionCallback(probe, layers="block2", every_n_steps=2, max_overhead=None,
                                     dirpath=tmp_path / "run")
    fit([callback], max_steps=2, strips=True)
    interrupted = tmp_path / "run" / "step=4"
    (interrupted / "strips" / "block2").mkdir(parents=True)
    strip = next((tmp_path / "run" / "step=2" / "strips" / "block2").iterdir())
    (interrupted / "strips" / "block2" / strip.name).write_bytes(strip.read_bytes())
    index = report_run(tmp_path / "run")
    assert "(step 2)" in index.read_text()
    assert [step for step, _ in read_run(tmp_path / "run")] == [0, 2]
