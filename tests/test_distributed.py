"""Distributed dissection (gloo on CPU): sharded runs equal the single-process one exactly, failures do not stall.

Each test spawns real processes joined in a gloo process group; the ranks write
their results to files that the test compares with a single-process run.
"""

from __future__ import annotations

import datetime
import functools
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lightning_dissect as ld
from lightning_dissect.distributed import StrategySynchronizer, check_strategy, local_zero_first
from lightning_dissect.engine.errors import DissectionError
from lightning_dissect.engine.sync import (
    RankFailedError,
    SingleProcessSynchronizer,
    TorchDistributedSynchronizer,
    default_synchronizer,
    guard,
)
from lightning_dissect.engine.thresholds import ActivationThresholds
from lightning_dissect.engine.top_images import TopImages
from tests.conftest import random_broden

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

PROBE_SIZE = 23  # odd: the two shards hold 12 and 11 images
FIELDS = ["thresholds", "iou", "intersection", "unit_area", "label_area", "category_labels", "category_scores",
          "labels", "scores", "top_images", "top_activations"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker, world_size: int, *args, timeout: float = 120.0) -> None:
    """Run `worker(rank, world_size, port, *args)` in `world_size` processes; fail (not hang) past `timeout`."""
    port = free_port()
    context = mp.start_processes(worker, args=(world_size, port, *args), nprocs=world_size, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"distributed workers still running after {timeout} s: a rank is waiting forever")


def init_group(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))


def activations(num_images: int, seed: int, ties: bool) -> torch.Tensor:
    acts = torch.randn(num_images, 5, 3, 3, generator=torch.Generator().manual_seed(seed))
    return (acts * 2).round() / 2 if ties else acts  # coarse values: ties at thresholds and among top images


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


def as_tensors(result: ld.Dissection) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {field: getattr(layer, field) for field in FIELDS} | {"summary": layer.summary()}
            for name, layer in result.items()}


CASES = {  # name -> dissect_activations options; the activations are seeded per case
    "paper_q005": dict(quantile=0.005, denominator="paper", top_k=5, ties=False),
    "lite_ties": dict(quantile=0.2, denominator="lite", top_k=30, ties=True),  # top_k above a shard's 12 images
    "global_rotated": dict(quantile=0.1, denominator="global", top_k=4, ties=True, rotation=dict(seed=1, alpha=0.5)),
}


@functools.lru_cache(maxsize=1)
def single_process_results(root: Path) -> dict:
    probe = ld.ProbeSet(root, cache_dir=False)
    results = {}
    for seed, (case, options) in enumerate(CASES.items()):
        options = dict(options)
        acts = activations(len(probe), seed, options.pop("ties"))
        results[case] = as_tensors(ld.dissect_activations({"layer": acts}, probe, batch_size=5, **options))
    results["model"] = as_tensors(ld.dissect(tiny_cnn(), probe, ["conv", "conv.0"], quantile=0.05, batch_size=1))
    return results


WORLD_SIZE = 3  # shards of 8, 8 and 7 images


def prepare_twice(rank: int, out: Path) -> list[str]:
    """`local_zero_first` on one node: once when rank 0's preparation succeeds, once when it fails."""
    marker = out / "prepared"
    synchronizer = TorchDistributedSynchronizer()
    outcomes = []

    def prepare() -> str:
        if rank == 0:
            time.sleep(0.3)  # the others would see no marker if they did not wait
            marker.write_text("cache filled")
            return "first"
        return "after" if marker.exists() else "too early"

    outcomes.append(local_zero_first(synchronizer, rank, prepare))

    def fail_on_local_zero() -> str:
        if rank == 0:
            raise OSError("the download failed")
        return "ran"

    try:
        outcomes.append(local_zero_first(synchronizer, rank, fail_on_local_zero))
    except RankFailedError as error:
        outcomes.append(f"RankFailedError{error.ranks}")
    except OSError:
        outcomes.append("OSError")
    return outcomes


def metrics_by_hand(num_images: int, shard: torch.Tensor) -> dict[str, torch.Tensor]:
    """The engine's statistics driven by hand over `shard`, synced by torchmetrics itself on `compute`
    (its default `gather_all_tensors` over the process group, as in a user's DDP validation loop)."""
    acts = activations(num_images, 4, ties=True)[shard]
    thresholds = ActivationThresholds(5, num_images * 9, 0.1)
    images = TopImages(5, 4)
    for start in range(0, len(shard), 3):
        thresholds.update(acts[start : start + 3])
        images.update(acts[start : start + 3], shard[start : start + 3])
    values, positions = images.compute()
    return {"thresholds": thresholds.compute(), "top_activations": values, "top_images": positions}


