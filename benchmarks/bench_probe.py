"""Target 4 of the performance issue: decoding, caching and reading a probe set.

First load: `ProbeSet` reads the Broden csv files, decodes every JPEG and PNG label map (in worker
processes, and again in this process alone for comparison), computes the canonical labels, label areas
and category presence, and writes the cache folder. Cached load: the same call again, which reads the
csv files, stats every file the probe decodes (the cache key) and maps the cache. Then the reads a
dissection makes: every batch of model input and labels, streamed from the cache (`device_budget_bytes=0`),
and the whole probe kept on the device.

    python -m benchmarks.bench_probe             # 512 synthetic images at 224 (segmentation 112)
    python -m benchmarks.bench_probe --quick     # 128 images
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import lightning_dissect as ld
from benchmarks.common import machine, print_table, synchronize
from lightning_dissect.synthetic import synthetic_broden_path

BATCH_SIZE = 64


def stream_seconds(probe: ld.ProbeSet, device: torch.device) -> float:
    """Wall time of reading every batch's model input and labels onto `device`."""
    batches = [list(range(start, min(start + BATCH_SIZE, len(probe)))) for start in range(0, len(probe), BATCH_SIZE)]
    started = time.perf_counter()
    for batch in probe.stream(batches, device):
        assert batch.inputs is not None
    synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128 images")
    parser.add_argument("--images", type=int, default=None, help="probe size (default 512, quick 128)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu", help="read the batches onto this device")
    parser.add_argument("--cache-dir", default=None, help="where the synthetic dataset is generated and cached")
    args = parser.parse_args()
    images = args.images or (128 if args.quick else 512)
    device = torch.device(args.device)
    workers = min(8, os.cpu_count() or 1)
    print(f"machine: {machine()}")
    started = time.perf_counter()
    root = synthetic_broden_path(num_images=images, image_size=args.image_size, cache_dir=args.cache_dir,
                                 workers=os.cpu_count() or 1)
    print(f"dataset: {root} ({time.perf_counter() - started:.0f} s to generate or find)")
    with tempfile.TemporaryDirectory() as alone, tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        ld.ProbeSet(root, cache_dir=alone, workers=1)
        first_alone = time.perf_counter() - started
        started = time.perf_counter()
        probe = ld.ProbeSet(root, cache_dir=cache)
        first = time.perf_counter() - started
        size = sum(path.stat().st_size for path in Path(cache).rglob("*") if path.is_file())
        started = time.perf_counter()
        broden = ld.Broden(root)
        csv = time.perf_counter() - started
        started = time.perf_counter()
        ld.ProbeSet(broden, cache_dir=cache)
        mapped = time.perf_counter() - started
        streamed = stream_seconds(ld.ProbeSet(broden, cache_dir=cache, device_budget_bytes=0), device)
        kept = ld.ProbeSet(broden, cache_dir=cache)
        started = time.perf_counter()
        kept.tensors(device)
        synchronize(device)
        to_device = time.perf_counter() - started
        from_device = stream_seconds(kept, device)
    print(f"\n### Target 4: probe loading ({len(probe)} images at {args.image_size}, segmentation "
          f"{probe.segmentation_size}, {probe.label_maps.shape[1]} label maps per image)\n")
    print_table(["step", "seconds", "images / s"], [
        ["first load, decoding in this process alone: decode, canonical labels, write cache", first_alone,
         f"{len(probe) / first_alone:.0f}"],
        [f"first load, decoding in {workers} worker processes", first, f"{len(probe) / first:.0f}"],
        ["cached load: csv files", csv, "-"],
        ["cached load: cache key (file stats) and mapping", mapped, f"{len(probe) / mapped:.0f}"],
        [f"every batch of {BATCH_SIZE} streamed from the cache onto {args.device!r}", streamed,
         f"{len(probe) / streamed:.0f}"],
        [f"probe.tensors({args.device!r}): the whole probe kept on the device", to_device, "-"],
        [f"every batch of {BATCH_SIZE} from the probe kept on {args.device!r}", from_device,
         f"{len(probe) / from_device:.0f}"],
    ])
    print(f"\ncache folder: {size / 2**20:.1f} MiB ({size / len(probe) / 1024:.0f} KiB per image)")


if __name__ == "__main__":
    main()
