"""`lightning-dissect`: compare reads saved runs, dissect matches the library, errors name the argument."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_dissect as ld
from lightning_dissect.cli import build_parser, main, split_run
from lightning_dissect.result import Dissection
from lightning_dissect.synthetic import make_synthetic_broden
from tests import cli_models
from tests.test_analysis import random_layer


def save_run(directory: Path, steps: dict[int, dict[str, int]]) -> Path:
    """A run folder as DissectionCallback writes it: step -> {layer: seed of its random dissection}."""
    for step, layers in steps.items():
        dissection = Dissection({name: random_layer(seed) for name, seed in layers.items()})
        dissection.to_json(directory / "dissections" / f"step={step}" / "dissection.json")
    return directory


def expected_row(seed: int) -> list[int]:
    summary = random_layer(seed).summary()
    return [int(summary["unique_concepts/object"]), int(summary["unique_concepts/scene"]),
            int(summary["unique_concepts"])]


def table_rows(output: str) -> dict[str, list[int]]:
    rows = {}
    for line in output.splitlines()[1:]:
        if line.startswith("figure:"):
            break
        *name, obj, scene, total = line.split()
        rows[" ".join(name)] = [int(obj), int(scene), int(total)]
    return rows


def test_compare_reads_the_last_dissection_of_each_saved_run(tmp_path, capsys):
    save_run(tmp_path / "small", {0: {"conv3": 1, "conv4": 2}, 100: {"conv3": 3, "conv4": 4}})
    save_run(tmp_path / "wide", {0: {"conv3": 5, "conv4": 6}, 7: {"conv3": 7, "conv4": 8}})
    figure = tmp_path / "out" / "bars.png"
    assert main(["compare", str(tmp_path / "small"), str(tmp_path / "wide"), "-o", str(figure)]) == 0
    output = capsys.readouterr().out
    assert output.splitlines()[0].split() == ["run", "object", "scene", "total"]
    assert table_rows(output) == {"small": expected_row(4), "wide": expected_row(8)}  # last step, last layer
    assert figure.is_file() and figure.stat().st_size > 1000
    assert f"figure: {figure}" in output


def test_compare_of_one_run_shows_its_layers_and_a_chosen_step(tmp_path, capsys):
    run = save_run(tmp_path / "run", {0: {"conv3": 1, "conv4": 2}, 9: {"conv3": 3, "conv4": 4}})
    assert main(["compare", f"{run}@0", "-o", str(tmp_path / "c.png")]) == 0
    assert table_rows(capsys.readouterr().out) == {"conv3": expected_row(1), "conv4": expected_row(2)}


def test_compare_stages_of_one_run_and_a_dissection_file(tmp_path, capsys):
    run = save_run(tmp_path / "run", {0: {"conv4": 1}, 9: {"conv4": 3}})
    single = tmp_path / "other.json"
    Dissection({"layer4": random_layer(5)}).to_json(single)
    assert main(["compare", f"{run}@0", f"{run}@9", str(single), "--names", "start", "end", "resnet",
                 "-o", str(tmp_path / "c.png")]) == 0
    assert table_rows(capsys.readouterr().out) == {"start": expected_row(1), "end": expected_row(3),
                                                   "resnet": expected_row(5)}


def test_compare_counts_detectors_when_asked(tmp_path, capsys):
    run = save_run(tmp_path / "run", {0: {"conv4": 1}})
    assert main(["compare", str(run), "--count", "detectors", "-o", str(tmp_path / "c.png")]) == 0
    summary = random_layer(1).summary()
    assert table_rows(capsys.readouterr().out) == {"conv4": [int(summary["detectors/object"]),
                                                             int(summary["detectors/scene"]),
                                                             int(summary["detectors"])]}


@pytest.mark.parametrize("arguments,message", [
    (["nowhere"], "RUN 'nowhere'"),
    (["run@5"], "no dissection at step 5; steps: [0]"),
    (["run", "--layer", "conv9"], "no layer 'conv9'; layers: ['conv4']"),
    (["run", "run", "--names", "a"], "--names has 1 names for 2 runs"),
    (["run@x"], "the step after '@' must be an integer"),
])
def test_compare_errors_name_the_run_step_or_layer(tmp_path, monkeypatch, capsys, arguments, message):
    save_run(tmp_path / "run", {0: {"conv4": 1}})
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *arguments, "-o", "c.png"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lightning-dissect compare: error:") and message in error
    assert not (tmp_path / "c.png").exists()


def test_split_run_keeps_paths_that_contain_an_at_sign(tmp_path):
    odd = tmp_path / "run@home"
    odd.mkdir()
    assert split_run(str(odd)) == (odd, None)
    assert split_run(f"{odd}@12") == (odd, 12)
    assert split_run("plain") == (Path("plain"), None)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def tiny_net() -> TinyNet:
    return TinyNet()


def test_dissect_command_writes_what_the_library_computes(tmp_path, random_dataset, capsys):
    torch.manual_seed(0)
    model = TinyNet()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    output = tmp_path / "out"
    assert main(["dissect", "tests.test_cli:tiny_net", "--weights", str(tmp_path / "weights.pt"), "--layers", "conv",
                 "--broden", str(random_dataset), "--quantile", "0.1", "-o", str(output)]) == 0
    saved = Dissection.from_json(output / "dissection.json")["conv"]
    expected = ld.dissect(model, ld.ProbeSet(random_dataset), "conv", quantile=0.1)["conv"]
    assert torch.equal(saved.iou, expected.iou) and torch.equal(saved.labels, expected.labels)
    assert (output / "conv.csv").is_file()
    assert f"conv: {expected.summary()['unique_concepts']:.0f} unique concepts" in capsys.readouterr().out


@pytest.mark.parametrize("arguments,message", [
    (["tiny_net", "--layers", "conv"], "must be module:function"),
    (["tests.test_cli:missing", "--layers", "conv"], "does not import"),
    (["builtins:dict", "--layers", "conv"], "returned dict, not a torch.nn.Module"),
    (["tests.test_cli:tiny_net", "--weights", "missing.pt", "--layers", "conv"], "missing.pt' is not a file"),
    (["tests.test_cli:tiny_net", "--weights", "notes.pt", "--layers", "conv"], "is not a state dict"),
    (["tests.test_cli:tiny_net", "--weights", "other.pt", "--layers", "conv"], "do not fit MODEL"),
    (["tests.test_cli:tiny_net", "--layers", "cnov"], "layer 'cnov' is not a module"),
])
def test_dissect_command_errors_name_the_model_weights_and_layer(tmp_path, monkeypatch, random_dataset, capsys,
                                                                  arguments, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.pt").write_text("not a state dict")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    assert main(["dissect", *arguments, "--broden", str(random_dataset), "-o", "out"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_subcommand_is_registered_and_report_comes_from_the_report_package():
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    assert set(commands) == {"demo", "compare", "dissect", "report"}
    from lightning_dissect.report.run import run_report

    assert parser.parse_args(["report", "somewhere"]).handler is run_report


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_the_console_script_of_setup_cfg_is_main():
    import configparser
    import importlib

    config = configparser.ConfigParser()
    config.read(Path(__file__).parents[1] / "setup.cfg")
    script = config["options.entry_points"]["console_scripts"].strip()
    name, target = (part.strip() for part in script.split("="))
    module, function = target.split(":")
    assert name == "lightning-dissect" and getattr(importlib.import_module(module), function) is main


def test_demo_prints_the_numbers_the_figures_and_the_tensorboard_command(tmp_path, monkeypatch, capsys):
    # The run itself is demo.emergence_run, run end to end by tests/test_examples.py; here the
    # command's arguments and what it prints.
    import lightning_dissect.demo

    calls = {}
    log_dir = tmp_path / "demo" / "emergence" / "version_0"

    def emergence_run(output, **options):
        calls.update(options, output=output)
        return {"steps": [0, 1, 2, 4, 9], "unique_concepts": {"model.conv4": (1.0, 11.0)},
                "detectors": {"model.conv4": (1.0, 37.0)}, "accuracy": 0.807,
                "figures": [log_dir / "figures" / "emergence_model.conv4.png"], "dissections": log_dir / "dissections",
                "log_root": tmp_path / "demo" / "emergence", "log_dir": log_dir}

    monkeypatch.setattr(lightning_dissect.demo, "emergence_run", emergence_run)
    assert main(["demo", "--steps", "7", "--images", "64", "--output", str(tmp_path / "demo"), "--no-progress"]) == 0
    assert calls == dict(output=tmp_path / "demo", steps=7, num_images=64, image_size=64, probe_size=None,
                         task="background", width=32, seed=0, cache_dir=None, progress=False, echo=print)
    output = capsys.readouterr().out
    assert "model.conv4: 1 unique concepts at step 0 -> 11 at step 9 (1 -> 37 detectors)" in output
    assert "validation accuracy on the background task: 80.7%" in output
    assert f"  {log_dir / 'figures' / 'emergence_model.conv4.png'}" in output
    assert f"tensorboard --logdir {tmp_path / 'demo' / 'emergence'}" in output
    assert f"lightning-dissect report {log_dir}" in output


def test_demo_refuses_a_nonpositive_size(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps 0 must be a positive integer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the command line


TRAIN_PY = """
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder holding `train_cli_project.py`, the working directory, not on sys.path (as under the console
    script, whose sys.path starts with its own folder)."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train_cli_project.py").write_text(TRAIN_PY)
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(folder))])
    yield folder
    sys.modules.pop("train_cli_project", None)