def ranks_worker(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    """Everything the standalone tests check, in one process group (spawning is the slow part)."""
    init_group(rank, world_size, port)
    try:
        probe = ld.ProbeSet(root, cache_dir=False)
        results: dict = {"shard": TorchDistributedSynchronizer().shard(len(probe))}
        for seed, (case, options) in enumerate(CASES.items()):
            options = dict(options)
            acts = activations(len(probe), seed, options.pop("ties"))
            # No synchronizer given: the initialised process group is used.
            results[case] = as_tensors(ld.dissect_activations({"layer": acts}, probe, batch_size=5, **options))
        results["model"] = as_tensors(ld.dissect(tiny_cnn(), probe, ["conv", "conv.0"], quantile=0.05,
                                                 batch_size=1))
        # BatchNorm statistics drifted apart, as under DDP between its buffer broadcasts: every rank
        # dissects rank zero's model, and keeps its own statistics.
        drifted = tiny_cnn()
        with torch.no_grad():
            drifted.conv[1].running_mean += rank
            drifted.conv[1].running_var *= 1 + rank
        own = {name: buffer.clone() for name, buffer in drifted.named_buffers()}
        results["drifted"] = as_tensors(ld.dissect(drifted, probe, ["conv", "conv.0"], quantile=0.05, batch_size=1))
        results["buffers_kept"] = all(torch.equal(own[name], buffer) for name, buffer in drifted.named_buffers())

        synchronizer = TorchDistributedSynchronizer()
        failures = []
        for failing_stage in ["pass one", "after the last collective"]:
            acts = activations(len(probe), 0, ties=False)
            if failing_stage == "pass one" and rank == 1:
                acts[1] = float("nan")  # probe image 1 is in rank 1's shard: rank 1 fails before any collective
            try:
                with guard(synchronizer):
                    ld.dissect_activations({"layer": acts}, probe, synchronizer=synchronizer)
                    if failing_stage == "after the last collective" and rank == 0:
                        raise OSError("disk full while writing the report")
                failures.append("ok")
            except RankFailedError as error:
                failures.append(f"RankFailedError{error.ranks}")
                results.setdefault("failure_messages", []).append(str(error))
            except (DissectionError, OSError) as error:
                failures.append(type(error).__name__)
        results["failures"] = failures
        # The group still works after the failures.
        with guard(synchronizer):
            after = ld.dissect_activations({"layer": activations(len(probe), 0, ties=False)}, probe)["layer"]
        results["after_failures"] = after.thresholds

        results["local_zero_first"] = prepare_twice(rank, Path(out))
        results["metrics"] = metrics_by_hand(len(probe), torch.arange(rank, len(probe), world_size))

        small = ld.ProbeSet(root, size=2, cache_dir=False)
        try:
            ld.dissect_activations({"layer": activations(2, 0, ties=False)}, small)
            results["small_probe"] = "no error"
        except DissectionError as error:
            results["small_probe"] = str(error)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def odd_probe_root(tmp_path_factory) -> Path:
    return random_broden(tmp_path_factory.mktemp("distributed") / "broden", num_images=PROBE_SIZE)


@pytest.fixture(scope="module")
def rank_results(odd_probe_root, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    run_ranks(ranks_worker, WORLD_SIZE, str(odd_probe_root), str(out))
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_each_rank_dissects_a_strided_shard(rank_results):
    assert [result["shard"] for result in rank_results] == [list(range(rank, PROBE_SIZE, WORLD_SIZE))
                                                            for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("case", [*CASES, "model", "drifted"])
def test_sharded_dissection_equals_single_process_exactly_on_every_rank(odd_probe_root, rank_results, case):
    # "drifted": each rank's BatchNorm statistics differ; the result is rank zero's model's ("model").
    expected = single_process_results(odd_probe_root)["model" if case == "drifted" else case]
    if case == "drifted":
        assert all(result["buffers_kept"] for result in rank_results)  # each rank's own statistics are back
    for rank, result in enumerate(rank_results):
        assert result[case].keys() == expected.keys()
        for layer, fields in expected.items():
            for field, value in fields.items():
                got = result[case][layer][field]
                if isinstance(value, torch.Tensor):
                    assert got.dtype == value.dtype and torch.equal(got, value), (rank, layer, field)
                else:
                    assert got == value, (rank, layer, field)


def test_metrics_synced_by_torchmetrics_equal_the_single_process_ones(odd_probe_root, rank_results):
    expected = metrics_by_hand(PROBE_SIZE, torch.arange(PROBE_SIZE))
    layer = ld.dissect_activations({"l": activations(PROBE_SIZE, 4, ties=True)}, ld.ProbeSet(odd_probe_root,
                                   cache_dir=False), quantile=0.1, top_k=4)["l"]
    assert torch.equal(expected["thresholds"], layer.thresholds)
    assert torch.equal(expected["top_images"], layer.top_images)
    for rank, result in enumerate(rank_results):
        for name, value in expected.items():
            assert torch.equal(result["metrics"][name], value), (rank, name)


def test_failure_on_one_rank_stops_every_rank_before_its_next_collective(odd_probe_root, rank_results):
    # Pass one: rank 1 raises on NaN activations; the others learn it at their first collective.
    # After the last collective: rank 0 raises; the others learn it when their guard ends.
    assert [result["failures"] for result in rank_results] == [
        ["RankFailedError[1]", "OSError"],
        ["DissectionError", "RankFailedError[0]"],
        ["RankFailedError[1]", "RankFailedError[0]"],
    ]
    # The ranks that did not fail say why the failing one did.
    for rank in (0, 2):
        assert "rank 1: DissectionError: layer 'layer' produced non-finite" in rank_results[rank]["failure_messages"][0]
    for rank in (1, 2):
        assert "rank 0: OSError: disk full while writing the report" in rank_results[rank]["failure_messages"][-1]
    probe = ld.ProbeSet(odd_probe_root, cache_dir=False)
    expected = ld.dissect_activations({"layer": activations(len(probe), 0, ties=False)}, probe)["layer"]
    for result in rank_results:
        assert torch.equal(result["after_failures"], expected.thresholds)


def test_local_rank_zero_prepares_first_and_its_failure_stops_the_others(rank_results):
    assert [result["local_zero_first"] for result in rank_results] == [
        ["first", "OSError"], ["after", "RankFailedError[0]"], ["after", "RankFailedError[0]"]]


def test_probe_smaller_than_the_world_fails_alike_on_every_rank(rank_results):
    messages = [result["small_probe"] for result in rank_results]
    assert messages == [messages[0]] * WORLD_SIZE
    assert "the probe set has 2 images, fewer than the 3 ranks" in messages[0]


# ---------------------------------------------------------------- without a process group

def test_without_a_process_group_the_default_synchronizer_does_nothing():
    assert type(default_synchronizer()) is SingleProcessSynchronizer
    with pytest.raises(RuntimeError, match="init_process_group"):
        TorchDistributedSynchronizer()


class _Strategy:
    global_rank, world_size, root_device = 0, 1, torch.device("cpu")


def _strategy_class(name: str, **attributes) -> type:
    return type(name, (_Strategy,), attributes)


@pytest.mark.parametrize("name,attributes,refused", [
    ("FSDPStrategy", {}, "FSDPStrategy"),
    ("ModelParallelStrategy", {}, "ModelParallelStrategy"),
    ("DeepSpeedStrategy", {"zero_stage_3": True}, "ZeRO stage 3"),
    ("DeepSpeedStrategy", {"zero_stage_3": False}, None),
    ("DDPStrategy", {}, None),
])
def test_sharded_strategies_are_refused_with_what_is_supported(name, attributes, refused):
    strategy = _strategy_class(name, **attributes)()
    if refused is None:
        check_strategy(strategy)
        return
    with pytest.raises(DissectionError, match=refused) as error:
        check_strategy(strategy)
    assert "Supported: a single device, DDP" in str(error.value)
    subclass = type("MyStrategy", (type(strategy),), {})()  # a user's subclass is refused too
    with pytest.raises(DissectionError, match=refused):
        check_strategy(subclass)


def test_strategy_synchronizer_on_one_device_equals_the_single_process_run(odd_probe_root):
    from pytorch_lightning.strategies import SingleDeviceStrategy

    probe = ld.ProbeSet(odd_probe_root, cache_dir=False)
    acts = activations(len(probe), 3, ties=True)
    synchronizer = StrategySynchronizer(SingleDeviceStrategy(torch.device("cpu")))
    with guard(synchronizer):
        got = ld.dissect_activations({"l": acts}, probe, quantile=0.1, top_k=3, synchronizer=synchronizer)["l"]
    expected = ld.dissect_activations({"l": acts}, probe, quantile=0.1, top_k=3)["l"]
    for field in FIELDS:
        assert torch.equal(getattr(got, field), getattr(expected, field)), field

