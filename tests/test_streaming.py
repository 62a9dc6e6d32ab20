"""The engine reads the probe batch by batch: the same dissection streamed, kept on the device, in memory, sharded."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import lightning_dissect as ld
from lightning_dissect.engine.sync import DistributedSynchronizer
from lightning_dissect.probe import ProbeSet
from tests.conftest import DEVICES, random_broden
from tests.reference import reference_dissection

LAYERS = ["stem", "head"]


class TwoLayers(nn.Module):
    """A `stem` at the input's size and a strided `head`: one layer upsampled 1x, one 2x to the 12 x 12 labels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU())
        self.head = nn.Conv2d(5, 7, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x)).mean((2, 3))


def model(seed: int = 0) -> TwoLayers:
    torch.manual_seed(seed)
    net = TwoLayers()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        net.stem[1].running_mean.uniform_(-0.2, 0.2)
        net.stem[1].running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return random_broden(tmp_path_factory.mktemp("stream") / "broden", num_images=41, image_size=24, seed=3)


@pytest.fixture(scope="module")
def probes(dataset, tmp_path_factory):
    """One probe, three ways: decoded in memory, mapped and streamed from the cache, mapped and kept whole."""
    cache = tmp_path_factory.mktemp("stream-cache")
    ProbeSet(dataset, cache_dir=cache)
    return {"in memory": ProbeSet(dataset, cache_dir=False),
            "streamed": ProbeSet(dataset, cache_dir=cache, device_budget_bytes=0),
            "kept": ProbeSet(dataset, cache_dir=cache)}


def fields(result: ld.Dissection) -> dict[str, torch.Tensor]:
    return {f"{layer}.{name}": value.cpu() for layer in result.layers for name, value in vars(result[layer]).items()
            if isinstance(value, torch.Tensor)}


def assert_same(got: ld.Dissection, expected: ld.Dissection) -> None:
    got_fields, expected_fields = fields(got), fields(expected)
    assert got_fields.keys() == expected_fields.keys() and expected_fields
    for name, value in expected_fields.items():
        assert got_fields[name].dtype == value.dtype and torch.equal(got_fields[name], value), name


def keep_on_every_device(monkeypatch) -> None:
    """The kept-on-the-device path on the CPU too: batches indexed from `probe.tensors(device)`."""
    monkeypatch.setattr(ProbeSet, "kept_on", lambda self, device: self.fits_device)


def captured(net: nn.Module, probe: ProbeSet) -> dict[str, torch.Tensor]:
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}
    hooks = [net.get_submodule(name).register_forward_hook(
        lambda module, inputs, output, name=name: outputs[name].append(output.detach().clone())) for name in LAYERS]
    try:
        with torch.no_grad():
            net.eval()(probe.model_input(range(len(probe)), "cpu"))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(parts) for name, parts in outputs.items()}


# A budget for all activations, none (the model runs again for every batch) and two batches of 6 images
# (the model runs again from the third batch on: pass two reads labels only, then images and labels).
BUDGETS = {"all": 2**31, "none": 0, "two batches": 2 * 6 * (5 * 24 * 24 + 7 * 12 * 12) * 4}


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_a_dissection_is_bit_identical_streamed_kept_on_the_device_and_in_memory(probes, dataset, budget,
                                                                                  monkeypatch):
    net = model()
    options = dict(quantile=0.05, batch_size=6, activation_cache_bytes=BUDGETS[budget])
    results = {name: ld.dissect(net, probe, LAYERS, **options) for name, probe in probes.items()}
    with monkeypatch.context() as patched:
        keep_on_every_device(patched)
        results["kept whole, indexed"] = ld.dissect(net, probes["kept"], LAYERS, **options)
    assert results["in memory"].settings["activations_cached"] == (budget == "all")
    for result in results.values():
        assert_same(result, results["in memory"])
    # ... and they are the numbers of the definition (SEMANTICS §2 to §4), computed the slow way.
    activations = captured(net, probes["in memory"])
    probe = probes["in memory"]
    for layer in LAYERS:
        expected = reference_dissection(activations[layer], ld.Broden(dataset), probe.rows, probe.categories,
                                        0.05, 0.04, "paper")
        got = results["streamed"][layer]
        assert torch.equal(got.thresholds, expected["thresholds"])
        assert torch.equal(got.intersection.double(), expected["intersection"])
        assert torch.equal(got.unit_area.double(), expected["unit_area"])


class _Recorder:
    """Wraps `ProbeSet.stream` and `ProbeSet.tensors` to record what the engine asks of the probe."""

    def __init__(self, monkeypatch) -> None:
        self.streams: list[dict] = []
        stream = ProbeSet.stream
        recorder = self

        def recorded(probe, batches, device, images=True, labels=True, prefetch=2):
            batches = [list(batch) for batch in batches]
            recorder.streams.append({"batches": batches, "images": images, "labels": labels})
            return stream(probe, batches, device, images=images, labels=labels, prefetch=prefetch)

        def refused(probe, device):
            raise AssertionError("the engine copied the whole probe (probe.tensors)")

        monkeypatch.setattr(ProbeSet, "stream", recorded)
        monkeypatch.setattr(ProbeSet, "tensors", refused)


