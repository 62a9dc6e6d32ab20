"""The engine's masks and tallies against the straightforward dense method: equal bit for bit.

`engine.masks.mask_pixels` takes whichever fast path the layer's shape, the device and the torch
build make exact and cheap (`engine/_fast_masks.py`); these tests do not ask which one ran. They
hold the result to the dense definition (`tests/dense.py`) on random inputs, on thresholds placed
exactly on upsampled values, at the edges of the maps, for every shape class (upsampling by 8x and
by 2x, equal sizes, downsampling, few and many units), on the reference path too, and when the
kernel check rejects the tiles. On CUDA the dense method runs on the same device, so the comparison
stays exact there.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_dissect as ld
from lightning_dissect.engine import _fast_masks
from lightning_dissect.engine.masks import mask_pixels, reference_path
from tests.conftest import DEVICES
from tests.dense import dense_pixels, dense_tally, dense_thresholds

SHAPES = [((14, 14), (112, 112)), ((7, 7), (112, 112)), ((13, 13), (113, 113)), ((5, 9), (70, 81)),
          ((4, 4), (8, 8)), ((3, 5), (8, 16)), ((28, 28), (112, 112)), ((6, 6), (10, 10)), ((8, 8), (8, 8)),
          ((20, 20), (8, 8)), ((16, 16), (32, 32)), ((64, 64), (32, 32)), ((56, 56), (112, 112)),
          ((9, 9), (9, 9)), ((9, 9), (30, 30)), ((112, 112), (112, 112))]


def fast_pixels(activations: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    maps, pixels = mask_pixels(activations, thresholds, size)
    return (maps * size[0] * size[1] + pixels).sort().values


def random_maps(batch: int, units: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Gaussian maps with a ReLU half (many exact zeros), a constant unit and a negative unit."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(batch, units, *shape, generator=g) * torch.rand(1, units, 1, 1, generator=g) * 4
    maps[:, : units // 2] = maps[:, : units // 2].relu()
    maps[:, -1] = 0.75
    maps[:, -2] -= 3
    return maps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,size", SHAPES)
@pytest.mark.parametrize("quantile", [0.005, 0.2])
def test_mask_pixels_equal_layer_tensor_interpolation(shape, size, quantile, device):
    maps = random_maps(6, 12, shape, seed=shape[0] * 100 + size[0]).to(device)
    thresholds = torch.quantile(maps.transpose(0, 1).flatten(1).double(), 1 - quantile, dim=1)
    assert torch.equal(fast_pixels(maps, thresholds, size), dense_pixels(maps, thresholds, size))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("units", [2, 7, 8, 12, 33])
@pytest.mark.parametrize("shape,size", [((9, 9), (9, 9)), ((9, 9), (30, 30)), ((9, 9), (112, 112)),
                                        ((16, 16), (32, 32)), ((20, 20), (8, 8)), ((14, 14), (112, 112))])
def test_mask_pixels_equal_the_layer_tensor_whatever_the_kernel_layout(shape, size, units, device):
    """Whether the kernel vectorises over units (which makes a unit's bits depend on its place in the
    layer tensor), returns its input at equal sizes or takes a channels-last path, the masks are the
    layer tensor's: for unit counts below, at and above the vector widths, from a channels-last input
    too, with thresholds on upsampled pixel values."""
    maps = (random_maps(3, units, shape, seed=units) * 3).round() / 3  # thirds: the interpolation rounds
    maps = maps.to(device)
    upsampled = torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    on_pixels = upsampled[1, :, size[0] // 2, size[1] // 3].double()
    for thresholds in [torch.quantile(maps.transpose(0, 1).flatten(1).double(), 0.9, dim=1), on_pixels]:
        expected = dense_pixels(maps, thresholds, size)
        assert torch.equal(fast_pixels(maps, thresholds, size), expected)
        channels_last = maps.contiguous(memory_format=torch.channels_last)
        assert torch.equal(fast_pixels(channels_last, thresholds, size), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,size", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[4], ((7, 7), (28, 28)),
                                        ((20, 20), (8, 8)), ((64, 64), (32, 32)), ((56, 56), (112, 112))])
def test_thresholds_on_upsampled_values_are_decided_like_the_kernel(shape, size, device):
    """Thresholds exactly at an upsampled pixel value, one float64 step either side, and at the
    float32 neighbours: the pixels there are within rounding reach, where only the kernel itself
    (for small outputs on CPU: run on the layer tensor, whose units 0-7 of a 12-unit tensor go
    through a vectorised path and units 8-11 through a scalar one) may decide."""
    maps = random_maps(4, 12, shape, seed=7).to(device)
    upsampled = torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(3)
    flat = upsampled.transpose(0, 1).flatten(1)  # (units, all pixels)
    random_pixel = flat[torch.arange(12), torch.randint(0, flat.shape[1], (12,), generator=g)].double()
    top_percent = flat.topk(flat.shape[1] // 100, dim=1).values[:, -1].double()
    on_threshold = 0
    for values in [random_pixel, top_percent]:
        up64, down64 = torch.nextafter(values, values + 1), torch.nextafter(values, values - 1)
        up32 = torch.nextafter(values.float(), values.float() + 1).double()
        down32 = torch.nextafter(values.float(), values.float() - 1).double()
        for thresholds in [values, up64, down64, up32, down32]:
            assert torch.equal(fast_pixels(maps, thresholds, size), dense_pixels(maps, thresholds, size))
        on_threshold += int((upsampled.double() == values.view(1, -1, 1, 1)).sum())
    assert on_threshold >= 24, "the thresholds do not sit on upsampled pixels: the test exercises nothing"


@pytest.mark.parametrize("device", DEVICES)
def test_zero_and_negative_thresholds(device):
    maps = torch.zeros(3, 4, 7, 7)
    maps[:, 1] = -torch.rand(3, 7, 7)  # all negative: the threshold is negative
    maps[0, 2, 3, 3] = 1.0  # one spike on zeros: threshold 0, the mask is the spike's footprint
    maps[:, 3, :, 0] = 2.0  # a column on the left edge
    maps = maps.to(device)
    thresholds = torch.tensor([0.0, -0.5, 0.0, 0.0], dtype=torch.float64, device=device)
    for size in [(112, 112), (113, 57)]:
        assert torch.equal(fast_pixels(maps, thresholds, size), dense_pixels(maps, thresholds, size))


@pytest.mark.parametrize("device", DEVICES)
def test_corner_and_edge_cells_reach_the_border_pixels(device):
    maps = torch.zeros(1, 4, 7, 7)
    for unit, (y, x) in enumerate([(0, 0), (0, 6), (6, 0), (6, 6)]):
        maps[0, unit, y, x] = 1.0
    maps = maps.to(device)
    thresholds = torch.full((4,), 0.3, dtype=torch.float64, device=device)
    pixels = fast_pixels(maps, thresholds, (112, 112))
    assert torch.equal(pixels, dense_pixels(maps, thresholds, (112, 112)))
    corners = {0: 0, 1: 111, 2: 111 * 112, 3: 112 * 112 - 1}
    for unit, corner in corners.items():
        assert unit * 112 * 112 + corner in pixels.tolist()


@pytest.mark.parametrize("shape,size", SHAPES)
def test_reference_path_equals_the_dense_method(shape, size):
    maps = random_maps(5, 12, shape, seed=shape[1] + size[1])
    thresholds = torch.quantile(maps.transpose(0, 1).flatten(1).double(), 0.9, dim=1)
    with reference_path():
        assert torch.equal(fast_pixels(maps, thresholds, size), dense_pixels(maps, thresholds, size))


@pytest.fixture
def fresh_kernel_probes():
    """Forget what the kernel probes learnt, before and after the test."""
    caches = [_fast_masks.tile_plan, _fast_masks.layout_free, _fast_masks.layer_kernel]
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def test_a_kernel_that_disagrees_with_the_tiles_falls_back_to_whole_maps(monkeypatch, fresh_kernel_probes):
    real = _fast_masks.axis_weights

    def shifted(in_size, out_size, fused=True):  # one source cell off: the probe must reject it
        i0, i1, w0, w1 = real(in_size, out_size, fused)
        return (i0 + 1).clamp(max=in_size - 1), (i1 + 1).clamp(max=in_size - 1), w0, w1

    monkeypatch.setattr(_fast_masks, "axis_weights", shifted)
    assert _fast_masks.tile_plan((14, 14), (112, 112), torch.device("cpu")) is None
    maps = random_maps(3, 5, (14, 14), seed=1)
    thresholds = torch.quantile(maps.transpose(0, 1).flatten(1).double(), 0.99, dim=1)
    assert torch.equal(fast_pixels(maps, thresholds, (112, 112)), dense_pixels(maps, thresholds, (112, 112)))


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (4, 1), (7, 9)])
def test_hot_blocks_are_two_by_two_max_pooling_above_the_bound(shape):
    maps = random_maps(2, 3, shape, seed=shape[1])
    pooled = torch.nn.functional.max_pool2d(torch.nn.functional.pad(maps, (0, 1, 0, 1), value=-float("inf")),
                                            kernel_size=2, stride=1)
    for near in maps.flatten().sort().values[::5]:
        bound = torch.full((1, 3, 1, 1), float(near))
        expected = (pooled > bound).view(-1).nonzero().squeeze(1)
        assert torch.equal(_fast_masks.hot_blocks(maps, bound), expected)


# ---------------------------------------------------------------- whole dissections against the dense method

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("denominator", ["paper", "lite", "global"])
@pytest.mark.parametrize("shape,quantile", [((14, 14), 0.005), ((7, 7), 0.02), ((13, 13), 0.1)])
def test_dissection_equals_the_dense_method(probe_112, denominator, shape, quantile, device):
    activations = random_maps(len(probe_112), 12, shape, seed=shape[0]).to(device)
    result = ld.dissect_activations({"l": activations}, probe_112, quantile=quantile, denominator=denominator,
                                    batch_size=3)["l"]
    thresholds = dense_thresholds(activations, quantile)
    intersection, unit_area = dense_tally(activations, thresholds, probe_112.label_maps.to(device),
                                          probe_112.image_labels.to(device), probe_112.label_category.to(device),
                                          len(probe_112.categories), denominator)
    assert torch.equal(result.thresholds, thresholds.cpu())
    assert torch.equal(result.intersection, intersection.cpu())
    assert torch.equal(result.unit_area, unit_area.cpu())
    assert intersection.sum() > 0 and unit_area.sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("denominator", ["paper", "lite", "global"])
def test_dissection_on_small_segmentations_equals_the_dense_method(random_dataset, denominator, device):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    activations = random_maps(len(probe), 6, (4, 4), seed=11).to(device)
    result = ld.dissect_activations({"l": activations}, probe, quantile=0.1, denominator=denominator,
                                    batch_size=5)["l"]
    thresholds = dense_thresholds(activations, 0.1)
    intersection, unit_area = dense_tally(activations, thresholds, probe.label_maps.to(device),
                                          probe.image_labels.to(device), probe.label_category.to(device),
                                          len(probe.categories), denominator)
    assert torch.equal(result.intersection, intersection.cpu())
    assert torch.equal(result.unit_area, unit_area.cpu())


def test_the_reference_path_gives_the_same_dissection(probe_112):
    activations = random_maps(len(probe_112), 12, (14, 14), seed=2)
    with reference_path(False):
        fast = ld.dissect_activations({"l": activations}, probe_112, quantile=0.005, batch_size=3)["l"]
    with reference_path():
        reference = ld.dissect_activations({"l": activations}, probe_112, quantile=0.005, batch_size=3)["l"]
    for field in ["thresholds", "intersection", "unit_area", "iou", "labels", "scores", "top_images",
                  "top_activations"]:
        assert torch.equal(getattr(fast, field), getattr(reference, field)), field


# ---------------------------------------------------------------- pass structure

class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 9, stride=8, padding=4), nn.ReLU())
        self.head = nn.Conv2d(6, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.head(self.features(x))


def test_activation_cache_budget_changes_nothing_but_the_model_runs(probe_112):
    model = TinyCNN()
    calls = []
    model.features.register_forward_hook(lambda *args: calls.append(1))
    results = {}
    one_batch = 3 * (6 * 28 * 28 + 4 * 14 * 14) * 4  # float32 bytes of one batch of both layers
    for budget in [2**31, one_batch, 0]:
        calls.clear()
        results[budget] = ld.dissect(model, probe_112, ["features", "head"], quantile=0.02, batch_size=3,
                                     activation_cache_bytes=budget, activation_spill=False)
        # One check pass (two images, before the passes), then 3 batches: pass one runs them all, pass two
        # reruns those beyond the budget (not spilled to disk here; tests/test_spill.py spills them).
        assert len(calls) == 1 + {2**31: 3, one_batch: 5, 0: 6}[budget]
    assert results[2**31].settings["activations_cached"] and not results[0].settings["activations_cached"]
    for budget in [one_batch, 0]:
        for name in ["features", "head"]:
            assert torch.equal(results[budget][name].iou, results[2**31][name].iou)
            assert torch.equal(results[budget][name].thresholds, results[2**31][name].thresholds)


def test_non_finite_activations_are_caught_and_huge_finite_ones_are_not(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    for bad in [float("inf"), -float("inf"), float("nan")]:
        activations = torch.zeros(len(probe), 2, 4, 4)
        activations[5, 1, 2, 2] = bad
        with pytest.raises(ld.DissectionError, match="non-finite"):
            ld.dissect_activations({"l": activations}, probe)
    huge = torch.full((len(probe), 2, 4, 4), 3e38)  # the sum overflows; every value is finite
    huge[:, :, 0, 0] = 0
    layer = ld.dissect_activations({"l": huge}, probe, quantile=0.1)["l"]
    assert torch.equal(layer.thresholds, torch.tensor([3e38, 3e38]).double())


def test_a_layer_output_changed_in_place_later_in_the_pass_is_dissected_as_the_layer_gave_it(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                          nn.Conv2d(4, 3, 3, stride=2, padding=1)).eval()
    with torch.no_grad():
        inputs = probe.model_input(range(len(probe)), "cpu")
        normalized = model[1](model[0](inputs)).clone()  # negative values that the in-place ReLU would zero
    assert (normalized < 0).any()
    expected = ld.dissect_activations({"1": normalized}, probe, quantile=0.3)
    # Without a copy the in-place ReLU is noticed from the version counter and the batch captured
    # again; inference tensors have no version counter and are always copied.
    for context in [None, torch.inference_mode]:
        result = ld.dissect(model, probe, ["1", "3"], quantile=0.3, batch_size=5, forward_context=context)
        assert torch.equal(result["1"].thresholds, expected["1"].thresholds)
        assert torch.equal(result["1"].iou, expected["1"].iou)


def test_outputs_are_copied_only_once_the_pass_changes_them_in_place():
    from lightning_dissect.engine.capture import LayerCapture

    inputs = torch.randn(2, 3, 8, 8)
    for inplace in [False, True]:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=inplace), nn.Conv2d(4, 2, 3)).eval()
        capture = LayerCapture({"0": model[0], "2": model[2]})
        with torch.no_grad(), capture:
            outputs = capture.run(model, inputs)
        with torch.no_grad():
            assert torch.equal(outputs["0"], model[0](inputs))  # as the layer gave it, negative values kept
        assert capture.copy == inplace

