"""Target 3 of the performance issue: peak memory of `ld.dissect` for growing probe sets.

Each configuration runs in a fresh process; its peak resident memory during `ld.dissect`, above
what the process held just before (probe set decoded, model built and run once), is read from
`/proc/self/status` (`VmHWM`, reset through `/proc/self/clear_refs`). Linux only.

The layer shapes are the targets' (256 x 14 x 14 and 512 x 7 x 7 together, and a 2048-unit 7 x 7
layer like ResNet-50's `layer4`), made by a cheap stand-in model so that 8192 images run in
minutes on a CPU: memory depends on the shapes, not on how the maps were computed. The images
are the synthetic dataset at 64 x 64 (segmentation 32 x 32), so generating 8192 takes minutes.

    python -m benchmarks.bench_memory            # N = 512, 2048, 8192 (about 10 minutes the first time)
    python -m benchmarks.bench_memory --quick    # N = 512, 2048
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch
from torch import nn

import lightning_dissect as ld
from benchmarks.common import machine, print_table, synthetic_probe
from lightning_dissect.engine.dissect import DEFAULT_ACTIVATION_CACHE_BYTES
from lightning_dissect.engine.thresholds import top_count

IMAGE_SIZE = 64


class StandIn(nn.Module):
    """Layers of ResNet-18's `layer3`/`layer4` shapes (and a 2048-unit 7 x 7 `wide`) at little cost."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer3 = nn.Sequential(nn.AdaptiveAvgPool2d(14), nn.Conv2d(3, 256, 3, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(256, 512, 1), nn.ReLU())
        self.wide = nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Conv2d(3, 2048, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(x)).mean() + self.wide(x).mean()


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(config: dict) -> dict:
    """Measure one configuration in this (fresh) process."""
    probe = synthetic_probe(config["images"], IMAGE_SIZE, cache_dir=config["cache_dir"])
    model = StandIn().eval()
    with torch.no_grad():
        model(probe.model_input(range(64), "cpu"))
    probe_bytes = sum(t.numel() * t.element_size() for t in (probe.images, probe.label_maps, probe.image_labels,
                                                             probe.category_present, probe.image_level_present))
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current resident size
    started = time.perf_counter()
    result = ld.dissect(model, probe, config["layers"], batch_size=64, activation_cache_bytes=config["budget"])
    seconds = time.perf_counter() - started
    peak = _status("VmHWM")
    shapes = {"layer3": (256, 14, 14), "layer4": (512, 7, 7), "wide": (2048, 7, 7)}
    n = len(probe)
    top_bytes = sum(k * top_count(n * h * w, 0.005) * 4 for k, h, w in (shapes[name] for name in config["layers"]))
    activation_bytes = sum(k * h * w * 4 * n for k, h, w in (shapes[name] for name in config["layers"]))
    return dict(config, extra=peak - before, probe_bytes=probe_bytes, top_bytes=top_bytes, seconds=seconds,
                activation_bytes=activation_bytes, cached=result.settings["activations_cached"],
                units=sum(shapes[name][0] for name in config["layers"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 512, 2048")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--cache-dir", default=None, help="where the synthetic datasets are generated and cached")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    sizes = args.sizes or ([512, 2048] if args.quick else [512, 2048, 8192])
    print(f"machine: {machine()}")
    for n in sizes:  # generate and decode once, so that the children only load the cache
        started = time.perf_counter()
        synthetic_probe(n, IMAGE_SIZE, cache_dir=args.cache_dir)
        print(f"probe of {n} images ready in {time.perf_counter() - started:.0f} s", flush=True)
    # glibc raises its mmap threshold as large blocks are freed, after which freed batch buffers stay
    # resident and the peak creeps up with the number of batches; a fixed threshold keeps RSS close
    # to the live tensors (without it the peaks below scatter by tens of MiB from run to run).
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072"))
    print(f"children run with MALLOC_MMAP_THRESHOLD_={environment['MALLOC_MMAP_THRESHOLD_']}")
    rows = []
    previous: dict[tuple, dict] = {}
    for layers, budgets in [(["layer3", "layer4"], [0, DEFAULT_ACTIVATION_CACHE_BYTES]), (["wide"], [0])]:
        for budget in budgets:
            for n in sizes:
                config = {"images": n, "layers": layers, "budget": budget, "cache_dir": args.cache_dir}
                command = [sys.executable, "-m", "benchmarks.bench_memory", "--child", json.dumps(config)]
                output = subprocess.run(command, capture_output=True, text=True, check=True, env=environment).stdout
                m = json.loads(output.strip().splitlines()[-1])
                key = (tuple(layers), budget)
                growth = "-"
                if key in previous:  # bytes added per extra image, against the top-k state's
                    p = previous[key]
                    per_image = (m["extra"] - p["extra"]) / (n - p["images"])
                    top_per_image = (m["top_bytes"] - p["top_bytes"]) / (n - p["images"])
                    growth = f"{per_image:.0f} ({top_per_image:.0f})"
                previous[key] = m
                rows.append(["+".join(layers), m["units"], n, "0" if budget == 0 else "2 GiB",
                             "all" if m["cached"] else "none" if budget == 0 else "part",
                             f"{m['probe_bytes'] / 2**20:.0f}", f"{m['extra'] / 2**20:.0f}",
                             f"{m['top_bytes'] / 2**20:.1f}", f"{m['activation_bytes'] / 2**20:.0f}",
                             f"{m['extra'] / m['units'] / 1024:.1f}", f"{m['extra'] / n / 1024:.1f}", growth,
                             f"{m['seconds']:.1f}"])
                print(f"done: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"\n### Target 3: peak memory of ld.dissect above the loaded probe (synthetic at {IMAGE_SIZE} x "
          f"{IMAGE_SIZE}, segmentation 32 x 32, batch 64, q = 0.005)\n")
    print_table(["layers", "units", "N", "activation_cache_bytes", "cached", "probe MiB", "peak extra MiB",
                 "top-k state MiB", "all activations MiB", "KiB / unit", "KiB / image",
                 "bytes / added image (top-k's)", "seconds"], rows)


if __name__ == "__main__":
    main()
