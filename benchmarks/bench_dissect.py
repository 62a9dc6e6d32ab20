"""Targets 1 and 2 of the performance issue: `ld.dissect` against a plain forward pass, and against
the straightforward dense method (`tests/dense.py`, the tests' reference; the engine's own
reference path, `LIGHTNING_DISSECT_REFERENCE=1`, is timed beside it).

A ResNet-18-shaped CNN with random weights (`benchmarks.common.ResNet18Shaped`, no torchvision),
224x224 input, `layer3` (256 x 14 x 14) and `layer4` (512 x 7 x 7) dissected together over the
synthetic dataset at 224 (segmentations 112 x 112), batch size 64, on a warm, decoded probe set.

    python -m benchmarks.bench_dissect            # 512 images, baseline on 64 (about 8 minutes on 2 cores)
    python -m benchmarks.bench_dissect --quick    # 128 images, baseline on 32
    python -m benchmarks.bench_dissect --device cuda                 # the probe streamed to the GPU
    python -m benchmarks.bench_dissect --device cuda --keep-probe    # the probe kept whole on the GPU

Prints markdown tables (docs/performance.md quotes them) and the profile of one `ld.dissect`.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch

import lightning_dissect as ld
from benchmarks.common import ResNet18Shaped, machine, print_table, probe_batches, synchronize, synthetic_probe
from lightning_dissect.engine.capture import resolve_layers
from lightning_dissect.engine.reference import reference_path
from tests.dense import dense_tally, dense_thresholds

LAYERS = ["layer3", "layer4"]


def timed_forward(model: torch.nn.Module, probe: ld.ProbeSet, batch_size: int, device: torch.device
                  ) -> tuple[tuple[float, float], dict[str, torch.Tensor]]:
    """A plain `torch.no_grad()` forward pass over the probe set: `((wall, cpu) seconds, outputs)`.
    The dissected layers' outputs are kept by reference (hooks that store a pointer; no copy),
    for the engine-alone row."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}
    model.eval()
    modules = resolve_layers(model, LAYERS)
    # Nothing in this model changes a layer's output in place afterwards: a reference is the output.
    hooks = [modules[name].register_forward_hook(lambda module, inputs, output, name=name:
                                                 captured[name].append(output)) for name in LAYERS]

    def forward() -> None:  # the probe read as ld.dissect reads it: streamed, or from the copy kept on the device
        with torch.no_grad():
            for batch in probe.stream(probe_batches(probe, batch_size), device, labels=False):
                model(batch.inputs)
        synchronize(device)

    try:
        seconds, _ = timed(forward)
    finally:
        for hook in hooks:
            hook.remove()
    return seconds, {name: torch.cat(parts) for name, parts in captured.items()}


