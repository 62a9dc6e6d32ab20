"""Target 5 of the performance issue: what the callback adds to a training run.

The emergence example's training (`examples/emergence.py`, through `demo.emergence_run`'s
pieces): `SmallCNN` (width 32) learning the synthetic `background` task at 64 x 64, batch 32,
TensorBoard logging; with `DissectionCallback` at its default schedule (step 0 and log-spaced
steps 1, 2, 4, 9, 20, ...) on the example's probe (300 validation images) and layers
(`model.conv1` ... `model.conv4`), against the same run without the callback. The runs go
without, with, without; the overhead is against the mean of the two runs without.

    python -m benchmarks.bench_training            # 1000 steps, as the example (about 5 minutes)
    python -m benchmarks.bench_training --quick    # 300 steps: the early, dense part of the schedule
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from benchmarks.common import machine, print_table


def _timed(owner: object, name: str, totals: dict[str, float], label: str) -> None:
    """Replace `owner.name` by a wrapper that adds its wall time to `totals[label]` (a few calls per
    dissection: no measurable cost)."""
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[label] = totals.get(label, 0.0) + time.perf_counter() - started

    wrapper.__wrapped__ = function  # type: ignore[attr-defined]
    setattr(owner, name, wrapper)


def train(steps: int, with_callback: bool, probe_size: int, cache_dir: str | None, output: str) -> dict:
    from lightning.pytorch import seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_dissect.callback import DissectionCallback
    from lightning_dissect.demo import SyntheticTaskModule, make_trainer, synthetic_images, synthetic_task_data
    from lightning_dissect.probe import ProbeSet
    from lightning_dissect.schedule import log_spaced
    from lightning_dissect.synthetic import synthetic_broden_path

    root = synthetic_broden_path(num_images=1000, image_size=64, cache_dir=cache_dir, workers=os.cpu_count() or 1)
    images = synthetic_images(root)
    seed_everything(0, verbose=False)
    module = SyntheticTaskModule("background", width=32)
    train_loader, val_loader = synthetic_task_data(root, "background", batch_size=32, images=images, seed=0)
    callbacks = []
    parts: dict[str, float] = {}
    if with_callback:
        from lightning_dissect import dissector

        # Where the callback's time goes, per instance (the class is left untouched).
        _timed(dissector, "dissect", parts, "engine: ld.dissect")
        probe = ProbeSet(root, split="val", size=min(probe_size, len(val_loader.dataset)), seed=0)
        layers = [f"model.conv{k}" for k in range(1, 5)]
        callback = DissectionCallback(probe, layers=layers, schedule=log_spaced(first=1, factor=2.2))
        _timed(callback.dissector, "_strips", parts, "unit strips (Dissector._strips)")
        _timed(callback.dissector, "_write", parts, "csv and json files (Dissector._write)")
        _timed(callback.dissector, "_show", parts, "logged scalars and media, figures (Dissector._show)")
        _timed(callback.dissector, "maybe_run", parts, "callback in all")
        callbacks.append(callback)
    logger = TensorBoardLogger(output, name="with" if with_callback else "without")
    trainer = make_trainer(steps, root_dir=output, callbacks=callbacks, logger=logger)
    started = time.perf_counter()
    try:
        trainer.fit(module, train_loader, val_loader)
    finally:
        if with_callback:
            dissector.dissect = dissector.dissect.__wrapped__
    seconds = time.perf_counter() - started
    dissections = sorted({entry.step for entry in callbacks[0].dissector.history}) if callbacks else []
    return {"seconds": seconds, "dissections": dissections, "parts": parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 steps")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1000, quick 300)")
    parser.add_argument("--probe-size", type=int, default=300, help="the example's default")
    parser.add_argument("--cache-dir", default=None, help="where the synthetic dataset is generated and cached")
    args = parser.parse_args()
    steps = args.steps or (300 if args.quick else 1000)
    print(f"machine: {machine()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as output:
        train(5, False, args.probe_size, args.cache_dir, output)  # dataset, imports, first-call costs
        without = train(steps, False, args.probe_size, args.cache_dir, output)
        with_callback = train(steps, True, args.probe_size, args.cache_dir, output)
        without_again = train(steps, False, args.probe_size, args.cache_dir, output)
    baseline = (without["seconds"] + without_again["seconds"]) / 2
    overhead = with_callback["seconds"] / baseline - 1
    print(f"\n### Target 5: training overhead of the callback ({steps} steps, target <= 10%)\n")
    print_table(["run", "seconds", "overhead"], [
        ["without the callback", without["seconds"], "-"],
        [f"with DissectionCallback ({len(with_callback['dissections'])} dissections)", with_callback["seconds"],
         f"{100 * overhead:.1f}%"],
        ["without the callback, again", without_again["seconds"], "-"],
    ])
    parts = with_callback["parts"]
    total = parts.pop("callback in all", 0.0)
    rows = [[label, seconds, f"{100 * seconds / baseline:.1f}%"] for label, seconds in parts.items()]
    rest = total - sum(parts.values())
    rows.append(["rest of the callback (schedule, history, switches)", rest, f"{100 * rest / baseline:.1f}%"])
    rows.append(["callback in all", total, f"{100 * total / baseline:.1f}%"])
    print("\n### Where the callback's time goes (share of the training without it)\n")
    print_table(["part", "seconds", "of training"], rows)
    print(f"\ndissected at steps {with_callback['dissections']}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
