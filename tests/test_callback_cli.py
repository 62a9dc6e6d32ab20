"""The LightningCLI configs in `callbacks/` parse into DissectionCallbacks, and `examples/emergence.py` runs."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

import lightning_dissect as ld
from lightning_dissect.schedule import EveryNEpochs, LogSpaced
from tests import test_callback as shared

_in_tmp_path = shared._in_tmp_path  # fixture
ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "dissect.yaml": dict(probe_source=None, requested_layers=None, schedule=repr(LogSpaced()), probe_size=None),
    "dissect_synthetic.yaml": dict(probe_source="synthetic", requested_layers=None, schedule=repr(EveryNEpochs(1)),
                                   probe_size=200),
    "dissect_emergence.yaml": dict(probe_source=None, requested_layers=["layer3", "layer4"],
                                   schedule=repr(LogSpaced(1, 2.2)), probe_size=2000, max_seconds=60),
    "dissect_folder.yaml": dict(requested_layers=None, schedule=repr(LogSpaced()), probe_size=500),
}


def write_concept_folder(root: Path) -> None:
    """The folder the folder config names, under the working directory: two images, a mask, a label list."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8), (200, 30, 30)).save(root / "images" / f"{name}.jpg")
    Image.new("L", (8, 8), 1).save(root / "masks" / "a.png")
    (root / "labels.txt").write_text("background\nroad\n")


def test_every_config_in_callbacks_is_tested():
    assert sorted(path.name for path in (ROOT / "callbacks").glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_callback_config_parses_with_lightning_cli(name):
    from lightning.pytorch.cli import LightningCLI

    module = type(shared.tiny_cnn())
    if name == "dissect_folder.yaml":
        write_concept_folder(Path("data/concepts"))  # in the test's working directory
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(module, run=False, save_config_callback=None,
                           args=["--config", str(ROOT / "callbacks" / name), "--trainer.logger=false"])
    callbacks = [callback for callback in cli.trainer.callbacks if isinstance(callback, ld.DissectionCallback)]
    assert len(callbacks) == 1
    dissector = callbacks[0].dissector
    for attribute, value in EXPECTED[name].items():
        found = getattr(dissector, attribute)
        assert (repr(found) if attribute == "schedule" else found) == value, attribute
    if name == "dissect_folder.yaml":
        folder = dissector.probe_source
        assert isinstance(folder, ld.datasets.ImageMaskFolder) and folder.label_names == ["-", "road"]
        assert folder.images_folder == Path("data/concepts/images").absolute() and len(folder) == 2


def test_emergence_example_trains_and_logs_dissections_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = importlib.util.spec_from_file_location("emergence_example", ROOT / "examples" / "emergence.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example
    spec.loader.exec_module(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = example.main(["--tiny", "--output", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    assert result["layers"] == ["model.conv3", "model.conv4"]
    assert [entry.step for entry in result["history"]] == [0, 0, 1, 1, 2, 2, 4, 4, 6, 6]  # 6: the final model
    events = EventAccumulator(result["log_dir"], size_guidance={"scalars": 0})
    events.Reload()
    for layer in result["layers"]:
        logged = [(event.step, event.value) for event in events.Scalars(f"dissect/{layer}/unique_concepts")]
        assert logged == [(entry.step, entry.summary["unique_concepts"]) for entry in result["history"]
                          if entry.layer == layer]
