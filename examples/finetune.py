"""Concept switches when fine-tuning: units change what they detect when the task changes.

The paper fine-tuned a network trained on one task on another and watched units switch concepts
(SEMANTICS §5: a unit that is a detector before and after with a different label). Here the
small CNN first learns the synthetic dataset's `background` task (scenes and textures), as in
`examples/emergence.py`, or is loaded from `--pretrained`; then its head is replaced and it is
fine-tuned on a task that rewards other concepts (`materials`: which materials the shapes are
made of, seen in their surface patterns), with `DissectionCallback` dissecting at step 0 (the
pretrained model) and at log-spaced steps.

Figures in the run's log folder: `figures/switches_<layer>.png` (switches, units becoming and
stopping being detectors, at every dissection) and `figures/transitions_<layer>.png` (the units
that switched between the first and the last dissection, grouped by transition, with example
units), also written as `transitions_<layer>.json`.

    python examples/finetune.py                                # about two minutes on two CPU cores
    python examples/finetune.py --pretrained runs/emergence/emergence/version_0/model.pt
    tensorboard --logdir runs/finetune
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lightning_dissect import analysis
from lightning_dissect.demo import SyntheticTaskModule, make_trainer, synthetic_images, synthetic_task_data
from lightning_dissect.io import atomic_write
from lightning_dissect.probe import ProbeSet
from lightning_dissect.synthetic import SYNTHETIC_TASKS, synthetic_broden_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("runs/finetune"), help="logs and figures go here")
    parser.add_argument("--images", type=int, default=1000, help="images in the synthetic dataset")
    parser.add_argument("--image-size", type=int, default=64, help="their size in pixels")
    parser.add_argument("--probe-size", type=int, default=None, help="probe images (default: the val split)")
    parser.add_argument("--from-task", default="background", choices=list(SYNTHETIC_TASKS),
                        help="the task learned first")
    parser.add_argument("--to-task", default="materials", choices=list(SYNTHETIC_TASKS),
                        help="the fine-tuning task (objects: this small CNN does not learn it beyond chance)")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="steps on --from-task (without --pretrained)")
    parser.add_argument("--pretrained", type=Path, default=None,
                        help="a state dict of SyntheticTaskModule (e.g. model.pt of an emergence run)")
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps")
    parser.add_argument("--factor", type=float, default=2.2, help="spacing of the log-spaced dissection steps")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument("--width", type=int, default=32, help="the CNN's width")
    parser.add_argument("--layers", nargs="+", default=["model.conv3", "model.conv4"],
                        help="layers to dissect (modules of the LightningModule)")
    parser.add_argument("--max-overhead", type=lambda text: None if text.lower() == "none" else float(text),
                        default=None,
                        help="the callback's share of the training time (default none: every scheduled step, "
                             "as the analysis needs; the callback's own default is 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the synthetic dataset is cached")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.from_task == args.to_task:
        parser.error(f"--to-task {args.to_task} must differ from --from-task")
    if args.pretrained is not None and not args.pretrained.is_file():
        parser.error(f"--pretrained {args.pretrained}: no such file")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Pretrain (or load), fine-tune with the callback, draw the figures; returns the numbers."""
    args = parse_args(argv)
    from lightning.pytorch import seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_dissect.callback import DissectionCallback
    from lightning_dissect.schedule import log_spaced

    root = synthetic_broden_path(num_images=args.images, image_size=args.image_size, cache_dir=args.cache_dir)
    images = synthetic_images(root)
    seed_everything(args.seed, verbose=False)
    module = SyntheticTaskModule(args.from_task, width=args.width)
    if args.pretrained is not None:
        module.load_state_dict(torch.load(args.pretrained, map_location="cpu", weights_only=True))
    else:
        print(f"pretraining on {args.from_task!r} for {args.pretrain_steps} steps")
        make_trainer(args.pretrain_steps, progress=args.progress).fit(
            module, *synthetic_task_data(root, args.from_task, images=images, seed=args.seed))

    module.set_task(args.to_task)
    module.learning_rate = args.learning_rate
    probe = ProbeSet(root, size=args.probe_size, split="val")
    callback = DissectionCallback(probe=probe, layers=args.layers, schedule=log_spaced(first=1, factor=args.factor),
                                  max_overhead=args.max_overhead)
    logger = TensorBoardLogger(args.output, name="finetune")
    print(f"fine-tuning on {args.to_task!r} for {args.steps} steps, dissecting {args.layers}")
    trainer = make_trainer(args.steps, callbacks=[callback], logger=logger, progress=args.progress)
    trainer.fit(module, *synthetic_task_data(root, args.to_task, images=images, seed=args.seed))

    log_dir = Path(trainer.log_dir)
    history = analysis.read_run(log_dir)
    (first_step, first), (last_step, last) = history[0], history[-1]
    numbers: dict = {"log_dir": str(log_dir), "steps": [step for step, _ in history], "layers": {}}
    for layer in args.layers:
        switches = analysis.switches_per_dissection(history, layer)
        table = analysis.transition_table(first[layer], last[layer])
        figures = [
            analysis.plot_switches(switches, log_dir / "figures" / f"switches_{layer}.png",
                                   title=f"{layer}: concept switches while fine-tuning {args.from_task} -> "
                                         f"{args.to_task}"),
            analysis.plot_transition_table(table, log_dir / "figures" / f"transitions_{layer}.png",
                                           title=f"{layer}: units that switched, step {first_step} -> {last_step}"),
        ]
        with atomic_write(log_dir / f"transitions_{layer}.json") as handle:
            json.dump({"from_step": first_step, "to_step": last_step, "transitions": table}, handle, indent=2)
        before, after = first[layer].summary(), last[layer].summary()
        switched = sum(row["count"] for row in table)
        numbers["layers"][layer] = {"switches": switches, "transitions": table, "switched_units": switched,
                                    "figures": [str(path) for path in figures],
                                    "unique_concepts": (before["unique_concepts"], after["unique_concepts"]),
                                    "detectors": (before["detectors"], after["detectors"])}
        print(f"\n{layer}: {switched} units switched concept between step {first_step} and step {last_step}; "
              f"detectors {before['detectors']:.0f} -> {after['detectors']:.0f}")
        for row in table[:8]:
            print(f"  {row['from']:>16} -> {row['to']:<16} {row['count']:3d} units, e.g. {row['units']}")
        for path in figures:
            print(f"  figure: {path}")
    print(f"\ntensorboard --logdir {args.output}")
    return numbers


if __name__ == "__main__":
    main()
    sys.exit(0)
