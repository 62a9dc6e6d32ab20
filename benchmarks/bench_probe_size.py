"""How detector counts vary with the probe's draw and size (issue 14, item 8).

A ResNet-18-shaped CNN with fixed random weights (`benchmarks.common.ResNet18Shaped`, half width by
default), `layer3` and `layer4` dissected on several draws (seeds) of each probe size from a pool of
synthetic images at 224 px. The pool's activations are computed once; each draw is dissected from
its rows (`ld.dissect_activations`, the same numbers as `ld.dissect` on that probe). The whole pool
is the reference the draws are compared with.

    python -m benchmarks.bench_probe_size                     # pool 5000, sizes 50..1600, 5 draws
    python -m benchmarks.bench_probe_size --pool 500 --sizes 50 100 200 --draws 3

Columns: `values above T` is `q * N * h * w`, the activations of one unit above its threshold (the
threshold sits between the `k`-th and `k+1`-th largest); `detectors` is the mean over draws with
the smallest and largest (the pool's row is the reference: with random weights it has almost none, and
a draw's extra detectors are the noise of a small probe); `threshold spread`
is the median over units of the draws' (largest - smallest) threshold over the pool's threshold;
`same label` is the share of the pool's detectors whose label a draw gives them too (mean over
draws). Prints markdown tables for docs/performance.md ("Probe size and stable counts").
"""

from __future__ import annotations

import argparse
import statistics

import torch

import lightning_dissect as ld
from benchmarks.common import ResNet18Shaped, machine, print_table, synthetic_probe
from lightning_dissect.engine.capture import LayerCapture, frozen, resolve_layers
from lightning_dissect.probe_source import probe_at_input_size

LAYERS = ["layer3", "layer4"]


def pool_activations(model: torch.nn.Module, probe: ld.ProbeSet, batch_size: int) -> dict[str, torch.Tensor]:
    """The dissected layers' outputs over the whole pool, in probe order."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}
    with frozen(model), LayerCapture(resolve_layers(model, LAYERS)) as capture:
        for start in range(0, len(probe), batch_size):
            outputs = capture.run(model, probe.model_input(range(start, min(start + batch_size, len(probe))), "cpu"))
            for name in LAYERS:
                parts[name].append(outputs[name].clone())
    return {name: torch.cat(values) for name, values in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=5000, help="synthetic images the draws are taken from")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400, 800, 1600])
    parser.add_argument("--draws", type=int, default=5, help="seeds per size")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--width", type=int, default=32, help="channels of the first stage (64: ResNet-18)")
    parser.add_argument("--cache-dir", default=None, help="where the synthetic dataset is generated once")
    args = parser.parse_args()

    print(machine())
    pool = synthetic_probe(args.pool, 224, cache_dir=args.cache_dir)
    if args.image_size != 224:
        pool = probe_at_input_size(pool, (args.image_size, args.image_size))
    widths = tuple(args.width * 2**i for i in range(4))
    model = ResNet18Shaped(widths=widths, seed=0)
    activations = pool_activations(model, pool, 64)
    reference = ld.dissect_activations(activations, pool)
    print(f"pool: {len(pool)} synthetic images at {args.image_size} px; ResNet-18-shaped, widths {widths}, "
          f"random weights (seed 0); {args.draws} draws per size\n")

    position = {row: i for i, row in enumerate(pool.rows)}
    rows = []
    for layer in LAYERS:
        whole = reference[layer]
        units, h, w = activations[layer].shape[1:]
        pool_detectors = whole.detectors
        for size in [*args.sizes, len(pool)]:
            draws = [pool.subset(size, seed=seed) for seed in range(args.draws)] if size < len(pool) else [pool]
            counts, same, thresholds = [], [], []
            for draw in draws:
                taken = activations[layer][[position[row] for row in draw.rows]]
                result = ld.dissect_activations({layer: taken}, draw)[layer]
                counts.append(int(result.detectors.sum()))
                same.append(float((result.labels[pool_detectors] == whole.labels[pool_detectors]).float().mean())
                            if pool_detectors.any() else float("nan"))
                thresholds.append(result.thresholds)
            stacked = torch.stack(thresholds)
            spread_t = ((stacked.max(0).values - stacked.min(0).values) / whole.thresholds.abs()).median()
            rows.append([layer, f"{units}x{h}x{w}", size, f"{0.005 * size * h * w:.0f}",
                         f"{statistics.mean(counts):.1f} ({min(counts)}-{max(counts)})",
                         f"{float(spread_t):.3f}",
                         f"{statistics.mean(same):.2f}" if pool_detectors.any() else "-"])
    print_table(["layer", "units x h x w", "probe images", "values above T", "detectors (min-max)",
                 "threshold spread", "same label"], rows)


if __name__ == "__main__":
    main()
