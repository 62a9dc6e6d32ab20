"""Each example runs end to end on a tiny configuration and shows what the paper found."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).parents[1]


def load_example(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_example(name: str, argv: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and small logs
        return load_example(name).main(argv)


def assert_figure(path: str | Path) -> None:
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the same numbers on every machine, and no thread waits on a busy one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One dataset cache for the module: each tiny dataset is generated once."""
    return tmp_path_factory.mktemp("example_cache")


# 200 images of 32 px, 50 steps: a small run where detectors emerge (seeded, one thread), dissected
# at steps 0, 1, 7 and 49 only (factor 7) to keep it short.
EMERGENCE = ["--images", "200", "--image-size", "32", "--steps", "50", "--width", "16", "--batch-size", "16",
             "--probe-size", "60", "--layers", "conv3", "conv4", "--factor", "7", "--max-overhead", "none"]


def test_emergence_finds_more_unique_concepts_at_the_last_dissection_than_at_the_first(tmp_path, cache):
    result = run_example("emergence", [*EMERGENCE, "--output", str(tmp_path), "--cache-dir", str(cache)])
    assert result["steps"] == [0, 1, 7, 49, 50]  # 50: the final model
    for layer in result["layers"]:
        first, last = result["unique_concepts"][layer]
        assert first < last, (layer, first, last)
    assert [Path(path).name for path in result["figures"]] == ["emergence_model.conv3.png",
                                                               "emergence_model.conv4.png"]
    for figure in result["figures"]:
        assert_figure(figure)
    assert Path(result["weights"]).is_file()
    # `lightning-dissect compare` reads the run the callback saved: untrained against trained.
    from lightning_dissect.cli import main as cli

    run = result["log_dir"]
    assert cli(["compare", f"{run}@0", run, "--layer", "model.conv4", "-o", str(tmp_path / "stages.png")]) == 0
    assert_figure(tmp_path / "stages.png")


def test_finetune_counts_switches_and_draws_the_transition_table(tmp_path, cache):
    result = run_example("finetune", ["--images", "200", "--image-size", "32", "--width", "16", "--pretrain-steps",
                                      "30", "--steps", "12", "--factor", "3", "--probe-size", "60", "--output",
                                      str(tmp_path), "--cache-dir", str(cache), "--no-progress", "--max-overhead",
                                      "none"])
    assert result["steps"] == [0, 1, 3, 9, 12]  # 12: the final model
    for layer, numbers in result["layers"].items():
        assert [row["step"] for row in numbers["switches"]] == [1, 3, 9, 12]
        assert numbers["switched_units"] == sum(row["count"] for row in numbers["transitions"])
        for figure in numbers["figures"]:
            assert_figure(figure)
        saved = json.loads((Path(result["log_dir"]) / f"transitions_{layer}.json").read_text())
        assert saved["transitions"] == numbers["transitions"] and (saved["from_step"], saved["to_step"]) == (0, 12)


def test_rotation_finds_fewer_detectors_at_alpha_one_with_an_unchanged_linear_probe(tmp_path, cache):
    result = run_example("rotation", ["--images", "200", "--image-size", "32", "--steps", "60", "--width", "16",
                                      "--alphas", "0", "1", "--seeds", "0", "1", "2", "--output", str(tmp_path),
                                      "--cache-dir", str(cache)])
    assert result["detectors_alpha_1_max"] < result["detectors_alpha_0"]
    assert result["linear_probe_accuracy_largest_change"] <= 0.01
    assert result["fewer_detectors"] and result["accuracy_unchanged"]
    assert_figure(result["figure"])
    assert json.loads((tmp_path / "rotation.json").read_text())["detectors_alpha_0"] == result["detectors_alpha_0"]


def test_compare_draws_layers_and_saved_runs_and_reads_them_back(tmp_path, cache, capsys):
    result = run_example("compare", ["--images", "100", "--image-size", "32", "--steps", "10", "--width", "8",
                                     "--tasks", "background", "--output", str(tmp_path), "--cache-dir", str(cache)])
    assert list(result["layers"]) == ["conv1", "conv2", "conv3", "conv4"]
    assert list(result["runs"]) == ["untrained", "trained on background"]
    assert_figure(tmp_path / "layers.png")
    assert_figure(tmp_path / "runs.png")
    assert "the same from the command line:\n  lightning-dissect compare " in capsys.readouterr().out
    again = run_example("compare", ["--runs", *result["saved"], "--output", str(tmp_path / "again")])
    assert list(again["runs"].values()) == list(result["runs"].values())


def test_broden_torchvision_says_what_is_missing_and_exits_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LIGHTNING_DISSECT_BRODEN", raising=False)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # not installed
    assert run_example("broden_torchvision", ["--broden", str(tmp_path)]) is None
    assert "skipped: torchvision is not installed" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    assert run_example("broden_torchvision", ["--broden", str(tmp_path)]) is None
    assert f"--broden {tmp_path} is not a Broden directory" in capsys.readouterr().out
    assert run_example("broden_torchvision", []) is None
    assert "no Broden directory given" in capsys.readouterr().out


class _Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer4 = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(x).mean(dim=(2, 3))


def test_broden_torchvision_dissects_what_torchvision_builds(tmp_path, monkeypatch, random_dataset, capsys):
    import lightning_dissect as ld

    built = {}

    def get_model(name: str, weights: str | None = None) -> nn.Module:
        torch.manual_seed(0)
        built["call"] = (name, weights)
        return _Features()

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(get_model=get_model)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    summaries = run_example("broden_torchvision", ["--broden", str(random_dataset), "--model", "resnet18",
                                                   "--image-size", "16", "--output", str(tmp_path)])
    assert built["call"] == ("resnet18", "DEFAULT")
    torch.manual_seed(0)
    expected = ld.dissect(_Features(), ld.ProbeSet(random_dataset, image_size=16), "layer4")["layer4"]
    assert summaries["layer4"] == expected.summary()
    assert (tmp_path / "layer4.csv").is_file() and (tmp_path / "dissection.json").is_file()
    assert_figure(tmp_path / "categories.png")
