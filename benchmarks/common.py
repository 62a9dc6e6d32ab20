"""Shared pieces of the benchmarks: a ResNet-shaped CNN (no torchvision), cached synthetic
probe sets, timing and the machine description printed above every table."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

import lightning_dissect as ld
from lightning_dissect.probe import DEVICE_BUDGET_BYTES
from lightning_dissect.synthetic import synthetic_broden_path


class BasicBlock(nn.Module):
    """The two-convolution residual block of ResNet-18/34."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False),
                                            nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18Shaped(nn.Module):
    """ResNet-18's layout (torchvision's module names), random weights.

    At 224x224 input `layer3` is 256 x 14 x 14 and `layer4` 512 x 7 x 7.
    `widths` changes the stage widths, e.g. `(64, 128, 256, 2048)` gives a
    2048-unit 7x7 `layer4` like ResNet-50's.
    """

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512), num_classes: int = 1000, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        previous = 64
        for number, width in enumerate(widths, start=1):
            stride = 1 if number == 1 else 2
            blocks = nn.Sequential(BasicBlock(previous, width, stride), BasicBlock(width, width))
            setattr(self, f"layer{number}", blocks)
            previous = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def synthetic_probe(num_images: int, image_size: int = 224, cache_dir: str | os.PathLike | None = None,
                    workers: int | None = None, device_budget_bytes: int = DEVICE_BUDGET_BYTES) -> ld.ProbeSet:
    """A probe set of a whole cached synthetic dataset (generated and decoded on first use);
    `device_budget_bytes=0` streams it to an accelerator batch by batch (as on the CPU)."""
    root = synthetic_broden_path(num_images=num_images, image_size=image_size, cache_dir=cache_dir,
                                 workers=workers or os.cpu_count() or 1)
    return ld.ProbeSet(root, device_budget_bytes=device_budget_bytes)


def probe_batches(probe: ld.ProbeSet, batch_size: int) -> list[list[int]]:
    """The probe's positions in batches, in order, as `ld.dissect` reads them."""
    return [list(range(start, min(start + batch_size, len(probe)))) for start in range(0, len(probe), batch_size)]


def forward_seconds(model: nn.Module, probe: ld.ProbeSet, batch_size: int, device: torch.device) -> float:
    """Wall time of a plain `torch.no_grad()` forward pass of `model` over the probe set, read as a
    dissection reads it (`ProbeSet.stream`: from the cache, or from a copy kept on the device)."""
    model.eval()
    started = time.perf_counter()
    with torch.no_grad():
        for batch in probe.stream(probe_batches(probe, batch_size), device, labels=False):
            model(batch.inputs)
    synchronize(device)
    return time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(repeats: int, run: Callable[[], float]) -> float:
    """The smallest of `repeats` timings (the machine is shared: the minimum is the least disturbed)."""
    return min(run() for _ in range(repeats))


def machine() -> str:
    """One line naming the machine: CPU model and cores (or GPU), torch version and threads, the OpenMP and
    allocator settings."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{model}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; allocator {allocator()}; "
            f"Python {platform.python_version()}")


ALLOCATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")
"""The environment variables that change how the process's memory is allocated: on a machine where a page
fault is slow, whether freed memory is reused or given back and faulted in again moves a CPU forward
pass by about 2x on this project's machine (docs/performance.md, "Page faults and the allocator")."""


def allocator() -> str:
    """The allocator settings of `ALLOCATOR_SETTINGS` in the environment, or "default"."""
    found = [f"{name}={os.environ[name]}" for name in ALLOCATOR_SETTINGS if os.environ.get(name)]
    return ", ".join(found) or "default"


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A markdown table, ready to paste into docs/performance.md."""
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float)
                                           else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    print("\n".join(lines), flush=True)


def repository_root() -> Path:
    return Path(__file__).resolve().parent.parent
