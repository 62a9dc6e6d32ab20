"""Pass one's activations beyond the memory budget wait on disk for pass two: exact, bounded, never left behind."""

from __future__ import annotations

import errno
import os
import threading
import time
import warnings
from types import SimpleNamespace

import pytest
import torch

import lightning_dissect as ld
from lightning_dissect.engine import spill as spill_module
from lightning_dissect.engine.activation_cache import ActivationCache
from lightning_dissect.engine.spill import ActivationSpill
from lightning_dissect.probe import ProbeSet
from tests.conftest import DEVICES, random_broden
from tests.test_streaming import BUDGETS, LAYERS, assert_same, model


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """41 images (7 batches of 6), streamed from the mapped cache."""
    dataset = random_broden(tmp_path_factory.mktemp("spill") / "broden", num_images=41, image_size=24, seed=3)
    return ProbeSet(dataset, cache_dir=tmp_path_factory.mktemp("spill-cache"), device_budget_bytes=0)


def batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"stem": torch.randn(3, 5, 6, 6, generator=generator),
            "head": torch.randn(3, 7, 3, 3, generator=generator).to(torch.bfloat16),
            "half": torch.randn(2, 4, generator=generator).to(torch.float16)[:, ::2]}  # not contiguous


def same_bits(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert torch.equal(bytes_of(got[name]), bytes_of(value)), name


def bytes_of(value: torch.Tensor) -> torch.Tensor:
    return value.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("device", DEVICES)
def test_batches_come_back_bit_for_bit_in_any_dtype_and_the_file_has_no_name(tmp_path, device):
    with ActivationSpill(tmp_path) as spill:
        for number in range(4):
            assert spill.put(number, {name: value.to(device) for name, value in batch(number).items()})
        assert len(spill) == 4 and 2 in spill and 4 not in spill
        assert os.listdir(tmp_path) == []  # nothing to clean up, however the process ends
        for number in range(4):
            maps = spill.get(number, device)
            assert all(value.device.type == device for value in maps.values())
            same_bits({name: value.cpu() for name, value in maps.items()}, batch(number))
        assert len(spill) == 0
    assert spill.bytes_written == 4 * sum(value.numel() * value.element_size() for value in batch(0).values())


def spill_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name in ("spill-prefetch", "spill-write")]