def test_the_engine_reads_images_then_labels_batch_by_batch_and_never_the_whole_probe(probes, monkeypatch):
    recorder = _Recorder(monkeypatch)
    probe = probes["streamed"]
    ld.dissect(model(), probe, LAYERS, quantile=0.05, batch_size=6, activation_cache_bytes=BUDGETS["two batches"],
               activation_spill=False)
    batches = [list(range(start, min(start + 6, len(probe)))) for start in range(0, len(probe), 6)]
    assert recorder.streams == [
        {"batches": batches, "images": True, "labels": False},       # pass one: the model's inputs
        {"batches": batches[:2], "images": False, "labels": True},   # pass two, activations kept: labels
        {"batches": batches[2:], "images": True, "labels": True},    # the rest: the model runs again
    ]
    recorder.streams.clear()
    # The activations beyond the budget spilled to disk (the default): pass two reads labels only.
    ld.dissect(model(), probe, LAYERS, quantile=0.05, batch_size=6, activation_cache_bytes=BUDGETS["two batches"])
    assert recorder.streams == [{"batches": batches, "images": True, "labels": False},
                                {"batches": batches, "images": False, "labels": True}]
    recorder.streams.clear()
    activations = {"stem": torch.randn(len(probe), 2, 4, 4, generator=torch.Generator().manual_seed(0))}
    ld.dissect_activations(activations, probe, batch_size=6)
    assert recorder.streams == [{"batches": batches, "images": False, "labels": True}]  # no image is read


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "probe-prefetch"]


@pytest.mark.parametrize("failing_pass", [1, 2])
def test_a_dissection_that_fails_midway_stops_reading_ahead(probes, failing_pass):
    net, calls = model(), []

    def fail_at_the_third_batch(module, inputs, output):
        calls.append(1)
        if len(calls) == (3 if failing_pass == 1 else 7 + 3):
            raise RuntimeError("out of memory, say")

    net.head.register_forward_hook(fail_at_the_third_batch)
    with pytest.raises(RuntimeError, match="out of memory"):  # not spilled: pass two runs the model again
        ld.dissect(net, probes["streamed"], LAYERS, batch_size=6, activation_cache_bytes=0, activation_spill=False)
    assert prefetch_threads() == []


class ThreadGroup:
    """The collectives of `world_size` ranks that are threads of this process."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world_size


class ThreadSynchronizer(DistributedSynchronizer):
    def __init__(self, rank: int, group: ThreadGroup) -> None:
        super().__init__(rank, group.world_size)
        self.group = group

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.group.slots[self.rank] = tensor.clone()
        self.group.barrier.wait()
        gathered = torch.stack([slot for slot in self.group.slots if slot is not None])
        self.group.barrier.wait()  # everyone has read the slots before they are written again
        return gathered

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_gather(tensor).sum(0)


def test_each_rank_streams_its_shard_and_every_rank_gets_the_single_process_dissection(probes, monkeypatch):
    """Two ranks (threads) with strided shards, one reading its probe streamed and one from memory: their
    dissection equals the single-process one on every path, bit for bit."""
    recorder = _Recorder(monkeypatch)
    net = model()
    expected = ld.dissect(net, probes["in memory"], LAYERS, quantile=0.05, batch_size=4)
    recorder.streams.clear()
    group = ThreadGroup(2)
    results: dict[int, object] = {}

    def rank(number: int, probe: ProbeSet) -> None:
        try:
            results[number] = ld.dissect(copy.deepcopy(net), probe, LAYERS, quantile=0.05, batch_size=4,
                                         activation_cache_bytes=BUDGETS["two batches"] // 3,
                                         synchronizer=ThreadSynchronizer(number, group))
        except BaseException as error:  # shown by the assertion below
            results[number] = error
            group.barrier.abort()

    threads = [threading.Thread(target=rank, args=(0, probes["streamed"])),
               threading.Thread(target=rank, args=(1, probes["in memory"]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for number in (0, 1):
        result = results[number]
        assert isinstance(result, ld.Dissection), result
        assert_same(result, expected)
    first_passes = [stream["batches"] for stream in recorder.streams if stream["images"] and not stream["labels"]]
    n = len(probes["streamed"])
    assert sorted([position for batch in batches for position in batch] for batches in first_passes) == [
        list(range(0, n, 2)), list(range(1, n, 2))]


@pytest.mark.parametrize("device", DEVICES)
def test_streamed_and_kept_dissections_agree_on_every_device(probes, device):
    """On an accelerator the kept probe is copied whole to the device and indexed there; the streamed
    one travels batch by batch (pinned, on a copy stream); both give the same numbers."""
    net = model().to(device)
    kept = ld.dissect(net, probes["kept"], LAYERS, quantile=0.05, batch_size=6, device=device)
    streamed = ld.dissect(net, probes["streamed"], LAYERS, quantile=0.05, batch_size=6, device=device)
    assert_same(streamed, kept)
    if device != "cpu":
        assert probes["kept"].kept_on(device) and not probes["streamed"].kept_on(device)
        probes["kept"].release()


@pytest.mark.parametrize("denominator", ["paper", "lite", "global"])
def test_the_tally_in_groups_of_images_and_chunks_of_mask_pixels_counts_what_the_whole_batch_counts(
        probes, monkeypatch, denominator):
    from lightning_dissect.engine import tally

    net = model()
    options = dict(quantile=0.05, batch_size=6, denominator=denominator)
    monkeypatch.setattr(tally, "MASK_IMAGES", 1000)
    monkeypatch.setattr(tally, "MASK_PIXEL_CHUNK", 2**40)
    whole = ld.dissect(net, probes["in memory"], LAYERS, **options)
    assert whole["stem"].intersection.sum() > 0
    monkeypatch.setattr(tally, "MASK_IMAGES", 4)  # batches of 6: groups of 4 and 2
    monkeypatch.setattr(tally, "MASK_PIXEL_CHUNK", 7)
    assert_same(ld.dissect(net, probes["streamed"], LAYERS, **options), whole)
