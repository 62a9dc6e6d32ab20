"""Emergence of concept detectors while a CNN trains from scratch, watched live in TensorBoard.

The paper dissected snapshots of a network at iterations 1, 2, 4, 9, 20, 44, ... of its training
and saw detectors for more and more concepts emerge (SEMANTICS §7). This script does the same
during one run: :class:`~lightning_dissect.demo.SmallCNN` learns the synthetic dataset's
`background` task from scratch while a `DissectionCallback` dissects its four blocks at step 0 and
at log-spaced steps (`log_spaced(first=1, factor=2.2)`), on a probe of validation images the
network never trains on. TensorBoard shows `dissect/model.conv<k>/unique_concepts` (and per
category, detectors, switches, unit tables and figures) growing; the script prints the same
numbers as a table at the end and draws the paper's emergence figure for each layer
(`figures/emergence_<layer>.png` in the run's folder: unique concepts per category against the
training step on a log axis, beside detectors per category).

    python examples/emergence.py                 # a few minutes on two CPU cores
    tensorboard --logdir runs/emergence          # the curves, the unit tables, the figures
    python examples/emergence.py --tiny          # seconds: the configuration the tests run
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning_dissect as ld
from lightning_dissect.demo import emergence_run

# A run of seconds is all overhead: the budget is off, so every scheduled step is dissected.
TINY = dict(images=48, image_size=32, steps=6, width=8, batch_size=8, probe_size=12, layers=["conv3", "conv4"],
            max_overhead=None)


def fraction_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("runs/emergence"), help="the TensorBoard root")
    parser.add_argument("--images", type=int, default=1000, help="images in the synthetic dataset (70%% train)")
    parser.add_argument("--image-size", type=int, default=64, help="image size of the synthetic dataset")
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--width", type=int, default=32, help="the CNN's width")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--layers", nargs="+", default=["conv1", "conv2", "conv3", "conv4"],
                        help="blocks of the CNN to dissect")
    parser.add_argument("--probe-size", type=int, default=300, help="validation images in the probe")
    parser.add_argument("--factor", type=float, default=2.2, help="spacing of the log-spaced dissection steps")
    parser.add_argument("--max-overhead", type=fraction_or_none, default=None,
                        help="the callback's share of the training time (default none: every scheduled step, "
                             "as the analysis needs; the callback's own default is 0.05)")
    parser.add_argument("--task", default="background", help="the synthetic task to learn")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the synthetic dataset is cached")
    parser.add_argument("--tiny", action="store_true", help=f"a run of seconds: {TINY}")
    args = parser.parse_args(argv)
    if args.tiny:
        for name, value in TINY.items():
            setattr(args, name, value)
    return args


def emergence_table(history: list[ld.HistoryEntry], layers: list[str]) -> str:
    """Unique concepts per layer (rows: dissected steps), as the paper's emergence plot reads them."""
    counts = {(entry.step, entry.layer): int(entry.summary["unique_concepts"]) for entry in history}
    steps = sorted({step for step, _ in counts})
    lines = ["step".rjust(6) + "".join(layer.rjust(14) for layer in layers)]
    lines += [str(step).rjust(6) + "".join(str(counts.get((step, layer), "")).rjust(14) for layer in layers)
              for step in steps]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train with live dissection, draw the emergence figures; returns what `demo.emergence_run` returns
    (the callback's `history`, the TensorBoard `log_dir`, the `figures`, ...) and the `layers`."""
    args = parse_args(argv)
    layers = [f"model.{layer}" for layer in args.layers]
    run = emergence_run(args.output, steps=args.steps, num_images=args.images, image_size=args.image_size,
                        probe_size=args.probe_size, task=args.task, width=args.width, seed=args.seed, layers=layers,
                        batch_size=args.batch_size, factor=args.factor, cache_dir=args.cache_dir,
                        progress=not args.tiny, max_overhead=args.max_overhead, echo=print)
    probe_size = run["history"][0].probe_size
    print(f"unique concepts (IoU > 0.04) on {probe_size} validation images; TensorBoard: {run['log_dir']}")
    print(emergence_table(run["history"], layers))
    for figure in run["figures"]:
        print(f"figure: {figure}")
    return dict(run, layers=layers, log_dir=str(run["log_dir"]))


if __name__ == "__main__":
    main()