def test_dissect_finds_a_module_of_the_current_directory_as_python_m_does(project, random_dataset, capsys):
    assert main(["dissect", "train_cli_project:Net", "--layers", "conv", "--broden", str(random_dataset),
                 "-o", "out"]) == 0
    assert (project / "out" / "dissection.json").is_file()
    assert "conv: " in capsys.readouterr().out


def test_a_module_that_is_nowhere_is_named_with_the_directory_and_the_ways_to_point_at_it(project, random_dataset,
                                                                                         capsys):
    assert main(["dissect", "trian_cli_project:Net", "--layers", "conv", "--broden", str(random_dataset)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"no module 'trian_cli_project' in the current directory ({project})" in error
    assert "PYTHONPATH" in error and "package.module:function" in error


def two_convolutions() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))


def test_dissect_takes_the_model_before_or_after_the_layers(tmp_path, random_dataset):
    model, layers = ["tests.test_cli:two_convolutions"], ["--layers", "0", "2"]
    saved = []
    for name, arguments in (("first", model + layers), ("after", layers + model)):
        torch.manual_seed(0)
        assert main(["dissect", *arguments, "--broden", str(random_dataset), "-o", str(tmp_path / name)]) == 0
        saved.append(Dissection.from_json(tmp_path / name / "dissection.json"))
    assert list(saved[0]) == list(saved[1]) == ["0", "2"]
    for layer in ("0", "2"):
        assert torch.equal(saved[0][layer].iou, saved[1][layer].iou)


