"""Target 4 of the performance issue: decoding and caching a probe set.

First load: `ProbeSet` reads the Broden csv files, decodes every JPEG and PNG label map (threads),
computes the canonical labels, label areas and category presence, and writes the cache file.
Cached load: the same call again, which reads the csv files and `torch.load`s the cache file.

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
from benchmarks.common import machine, print_table
from lightning_dissect.synthetic import synthetic_broden_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128 images")
    parser.add_argument("--images", type=int, default=None, help="probe size (default 512, quick 128)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu", help="also time the copy to this device")
    parser.add_argument("--cache-dir", default=None, help="where the synthetic dataset is generated and cached")
    args = parser.parse_args()
    images = args.images or (128 if args.quick else 512)
    print(f"machine: {machine()}")
    started = time.perf_counter()
    root = synthetic_broden_path(num_images=images, image_size=args.image_size, cache_dir=args.cache_dir,
                                 workers=os.cpu_count() or 1)
    print(f"dataset: {root} ({time.perf_counter() - started:.0f} s to generate or find)")
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        probe = ld.ProbeSet(root, cache_dir=cache)
        first = time.perf_counter() - started
        cache_file = next(Path(cache).glob("probe-*.pt"))
        size = cache_file.stat().st_size
        started = time.perf_counter()
        ld.ProbeSet(root, cache_dir=cache)
        cached = time.perf_counter() - started
        started = time.perf_counter()
        probe.tensors(args.device)
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()
        to_device = time.perf_counter() - started
    print(f"\n### Target 4: probe loading ({len(probe)} images at {args.image_size}, segmentation "
          f"{probe.segmentation_size}, {probe.label_maps.shape[1]} label maps per image)\n")
    print_table(["step", "seconds", "images / s"], [
        ["first load: decode, canonical labels, write cache", first, f"{len(probe) / first:.0f}"],
        ["cached load: csv files + torch.load", cached, f"{len(probe) / cached:.0f}"],
        [f"probe.tensors({args.device!r}), kept for later dissections", to_device, "-"],
    ])
    print(f"\ncache file: {size / 2**20:.1f} MiB ({size / len(probe) / 1024:.0f} KiB per image)")


if __name__ == "__main__":
    main()
