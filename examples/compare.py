"""Comparing representations: unique concepts per category across layers and across saved runs.

The paper compared layers of one network (interpretability rises with depth) and networks that
differ in architecture, training task or training stage, with bar charts of unique concepts per
category. This script does both on the synthetic dataset:

1. it trains :class:`~lightning_dissect.demo.SmallCNN` on the `background` task and dissects all
   four blocks: `layers.png`;
2. it saves dissections of the last block for several "runs" (the untrained network, the one
   trained on `background`, one trained on `materials`), each as a dissection JSON file like the
   ones `DissectionCallback` writes, and compares them the way `lightning-dissect compare` does:
   `runs.png`. The equivalent command is printed.

With `--runs RUN[@STEP] ...` it only compares runs saved before (callback log folders or
dissection JSON files), exactly as `lightning-dissect compare RUN ...`.

    python examples/compare.py                        # about two minutes on two CPU cores
    python examples/compare.py --runs runs/emergence/emergence/version_0@0 runs/emergence/emergence/version_0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning_dissect as ld
from lightning_dissect import analysis
from lightning_dissect.cli import compared_layers
from lightning_dissect.demo import SyntheticTaskModule, make_trainer, synthetic_images, synthetic_task_data
from lightning_dissect.synthetic import synthetic_broden_path

LAYERS = ["conv1", "conv2", "conv3", "conv4"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("runs/compare"), help="figures and saved runs go here")
    parser.add_argument("--runs", nargs="+", default=None, metavar="RUN[@STEP]",
                        help="only compare these saved runs (callback log folders or dissection JSON files)")
    parser.add_argument("--images", type=int, default=1000, help="images in the synthetic dataset")
    parser.add_argument("--image-size", type=int, default=64, help="their size in pixels")
    parser.add_argument("--steps", type=int, default=400, help="training steps of each trained run")
    parser.add_argument("--width", type=int, default=32, help="the CNN's width")
    parser.add_argument("--tasks", nargs="+", default=["background", "materials"],
                        help="the training tasks of the compared runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the synthetic dataset is cached")
    return parser.parse_args(argv)


def compare_runs(runs: list[str], path: Path, names: list[str] | None = None) -> dict[str, dict[str, int]]:
    """What `lightning-dissect compare` does: the last layer of each run, counted and drawn."""
    counts = analysis.concept_counts(compared_layers(runs, names=names))
    print(analysis.format_counts(counts, "run"))
    print(f"figure: {analysis.plot_comparison(counts, path, title='unique concepts per category, by run')}")
    return counts


def main(argv: list[str] | None = None) -> dict:
    """Train, dissect and draw both comparisons (or only compare `--runs`); returns the counts."""
    args = parse_args(argv)
    if args.runs:
        return {"runs": compare_runs(args.runs, args.output / "runs.png")}
    from lightning.pytorch import seed_everything

    root = synthetic_broden_path(num_images=args.images, image_size=args.image_size, cache_dir=args.cache_dir)
    images = synthetic_images(root)
    probe = ld.ProbeSet(root, split="val")
    layers = [f"model.{layer}" for layer in LAYERS]
    saved = []
    for name in ["untrained", *args.tasks]:
        task = name if name != "untrained" else args.tasks[0]
        seed_everything(args.seed, verbose=False)
        module = SyntheticTaskModule(task, width=args.width)
        if name != "untrained":
            make_trainer(args.steps).fit(module, *synthetic_task_data(root, task, images=images, seed=args.seed))
        dissection = ld.dissect(module, probe, layers, top_k=0)
        path = args.output / "saved" / name / "dissection.json"
        dissection.to_json(path)
        saved.append(str(path))
        if name == args.tasks[0]:
            by_layer = analysis.concept_counts({layer.removeprefix("model."): dissection[layer] for layer in layers})
            print(analysis.format_counts(by_layer, "layer"))
            figure = analysis.plot_comparison(by_layer, args.output / "layers.png",
                                              title=f"unique concepts per category by layer ({name})")
            print(f"figure: {figure}")
    names = ["untrained", *(f"trained on {task}" for task in args.tasks)]
    by_run = compare_runs(saved, args.output / "runs.png", names)
    print("the same from the command line:\n  lightning-dissect compare " + " ".join(saved)
          + " --names " + " ".join(f'"{name}"' for name in names))
    return {"layers": by_layer, "runs": by_run, "saved": saved}


if __name__ == "__main__":
    main()
