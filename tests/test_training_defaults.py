"""Default-on in real training runs: the cost budget, the final model, one folder per run (issue 12)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_dissect as ld
from lightning_dissect.budget import OverheadBudget
from lightning_dissect.history import read_history
from lightning_dissect.run_folder import RunFolder
from lightning_dissect.schedule import log_spaced
from tests import test_callback as shared
from tests.test_callback import fit, loader, steps_of, tiny_cnn

_in_tmp_path, probe, synthetic_root = shared._in_tmp_path, shared.probe, shared.synthetic_root  # fixtures


# ---------------------------------------------------------------------- the budget, on a clock


def test_budget_sizes_the_probe_so_every_scheduled_dissection_fits():
    budget = OverheadBudget(0.05)
    # 300 steps of 0.19 s: 57 s of training; 5% of the fit is 3 s; 10 dissections at 1 ms an image: 300 images.
    assert budget.plan_probe_size(0.001, 0.19, 300, dissections=10, largest=500, smallest=200) == 300
    assert budget.plan_probe_size(0.001, 0.19, 300, dissections=30, largest=500, smallest=200) == 200  # the floor
    assert budget.plan_probe_size(0.001, 0.19, 300, dissections=30, largest=150, smallest=200) == 150
    assert budget.plan_probe_size(0.0001, 0.19, 300, dissections=10, largest=500, smallest=200) == 500
    assert budget.plan_probe_size(0.001, 0.19, float("inf"), dissections=10, largest=500, smallest=200) == 500
    assert OverheadBudget(None).plan_probe_size(1.0, 0.19, 300, dissections=10, largest=500, smallest=200) == 500
    with pytest.raises(ValueError, match="max_overhead=1.5"):
        OverheadBudget(1.5)


def simulated_run(budget: OverheadBudget, now: list[float], steps: int, step_seconds: Callable[[int], float]
                  ) -> list[int]:
    """A fit of `steps` training steps on the clock `now`, a log-spaced schedule and a final dissection:
    dissections of 0.5 s, of which the first and the last also draw for 0.3 s. Returns the steps kept."""
    planned = log_spaced().planned_steps(steps)
    budget.start()
    kept: list[int] = []
    for step in range(steps + 1):
        if step > 0:
            now[0] += step_seconds(step)  # the training step that leads to `step`
        final = step == steps
        if step in planned or final:
            later = sum(1 for other in planned if other > step) + (0 if final else 1)
            if final or budget.keep(step, steps, later, first=not kept):
                drawing = 0.3 if final or not kept else 0.0
                kept.append(step)
                now[0] += 0.5 + drawing
                budget.spent(0.5 + drawing, drawing=drawing)
    return kept


def test_budget_skips_the_earliest_scheduled_dissections_and_keeps_the_latest():
    """300 steps of 0.27 s: 81 s of training, 5% of the fit is 4.263 s (0.05 / 0.95 of 81 s). Dissections
    of 0.5 s (the calibration's estimate before one is measured); the first and the last draw for 0.3 s
    (estimated as two dissections, 1.0 s, until one is measured). Worked out by hand, for this dissection,
    the later ones (the final included) and the drawings due:
    step 0: 10 x 0.5 + 2 x 1.0 = 7.0 > 4.263, skipped; step 1: 9 x 0.5 + 2.0 = 6.5; step 2: 6.0; step 4:
    5.5; step 9: 5.0; step 20 (from now on the measured rate projects the same 81 s): 4.5, skipped;
    step 44: 4 x 0.5 + 2.0 = 4.0, kept (0.8 s spent). Step 97: 0.8 + 3 x 0.5 + 0.3 (the drawing now
    measured) = 2.6, kept; so is 213 (2.6), and the final one: 2.6 s in all."""
    now = [0.0]
    budget = OverheadBudget(0.05, clock=lambda: now[0], drawing_per_dissection=2.0)
    assert budget.plan_probe_size(0.0025, 0.27, 300, dissections=10, largest=200, smallest=200) == 200
    budget.expected_seconds = 0.0025 * 200
    # The plan's outlook: n dissections and two drawings within 4.263 s: n x 0.5 + 2.0 <= 4.263, n = 4.
    assert budget.expected(10, 300) == (4, pytest.approx((4 * 0.5 + 2 * 1.0) / (81 + 4 * 0.5 + 2 * 1.0)))
    assert simulated_run(budget, now, 300, lambda step: 0.27) == [44, 97, 213, 300]
    assert budget.own_seconds == pytest.approx(2.6) and budget.share == pytest.approx(2.6 / (81 + 2.6))
    # Ten times longer: 5% of 810 s affords every scheduled dissection, step 0 first.
    now = [0.0]
    long = OverheadBudget(0.05, clock=lambda: now[0], drawing_per_dissection=2.0)
    long.plan_probe_size(0.0025, 0.27, 3000, dissections=12, largest=200, smallest=200)
    long.expected_seconds = 0.5
    assert long.expected(12, 3000) == (12, pytest.approx((12 * 0.5 + 2 * 1.0) / (810 + 12 * 0.5 + 2 * 1.0)))
    assert simulated_run(long, now, 3000, lambda step: 0.27) == log_spaced().planned_steps(3000) + [3000]
    # Before training, without an estimate of a step or of the run's length, step 0 is kept.
    now = [0.0]
    unknown = OverheadBudget(0.05, clock=lambda: now[0])
    unknown.expected_seconds = 0.5
    unknown.start()
    assert unknown.keep(0, 300, later=9, first=True) and unknown.keep(0, float("inf"), later=9, first=True)
    # By default a drawing is expected to take DRAWING_PER_DISSECTION (6) dissections, 3.0 s: within the
    # 4.263 s of the 300-step fit, only the final dissection (0.5 s and its drawing).
    default = OverheadBudget(0.05)
    default.plan_probe_size(0.0025, 0.27, 300, dissections=10, largest=200, smallest=200)
    default.expected_seconds = 0.5
    assert default.expected(10, 300) == (1, pytest.approx((0.5 + 3.0) / (81 + 0.5 + 3.0)))


def test_slow_first_steps_do_not_spend_the_budget_on_the_earliest_dissections():
    """The first training step takes 5 s (loaders starting), the others 0.27 s. Projected from the first
    step the fit would last 1500 s and every early dissection would fit; the plan's estimate of a step
    (0.27 s) projects until step 20, so steps 0 to 9 are skipped as with a steady rate. From step 20 the
    measured rate, the slow step included, projects 152 s: 5% of it affords step 20 as well."""
    now = [0.0]
    budget = OverheadBudget(0.05, clock=lambda: now[0], drawing_per_dissection=2.0)
    budget.plan_probe_size(0.0025, 0.27, 300, dissections=10, largest=200, smallest=200)
    budget.expected_seconds = 0.5
    assert simulated_run(budget, now, 300, lambda step: 5.0 if step == 1 else 0.27) == [20, 44, 97, 213, 300]


# ---------------------------------------------------------------------- real runs


def test_the_final_model_is_dissected_however_the_fit_ends(probe):
    by_steps = ld.DissectionCallback(probe, layers="block2", every_n_steps=5, max_overhead=None)
    fit([by_steps], max_steps=7)
    assert steps_of(by_steps) == [0, 5, 7]
    by_epochs = ld.DissectionCallback(probe, layers="block2", every_n_epochs=2, max_overhead=None)
    fit([by_epochs], max_epochs=5)  # 4 steps an epoch: epochs 1 and 3 end at steps 8 and 16
    assert steps_of(by_epochs) == [0, 8, 16, 20]

    from lightning.pytorch.callbacks import EarlyStopping

    stopped = ld.DissectionCallback(probe, layers="block2", every_n_steps=100, max_overhead=None)
    # A validation loss that cannot improve: training stops after the second epoch.
    stopping = EarlyStopping(monitor="val_loss", patience=0, min_delta=1e9, mode="min")
    trainer, _ = fit([stopped, stopping], model=tiny_cnn(lr=0.0), max_epochs=10, val=loader(num_images=8))
    assert trainer.current_epoch < 10 and trainer.global_step == 8
    assert steps_of(stopped) == [0, 8]
    already = ld.DissectionCallback(probe, layers="block2", every_n_steps=4, max_overhead=None)
    fit([already], max_steps=8)
    assert [entry.step for entry in already.dissector.history] == [0, 4, 8]  # step 8 once


def test_the_budget_decision_is_logged_once_and_the_probe_size_stays_fixed(probe, caplog, monkeypatch):
    monkeypatch.setattr(ld.dissector, "MIN_PROBE_SIZE", 8)
    callback = ld.DissectionCallback(probe, layers="block2", every_n_steps=2, max_overhead=0.5)
    with caplog.at_level(logging.INFO):
        fit([callback], max_steps=12, max_epochs=3)
    decisions = [record.getMessage() for record in caplog.records
                 if "DissectionCallback: probe of" in record.getMessage()]
    assert len(decisions) == 1
    size = len(callback.dissector.probe)
    assert re.fullmatch(rf"DissectionCallback: probe of {size} of 48 images at 32x32 \(the size of the training "
                        r"images\); (7 dissections|[1-6] of 7 scheduled dissections) expected"
                        r"( \(the last, never skipped\))?, about [0-9.]+% of the fit \(max_overhead=0.5\)",
                        decisions[0]), decisions[0]
    assert 8 <= size <= 48 and {entry.probe_size for entry in callback.dissector.history} == {size}
    assert steps_of(callback)[-1] == 12  # the last is never skipped (step 0 may be, in a run this short)
    assert set(steps_of(callback)) | set(callback.dissector.skipped) == {0, 2, 4, 6, 8, 10, 12}
    ends = [record.getMessage() for record in caplog.records
            if re.match(r"DissectionCallback: \d+ dissections? took", record.getMessage())]
    assert len(ends) == 1 and "% of the fit" in ends[0]


def test_the_probe_goes_to_the_model_at_the_training_images_size(probe, caplog):
    small = DataLoader(TensorDataset(torch.randn(32, 3, 16, 24), torch.randint(0, 4, (32,))), batch_size=8)
    callback = ld.DissectionCallback(probe, layers="block2", every_n_steps=2, max_overhead=None)
    with caplog.at_level(logging.INFO):
        fit([callback], data=small, max_steps=2)
    assert any("images at 16x24 (the size of the training images)" in record.getMessage()
               for record in caplog.records)
    assert callback.dissector.input_size == (16, 24)
    inputs = callback.dissector.probe.model_input([0, 1], "cpu")
    assert tuple(inputs.shape) == (2, 3, 16, 24)
    given = ld.DissectionCallback(probe, layers="block2", every_n_steps=2, max_overhead=None, image_size=20)
    fit([given], data=small, max_steps=2)
    assert given.dissector.input_size == (20, 20)


@pytest.mark.parametrize("ending", ["off schedule", "on schedule", "early stop on schedule"])
def test_first_and_last_dissections_always_draw_their_figures(probe, tmp_path, ending):
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    every = {"every_n_epochs": 1} if ending == "early stop on schedule" else {"every_n_steps": 2}
    callback = ld.DissectionCallback(probe, layers="block2", max_overhead=None, figure_budget=1e-9, **every)
    logger = TensorBoardLogger(tmp_path, name="tb")
    if ending == "early stop on schedule":  # stops at the end of the second epoch, just dissected on schedule
        stopping = EarlyStopping(monitor="val_loss", patience=0, min_delta=1e9, mode="min")
        fit([callback, stopping], model=tiny_cnn(lr=0.0), max_epochs=10, val=loader(num_images=8), logger=logger,
            strips=True)
        last, steps = 8, [0, 4, 8]
    else:
        last = 7 if ending == "off schedule" else 6
        steps = [0, 2, 4, 6, 7] if ending == "off schedule" else [0, 2, 4, 6]
        fit([callback], max_steps=last, logger=logger, strips=True)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()
    assert [e.step for e in events.Scalars("dissect/block2/detectors")] == steps
    assert [e.step for e in events.Images("dissect/block2/detectors_per_category")] == [0, last]
    assert [e.step for e in events.Tensors("dissect/block2/units/text_summary")] == steps  # tables once a step
    # The final dissection saves the strip of every detector: a picture on every detector's card.
    final = ld.Dissection.from_json(Path(logger.log_dir) / "dissections" / f"step={last}" / "dissection.json")["block2"]
    strips = Path(logger.log_dir) / "dissections" / f"step={last}" / "strips" / "block2"
    detectors = final.detectors.nonzero().squeeze(1).tolist()
    assert detectors and {f"unit_{unit}.jpg" for unit in detectors} <= {path.name for path in strips.iterdir()}


# ---------------------------------------------------------------------- one folder per run


def test_runs_without_a_logger_sharing_a_root_get_folders_of_their_own(probe, tmp_path):
    runs = [ld.DissectionCallback(probe, layers="block2", every_n_steps=2, max_overhead=None) for _ in range(2)]
    fit([runs[0]], max_steps=4, default_root_dir=tmp_path)
    fit([runs[1]], max_steps=6, default_root_dir=tmp_path)
    folders = sorted((tmp_path / "dissections").iterdir())
    assert [folder.name for folder in folders] == ["version_0", "version_1"]
    for folder, steps in zip(folders, ([0, 2, 4], [0, 2, 4, 6])):
        run = RunFolder(folder)
        assert list(run.steps) == steps and len(run.run_ids()) == 1
        assert sorted({entry.step for entry in read_history(folder / "history.jsonl")}) == steps


def test_wandb_runs_sharing_a_save_dir_get_folders_of_their_own(probe, tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    folders = []
    for steps in (4, 6):
        logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning-dissect-test")
        callback = ld.DissectionCallback(probe, layers="block2", every_n_steps=2, max_overhead=None,
                                         strips_per_layer=0)
        fit([callback], max_steps=steps, logger=logger)
        run_id = logger.experiment.id
        logger.experiment.finish()
        folders.append((tmp_path / "dissections" / run_id, steps))
    assert sorted(path.name for path in (tmp_path / "dissections").iterdir()) == sorted(f.name for f, _ in folders)
    for folder, steps in folders:
        assert list(RunFolder(folder).steps) == list(range(0, steps + 1, 2))


def test_a_resumed_run_continues_its_own_folder(probe, tmp_path):
    first = ld.DissectionCallback(probe, layers="block2", every_n_steps=2, max_overhead=None)
    trainer, _ = fit([first], max_epochs=1, default_root_dir=tmp_path)  # steps 0..4
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = ld.DissectionCallback(probe, layers="block2", every_n_steps=2, max_overhead=None)
    fit([resumed], max_epochs=2, default_root_dir=tmp_path, ckpt_path=tmp_path / "epoch1.ckpt")
    assert [folder.name for folder in (tmp_path / "dissections").iterdir()] == ["version_0"]
    run = RunFolder(tmp_path / "dissections" / "version_0")
    assert list(run.steps) == [0, 2, 4, 6, 8] and len(run.run_ids()) == 1
    new = ld.DissectionCallback(probe, layers="block2", every_n_steps=2, max_overhead=None)
    fit([new], max_steps=2, default_root_dir=tmp_path)  # a new run: a new folder
    assert sorted(folder.name for folder in (tmp_path / "dissections").iterdir()) == ["version_0", "version_1"]


def test_a_given_dirpath_that_holds_another_run_is_refused(probe, tmp_path):
    fit([ld.DissectionCallback(probe, layers="block2", every_n_steps=2, dirpath=tmp_path / "d", max_overhead=None)],
        max_steps=2)
    with pytest.raises(ld.DissectionError, match=r"dirpath: .* holds the dissections of run \w+ \(steps \[0, 2\]\)"):
        fit([ld.DissectionCallback(probe, layers="block2", dirpath=tmp_path / "d")], max_steps=2)


def test_report_and_compare_say_when_a_folder_mixes_runs(probe, tmp_path, capsys):
    from lightning_dissect.cli import main
    from lightning_dissect.report.run import report_run

    fit([ld.DissectionCallback(probe, layers="block2", every_n_steps=2, dirpath=tmp_path / "a", max_overhead=None)],
        max_steps=2)
    fit([ld.DissectionCallback(probe, layers="block2", every_n_steps=2, dirpath=tmp_path / "b", max_overhead=None)],
        max_steps=4)
    (tmp_path / "b" / "step=4").rename(tmp_path / "a" / "step=4")  # what two runs writing one folder once left
    with pytest.raises(ValueError, match=r"mixes the dissections of 2 runs"):
        report_run(tmp_path / "a")
    assert main(["compare", str(tmp_path / "a"), "-o", str(tmp_path / "c.png")]) == 2
    assert "mixes the dissections of 2 runs" in capsys.readouterr().err


def test_a_resume_under_another_schedule_keeps_the_history_and_warns_once(probe, tmp_path):
    first = ld.DissectionCallback(probe, layers="block2", every_n_steps=2, max_overhead=None)
    trainer, _ = fit([first], max_epochs=1, default_root_dir=tmp_path)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = ld.DissectionCallback(probe, layers="block2", every_n_steps=3, max_overhead=None)
    with pytest.warns(UserWarning, match=r"the checkpoint was dissected on the schedule EveryNSteps\(at_start=True, "
                                         r"n=2\), this run uses EveryNSteps\(at_start=True, n=3\)") as caught:
        fit([resumed], max_epochs=2, default_root_dir=tmp_path, ckpt_path=tmp_path / "epoch1.ckpt")
    assert sum("dissected on the schedule" in str(w.message) for w in caught) == 1
    assert steps_of(resumed) == [0, 2, 4, 6, 8]  # 0, 2, 4 kept from the checkpoint; 6 on the new schedule; 8 final
    assert json.loads((tmp_path / "dissections" / "version_0" / "run.json").read_text())["run_id"]


def test_defaults_and_their_validation():
    """The defaults: `max_overhead=0.05`, `at_end=True`; `max_overhead=None` turns the budget off."""
    callback = ld.DissectionCallback()
    assert callback.dissector.budget.max_overhead == 0.05 and callback.dissector.at_end
    assert ld.DissectionCallback(max_overhead=None).dissector.budget.max_overhead is None
    with pytest.raises(ValueError, match="max_overhead=0"):
        ld.DissectionCallback(max_overhead=0)
    with pytest.raises(ValueError, match="at_end='yes'"):
        ld.DissectionCallback(at_end="yes")
