"""Peak memory for growing probe sets: of `ld.dissect` (target 3), and of decoding and loading the probe.

Each configuration runs in a fresh process; its peak resident memory during `ld.dissect`, above
what the process held just before (probe set decoded, model built and run once), is read from
`/proc/self/status` (`VmHWM`, reset through `/proc/self/clear_refs`). Linux only.

The layer shapes are the targets' (256 x 14 x 14 and 512 x 7 x 7 together, and a 2048-unit 7 x 7
layer like ResNet-50's `layer4`), made by a cheap stand-in model so that 8192 images run in
minutes on a CPU: memory depends on the shapes, not on how the maps were computed. The images
are the synthetic dataset at 64 x 64 (segmentation 32 x 32), so generating 8192 takes minutes.

    python -m benchmarks.bench_memory            # N = 512, 2048, 8192 (about 10 minutes the first time)
    python -m benchmarks.bench_memory --quick    # N = 512, 2048

The probe sweep (`--probe`) measures the probe itself, and a dissection streamed from it, on the synthetic
dataset at 224 x 224 (segmentation 112 x 112, Broden's), N = 500, 3000 and 10000 (`--full` adds 63305, the
released Broden's size): each step in a fresh process, on the probe cache the first step writes, its peak
resident memory above what the process held before the step (Python, torch and the parsed csv files), and
for decoding also the largest worker process's peak (`getrusage(RUSAGE_CHILDREN)`). The steps
(`PROBE_STEPS`, a function measured in a child process and the columns it adds):

- `decode`: decode into an empty cache folder (the first use of a probe);
- `load`: open the cached probe (every later use);
- `dissect`: `ld.dissect` of the stand-in's `layer3` and `layer4` with `activation_cache_bytes=0` (memory
  bounded by the threshold state), the probe read batch by batch from the cache;
- `time`: `ld.dissect` of a ResNet-18-shaped CNN (`--time-model`) against a plain `torch.no_grad()` forward
  pass over the same probe read from the same cache (`ProbeSet.stream`, as the dissection reads it),
  interleaved, best of `--repeats`; the default activation budget (2 GiB in memory, the batches beyond it
  spilled to a temporary file: `activation_spill=True`). `ForwardClock` also times the model inside both
  passes (to the last dissected layer's output), which gives each pass's milliseconds per image outside
  the model (the forward pass reads the probe there; the dissection reads it and does its own work) and
  each dissection against the plain pass at the dissection's own model speed (its model time plus the
  plain pass's time outside the model): a machine whose speed drifts between two passes minutes apart
  moves that far less than the pair's ratio. Per pass it also prints the model's milliseconds per image,
  the process's page faults per image while the model ran, and the machine's steal time (`/proc/stat`),
  which tell a model slowed by fresh memory or by the host from a slower machine. The time step runs
  with the OpenMP wait policy of the caller's environment (printed with the machine): unset, as for most
  users, unless the machine is shared.

Between two sizes the tables give the memory each peak adds per added image, against the bytes the
top-k threshold state adds per image (the one part of a dissection that must grow with N).

    python -m benchmarks.bench_memory --probe --cache-dir DIR            # N = 500, 3000, 10000 (about 1 hour)
    python -m benchmarks.bench_memory --probe --full                     # and 63305 (hours the first time)
    python -m benchmarks.bench_memory --probe --steps decode load dissect # memory only (minutes)
    python -m benchmarks.bench_memory --probe --library OLD_CHECKOUT --steps decode load   # another version

The threshold state alone (`--thresholds`): `ActivationThresholds` of the targets' `layer3` and `layer4`
shapes fed N images of random activations (no model, no probe: N = 63,305 in minutes), each N in a fresh
process: the state's size, the peak above the process before, and the seconds.

    python -m benchmarks.bench_memory --thresholds                        # N = 10000, 63305
    python -m benchmarks.bench_memory --thresholds --library OLD_CHECKOUT # another version
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import lightning_dissect as ld
from benchmarks.common import (
    ResNet18Shaped,
    forward_seconds,
    machine,
    print_table,
    repository_root,
    synchronize,
    synthetic_probe,
)
from lightning_dissect.engine.dissect import DEFAULT_ACTIVATION_CACHE_BYTES
from lightning_dissect.engine.thresholds import top_count
from lightning_dissect.synthetic import synthetic_broden_path

IMAGE_SIZE = 64
PROBE_IMAGE_SIZE = 224


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


def _reset_peak() -> int:
    """Make `VmHWM` the current resident size; returns that size."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _status("VmRSS")