def timed(run) -> tuple[tuple[float, float], object]:
    """`((wall, cpu) seconds, result)`; the targets are wall times, the CPU time (all threads of
    this process) is there for a look at a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return (time.perf_counter() - wall, time.process_time() - cpu), result


def best(*timings: tuple[float, float]) -> tuple[float, float]:
    return min(t[0] for t in timings), min(t[1] for t in timings)


def profile_table(profile: cProfile.Profile, total: float) -> list[list[object]]:
    """Where one `ld.dissect` spends its time, from cProfile's cumulative times."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    parts = {
        "model forward (LayerCapture.run)": ("capture.py", "run"),
        "probe batches: input transform (ProbeSet.stream)": ("probe.py", "_batch"),
        "threshold state (ActivationThresholds.update)": ("thresholds.py", "update"),
        "top images (TopImages.update)": ("top_images.py", "update"),
        "masks: tiles near thresholds (mask_pixels)": ("masks.py", "mask_pixels"),
        "intersections, areas (count_masks)": ("tally.py", "count_masks"),
        "scores (iou, category_best, unit_labels)": ("scores.py", None),
    }
    rows = []
    for label, (filename, function) in parts.items():
        seconds = sum(value[3] for (path, _, name), value in stats.items()
                      if path.endswith(filename) and (function is None or name == function))
        rows.append([label, seconds, f"{100 * seconds / total:.1f}%"])
    accounted = sum(row[1] for row in rows)
    rows.append(["everything else", total - accounted, f"{100 * (total - accounted) / total:.1f}%"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128 images, baseline on 32, no uncached run")
    parser.add_argument("--images", type=int, default=None, help="probe size (default 512, quick 128)")
    parser.add_argument("--baseline-images", type=int, default=None, help="images for the dense method (64/32)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="forward/dissect pairs (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cache-dir", default=None, help="where the synthetic dataset is generated and cached")
    parser.add_argument("--keep-probe", action="store_true",
                        help="keep the probe whole on an accelerator (its default within device_budget_bytes) instead "
                             "of streaming it batch by batch from the cache; on the CPU the probe is always streamed")
    args = parser.parse_args()
    images = args.images or (128 if args.quick else 512)
    baseline_images = args.baseline_images or (32 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(f"machine: {machine()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    # Streamed unless asked otherwise: device_budget_bytes=0 reads every batch from the cache (pinned,
    # non_blocking, the next batch read ahead); with --keep-probe an accelerator holds the whole probe.
    probe = synthetic_probe(images, 224, cache_dir=args.cache_dir,
                            device_budget_bytes=2**62 if args.keep_probe else 0)
    if probe.kept_on(device):
        probe.tensors(device)  # copied once, before anything is timed
    model = ResNet18Shaped().to(device).eval()
    print(f"probe: {len(probe)} synthetic images at 224, segmentation {probe.segmentation_size}, "
          f"{'kept whole on the device' if probe.kept_on(device) else 'streamed from the cache batch by batch'}; "
          f"model: ResNet-18-shaped, random weights; layers {LAYERS}; batch size {args.batch_size}; device {device}")
    with torch.no_grad():  # warm-up: allocator and kernels
        model(probe.model_input(range(min(args.batch_size, len(probe))), device))

    # ------------------------------------------------------------------ target 1
    # Forward and dissection alternate; the smallest time of each is the least disturbed by other jobs.
    def dissect(**options) -> tuple[tuple[float, float], ld.Dissection]:
        return timed(lambda: ld.dissect(model, probe, LAYERS, batch_size=args.batch_size, **options))

    # As many forward passes as dissections, in pairs; the first dissection is profiled.
    forward, activations = timed_forward(model, probe, args.batch_size, device)
    profile = cProfile.Profile()
    profile.enable()
    dissected, result = dissect()
    profile.disable()
    profiled_seconds = dissected[0]
    for _ in range(args.repeats - 1):
        forward = best(forward, timed_forward(model, probe, args.batch_size, device)[0])
        dissected = best(dissected, dissect()[0])
    engine, engine_result = timed(lambda: ld.dissect_activations(activations, probe, batch_size=args.batch_size))
    for name in LAYERS:
        assert torch.equal(engine_result[name].iou, result[name].iou), name

    def row(label: str, timing: tuple[float, float]) -> list[object]:
        return [label, timing[0], f"{timing[0] / forward[0]:.3f}"]

    rows = [row("plain forward pass, torch.no_grad()", forward),
            row("ld.dissect, activations kept between passes (default)", dissected)]
    if not args.quick:
        rows.append(row("ld.dissect, activation_cache_bytes=0 (spilled to a temporary file, the default beyond it)",
                        dissect(activation_cache_bytes=0)[0]))
        rows.append(row("ld.dissect, activation_cache_bytes=0, activation_spill=False (model runs twice)",
                        dissect(activation_cache_bytes=0, activation_spill=False)[0]))
    rows.append(row("engine alone: ld.dissect_activations on captured outputs", engine))
    print(f"\n### Target 1: dissection vs forward pass ({len(probe)} images, best of {args.repeats} forward "
          f"passes and {args.repeats} dissections, alternating; target <= 1.25 on CPU, 1.10 on CUDA)\n")
    print_table(["run", "seconds", "x forward"], rows)
    parts = (forward[0] + engine[0]) / forward[0]
    print(f"\nforward pass + engine alone, the dissection's parts: {parts:.3f} x forward")
    print(f"\nactivations cached: {result.settings['activations_cached']}; "
          f"cached bytes: {sum(a.numel() * 4 for a in activations.values()) / 2**20:.0f} MiB")
    print(f"\n### Where one ld.dissect spends its {profiled_seconds:.1f} s (cProfile, cumulative)\n")
    print_table(["part", "seconds", "share"], profile_table(profile, profiled_seconds))
    activations.clear()

    # ------------------------------------------------------------------ target 2
    subset = ld.ProbeSet(probe.broden, size=baseline_images, seed=0)
    _, sub_activations = timed_forward(model, subset, args.batch_size, device)
    (fast_seconds, _), fast = timed(lambda: ld.dissect_activations(sub_activations, subset,
                                                                   batch_size=args.batch_size))
    with reference_path():
        (reference_seconds, _), reference = timed(lambda: ld.dissect_activations(sub_activations, subset,
                                                                                 batch_size=args.batch_size))
    dense_seconds = 0.0
    identical = True
    for name, acts in sub_activations.items():
        (seconds, _), (thresholds, (intersection, unit_area)) = timed(lambda acts=acts: (
            (t := dense_thresholds(acts, 0.005)),
            dense_tally(acts, t, subset.label_maps.to(device), subset.image_labels.to(device),
                        subset.label_category.to(device), len(subset.categories), "paper")))
        dense_seconds += seconds
        identical &= all(torch.equal(thresholds.cpu(), result[name].thresholds)
                         and torch.equal(intersection.cpu(), result[name].intersection)
                         and torch.equal(unit_area.cpu(), result[name].unit_area) for result in (fast, reference))
    print(f"\n### Target 2: against the straightforward dense method ({baseline_images} images, "
          "thresholds + tally on captured activations)\n")
    print_table(["method", "seconds", "speed-up"], [
        ["dense: upsample every map, float64 compare, one-hot label products", dense_seconds, "1"],
        ["engine on its reference path (LIGHTNING_DISSECT_REFERENCE=1)", reference_seconds,
         f"{dense_seconds / reference_seconds:.1f}x"],
        ["lightning_dissect engine (ld.dissect_activations)", fast_seconds, f"{dense_seconds / fast_seconds:.0f}x"],
    ])
    print(f"\nidentical thresholds, intersections and unit areas (dense, engine, reference path): "
          f"{'yes' if identical else 'NO'}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
