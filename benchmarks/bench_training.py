"""What `DissectionCallback` adds to a training run, at its defaults (the `max_overhead` target: at most 5%).

Two cases, each trained with and without the callback, the runs interleaved (without, with, without,
with, ...), and the best (shortest) fit of each kind compared:

- `user`: what a new user runs first: a CNN of three conv layers (64, 128 and 256 units: a fit that
  takes about as long here as the user's 82 s) learning the synthetic `background` task at 64 x 64
  for 300 steps (batch 32, Trainer defaults: TensorBoard, checkpoints), with
  `DissectionCallback(probe="synthetic")` and nothing else.
- `emergence`: the emergence example's training (`examples/emergence.py`): `SmallCNN` (width 32) for
  1000 steps, its four blocks dissected on its 300-image probe at log-spaced steps, TensorBoard,
  the callback's defaults otherwise.

Besides the wall times, the callback's own accounted time (`Dissector.budget.own_seconds`:
calibration, dissections, figures, files) is printed against the fit, with the wall time of all its
hooks as the trainer calls them (measured from outside: everything the callback costs), the steps it
dissected and those the budget skipped. Every fit also times its training steps (from the start of
a batch to its end, other callbacks' hooks outside): the median step with and without the callback
shows whether the callback slows training outside its hooks, which a fit's wall time, drifting by
several percent from fit to fit on a shared machine, cannot show.

    python -m benchmarks.bench_training                  # both cases, 3 runs of each kind (about 20 minutes)
    python -m benchmarks.bench_training --case user --repeats 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import machine, print_table


def user_module() -> Any:
    """The user's network: three 3x3 conv layers with ReLU and 2x2 pooling, global pooling, a linear head."""
    from lightning.pytorch import LightningModule

    from lightning_dissect.synthetic import SYNTHETIC_TASKS

    class ThreeConv(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.conv2 = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.conv3 = nn.Sequential(nn.Conv2d(128, 256, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(256, len(SYNTHETIC_TASKS["background"]))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv3(self.conv2(self.conv1(images))).mean(dim=(2, 3)))

        def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
            images, targets = batch
            return F.cross_entropy(self(images), targets)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    return ThreeConv()


def time_hooks(callback: Any) -> dict[str, float]:
    """Wrap every Lightning hook of `callback` (this instance only) to add up its wall time: all the time the
    trainer spends in the callback, whatever the callback itself accounts for."""
    from lightning.pytorch import Callback

    seconds: dict[str, float] = {}

    def timer(name: str, hook: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
        return timed

    for name in dir(Callback):
        if name.startswith("on_") or name in ("setup", "teardown", "state_dict", "load_state_dict"):
            setattr(callback, name, timer(name, getattr(callback, name)))
    return seconds


def step_timer() -> Any:
    """A callback timing every training step, from its first `on_train_batch_start` to its last
    `on_train_batch_end` (put first and last in the callback list, so that the others' hooks fall outside)."""
    from lightning.pytorch import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.started = 0.0
            self.first, self.last = self._first(), self._last()

        def _first(self) -> Callback:
            timer = self

            class First(Callback):
                def on_train_batch_start(self, *args: Any) -> None:
                    timer.started = time.perf_counter()
            return First()

        def _last(self) -> Callback:
            timer = self

            class Last(Callback):
                def on_train_batch_end(self, *args: Any) -> None:
                    timer.seconds.append(time.perf_counter() - timer.started)
            return Last()

    return StepTimer()


def fit(case: str, with_callback: bool, output: str, cache_dir: str | None, steps: int | None) -> dict[str, Any]:
    """One fit; its wall time and, with the callback, what the callback accounted for."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_dissect.callback import DissectionCallback
    from lightning_dissect.demo import SyntheticTaskModule, make_trainer, synthetic_images, synthetic_task_data
    from lightning_dissect.probe import ProbeSet
    from lightning_dissect.synthetic import synthetic_broden_path

    root = synthetic_broden_path(num_images=1000, image_size=64, cache_dir=cache_dir, workers=os.cpu_count() or 1)
    train_loader, val_loader = synthetic_task_data(root, "background", batch_size=32, images=synthetic_images(root),
                                                   seed=0)
    seed_everything(0, verbose=False)
    timer = step_timer()
    callbacks: list[Any] = []
    if case == "user":
        module = user_module()
        if with_callback:
            callbacks.append(DissectionCallback(probe="synthetic"))
        trainer = Trainer(max_steps=steps or 300, accelerator="cpu", callbacks=callbacks, default_root_dir=output,
                          enable_progress_bar=False, enable_model_summary=False)
        loaders: tuple = (train_loader,)
    else:
        module = SyntheticTaskModule("background", width=32)
        if with_callback:
            probe = ProbeSet(root, split="val", size=min(300, len(val_loader.dataset)), seed=0)  # type: ignore[arg-type]
            callbacks.append(DissectionCallback(probe, layers=[f"model.conv{k}" for k in range(1, 5)]))
        logger = TensorBoardLogger(output, name="emergence")
        trainer = make_trainer(steps or 1000, root_dir=output, callbacks=callbacks, logger=logger)
        loaders = (train_loader, val_loader)
    hooks = time_hooks(callbacks[0]) if callbacks else {}
    trainer.callbacks.insert(0, timer.first)  # type: ignore[attr-defined]
    trainer.callbacks.append(timer.last)  # type: ignore[attr-defined]
    started = time.perf_counter()
    trainer.fit(module, *loaders)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {"seconds": seconds, "step": float(torch.tensor(timer.seconds).median())}
    if callbacks:
        result["hooks"] = sum(hooks.values())
        dissector = callbacks[0].dissector
        budget = dissector.budget
        result.update(dissection=budget.dissection_seconds / max(budget.dissections, 1),
                      drawing=budget.last_drawing or 0.0)
        result.update(own=dissector.budget.own_seconds, steps=sorted({entry.step for entry in dissector.history}),
                      skipped=list(dissector.skipped), probe=len(dissector.probe) if dissector.probe else 0)
    return result


def measure(case: str, repeats: int, cache_dir: str | None, steps: int | None) -> None:
    with tempfile.TemporaryDirectory() as output:
        fit(case, True, output, cache_dir, 5)  # datasets generated and cached, imports, first calls
        runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        for _ in range(repeats):
            for with_callback in (False, True):
                runs[with_callback].append(fit(case, with_callback, output, cache_dir, steps))
    without = min(run["seconds"] for run in runs[False])
    best = min(runs[True], key=lambda run: run["seconds"])
    print(f"\n### `{case}`: {repeats} fits of each kind, interleaved; the best of each (target: overhead <= 5%)\n")
    print_table(["fit", "seconds (best)", "all runs", "overhead", "median training step ms (all runs)"], [
        ["without the callback", without, " / ".join(f"{run['seconds']:.1f}" for run in runs[False]), "-",
         " / ".join(f"{1000 * run['step']:.1f}" for run in runs[False])],
        ["with DissectionCallback (defaults)", best["seconds"],
         " / ".join(f"{run['seconds']:.1f}" for run in runs[True]), f"{100 * (best['seconds'] / without - 1):.1f}%",
         " / ".join(f"{1000 * run['step']:.1f}" for run in runs[True])],
    ])
    pairs = [f"{100 * (with_['seconds'] / without_['seconds'] - 1):+.1f}%" for without_, with_ in zip(runs[False],
                                                                                                     runs[True])]
    steps_ratio = (torch.tensor([run["step"] for run in runs[True]]).median()
                   / torch.tensor([run["step"] for run in runs[False]]).median())
    print(f"\npairs (without, then with): {', '.join(pairs)}; median training step with / without the callback: "
          f"{float(steps_ratio):.3f}")
    print()
    print_table(["fit with the callback", "callback's own seconds", "of that fit", "in its hooks (all)",
                 "a dissection s", "last drawing s", "probe", "dissected steps", "skipped by the budget"],
                [[f"run {number + 1}", run["own"], f"{100 * run['own'] / run['seconds']:.1f}%",
                  f"{run['hooks']:.2f} s, {100 * run['hooks'] / run['seconds']:.1f}%",
                  f"{run['dissection']:.2f}", f"{run['drawing']:.2f}", run["probe"],
                  " ".join(map(str, run["steps"])), " ".join(map(str, run["skipped"])) or "-"]
                 for number, run in enumerate(runs[True])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["user", "emergence", "both"], default="both", help="which training run")
    parser.add_argument("--repeats", type=int, default=3, help="fits of each kind (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the case's, 300 or 1000)")
    parser.add_argument("--cache-dir", default=None, help="where the synthetic datasets are generated and cached")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for case in (["user", "emergence"] if args.case == "both" else [args.case]):
        measure(case, args.repeats, args.cache_dir, args.steps)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