def child(config: dict) -> dict:
    """Measure one configuration in this (fresh) process."""
    probe = synthetic_probe(config["images"], IMAGE_SIZE, cache_dir=config["cache_dir"])
    model = StandIn().eval()
    with torch.no_grad():
        model(probe.model_input(range(64), "cpu"))
    probe_bytes = sum(t.numel() * t.element_size() for t in (probe.images, probe.label_maps, probe.image_labels,
                                                             probe.category_present, probe.image_level_present))
    before = _reset_peak()
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


# ---------------------------------------------------------------------- the probe sweep


def measure_decode(config: dict) -> dict:
    """Decode the probe into an empty cache folder: the first use of a probe."""
    broden = ld.Broden(config["root"])
    before = _reset_peak()
    started = time.perf_counter()
    probe = ld.ProbeSet(broden, cache_dir=config["probe_cache"], progress=False)
    seconds = time.perf_counter() - started
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    cached = sum(path.stat().st_size for path in Path(config["probe_cache"]).rglob("*") if path.is_file())
    return {"decode_extra": _status("VmHWM") - before, "decode_start": before, "decode_worker": workers,
            "decode_seconds": seconds, "images": len(probe), "cache_bytes": cached,
            "probe_bytes": sum(t.numel() * t.element_size() for t in (probe.images, probe.label_maps,
                                                                       probe.image_labels))}


def measure_load(config: dict) -> dict:
    """Open the cached probe in a new process: every later use of the probe."""
    started = time.perf_counter()
    broden = ld.Broden(config["root"])
    csv_seconds = time.perf_counter() - started
    before = _reset_peak()
    started = time.perf_counter()
    ld.ProbeSet(broden, cache_dir=config["probe_cache"])
    seconds = time.perf_counter() - started
    return {"load_extra": _status("VmHWM") - before, "load_start": before, "load_csv_seconds": csv_seconds,
            "load_seconds": seconds}


PROBE_LAYERS = {"layer3": (256, 14, 14), "layer4": (512, 7, 7)}  # at 224 x 224 input, both models


def _top_bytes(n: int) -> int:
    """Bytes of the top-k threshold state of `PROBE_LAYERS` over `n` images (float32 values)."""
    return sum(k * top_count(n * h * w, 0.005) * 4 for k, h, w in PROBE_LAYERS.values())


def measure_dissect(config: dict) -> dict:
    """`ld.dissect` with memory bounded by the threshold state, the probe streamed from the cache."""
    probe = ld.ProbeSet(ld.Broden(config["root"]), cache_dir=config["probe_cache"])
    model = StandIn().eval()
    with torch.no_grad():  # allocator pools and kernels warm, as they are for a second dissection
        model(probe.model_input(range(64), "cpu"))
    before = _reset_peak()
    started = time.perf_counter()
    ld.dissect(model, probe, list(PROBE_LAYERS), batch_size=64, activation_cache_bytes=0)
    seconds = time.perf_counter() - started
    return {"dissect_extra": _status("VmHWM") - before, "dissect_seconds": seconds,
            "top_bytes": _top_bytes(len(probe)), "n": len(probe)}


