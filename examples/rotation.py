"""Are individual units meaningful? Dissect one layer in its own basis and in rotated ones.

The paper's basis-change experiment (SEMANTICS §6): the same layer is dissected as it is
(`alpha = 0`) and after a random rotation of its units raised to the power `alpha` (0 to 1,
several seeds). A rotation keeps everything a linear read-out can use, so a linear probe's
accuracy on the layer's pooled features does not change; if interpretability were a property of
the space rather than of the units, the detectors would not change either. They drop: the
network's own units are more interpretable than random directions in the same space.

The default layer is `conv3`, whose detectors are mostly shape (object) detectors. In this small
network the last block's detectors are mostly textures, which fill whole images: a random mixture
of units still fires most on some texture, so `conv4` loses fewer detectors under rotation
(`--layer conv4` shows it).

This script trains :class:`~lightning_dissect.demo.SmallCNN` from scratch on the synthetic
dataset's `background` task, then for each `alpha` and seed dissects the layer with
`lightning_dissect.dissect(..., rotation={"seed": s, "alpha": a})` and measures the linear
probe's validation accuracy on the rotated pooled features. It writes `rotation.png` (unique
concepts and detectors against `alpha`) and `rotation.json` (every number) to `--output`, and
checks that `alpha = 1` finds fewer detectors than `alpha = 0` at a linear-probe accuracy within
`--tolerance` of the unrotated one.

    python examples/rotation.py                       # about a minute on two CPU cores
    python examples/rotation.py --steps 60 --images 200 --alphas 0 1 --seeds 0   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import lightning_dissect as ld
from lightning_dissect import analysis
from lightning_dissect.demo import SyntheticTaskModule, make_trainer, synthetic_images, synthetic_task_data
from lightning_dissect.engine.capture import LayerCapture, frozen, resolve_layers
from lightning_dissect.io import atomic_write
from lightning_dissect.synthetic import synthetic_broden_path, synthetic_targets


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("runs/rotation"), help="where figures and numbers go")
    parser.add_argument("--images", type=int, default=1000, help="images in the synthetic dataset (70%% train)")
    parser.add_argument("--image-size", type=int, default=64, help="image size of the synthetic dataset")
    parser.add_argument("--steps", type=int, default=400, help="training steps before the dissections")
    parser.add_argument("--width", type=int, default=32, help="the CNN's width")
    parser.add_argument("--layer", default="conv3",
                        help="the layer to dissect (default conv3: its detectors are mostly shapes)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
                        help="rotation powers, 0 (own basis) to 1 (a random basis)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the random rotations")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="largest change of linear-probe accuracy counted as unchanged (0.01: one point)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training run")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the synthetic dataset is cached")
    args = parser.parse_args(argv)
    if not all(0 <= alpha <= 1 for alpha in args.alphas) or 0 not in args.alphas or 1 not in args.alphas:
        parser.error(f"--alphas {args.alphas}: powers lie in [0, 1] and must include 0 and 1")
    return args


def layer_activations(model: torch.nn.Module, layer: str, images: torch.Tensor, batch_size: int = 256,
                      ) -> torch.Tensor:
    """The layer's output `(N, K, h, w)` over `images`, the model left unchanged."""
    modules = resolve_layers(model, [layer])
    outputs = []
    with frozen(model), LayerCapture(modules) as capture:
        for start in range(0, len(images), batch_size):
            outputs.append(capture.run(model, images[start:start + batch_size])[layer].float())
    return torch.cat(outputs)


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns the numbers written to `rotation.json`."""
    args = parse_args(argv)
    from lightning.pytorch import seed_everything

    root = synthetic_broden_path(num_images=args.images, image_size=args.image_size, cache_dir=args.cache_dir)
    images = synthetic_images(root)
    seed_everything(args.seed, verbose=False)
    module = SyntheticTaskModule("background", width=args.width)
    train_loader, val_loader = synthetic_task_data(root, "background", images=images, seed=args.seed)
    make_trainer(args.steps).fit(module, train_loader, val_loader)
    model = module.model

    probe = ld.ProbeSet(root, split="val")
    targets = synthetic_targets(root)
    train, labels = targets["train"], targets["background"]
    activations = layer_activations(model, args.layer, images)
    results, accuracy = {}, {}
    for alpha in sorted(set(args.alphas)):
        for seed in args.seeds if alpha > 0 else args.seeds[:1]:  # alpha = 0 is the identity for every seed
            results[alpha, seed] = ld.dissect(model, probe, args.layer, rotation={"seed": seed, "alpha": alpha},
                                              top_k=0)[args.layer]
            matrix = ld.Rotation(seed=seed, alpha=alpha).resolve(activations.shape[1])
            pooled = ld.rotate_units(activations, matrix).mean(dim=(2, 3))
            accuracy[alpha, seed] = analysis.linear_probe_accuracy(pooled[train], labels[train], pooled[~train],
                                                                   labels[~train])
            summary = results[alpha, seed].summary()
            print(f"alpha={alpha:.2f} seed={seed}: {summary['unique_concepts']:.0f} unique concepts, "
                  f"{summary['detectors']:.0f} detectors, linear probe {100 * accuracy[alpha, seed]:.1f}%")

    curve = analysis.rotation_curve(results)
    for row in curve:
        row["linear_probe_accuracy_mean"] = sum(a for (alpha, _), a in accuracy.items() if alpha == row["alpha"]) / (
            row["seeds"])
    args.output.mkdir(parents=True, exist_ok=True)
    figure = analysis.plot_rotation(curve, args.output / "rotation.png",
                                    title=f"{args.layer} under rotations R^alpha ({len(args.seeds)} seeds)")
    own = results[0.0, args.seeds[0]].summary()
    rotated = [results[1.0, seed].summary() for seed in args.seeds]
    accuracy_change = max(abs(accuracy[1.0, seed] - accuracy[0.0, args.seeds[0]]) for seed in args.seeds)
    numbers = {
        "layer": args.layer, "curve": curve,
        "runs": [{"alpha": alpha, "seed": seed, "linear_probe_accuracy": accuracy[alpha, seed],
                  **results[alpha, seed].summary()} for alpha, seed in results],
        "detectors_alpha_0": own["detectors"], "detectors_alpha_1_max": max(s["detectors"] for s in rotated),
        "unique_concepts_alpha_0": own["unique_concepts"],
        "unique_concepts_alpha_1_mean": sum(s["unique_concepts"] for s in rotated) / len(rotated),
        "linear_probe_accuracy_alpha_0": accuracy[0.0, args.seeds[0]],
        "linear_probe_accuracy_largest_change": accuracy_change,
        "figure": str(figure),
    }
    with atomic_write(args.output / "rotation.json") as handle:
        json.dump(numbers, handle, indent=2)
    fewer = numbers["detectors_alpha_1_max"] < numbers["detectors_alpha_0"]
    unchanged = accuracy_change <= args.tolerance
    print(f"alpha=0: {own['detectors']:.0f} detectors; alpha=1: at most {numbers['detectors_alpha_1_max']:.0f} "
          f"({'fewer' if fewer else 'NOT fewer'}); linear-probe accuracy changed by at most "
          f"{100 * accuracy_change:.2f} points ({'unchanged' if unchanged else 'CHANGED'}, tolerance "
          f"{100 * args.tolerance:.1f})")
    print(f"figure: {figure}")
    numbers["fewer_detectors"], numbers["accuracy_unchanged"] = fewer, unchanged
    return numbers


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["fewer_detectors"] and result["accuracy_unchanged"] else 1)