@pytest.mark.parametrize("model,layers,message", [
    (None, ["conv"], "MODEL is missing"),
    (None, ["a:b", "conv", "c:d"], "--layers 'a:b': layer names have no ':' and no .pt/.pth ending (MODEL is 'c:d')"),
    ("m:f", ["conv", "a:b"], "--layers 'a:b': layer names have no ':' and no .pt/.pth ending (MODEL is 'm:f')"),
    (None, ["conv", "a.pt", "b.pth"], "--layers 'a.pt': layer names have no ':' and no .pt/.pth ending"),
    ("m:f", [], "--layers names no layer"),
])
def test_model_and_layers_refuse_what_is_not_one_model_and_some_layers(model, layers, message):
    from lightning_dissect.cli import UsageError, model_and_layers

    with pytest.raises(UsageError, match=re.escape(message)):
        model_and_layers(model, layers)
    assert model_and_layers(None, ["conv", "pkg.nets:build", "layer4.1"]) == ("pkg.nets:build", ["conv", "layer4.1"])
    assert model_and_layers(None, ["conv", "runs/net.PT"]) == ("runs/net.PT", ["conv"])


def test_every_option_of_every_command_has_help_text_and_each_summary_says_its_defaults():
    subparsers = next(action for action in build_parser()._actions if action.dest == "command")
    for name, command in subparsers.choices.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
    summaries = {choice.dest: choice.help for choice in subparsers._choices_actions}
    assert set(summaries) == set(subparsers.choices)
    assert all("(default: " in summary for summary in summaries.values()), summaries
    assert "the synthetic dataset where no --broden is given" in summaries["dissect"]


