"""The Trainer-free Dissector: a plain PyTorch / Fabric loop, concept tracking against a hand-written
reference, the automatic layer choice, the cost budget and the files."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_dissect as ld
from lightning_dissect.engine.layer_choice import choose_layers
from tests import test_callback as shared
from tests.test_callback import loader

_in_tmp_path, probe, synthetic_root = shared._in_tmp_path, shared.probe, shared.synthetic_root  # fixtures


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(16, 4))

    def forward(self, images):
        return self.head(self.block2(self.block1(images)))


def train(dissector: ld.Dissector | None, steps: int = 4, fabric_loggers=None) -> tuple[nn.Module, list]:
    """A Fabric loop: the dissector is asked before every step and once after the last."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, loggers=fabric_loggers or [])
    fabric.seed_everything(0, verbose=False)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapped, optimizer = fabric.setup(model, optimizer)
    batches = iter(fabric.setup_dataloaders(loader(shuffle=True)))
    for step in range(steps):
        if dissector is not None:
            dissector.maybe_run(model, step)  # the module itself: layer names as in model.named_modules()
        images, targets = next(batches)
        fabric.backward(F.cross_entropy(wrapped(images), targets))
        optimizer.step()
        optimizer.zero_grad()
    if dissector is not None:
        dissector.maybe_run(model, steps)
    for logger in fabric.loggers:
        logger.finalize("success")
    return model, list(optimizer.state_dict()["state"].values())


def test_fabric_loop_with_dissector_dissects_on_schedule_and_trains_bit_identically(probe, tmp_path):
    from lightning.fabric.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="fabric")
    dissector = ld.Dissector(probe, layers=["block2"], every_n_steps=2, loggers=[logger], dirpath=tmp_path / "d",
                             figure_budget=None, strips_per_layer=0,  # strips: tested in test_report*, time saved
                             max_overhead=None)
    model, optimizer_state = train(dissector, fabric_loggers=[logger])
    plain, plain_optimizer_state = train(None)
    assert [entry.step for entry in dissector.history] == [0, 2, 4]
    for name, value in plain.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"])
               for a, b in zip(plain_optimizer_state, optimizer_state))
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        logged = [(int(row["step"]), float(row["dissect/block2/unique_concepts"])) for row in csv.DictReader(handle)
                  if row["dissect/block2/unique_concepts"]]
    assert logged == [(entry.step, entry.summary["unique_concepts"]) for entry in dissector.history]
    assert (Path(logger.log_dir) / "media" / "dissect" / "block2" / "emergence" / "step=4.png").is_file()
    assert [json.loads(line)["step"] for line in (tmp_path / "d" / "history.jsonl").read_text().splitlines()] == \
        [0, 2, 4]


def test_numbers_are_the_engines_and_switches_match_a_hand_written_comparison(probe):
    torch.manual_seed(0)
    model = Net().eval()
    options = dict(quantile=0.05, iou_threshold=0.02)
    dissector = ld.Dissector(probe, ["block1", "block2"], **options, max_overhead=None)
    first = dissector.run(model, step=0)
    before = ld.dissect(model, probe, ["block1", "block2"], **options)
    torch.manual_seed(1)
    model.block2[0].reset_parameters()
    model.block1[0].weight.data.mul_(-1)
    second = dissector.run(model, step=7, epoch=1)
    after = ld.dissect(model, probe, ["block1", "block2"], **options)
    changed = 0
    for layer in ("block1", "block2"):
        summary = after[layer].summary()
        for name, value in summary.items():
            if name != "units":
                assert second.metrics[f"dissect/{layer}/{name}"] == value
        assert f"dissect/{layer}/switches" not in first.metrics  # nothing to compare with yet
        old, new = before[layer], after[layer]
        was = [float(score) > 0.02 for score in old.scores]
        now = [float(score) > 0.02 for score in new.scores]
        switched = [unit for unit in range(new.num_units)
                    if was[unit] and now[unit] and int(old.labels[unit]) != int(new.labels[unit])]
        entry = second.entries[layer]
        assert entry.switched_units == switched
        assert entry.new_units == [unit for unit in range(new.num_units) if now[unit] and not was[unit]]
        assert entry.lost_units == [unit for unit in range(new.num_units) if was[unit] and not now[unit]]
        assert second.metrics[f"dissect/{layer}/switches"] == len(switched)
        assert second.metrics[f"dissect/{layer}/switch_in"] == len(entry.new_units)
        assert second.metrics[f"dissect/{layer}/switch_out"] == len(entry.lost_units)
        pairs = Counter((old.label_name(unit), new.label_name(unit)) for unit in switched)
        assert sorted(map(tuple, entry.transitions)) == sorted((a, b, n) for (a, b), n in pairs.items())
        assert entry.label == [new.label_name(unit) for unit in range(new.num_units)]
        assert (entry.step, entry.epoch) == (7, 1)
        changed += len(switched) + len(entry.new_units) + len(entry.lost_units)
    assert changed > 0  # the comparison had something to find