def wait_for(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("device", DEVICES)
def test_write_behind_puts_the_batches_in_order_one_behind_and_all_of_them_by_the_end(tmp_path, device,
                                                                                      monkeypatch):
    put: list[int] = []
    go = threading.Event()
    real_put = ActivationSpill.put

    def held(spill, number, maps):
        put.append(number)
        go.wait(10)
        return real_put(spill, number, maps)

    monkeypatch.setattr(ActivationSpill, "put", held)
    with ActivationSpill(tmp_path) as spill:
        with spill.write_behind() as write:
            write(0, {name: value.to(device) for name, value in batch(0).items()})
            wait_for(lambda: put == [0])  # the thread writes batch 0: the caller goes on
            write(1, batch(1))  # waits in the queue
            third = threading.Thread(target=write, args=(2, batch(2)))
            third.start()
            third.join(0.2)
            waited, threads = third.is_alive(), len(spill_threads())
            go.set()
            assert waited  # no room for a third batch while one is written and one waits
            assert threads == 1
            third.join()
            for number in range(3, 6):
                write(number, batch(number))
        assert put == list(range(6)) and len(spill) == 6  # every batch written once the block ended
        assert spill_threads() == []
        for number in range(6):
            same_bits(spill.get(number, "cpu"), batch(number))


def test_a_write_behind_error_is_raised_in_the_caller_and_the_batches_after_it_are_not_written(tmp_path,
                                                                                                 monkeypatch):
    real_put = ActivationSpill.put

    def fails_at_one(spill, number, maps):
        if number == 1:
            raise RuntimeError("a write that fails")
        return real_put(spill, number, maps)

    monkeypatch.setattr(ActivationSpill, "put", fails_at_one)
    with ActivationSpill(tmp_path) as spill:
        with pytest.raises(RuntimeError, match="a write that fails"):
            with spill.write_behind() as write:
                for number in range(4):
                    write(number, batch(number))
        assert spill_threads() == []
        assert [number in spill for number in range(4)] == [True, False, False, False]
        same_bits(spill.get(0, "cpu"), batch(0))


def test_a_caller_error_stops_the_write_behind_leaving_the_queued_batch_unwritten(tmp_path, monkeypatch):
    real_put = ActivationSpill.put

    def slow(spill, number, maps):
        time.sleep(0.3)
        return real_put(spill, number, maps)

    monkeypatch.setattr(ActivationSpill, "put", slow)
    with ActivationSpill(tmp_path) as spill:
        with pytest.raises(KeyboardInterrupt):
            with spill.write_behind() as write:
                write(0, batch(0))
                write(1, batch(1))
                raise KeyboardInterrupt
        assert spill_threads() == []
        assert 0 in spill and 1 not in spill  # the batch being written is finished, the one waiting dropped


@pytest.mark.parametrize("device", DEVICES)
def test_read_ahead_gives_the_batches_in_order_reading_one_ahead_and_stops_when_closed(tmp_path, device,
                                                                                       monkeypatch):
    read: list[int] = []
    real_get = ActivationSpill.get

    def counted(spill, number, where):
        read.append(number)
        return real_get(spill, number, where)

    monkeypatch.setattr(ActivationSpill, "get", counted)
    with ActivationSpill(tmp_path) as spill:
        for number in range(6):
            assert spill.put(number, batch(number))
        batches = spill.read_ahead(range(1, 6), device)
        first = next(batches)
        same_bits({name: value.cpu() for name, value in first.items()}, batch(1))
        assert all(value.device.type == device for value in first.values())
        time.sleep(0.2)
        assert read == [1, 2, 3]  # the batch given, one queued, one read and waiting for room
        assert len(spill_threads()) == 1
        batches.close()
        assert spill_threads() == []
        assert len(spill) == 6 - len(read)
        for number, maps in zip(range(4, 6), spill.read_ahead(range(4, 6), device)):
            same_bits({name: value.cpu() for name, value in maps.items()}, batch(number))
        assert spill_threads() == []


def test_a_batch_the_disk_reserve_cannot_take_is_not_written_and_none_after_it(tmp_path, monkeypatch):
    free = {"bytes": 10**12}
    monkeypatch.setattr(spill_module.shutil, "disk_usage", lambda folder: SimpleNamespace(free=free["bytes"]))
    with ActivationSpill(tmp_path, reserve_bytes=1000) as spill:
        assert spill.put(0, batch(0))
        free["bytes"] = 1000 + 10  # the next batch would eat into the reserve
        assert not spill.put(1, batch(1)) and spill.full
        free["bytes"] = 10**12
        assert not spill.put(2, batch(2))  # a spill that once refused stays closed: the rest runs again
        assert len(spill) == 1
        same_bits(spill.get(0, "cpu"), batch(0))


def test_a_write_that_fails_midway_is_cut_off_and_the_batches_before_it_stay_exact(tmp_path, monkeypatch):
    real_write, writes = spill_module._write_all, []

    def full_disk_at_the_fifth_write(file, data):
        writes.append(1)
        if len(writes) == 5:  # the second layer of batch 1: its first layer is already in the file
            real_write(file, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(file, data)

    monkeypatch.setattr(spill_module, "_write_all", full_disk_at_the_fifth_write)
    with ActivationSpill(tmp_path, reserve_bytes=0) as spill:
        assert spill.put(0, batch(0))
        written = spill.bytes_written
        assert not spill.put(1, batch(1)) and spill.full and 1 not in spill
        assert spill.bytes_written == written == os.fstat(spill._file.fileno()).st_size
        same_bits(spill.get(0, "cpu"), batch(0))


def test_a_folder_where_no_file_can_be_made_warns_and_spills_nothing(tmp_path, monkeypatch):
    def refused(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(spill_module.tempfile, "TemporaryFile", refused)
    with ActivationSpill(tmp_path, reserve_bytes=0) as spill:
        with pytest.warns(RuntimeWarning, match="could not make the activation spill file in .*=FOLDER"):
            assert not spill.put(0, batch(0))
        assert spill.full and len(spill) == 0


@pytest.mark.parametrize("value", ["no/such/folder", 3])
def test_activation_spill_must_be_a_flag_or_an_existing_folder(probe, value):
    with pytest.raises(ValueError, match="activation_spill=.* must be True .*, False .* or an existing folder"):
        ld.dissect(model(), probe, LAYERS, activation_spill=value)


class ForwardCounter:
    def __init__(self, net: torch.nn.Module) -> None:
        self.calls = 0
        net.stem.register_forward_hook(self.count)  # the engine stops a forward after its last layer

    def count(self, module, inputs, output) -> None:
        self.calls += 1


def test_spilled_recomputed_and_kept_activations_give_the_same_dissection(probe, tmp_path, monkeypatch):
    """41 images in batches of 6: 7 batches; the budget keeps two in memory. Spilled, the model runs once
    per batch (plus the check pass's one call); not spilled, again for the five others; with a disk that
    takes two batches, again for the last three. Every way gives the all-in-memory numbers."""
    options = dict(quantile=0.05, batch_size=6)
    expected = ld.dissect(model(), probe, LAYERS, activation_cache_bytes=BUDGETS["all"], **options)
    runs = {}
    for name, spill_option in (("spilled", tmp_path), ("not spilled", False), ("default", True)):
        net = model()
        counter = ForwardCounter(net)
        runs[name] = ld.dissect(net, probe, LAYERS, activation_cache_bytes=BUDGETS["two batches"],
                                activation_spill=spill_option, **options), counter.calls
    real_put = ActivationSpill.put

    def two_batches_fit(spill, number, maps):
        return real_put(spill, number, maps) if len(spill) < 2 and not spill.full else False

    monkeypatch.setattr(ActivationSpill, "put", two_batches_fit)
    net = model()
    counter = ForwardCounter(net)
    runs["disk full after two"] = ld.dissect(net, probe, LAYERS, activation_cache_bytes=BUDGETS["two batches"],
                                             activation_spill=tmp_path, **options), counter.calls
    counts = {name: (result.settings["activations_spilled"], result.settings["activations_recomputed"], calls)
              for name, (result, calls) in runs.items()}
    assert counts == {"spilled": (5, 0, 1 + 7), "default": (5, 0, 1 + 7), "not spilled": (0, 5, 1 + 7 + 5),
                      "disk full after two": (2, 3, 1 + 7 + 3)}
    for result, _ in runs.values():
        assert not result.settings["activations_cached"]
        assert_same(result, expected)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("device", DEVICES)
def test_the_memory_cache_keeps_copies_of_the_leading_batches_that_fit_and_lets_them_go_after_the_last(device):
    """Batches of 3, 3, 3 and 2 images at 48 bytes an image: a budget of two batches' bytes keeps two, one byte
    less keeps one, and a batch after one that did not fit is never kept. The kept maps are copies (the
    tensors handed in can change or go), come back bit for bit, and the blocks go with the last one taken."""
    sizes = [3, 3, 3, 2]

    def maps(number: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(number)
        return {"a": torch.randn(sizes[number], 2, 2, 2, generator=generator).to(device),
                "b": torch.randn(sizes[number], 1, 2, 2, generator=generator).to(device)}

    for budget, fits in ((6 * 48, 2), (6 * 48 - 1, 1), (0, 0), (11 * 48, 4)):
        cache = ActivationCache(budget, sizes)
        originals = [maps(number) for number in range(len(sizes))]
        kept = [cache.keep(number, batch) for number, batch in enumerate(originals)]
        assert kept == [number < fits for number in range(len(sizes))] and len(cache) == fits
        for batch in originals:
            for value in batch.values():
                value.fill_(7.0)  # the caller's tensors change: the kept copies do not
        for number in range(fits):
            assert cache.blocks  # held until the last kept batch is taken
            same_bits(cache.take(number), maps(number))
        assert cache.blocks == {}
        with pytest.raises(IndexError, match=f"batch {fits} is not kept"):
            cache.take(fits)
    in_order = ActivationCache(11 * 48, sizes)  # a batch after one that was not kept is not kept either
    assert [in_order.keep(number, maps(number)) for number in (1, 0, 2)] == [False, True, False]


@pytest.mark.parametrize("kept", ["spill", "memory"])
def test_pass_two_reads_pass_one_bits_not_a_second_forward(probe, tmp_path, kept):
    """A model whose outputs change from call to call (a nondeterministic kernel, say): with the spill, or
    every batch kept in memory, pass two tallies exactly the maps the thresholds were read from, so the
    dissection is the one of the activations pass one saw."""
    net, seen = model(), {name: [] for name in LAYERS}
    calls = {"n": 0}

    def drifting(module, inputs, output):
        calls["n"] += 1
        return output + 1e-3 * calls["n"]

    net.stem.register_forward_hook(drifting)
    for name in LAYERS:
        net.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, name=name: seen[name].append(output.detach().clone()))
    budget = dict(activation_cache_bytes=0, activation_spill=tmp_path) if kept == "spill" else dict(
        activation_spill=False)
    result = ld.dissect(net, probe, LAYERS, quantile=0.05, batch_size=6, **budget)
    if kept == "spill":
        assert result.settings["activations_spilled"] == 7
    else:
        assert result.settings["activations_cached"]
    activations = {name: torch.cat(outputs[1:]) for name, outputs in seen.items()}  # [0]: the check pass
    assert_same(result, ld.dissect_activations(activations, probe, quantile=0.05, batch_size=6))


@pytest.mark.parametrize("method", ["put", "get"])  # pass one's writes (behind the model), pass two's reads
def test_a_dissection_whose_spill_fails_raises_it_closes_the_file_and_stops_its_threads(probe, tmp_path, monkeypatch,
                                                                                        method):
    opened: list[ActivationSpill] = []
    real_init = ActivationSpill.__init__

    def recorded(spill, *args, **kwargs):
        real_init(spill, *args, **kwargs)
        opened.append(spill)

    def fail(spill, number, *args):
        raise RuntimeError(f"a {method} that fails")

    monkeypatch.setattr(ActivationSpill, "__init__", recorded)
    monkeypatch.setattr(ActivationSpill, method, fail)
    with pytest.raises(RuntimeError, match=f"a {method} that fails"):
        ld.dissect(model(), probe, LAYERS, batch_size=6, activation_cache_bytes=0, activation_spill=tmp_path)
    assert len(opened) == 1
    file = opened[0]._file
    assert (file is None and method == "put") or (file is not None and file.closed)  # pass one wrote it
    assert spill_threads() == []  # the write-behind or the read-ahead stopped too


def test_a_probe_that_fits_the_budget_never_touches_the_disk(probe, monkeypatch):
    def refused(**kwargs):
        raise AssertionError("a spill file was made")

    monkeypatch.setattr(spill_module.tempfile, "TemporaryFile", refused)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = ld.dissect(model(), probe, LAYERS, quantile=0.05, batch_size=6)
    assert result.settings["activations_cached"] and result.settings["activations_spilled"] == 0
