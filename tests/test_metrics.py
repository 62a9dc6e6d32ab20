"""The engine's statistics as torchmetrics Metrics: exact, resumable, mergeable across processes.

`ActivationThresholds`, `TopImages` and `IoUTally` against slow references (`torch.quantile`, a
sort, `tests/dense.py`), through `update`/`compute`/`reset`/`state_dict`, `forward`, and a
2-process reduction simulated with torchmetrics' own sync path (a gather that hands each state the
other shard's): the merged result equals the single-process one bit for bit. `tests/test_distributed.py`
does the same in a real gloo group.
"""

from __future__ import annotations

import pytest
import torch

import lightning_dissect as ld
from lightning_dissect.engine.scores import iou
from lightning_dissect.engine.tally import IoUTally
from lightning_dissect.engine.thresholds import ActivationThresholds, merge_top_values
from lightning_dissect.engine.top_images import TopImages, merge_top_image_states
from tests.conftest import DEVICES
from tests.dense import dense_tally, dense_thresholds


def coarse_maps(images: int, units: int, side: int, seed: int) -> torch.Tensor:
    """Maps with many exact ties (halves), at thresholds and among per-image maxima."""
    return (torch.randn(images, units, side, side, generator=torch.Generator().manual_seed(seed)) * 2).round() / 2