def test_history_survives_a_state_dict_round_trip_through_json(probe):
    dissector = ld.Dissector(probe, ["block2"], every_n_steps=1, max_overhead=None)
    model = Net()
    for step in range(3):
        dissector.maybe_run(model, step)
    state = json.loads(json.dumps(dissector.state_dict()))
    restored = ld.Dissector(probe, ["block2"], every_n_steps=1, max_overhead=None)
    restored.load_state_dict(state)
    assert restored.history == dissector.history and restored.last_step == 2
    assert restored.maybe_run(model, 2) is None  # already dissected
    assert restored.maybe_run(model, 3).entries["block2"].switches == 0  # compared with the restored step 2


def test_automatic_layers_of_a_resnet_are_its_last_two_stages():
    class Block(nn.Module):
        def __init__(self, width_in, width, stride):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(width_in, width, 3, stride, 1), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width)
            self.relu = nn.ReLU()  # used twice, as torchvision's blocks do
            self.downsample = nn.Conv2d(width_in, width, 1, stride) if stride > 1 or width_in != width else None

        def forward(self, x):
            identity = self.downsample(x) if self.downsample is not None else x
            return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + identity)

    class MiniResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
            widths = [4, 4, 8, 16, 32]
            for stage in range(1, 5):
                stride = 1 if stage == 1 else 2
                setattr(self, f"layer{stage}", nn.Sequential(Block(widths[stage - 1], widths[stage], stride),
                                                             Block(widths[stage], widths[stage], 1)))
            self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)

        def forward(self, x):
            x = self.stem(x)
            for stage in range(1, 5):
                x = getattr(self, f"layer{stage}")(x)
            return self.fc(self.avgpool(x).flatten(1))

    with torch.no_grad():
        assert choose_layers(MiniResNet().eval(), torch.randn(2, 3, 32, 32)) == ["layer3", "layer4"]


def test_automatic_layers_skip_pooling_and_dropout_and_need_a_spatial_module(probe):
    sequential = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.1), nn.AdaptiveAvgPool2d(1),
                               nn.Flatten(), nn.Linear(16, 2))
    messages = []
    dissector = ld.Dissector(probe, max_overhead=None)
    assert dissector.setup(sequential, ld.RunContext(info=messages.append)) == ["1", "4"]
    assert messages == ["DissectionCallback: dissecting ['1', '4'], chosen automatically (the last outputs of the "
                        "deepest feature stages; pass layers=[...] to choose)"]
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    with pytest.raises(ld.DissectionError, match="layers=None: no module of Sequential returns a spatial"):
        ld.Dissector(probe, max_overhead=None).setup(flat)


def test_probe_size_and_time_budget_cut_the_probe_once_to_a_subset_of_the_same_draw(probe, synthetic_root,
                                                                                    monkeypatch):
    assert len(ld.Dissector(synthetic_root, probe_size=20, max_overhead=None).load_probe()) == 20
    cut = ld.Dissector(probe, probe_size=20, max_overhead=None).load_probe()
    assert len(cut) == 20 and set(cut.rows) <= set(probe.rows)

    # max_seconds sizes the probe once, before the first dissection, never below MIN_PROBE_SIZE images.
    monkeypatch.setattr(ld.dissector, "MIN_PROBE_SIZE", 10)
    budget = ld.Dissector(probe, ["block2"], every_n_steps=1, max_seconds=1e-6, max_overhead=None)
    messages = []
    context = ld.RunContext(info=messages.append)
    model = Net()
    first = budget.maybe_run(model, 0, context=context)
    second = budget.maybe_run(model, 1, context=context)
    assert first.entries["block2"].probe_size == second.entries["block2"].probe_size == 10
    assert set(budget.probe.rows) <= set(probe.rows)
    assert messages[0].startswith("DissectionCallback: probe of 10 of 48 images at 32x32 (the probe's own size)")
    resumed = ld.Dissector(probe, ["block2"], every_n_steps=1, max_seconds=1e-6, max_overhead=None)
    resumed.load_state_dict(budget.state_dict())
    assert resumed.maybe_run(model, 2).entries["block2"].probe_size == 10  # no new calibration: the same size


def test_a_probe_too_small_for_stable_counts_is_said_once_naming_the_layers(probe, monkeypatch):
    # 48 images; at q = 0.001, block2 (16 x 16) has 0.001 * 48 * 256 = 12.3 values above its threshold.
    warnings: list[str] = []
    small = ld.Dissector(probe, ["block1", "block2"], every_n_steps=1, quantile=0.001, max_overhead=None)
    for step in range(3):
        small.maybe_run(Net(), step, context=ld.RunContext(warn=warnings.append))
    assert len(warnings) == 1 and "too small for stable counts" in warnings[0]
    assert "48 images (fewer than 400)" in warnings[0]
    assert "'block2' has 12.3 activations" in warnings[0] and "'block1'" not in warnings[0]

    monkeypatch.setattr(ld.stability, "STABLE_PROBE_SIZE", 40)
    warnings.clear()
    stable = ld.Dissector(probe, ["block1", "block2"], every_n_steps=1, max_overhead=None)
    stable.maybe_run(Net(), 0, context=ld.RunContext(warn=warnings.append))
    assert warnings == []


