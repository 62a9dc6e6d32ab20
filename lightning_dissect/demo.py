"""The model and tasks of the demo and the examples: a small CNN learning a task of the synthetic dataset.

`lightning-dissect demo` and the scripts in `examples/` train :class:`SmallCNN` from scratch on one
of the synthetic dataset's tasks (`lightning_dissect.synthetic.SYNTHETIC_TASKS`): `background`
(which of 6 scenes or 6 textures is behind the shapes, single-label), `objects` (which of 7
shapes are visible, multi-label) or `materials` (which of 5 materials, multi-label). The network
sees the images exactly as a `ProbeSet` feeds them to it (ImageNet mean/std, no resize), so what
it learns is what the dissection measures.

Needs Lightning (`pip install lightning`); the rest of the package does not import this module.

Example:
    >>> from lightning_dissect.synthetic import synthetic_broden_path        # doctest: +SKIP
    >>> root = synthetic_broden_path(num_images=1000, image_size=64)        # doctest: +SKIP
    >>> train, val = synthetic_task_data(root, "background")                # doctest: +SKIP
    >>> module = SyntheticTaskModule("background")                          # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dissect.broden import Broden
from lightning_dissect.probe import ImageTransform
from lightning_dissect.progress import show_progress
from lightning_dissect.synthetic import SYNTHETIC_TASKS, synthetic_targets

SINGLE_LABEL_TASKS = ("background",)


def _block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Four blocks of 3x3 convolution, BatchNorm and ReLU; 2x2 max pooling after the first three;
    global average pooling and a linear head.

    The dissected layers are the blocks `conv1` ... `conv4` (at 64 x 64 input: 64, 32, 16 and 8
    pixels wide, with `width // 2`, `width`, `2 * width` and `2 * width` units).

    Args:
        num_outputs: classes (or labels) of the head.
        width: units of `conv2`; `conv3` and `conv4` have twice as many.
    """

    def __init__(self, num_outputs: int, width: int = 32) -> None:
        super().__init__()
        if not isinstance(width, int) or width < 2:
            raise ValueError(f"width={width!r} must be an integer >= 2")
        self.conv1 = _block(3, width // 2)
        self.conv2 = _block(width // 2, width)
        self.conv3 = _block(width, 2 * width)
        self.conv4 = _block(2 * width, 2 * width)
        self.head = nn.Linear(2 * width, num_outputs)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """`conv4`'s output `(B, 2 * width, h, w)`."""
        x = F.max_pool2d(self.conv1(images), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = F.max_pool2d(self.conv3(x), 2)
        return self.conv4(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))


def task_outputs(task: str) -> int:
    """The number of classes (or labels) of a synthetic task.

    Raises:
        ValueError: an unknown task, naming the tasks there are.
    """
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"task={task!r} is not a synthetic task; choose one of {list(SYNTHETIC_TASKS)}")
    return len(SYNTHETIC_TASKS[task])


def task_loss(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for the single-label task, binary cross-entropy per label for the others."""
    if task in SINGLE_LABEL_TASKS:
        return F.cross_entropy(outputs, targets)
    return F.binary_cross_entropy_with_logits(outputs, targets)


def task_accuracy(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy for the single-label task; the share of labels predicted right for the others."""
    if task in SINGLE_LABEL_TASKS:
        return (outputs.argmax(dim=1) == targets).double().mean()
    return ((outputs > 0) == (targets > 0.5)).double().mean()


class SyntheticTaskModule(LightningModule):
    """A :class:`SmallCNN` learning one synthetic task with Adam.

    Logs `train/loss`, `val/loss` and `val/accuracy` (see :func:`task_accuracy`).

    Args:
        task: a key of `SYNTHETIC_TASKS`.
        width: the CNN's width.
        learning_rate: Adam's learning rate.
    """

    def __init__(self, task: str = "background", width: int = 32, learning_rate: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.task = task
        self.model = SmallCNN(task_outputs(task), width)
        self.learning_rate = learning_rate

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def set_task(self, task: str) -> None:
        """Switch to another task for fine-tuning: a new head (drawn from the global random stream),
        the convolutions kept."""
        device = self.model.head.weight.device
        self.model.head = nn.Linear(self.model.head.in_features, task_outputs(task)).to(device)
        self.task = task
        self.hparams["task"] = task

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        images, targets = batch
        loss = task_loss(self.task, self(images), targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        images, targets = batch
        outputs = self(images)
        self.log("val/loss", task_loss(self.task, outputs, targets), prog_bar=False)
        self.log("val/accuracy", task_accuracy(self.task, outputs, targets), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate)


def synthetic_images(root: str | os.PathLike, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> torch.Tensor:
    """Every image of a Broden directory in `index.csv` order, as model input (float32 `(N, 3, H, W)`).

    Args:
        root: the dataset directory.
        transform: float images in [0, 1] -> model input; default what a `ProbeSet` applies
            (`ImageTransform()`: ImageNet mean/std).
    """
    broden = Broden(root)
    transform = transform or ImageTransform()
    images = torch.stack([broden.read_image(i) for i in range(len(broden))])
    return transform(images.float().div_(255))


def synthetic_task_data(root: str | os.PathLike, task: str, batch_size: int = 32, seed: int = 0,
                        images: torch.Tensor | None = None) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders of a synthetic task, split by `index.csv`'s `split` column.

    Args:
        root: a directory written by `make_synthetic_broden`.
        task: a key of `SYNTHETIC_TASKS`.
        batch_size: images per batch.
        seed: seed of the shuffling of the training loader.
        images: :func:`synthetic_images` of `root`, when already loaded.

    Returns:
        `(train, val)`: the training loader shuffles with its own seeded generator; the
        validation loader keeps the dataset order.
    """
    task_outputs(task)  # validates the name
    targets = synthetic_targets(root)
    images = synthetic_images(root) if images is None else images
    train = targets["train"]
    if not train.any() or train.all():
        raise ValueError(f"{root}: a synthetic task needs train and val images; generate more images")
    labels = targets[task]
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(TensorDataset(images[train], labels[train]), batch_size=batch_size, shuffle=True,
                              generator=generator)
    val_loader = DataLoader(TensorDataset(images[~train], labels[~train]), batch_size=256)
    return train_loader, val_loader


def make_trainer(max_steps: int, root_dir: str | os.PathLike[str] | None = None, callbacks: list | None = None,
                 logger: Any = False, progress: bool = False) -> Trainer:
    """A CPU `Trainer` for the demo's short runs: `max_steps` optimizer steps, validation after
    each epoch, no checkpoints. Seed first (`lightning.pytorch.seed_everything`) for a run that repeats.

    Args:
        max_steps: optimizer steps to take.
        root_dir: `default_root_dir` (where a logger's files go).
        callbacks: e.g. `[DissectionCallback(...)]`.
        logger: a Lightning logger, or False for none.
        progress: show Lightning's progress bar, when stdout is a terminal (`progress.show_progress`).
    """
    return Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks or [],
                   enable_checkpointing=False, enable_progress_bar=show_progress(progress, sys.stdout),
                   enable_model_summary=False,
                   default_root_dir=str(root_dir) if root_dir is not None else None, log_every_n_steps=10,
                   num_sanity_val_steps=0)


def emergence_run(output: str | os.PathLike, steps: int = 600, num_images: int = 1000, image_size: int = 64,
                  probe_size: int | None = None, task: str = "background", width: int = 32, seed: int = 0,
                  layers: Sequence[str] = ("model.conv3", "model.conv4"), batch_size: int = 32,
                  factor: float = 2.2, cache_dir: str | os.PathLike | None = None, progress: bool = True,
                  max_overhead: float | None = None, echo: Callable[[str], None] = lambda message: None) -> dict:
    """Train :class:`SmallCNN` from scratch with `DissectionCallback` and draw the emergence figures.

    What `lightning-dissect demo` and `examples/emergence.py` run: the synthetic dataset (generated
    into the cache when missing); the model learning `task` for `steps` steps, dissected at step 0
    and at log-spaced steps (1, 2, 4, 9, 20, ... for `factor=2.2`) on validation images it never
    trains on, logged to TensorBoard under `<output>/emergence/version_<n>/`; then, per layer, the
    paper's emergence figure (`analysis.plot_emergence`) in that folder's `figures/`, and the
    trained weights as `model.pt` (for `examples/finetune.py --pretrained`).

    Args:
        output: the TensorBoard root.
        steps: training steps.
        num_images, image_size: the synthetic dataset.
        probe_size: probe images drawn from the validation split (seeded by `seed`); None for all.
        task, width: the model's task and width.
        seed: seeds the model, the data order and everything else.
        layers: the layers to dissect (names in the `LightningModule`: `model.conv<k>`).
        batch_size: training batch size.
        factor: spacing of the log-spaced dissection steps.
        cache_dir: the dataset cache (default `$LIGHTNING_DISSECT_CACHE` or `~/.cache/lightning_dissect`).
        progress: show progress bars (on a terminal only: `progress.show_progress`).
        max_overhead: the callback's cost budget (`DissectionCallback`); None (here the default: the run is
            about its dissections) dissects at every scheduled step. A run of a minute on a CPU affords
            only its final dissection within the callback's default 5%.
        echo: called with each progress message.

    Returns:
        `log_root`, `log_dir`, `dissections` (folder), `figures` (paths), `weights` (path), `steps`
        (the dissected ones), `history` (the callback's per-layer entries), `dissections_by_step`
        (`[(step, Dissection)]`), `unique_concepts` and `detectors` (per layer: at the first and
        the last dissection) and `accuracy` (validation accuracy at the end).
    """
    import time

    import torch
    from lightning.pytorch import seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_dissect import analysis
    from lightning_dissect.callback import DissectionCallback
    from lightning_dissect.probe import ProbeSet
    from lightning_dissect.schedule import log_spaced
    from lightning_dissect.synthetic import synthetic_broden_path

    output = Path(output)
    started = time.perf_counter()
    echo(f"synthetic dataset: {num_images} images of {image_size} px (generated once, then cached)")
    root = synthetic_broden_path(num_images=num_images, image_size=image_size, cache_dir=cache_dir,
                                 workers=min(4, os.cpu_count() or 1), info=echo)
    echo(f"  {root} ({time.perf_counter() - started:.0f} s)")
    images = synthetic_images(root)
    seed_everything(seed, verbose=False)
    module = SyntheticTaskModule(task, width=width)
    train_loader, val_loader = synthetic_task_data(root, task, batch_size=batch_size, images=images, seed=seed)
    validation_images = len(val_loader.dataset)  # type: ignore[arg-type]  # a TensorDataset
    probe = ProbeSet(root, split="val", size=min(probe_size or validation_images, validation_images), seed=seed,
                     progress=show_progress(progress))
    schedule = log_spaced(first=1, factor=factor)
    callback = DissectionCallback(probe, layers=list(layers), schedule=schedule, max_overhead=max_overhead)
    logger = TensorBoardLogger(output, name="emergence")
    echo(f"training {type(module.model).__name__} on the {task!r} task for {steps} steps; dissecting {list(layers)} "
         f"on {len(probe)} validation images at steps {schedule.steps(steps)}")
    trainer = make_trainer(steps, root_dir=output, callbacks=[callback], logger=logger, progress=progress)
    trainer.fit(module, train_loader, val_loader)
    log_dir = Path(logger.log_dir)
    torch.save(module.state_dict(), log_dir / "model.pt")
    saved = analysis.read_run(log_dir)
    figures = [analysis.plot_emergence(analysis.emergence_curve(saved, layer),
                                       log_dir / "figures" / f"emergence_{layer}.png",
                                       title=f"{layer}: concepts emerging while training from scratch")
               for layer in layers]
    first, last = saved[0][1], saved[-1][1]
    accuracy = trainer.callback_metrics.get("val/accuracy")
    echo(f"done in {time.perf_counter() - started:.0f} s")
    return {
        "log_root": output / "emergence", "log_dir": log_dir, "dissections": log_dir / "dissections",
        "figures": figures, "weights": log_dir / "model.pt", "steps": [step for step, _ in saved],
        "history": callback.dissector.history, "dissections_by_step": saved,
        "unique_concepts": {layer: (first[layer].summary()["unique_concepts"], last[layer].summary()["unique_concepts"])
                            for layer in layers},
        "detectors": {layer: (first[layer].summary()["detectors"], last[layer].summary()["detectors"])
                      for layer in layers},
        "accuracy": float(accuracy) if accuracy is not None else float("nan"),
    }