class ForwardClock:
    """The seconds a model spends in its forward passes inside a dissection: from the model's forward
    pre-hook to the output of `last`, the last dissected layer, where the engine stops the pass (or to
    the model's output, for a pass that runs to the end). Registered before the dissection's own hooks,
    so its hook on `last` runs first. On CUDA it measures launches, not the device's work. Also the
    process's minor page faults in those windows (`faults`; any thread's, the model's own threads
    first of all): where a fault is slow, they tell a model slowed by fresh memory from a slower machine."""

    def __init__(self, model: nn.Module, last: nn.Module) -> None:
        self.seconds, self.faults, self._started, self._faulted = 0.0, 0, None, 0
        self._handles = [model.register_forward_pre_hook(self._start), last.register_forward_hook(self._stop),
                         model.register_forward_hook(self._stop)]

    def _start(self, *_: object) -> None:
        self._faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self._started = time.perf_counter()

    def _stop(self, *_: object) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self._faulted
            self._started = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def steal_seconds() -> float:
    """The CPU time this (virtual) machine's processors waited for the host so far (`/proc/stat`'s steal, all
    processors together); NaN where it is not known. A pass with much of it ran on a machine slowed from outside."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def measure_time(config: dict) -> dict:
    """`ld.dissect` against a plain forward pass over the same probe, interleaved, best of `repeats`;
    and each pass's time inside the model (`ForwardClock`, up to the last dissected layer in both), which
    gives each dissection against a plain pass at its own model speed: a machine whose speed drifts
    between two passes minutes apart moves that far less than the pair's ratio."""
    device = torch.device(config["device"])
    probe = ld.ProbeSet(ld.Broden(config["root"]), cache_dir=config["probe_cache"])
    model = (ResNet18Shaped() if config["time_model"] == "resnet18" else StandIn()).to(device).eval()
    last = model.get_submodule(list(PROBE_LAYERS)[-1])
    forward_seconds(model, probe.subset(min(len(probe), 128)), 64, device)  # warm-up
    forwards, dissections, forwards_inside, inside, kept = [], [], [], [], ""
    faults: list[tuple[int, int]] = []
    steal: list[tuple[float, float]] = []
    for _ in range(config["repeats"]):
        clock = ForwardClock(model, last)
        stolen = steal_seconds()
        forwards.append(forward_seconds(model, probe, 64, device))
        forward_steal = steal_seconds() - stolen
        clock.remove()
        forwards_inside.append(clock.seconds)
        forward_faults = clock.faults
        clock = ForwardClock(model, last)
        stolen = steal_seconds()
        started = time.perf_counter()
        result = ld.dissect(model, probe, list(PROBE_LAYERS), batch_size=64, device=device)
        synchronize(device)
        dissections.append(time.perf_counter() - started)
        steal.append((forward_steal, steal_seconds() - stolen))
        clock.remove()
        inside.append(clock.seconds)
        faults.append((forward_faults, clock.faults))
        spilled, recomputed = result.settings["activations_spilled"], result.settings["activations_recomputed"]
        batches = -(-len(probe) // 64)
        kept = f"{batches - spilled - recomputed} / {spilled} / {recomputed}"
    return {"forward_seconds": min(forwards), "dissect_time_seconds": min(dissections), "kept": kept,
            "forwards": forwards, "dissections": dissections, "forwards_inside": forwards_inside,
            "inside": inside, "faults": faults, "steal": steal, "n": len(probe)}


def _outside(m: dict, passes: str, inside: str) -> list[float]:
    """Each pass's seconds outside the model (reading the probe; for a dissection also its own work)."""
    return [total - model for total, model in zip(m[passes], m[inside])]


def measure_thresholds(config: dict) -> dict:
    """The exact-threshold state of `PROBE_LAYERS` over `n` images of random activations, batch by batch."""
    from lightning_dissect.engine.thresholds import ActivationThresholds

    n, batch = config["n"], 64
    generator = torch.Generator().manual_seed(0)
    maps = {name: torch.randn(batch, *shape, generator=generator).relu_() for name, shape in PROBE_LAYERS.items()}
    before = _reset_peak()  # the metrics made after it: the peak counts the state and all its copies
    started = time.perf_counter()
    metrics = {name: ActivationThresholds(k, n * h * w, 0.005) for name, (k, h, w) in PROBE_LAYERS.items()}
    state = sum(metric.top.numel() * metric.top.element_size() for metric in metrics.values())
    for start in range(0, n, batch):
        for name, metric in metrics.items():  # each batch a little different from the last
            metric.update(maps[name][: min(batch, n - start)] * (1 + (start // batch % 7) * 1e-3))
    return {"n": n, "state": state, "extra": _status("VmHWM") - before, "seconds": time.perf_counter() - started}


def thresholds_sweep(sizes: list[int], library: str | None) -> None:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [path for path in (library, str(repository_root()), os.environ.get("PYTHONPATH")) if path]),
                       MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072"))
    print(f"machine: {machine()}")
    if library:
        print(f"library measured: {library}")
    rows, previous = [], None
    for n in sizes:
        command = [sys.executable, "-m", "benchmarks.bench_memory", "--probe-step", "thresholds", "--child",
                   json.dumps({"n": n})]
        output = subprocess.run(command, capture_output=True, text=True, check=True, env=environment, cwd=library)
        m = json.loads(output.stdout.strip().splitlines()[-1])
        growth = "-" if previous is None else (f"{(m['extra'] - previous['extra']) / (n - previous['n']) / 1024:.2f} "
                                               f"({(m['state'] - previous['state']) / (n - previous['n']) / 1024:.2f})")
        rows.append([n, f"{m['state'] / 2**20:.1f}", f"{m['extra'] / 2**20:.1f}", f"{m['extra'] / m['state']:.1f}",
                     growth, f"{m['seconds']:.1f}"])
        previous = m
        print(f"  N={n}: done", file=sys.stderr, flush=True)
    print("\n### The exact-threshold state alone: layer3 + layer4 shapes, random activations, batch 64, q = 0.005\n")
    print_table(["N", "state MiB", "peak extra MiB", "peak / state", "KiB / added image (state's)", "seconds"], rows)


@dataclass(frozen=True)
class ProbeStep:
    """One measurement of the probe sweep: run in a fresh process per N; `columns` read its result."""

    measure: Callable[[dict], dict]
    columns: dict[str, Callable[[dict], str]]


def _mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


PROBE_STEPS: dict[str, ProbeStep] = {
    "decode": ProbeStep(measure_decode, {
        "probe GiB": lambda m: f"{m['probe_bytes'] / 2**30:.2f}",
        "decode s": lambda m: f"{m['decode_seconds']:.0f}",
        "images / s": lambda m: f"{m['images'] / m['decode_seconds']:.0f}",
        "decode peak extra MiB": lambda m: _mib(m["decode_extra"]),
        # A forked worker starts with its parent's pages: its peak above the parent's start is its own.
        "largest worker peak extra MiB": lambda m: _mib(m["decode_worker"] - m["decode_start"])
        if m["decode_worker"] else "-",
    }),
    "load": ProbeStep(measure_load, {
        "csv s": lambda m: f"{m['load_csv_seconds']:.2f}",
        "load s": lambda m: f"{m['load_seconds']:.3f}",
        "load peak extra MiB": lambda m: _mib(m["load_extra"]),
    }),
    "dissect": ProbeStep(measure_dissect, {
        "dissect s": lambda m: f"{m['dissect_seconds']:.0f}",
        "dissect peak extra MiB": lambda m: _mib(m["dissect_extra"]),
        "top-k state MiB": lambda m: f"{m['top_bytes'] / 2**20:.1f}",
    }),
    "thresholds": ProbeStep(measure_thresholds, {}),  # run by --thresholds, not by the probe sweep
    "time": ProbeStep(measure_time, {
        "forward s": lambda m: f"{m['forward_seconds']:.1f}",
        "dissect (timed) s": lambda m: f"{m['dissect_time_seconds']:.1f}",
        "x forward": lambda m: f"{m['dissect_time_seconds'] / m['forward_seconds']:.3f}",
        # Each repeat's dissection against the forward pass just before it: a machine that drifts slowly
        # moves both alike, so the pairs show the spread the best-of ratio hides.
        "pairs x forward": lambda m: ", ".join(f"{dissect / forward:.3f}"
                                               for forward, dissect in zip(m["forwards"], m["dissections"])),
        # Outside the model's forward passes (ForwardClock), per image, best repeat: the forward pass reads
        # the probe there; the dissection reads it too and does its own work.
        "outside the model ms / image (forward, dissect)": lambda m: (
            f"{min(_outside(m, 'forwards', 'forwards_inside')) / m['n'] * 1e3:.2f}, "
            f"{min(_outside(m, 'dissections', 'inside')) / m['n'] * 1e3:.2f}"),
        # Each dissection against the plain pass it would be at its own model speed: its model time plus the
        # plain pass's time outside the model (the same repeat's).
        "x forward at the same model speed": lambda m: ", ".join(
            f"{dissect / (model + outside):.3f}" for dissect, model, outside
            in zip(m["dissections"], m["inside"], _outside(m, "forwards", "forwards_inside"))),
        # Per repeat: the model's milliseconds per image in each pass, the page faults per image while the
        # model ran, and the machine's steal time during each pass (why a model ran slower in one pass).
        "model ms / image (forward, dissect)": lambda m: "; ".join(
            f"{forward / m['n'] * 1e3:.1f}, {dissect / m['n'] * 1e3:.1f}"
            for forward, dissect in zip(m["forwards_inside"], m["inside"])),
        "faults / image in the model (forward, dissect)": lambda m: "; ".join(
            f"{forward / m['n']:.0f}, {dissect / m['n']:.0f}" for forward, dissect in m["faults"]),
        "steal s (forward, dissect)": lambda m: "; ".join(
            f"{forward:.1f}, {dissect:.1f}" for forward, dissect in m["steal"]),
        "batches in memory / spilled / run again": lambda m: m["kept"],
    }),
}

# Peaks whose growth per added image the sweep prints, against the top-k state's.
GROWING_PEAKS = {"decode": "decode_extra", "load": "load_extra", "dissect": "dissect_extra"}


def probe_sweep(sizes: list[int], cache_dir: str | None, library: str | None, steps: list[str],
                extra: dict) -> None:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [path for path in (library, str(repository_root()), os.environ.get("PYTHONPATH")) if path]))
    # As for target 3: a fixed mmap threshold keeps freed batch buffers out of the resident size, for the
    # memory steps. The time step runs with glibc's own (adaptive) threshold, as users do: a fixed small one
    # maps and faults in every large buffer afresh, which slowed the dissection more than the forward pass
    # (on 500 images, 1.18 x forward against 1.12 with the threshold at glibc's ceiling).
    memory_environment = dict(environment,
                              MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072"))
    steps = ["decode"] + [name for name in steps if name != "decode"]  # the others read its cache
    print(f"machine: {machine()}")
    print(f"load average before: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    if library:
        print(f"library measured: {library}")
    rows, all_measured = [], []
    for n in sizes:
        started = time.perf_counter()
        root = synthetic_broden_path(num_images=n, image_size=PROBE_IMAGE_SIZE, cache_dir=cache_dir,
                                     workers=os.cpu_count() or 1)
        print(f"dataset of {n} images ready in {time.perf_counter() - started:.0f} s", flush=True)
        probe_cache = Path(tempfile.mkdtemp(prefix="bench-probe-", dir=root.parent))
        measured: dict = {"n": n}
        try:
            for name in steps:
                config = dict(extra, root=str(root), probe_cache=str(probe_cache))
                command = [sys.executable, "-m", "benchmarks.bench_memory", "--probe-step", name, "--child",
                           json.dumps(config)]
                # cwd: `python -m` puts the working folder first on sys.path, before PYTHONPATH.
                output = subprocess.run(command, capture_output=True, text=True, check=True,
                                        env=environment if name == "time" else memory_environment,
                                        cwd=library)
                measured.update(json.loads(output.stdout.strip().splitlines()[-1]))
                print(f"  {name}: done ({os.getloadavg()[0]:.2f} load)", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(probe_cache, ignore_errors=True)
        all_measured.append(measured)
        rows.append([n] + [show(measured) for step in steps for show in PROBE_STEPS[step].columns.values()])
    print(f"load average after: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    print(f"\n### Probe sweep: decoding, loading, dissecting (synthetic at {PROBE_IMAGE_SIZE} x {PROBE_IMAGE_SIZE}, "
          f"segmentation {PROBE_IMAGE_SIZE // 2} x {PROBE_IMAGE_SIZE // 2}, each step in a fresh process; dissect: "
          f"layer3 + layer4 of the stand-in, activation_cache_bytes=0; time: {extra['time_model']}, best of "
          f"{extra['repeats']}, interleaved)\n")
    print_table(["N"] + [header for step in steps for header in PROBE_STEPS[step].columns], rows)
    growing = [step for step in steps if step in GROWING_PEAKS]
    if len(all_measured) > 1 and growing:
        growth = []
        for previous, current in zip(all_measured, all_measured[1:]):
            added = current["n"] - previous["n"]
            row: list[object] = [f"{previous['n']} -> {current['n']}"]
            row += [f"{(current[GROWING_PEAKS[step]] - previous[GROWING_PEAKS[step]]) / added / 1024:.2f}"
                    for step in growing]
            row.append(f"{(_top_bytes(current['n']) - _top_bytes(previous['n'])) / added / 1024:.2f}")
            growth.append(row)
        print("\n### Peak memory added per added image (KiB), against the top-k state's\n")
        print_table(["N"] + [f"{step} KiB / image" for step in growing] + ["top-k state KiB / image"], growth)
    if "time" in steps:
        print("\nall timings (forward, dissect), seconds: " + "; ".join(
            f"N={m['n']}: {[round(t, 1) for t in m['forwards']]}, {[round(t, 1) for t in m['dissections']]}"
            for m in all_measured))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 512, 2048")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--cache-dir", default=None, help="where the synthetic datasets are generated and cached")
    parser.add_argument("--probe", action="store_true", help="the probe sweep (decoding and loading) instead")
    parser.add_argument("--library", default=None, help="with --probe: measure the lightning_dissect package in "
                                                          "this folder (e.g. an older checkout)")
    parser.add_argument("--full", action="store_true", help="with --probe: also N = 63305, the released Broden's size")
    parser.add_argument("--thresholds", action="store_true", help="the threshold state alone, N = 10000, 63305")
    parser.add_argument("--steps", nargs="+", choices=[step for step in PROBE_STEPS if step != "thresholds"],
                        default=[step for step in PROBE_STEPS if step != "thresholds"],
                        help="with --probe: the steps to run (decode always runs: the others read its cache)")
    parser.add_argument("--repeats", type=int, default=3, help="with --probe: forward/dissect pairs of the time step")
    parser.add_argument("--time-model", choices=["resnet18", "standin"], default="resnet18",
                        help="with --probe: the model of the time step")
    parser.add_argument("--device", default="cpu", help="with --probe: where the time step runs")
    parser.add_argument("--probe-step", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config = json.loads(args.child)
        measure = PROBE_STEPS[args.probe_step].measure if args.probe_step else child
        print(json.dumps(measure(config)))
        return
    if args.thresholds:
        thresholds_sweep(args.sizes or [10000, 63305], args.library)
        return
    if args.probe:
        sizes = args.sizes or [500, 3000, 10000] + ([63305] if args.full else [])
        probe_sweep(sizes, args.cache_dir, args.library, args.steps,
                    {"repeats": args.repeats, "time_model": args.time_model, "device": args.device})
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