def batches(maps: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(maps, probe positions)` of consecutive batches."""
    positions = torch.arange(maps.shape[0])
    return list(zip(maps.split(size), positions.split(size)))


def shards(maps: torch.Tensor, world: int, size: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The strided shards of the engine's distributed runs, in batches."""
    positions = torch.arange(maps.shape[0])
    return [list(zip(maps[rank::world].split(size), positions[rank::world].split(size))) for rank in range(world)]


def sync_with(metric, others) -> None:
    """torchmetrics' sync of `metric` as if `others` were the other ranks (rank order: metric first),
    as the engine calls it (its metrics have `sync_on_compute=False`: the sync is explicit)."""
    states = {name: [other.metric_state[name] for other in others] for name in metric.metric_state}
    calls = iter(metric.metric_state)  # torchmetrics gathers the states in this order

    def gather(tensor, group=None):
        return [tensor, *states[next(calls)]]

    metric.sync(dist_sync_fn=gather, distributed_available=lambda: True)


# ---------------------------------------------------------------- thresholds

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantile", [0.005, 0.1, 0.5])
def test_thresholds_metric_equals_torch_quantile(device, quantile):
    maps = coarse_maps(23, 5, 4, seed=1).to(device)
    metric = ActivationThresholds(5, 23 * 16, quantile).to(device)
    for batch, _ in batches(maps, 4):
        metric.update(batch)
    assert torch.equal(metric.compute(), dense_thresholds(maps, quantile))


@pytest.mark.parametrize("device", DEVICES)
def test_thresholds_metric_reset_and_state_dict_round_trip(device):
    maps = coarse_maps(20, 3, 3, seed=2).to(device)
    parts = batches(maps, 6)
    first = ActivationThresholds(3, 20 * 9, 0.05).to(device)
    for batch, _ in parts[:2]:
        first.update(batch)
    resumed = ActivationThresholds(3, 20 * 9, 0.05).to(device)
    resumed.load_state_dict(first.state_dict())
    for batch, _ in parts[2:]:
        resumed.update(batch)
        first.update(batch)
    expected = dense_thresholds(maps, 0.05)
    assert torch.equal(resumed.compute(), expected) and torch.equal(first.compute(), expected)
    first.reset()
    assert int(first.seen) == 0 and bool(torch.isinf(first.top).all())
    for batch, _ in parts:
        first.update(batch)
    assert torch.equal(first.compute(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_the_threshold_state_is_held_once_however_the_metric_is_moved_and_reset(device):
    """torchmetrics keeps every state's default for `reset`; `top`'s is one value, so the metric's tensors
    hold the state's bytes once (plus a few), before and after `.to`, `reset` and updates."""
    metric = ActivationThresholds(4, 50 * 9, 0.2).to(device)
    state_bytes = metric.top.numel() * metric.top.element_size()

    def held() -> int:
        storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
                    for tensor in (*metric._defaults.values(), metric.top, metric.seen)}
        return sum(storages.values())

    assert held() <= state_bytes + 64
    maps = coarse_maps(50, 4, 3, seed=5).to(device)
    for batch, _ in batches(maps, 8):
        metric.update(batch)
    expected = dense_thresholds(maps, 0.2)
    assert torch.equal(metric.compute(), expected) and held() <= state_bytes + 64
    metric.reset()  # a full, writable state again, not a view of the one default value
    assert metric.top.is_contiguous() and bool(torch.isinf(metric.top).all()) and held() <= state_bytes + 64
    for batch, _ in batches(maps, 8):
        metric.update(batch)
    assert torch.equal(metric.compute(), expected) and bool(torch.isinf(metric._defaults["top"]).all())
    assert metric.half().top.dtype == torch.float32  # torchmetrics' guard: a state is moved, not cast


@pytest.mark.parametrize("world", [2, 3])
def test_thresholds_merged_across_shards_equal_the_single_process_ones(world):
    maps = coarse_maps(17, 4, 3, seed=world)
    single = ActivationThresholds(4, 17 * 9, 0.1)
    for batch, _ in batches(maps, 5):
        single.update(batch)
    ranks = [ActivationThresholds(4, 17 * 9, 0.1, sync_on_compute=False) for _ in range(world)]
    for metric, shard in zip(ranks, shards(maps, world, 5)):
        for batch, _ in shard:
            metric.update(batch)
    # The reduction itself, on stacked states ...
    merged = merge_top_values(torch.stack([metric.top for metric in ranks]))
    assert torch.equal(merged.sort(dim=1).values, single.top.sort(dim=1).values)  # the same values, any order
    # ... and through torchmetrics' sync, as the engine and DDP users run it.
    sync_with(ranks[0], ranks[1:])
    assert int(ranks[0].seen) == 17 * 9
    assert torch.equal(ranks[0].compute(), single.compute())
    assert torch.equal(single.compute(), dense_thresholds(maps, 0.1))


def test_a_rank_that_saw_fewer_values_than_k_merges_exactly():
    """Empty slots (-inf) of a rank with few values sort below every real value."""
    maps = coarse_maps(3, 2, 2, seed=5)  # 12 values per unit; q = 0.5 needs the top 7
    single = ActivationThresholds(2, 12, 0.5)
    single.update(maps)
    ranks = [ActivationThresholds(2, 12, 0.5, sync_on_compute=False) for _ in range(2)]
    ranks[0].update(maps[:1])  # 4 values, fewer than k
    ranks[1].update(maps[1:])
    sync_with(ranks[0], ranks[1:])
    assert torch.equal(ranks[0].compute(), single.compute())
    assert torch.equal(single.compute(), dense_thresholds(maps, 0.5))


def test_thresholds_metric_forward_accumulates_like_update():
    maps = coarse_maps(12, 3, 3, seed=6)
    by_update, by_forward = ActivationThresholds(3, 108, 0.1), ActivationThresholds(3, 108, 0.1)
    for batch, _ in batches(maps, 5):
        by_update.update(batch)
        by_forward(batch)
    assert torch.equal(by_forward.top.sort(dim=1).values, by_update.top.sort(dim=1).values)
    assert torch.equal(by_forward.compute(), by_update.compute())


def test_thresholds_metric_forward_merges_states_that_are_not_full_yet():
    """torchmetrics' forward merges the running state with each batch's; with k above the values seen
    so far, the merged states still have empty slots, which later batches fill."""
    maps = coarse_maps(30, 2, 3, seed=8)  # 9 values per image and unit; q = 0.1 of 270 needs the top 28
    by_update, by_forward = ActivationThresholds(2, 270, 0.1), ActivationThresholds(2, 270, 0.1)
    for batch, _ in batches(maps, 1):
        by_update.update(batch)
        by_forward(batch)
    assert torch.equal(by_forward.compute(), by_update.compute())
    assert torch.equal(by_update.compute(), dense_thresholds(maps, 0.1))


def test_thresholds_metric_refuses_maps_of_another_layer():
    with pytest.raises(ValueError, match=r"expected \(B, 3, \.\.\.\)"):
        ActivationThresholds(3, 100).update(torch.zeros(2, 4, 5, 5))
    with pytest.raises(ValueError, match="quantile"):
        ActivationThresholds(3, 100, quantile=1.0)


# ---------------------------------------------------------------- top images

def brute_force_top_images(maps: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    peaks = maps.amax(dim=(2, 3))
    positions = [sorted(range(maps.shape[0]), key=lambda x, u=u: (-peaks[x, u].item(), x))[:k]
                 for u in range(maps.shape[1])]
    index = torch.tensor(positions)
    return peaks.t().gather(1, index), index


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 4, 30])
def test_top_images_metric_equals_a_sort_with_ties_to_the_lower_position(device, k):
    maps = coarse_maps(13, 4, 3, seed=k).to(device)
    metric = TopImages(4, k).to(device)
    for batch, positions in batches(maps, 4):
        metric.update(batch, positions.to(device))
    values, positions = metric.compute()
    expected_values, expected_positions = brute_force_top_images(maps.cpu(), k)
    assert torch.equal(positions.cpu(), expected_positions) and torch.equal(values.cpu(), expected_values)
    assert values.dtype == torch.float32 and positions.dtype == torch.long


@pytest.mark.parametrize("world", [2, 3])
def test_top_images_merged_across_shards_equal_the_single_process_ones(world):
    maps = coarse_maps(11, 3, 2, seed=world)
    single = TopImages(3, 5)
    for batch, positions in batches(maps, 3):
        single.update(batch, positions)
    ranks = [TopImages(3, 5, sync_on_compute=False) for _ in range(world)]
    for metric, shard in zip(ranks, shards(maps, world, 3)):
        for batch, positions in shard:
            metric.update(batch, positions)
    assert torch.equal(merge_top_image_states(torch.stack([metric.top for metric in ranks])), single.top)
    sync_with(ranks[0], ranks[1:])
    for got, expected in zip(ranks[0].compute(), single.compute()):
        assert torch.equal(got, expected)


def test_top_images_round_trip_and_fewer_images_than_k():
    maps = coarse_maps(3, 2, 2, seed=9)
    metric = TopImages(2, 10)
    metric.update(maps[:2], torch.tensor([0, 1]))
    again = TopImages(2, 10)
    again.load_state_dict(metric.state_dict())
    again.update(maps[2:], torch.tensor([2]))
    values, positions = again.compute()
    assert positions.shape == (2, 3)  # only the images seen
    assert torch.equal(positions, brute_force_top_images(maps, 3)[1])
    again.reset()
    assert int(again.images) == 0 and bool((again.top[..., 0] == -float("inf")).all())


# ---------------------------------------------------------------- tally

def tally_inputs(probe, positions: torch.Tensor, device) -> list[torch.Tensor]:
    return [probe.label_maps[positions].to(device), probe.image_labels[positions].to(device),
            probe.category_present[positions].to(device), probe.image_level_present[positions].to(device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("denominator", ["paper", "lite", "global"])
def test_tally_metric_equals_the_dense_tally_and_merges_across_shards(random_dataset, device, denominator):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    maps = coarse_maps(len(probe), 5, 4, seed=3).to(device)
    thresholds = dense_thresholds(maps, 0.1)
    label_category = probe.label_category.to(device)

    def tally() -> IoUTally:
        return IoUTally(thresholds, label_category, len(probe.categories), denominator,
                        sync_on_compute=False).to(device)

    single = tally()
    for batch, positions in batches(maps, 5):
        single.update(batch, *tally_inputs(probe, positions, device))
    expected = dense_tally(maps, thresholds, probe.label_maps.to(device), probe.image_labels.to(device),
                           label_category, len(probe.categories), denominator)
    assert torch.equal(single.intersection, expected[0]) and torch.equal(single.unit_area, expected[1])
    ranks = [tally() for _ in range(2)]
    for metric, shard in zip(ranks, shards(maps, 2, 4)):
        for batch, positions in shard:
            metric.update(batch, *tally_inputs(probe, positions, device))
    sync_with(ranks[0], ranks[1:])
    assert torch.equal(ranks[0].intersection, expected[0]) and torch.equal(ranks[0].unit_area, expected[1])
    restored = tally()
    restored.load_state_dict(single.state_dict())
    assert torch.equal(restored.intersection, expected[0])
    restored.reset()
    assert int(restored.intersection.sum()) == 0 and int(restored.unit_area.sum()) == 0


@pytest.mark.parametrize("threads, groups, share", [(4, 4, 1), (4, 2, 2)])
def test_the_tally_on_worker_threads_counts_what_the_dense_tally_counts_and_leaves_the_callers_threads_alone(
        random_dataset, monkeypatch, threads, groups, share):
    """Image groups counted on worker threads, each with its share of the intra-op threads: the same sums
    (integers, in any order), and the calling thread's count as it was, even after `torch.set_num_threads`
    (which a new thread's first operation would otherwise copy over the worker's share)."""
    from lightning_dissect.engine import tally as tally_module
    from lightning_dissect.engine.tally_threads import tally_threads

    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    maps = coarse_maps(len(probe), 5, 4, seed=5)
    thresholds = dense_thresholds(maps, 0.1)
    monkeypatch.setattr(tally_module, "MASK_IMAGES", 2)  # batches of 7: four groups, the last of one image
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tally_threads(torch.device("cpu"), groups) as workers:
            assert workers is not None
            assert workers.submit(torch.get_num_threads).result() == share
            tally = IoUTally(thresholds, probe.label_category, len(probe.categories), "lite")
            for batch, positions in batches(maps, 7):
                tally.update(batch, *tally_inputs(probe, positions, "cpu"), workers=workers)
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    expected = dense_tally(maps, thresholds, probe.label_maps, probe.image_labels, probe.label_category,
                           len(probe.categories), "lite")
    assert torch.equal(tally.intersection, expected[0]) and torch.equal(tally.unit_area, expected[1])


def test_the_tally_runs_on_the_calling_thread_off_the_cpu_or_with_one_thread():
    from lightning_dissect.engine.tally_threads import tally_threads

    with tally_threads(torch.device("cuda"), 4) as workers:  # a device object needs no CUDA
        assert workers is None
    with tally_threads(torch.device("cpu"), 1) as workers:
        assert workers is None
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tally_threads(torch.device("cpu"), 4) as workers:
            assert workers is None
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- a user's own loop

def test_a_users_own_loop_gives_the_engines_numbers(random_dataset):
    """The two passes written out with the metrics, as a validation loop would: the engine's IoU."""
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    maps = coarse_maps(len(probe), 6, 3, seed=4)
    loader = batches(maps, 7)
    thresholds = ActivationThresholds(num_units=6, num_values=maps[:, 0].numel(), quantile=0.1)
    images = TopImages(num_units=6, k=3)
    for batch, positions in loader:
        thresholds.update(batch)
        images.update(batch, positions)
    tally = IoUTally(thresholds.compute(), probe.label_category, len(probe.categories))
    for batch, positions in loader:
        tally.update(batch, *tally_inputs(probe, positions, "cpu"))
    intersection, unit_area = tally.compute()
    scores = iou(intersection, unit_area, probe.label_area, probe.label_category)
    engine = ld.dissect_activations({"l": maps}, probe, quantile=0.1, top_k=3)["l"]
    assert torch.equal(thresholds.compute(), engine.thresholds)
    assert torch.equal(scores, engine.iou)
    assert torch.equal(images.compute()[1], engine.top_images)