def test_demo_task_lists_its_choices(capsys):
    from lightning_dissect.synthetic import SYNTHETIC_TASKS

    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(["demo", "--task", "backgrund"])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert all(repr(task) in error for task in SYNTHETIC_TASKS)


def test_report_of_a_path_that_does_not_exist_says_so_in_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert error == f"lightning-dissect report: error: RUN_DIR {tmp_path / 'nowhere'} does not exist\n"


# ---------------------------------------------------------------------------------------- dissect: the classic job


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic_broden(tmp_path_factory.mktemp("cli-synthetic") / "broden", num_images=16, image_size=32)


def assert_same_numbers(saved: Dissection, expected: Dissection) -> None:
    assert list(saved) == list(expected)
    for layer in expected:
        for name, value in vars(expected[layer]).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(getattr(saved[layer], name), value), (layer, name)


def test_dissect_command_dissects_several_layers_in_one_pass_and_writes_csvs_json_and_the_report(synthetic, tmp_path,
                                                                                              capsys):
    out = tmp_path / "out"
    assert main(["dissect", "tests.cli_models:two_stage", "--broden", str(synthetic), "--layers", "stem", "stage",
                 "--size", "10", "--batch-size", "4", "--device", "cpu", "--out", str(out)]) == 0
    expected = ld.dissect(cli_models.two_stage(), ld.ProbeSet(synthetic, size=10), ["stem", "stage"], batch_size=4)
    saved = Dissection.from_json(out / "dissection.json")
    assert_same_numbers(saved, expected)
    assert saved.settings["probe_size"] == 10 and saved.settings["batch_size"] == 4
    printed = capsys.readouterr().out
    for layer, result in expected.items():
        with open(out / f"{layer}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [int(row["unit"]) for row in rows] == list(range(1, result.num_units + 1))
        assert [row["label"] for row in rows] == [result.label_name(unit) for unit in range(result.num_units)]
        summary = result.summary()
        assert (f"{layer}: {summary['unique_concepts']:.0f} unique concepts, {summary['detectors']:.0f} of "
                f"{result.num_units} units are detectors") in printed
    index = out / "report" / "index.html"
    assert index.is_file() and f"HTML report: {index}" in printed
    pages = sorted(path.name for path in (out / "report").glob("layer-*.html"))
    assert pages == ["layer-stage.html", "layer-stem.html"]
    for layer, result in expected.items():  # a strip per unit
        strips = {path.stem for path in (out / "report" / "images" / f"layer-{layer}").rglob("unit_*.*")}
        assert strips == {f"unit_{unit}" for unit in range(result.num_units)}


def test_dissect_command_without_size_dissects_the_whole_dataset_and_skips_the_report_when_asked(synthetic, tmp_path):
    out = tmp_path / "out"
    assert main(["dissect", "--layers", "stage", "tests.cli_models:two_stage", "--broden", str(synthetic),
                 "--no-report", "-o", str(out)]) == 0
    saved = Dissection.from_json(out / "dissection.json")
    assert saved.settings["probe_size"] == len(ld.Broden(synthetic))
    assert_same_numbers(saved, ld.dissect(cli_models.two_stage(), ld.ProbeSet(synthetic), ["stage"]))
    assert sorted(path.name for path in out.iterdir()) == ["dissection.json", "stage.csv"]


def test_a_model_saved_whole_with_torch_save_or_named_as_an_attribute_is_the_same_model(synthetic, tmp_path):
    torch.save(cli_models.two_stage(), tmp_path / "model.pt")
    results = []
    for model in (str(tmp_path / "model.pt"), "tests.cli_models:BUILT", "tests.cli_models:two_stage"):
        out = tmp_path / f"out{len(results)}"
        assert main(["dissect", model, "--broden", str(synthetic), "--layers", "stem", "--size", "6", "--no-report",
                     "-o", str(out)]) == 0
        results.append(Dissection.from_json(out / "dissection.json"))
    assert_same_numbers(results[0], results[2])
    assert_same_numbers(results[1], results[2])
    # The layers before the file, as with module:function.
    assert main(["dissect", "--layers", "stem", str(tmp_path / "model.pt"), "--broden", str(synthetic), "--size", "6",
                 "--no-report", "-o", str(tmp_path / "after")]) == 0
    assert_same_numbers(Dissection.from_json(tmp_path / "after" / "dissection.json"), results[2])


@pytest.mark.parametrize("arguments,message", [
    (["tests.cli_models:two_stage", "--layers", "stem", "--batch-size", "0"], "--batch-size 0 must be a positive"),
    (["tests.cli_models:two_stage", "--layers", "stem", "--size", "0"], "--size 0 must be a positive"),
    (["tests.cli_models:two_stage", "--layers", "stem", "--size", "17"], "--size 17: size=17 but"),
    (["tests.cli_models:two_stage", "--layers", "stem", "--quantile", "1.5"], "--quantile 1.5 must be in (0, 1)"),
    (["tests.cli_models:two_stage", "--layers", "stem", "--device", "tpu9"], "--device 'tpu9' is not a device"),
    (["tests.cli_models:two_stage", "--layers", "stme"], "'stme'"),
    (["tests.cli_models:two_stage", "--layers", "stem", "--spill-dir", "nowhere"],
     "--spill-dir nowhere: not an existing folder"),
    (["tests.cli_models:two_stage", "--layers", "stem", "--spill-dir", ".", "--no-spill"],
     "--spill-dir and --no-spill contradict each other"),
    (["tests.cli_models:NOT_A_MODEL", "--layers", "stem"], "is a int, neither an nn.Module nor a function"),
    (["tests.cli_models:needs_arguments", "--layers", "stem"], "cannot be called without arguments"),
    (["missing.pt", "--layers", "stem"], "must be module:function (e.g. torchvision.models:resnet18) or a .pt/.pth"),
    (["weights.pt", "--layers", "stem"], "holds a state dict (the weights, without the model): name the code that "
                                         "builds the model as module:function and pass the file as --weights"),
    (["notes.pt", "--layers", "stem"], "MODEL 'notes.pt' is not a file saved with torch.save"),
    (["elsewhere.pt", "--layers", "stem"], "the model's code does not import here"),
])
def test_dissect_command_errors_name_the_argument_at_fault(synthetic, tmp_path, monkeypatch, capsys, arguments,
                                                           message):
    monkeypatch.chdir(tmp_path)
    torch.save(cli_models.two_stage().state_dict(), tmp_path / "weights.pt")
    (tmp_path / "notes.pt").write_text("not a model")
    (tmp_path / "elsewhere.pt").write_bytes(saved_from_a_module_that_is_gone(tmp_path))
    assert main(["dissect", *arguments, "--broden", str(synthetic), "-o", "out"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lightning-dissect dissect: error:") and message in error, error
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA has the device")
def test_dissect_command_names_a_cuda_device_the_machine_does_not_have(synthetic, tmp_path, capsys):
    assert main(["dissect", "tests.cli_models:two_stage", "--layers", "stem", "--device", "cuda", "--broden",
                 str(synthetic), "-o", str(tmp_path / "out")]) == 2
    assert "--device 'cuda': this machine has no CUDA device" in capsys.readouterr().err


def saved_from_a_module_that_is_gone(tmp_path: Path) -> bytes:
    """The bytes of torch.save(model) for a model whose class lives in a module that no longer imports."""
    import importlib
    import io

    folder = tmp_path / "gone"
    folder.mkdir(exist_ok=True)
    (folder / "vanishing_cli_model.py").write_text("import torch\n\nclass Net(torch.nn.Conv2d):\n    pass\n")
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("vanishing_cli_model")
        buffer = io.BytesIO()
        torch.save(module.Net(3, 2, 1), buffer)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("vanishing_cli_model", None)
    return buffer.getvalue()