def test_files_are_replaced_whole_and_a_failed_write_leaves_the_last_complete_history(probe, tmp_path):
    dissector = ld.Dissector(probe, ["block1", "block2"], every_n_steps=1, dirpath=tmp_path, save_json=False,
                             figure_budget=None, max_overhead=None)
    model = Net()
    dissector.maybe_run(model, 0)
    dissector.maybe_run(model, 1)
    complete = (tmp_path / "history.jsonl").read_text()
    assert [json.loads(line) for line in complete.splitlines()] == [entry.to_dict() for entry in dissector.history]
    assert sorted(path.name for path in (tmp_path / "step=1").iterdir()) == ["block1.csv", "block2.csv",
                                                                              "complete.json", "strips"]
    dissector.history.append(ld.HistoryEntry(step=2, layer="block2", epoch=object()))  # not JSON: fails mid-write
    with pytest.raises(TypeError):
        dissector.write_history()
    assert (tmp_path / "history.jsonl").read_text() == complete
    assert sorted(path.name for path in tmp_path.iterdir()) == ["history.jsonl", "step=0", "step=1"]


def test_a_broken_logger_warns_and_the_others_still_get_the_dissection(probe):
    class Broken:
        def log_metrics(self, metrics, step):
            raise OSError("disk full")

    class Recording:
        def __init__(self):
            self.steps = []

        def log_metrics(self, metrics, step):
            self.steps.append(step)

    recording = Recording()
    dissector = ld.Dissector(probe, ["block2"], loggers=[Broken(), recording], max_overhead=None)
    with pytest.warns(UserWarning) as caught:
        report = dissector.maybe_run(Net(), 0)
    assert report is not None and recording.steps == [0]
    assert any("could not show the dissection at step 0 (OSError: disk full)" in str(w.message) for w in caught)


def test_a_plain_summary_writer_gets_scalars_tables_and_figures(probe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path)
    dissector = ld.Dissector(probe, ["block2"], every_n_steps=1, loggers=[writer], figure_budget=None,
                             strips_per_layer=0, max_overhead=None)
    for step in range(2):
        dissector.maybe_run(Net(), step)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("dissect/block2/detectors")] == \
        [(entry.step, entry.summary["detectors"]) for entry in dissector.history]
    assert [event.step for event in events.Tensors("dissect/block2/units/text_summary")] == [0, 1]
    assert [event.step for event in events.Images("dissect/block2/emergence")] == [0, 1]


def test_figure_budget_skips_figures_but_never_scalars_tables_or_files(probe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    def logged(budget, folder):
        writer = SummaryWriter(folder)
        dissector = ld.Dissector(probe, ["block2"], every_n_steps=1, loggers=[writer], dirpath=folder / "d",
                                 figure_budget=budget, strips_per_layer=0, max_overhead=None)
        for step in range(3):  # drawing takes far more than 1e-9 of the wall time: only step 0 may draw
            dissector.maybe_run(Net(), step)
        writer.close()
        events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()
        return ([e.step for e in events.Scalars("dissect/block2/detectors")],
                [e.step for e in events.Tensors("dissect/block2/units/text_summary")],
                [e.step for e in events.Images("dissect/block2/detectors_per_category")],
                sorted(p.name for p in (folder / "d").iterdir()))

    scalars, tables, images, files = logged(1e-9, tmp_path / "a")
    all_scalars, all_tables, all_images, all_files = logged(None, tmp_path / "b")
    assert scalars == all_scalars == [0, 1, 2] and tables == all_tables == [0, 1, 2]
    assert images == [0] and all_images == [0, 1, 2]
    assert files == all_files
    with pytest.raises(ValueError, match="figure_budget"):
        ld.Dissector(probe, ["block2"], figure_budget=0, max_overhead=None)


def test_figure_budget_expects_the_next_drawing_to_cost_as_much_as_the_last():
    """Figures are drawn only when the time spent so far plus the last drawing's time fits in the
    budget: with 10% and a 1 s drawing at t = 0, the next one waits until 20 s have passed."""
    from lightning_dissect.budget import FigureBudget

    now = [100.0]
    budget = FigureBudget(0.1, clock=lambda: now[0])
    assert budget.due()  # the first dissection always draws
    budget.spent(1.0)
    due = {}
    for elapsed in [10.0, 15.0, 19.9, 20.0, 30.0]:
        now[0] = 100.0 + elapsed
        due[elapsed] = budget.due()
    assert due == {10.0: False, 15.0: False, 19.9: False, 20.0: True, 30.0: True}
