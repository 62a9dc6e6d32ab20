"""The engine's fast path against the straightforward dense method: equal bit for bit.

The tally evaluates only tiles of the upsampled maps near each threshold and leaves the pixels
within rounding reach of it to `F.interpolate` (`engine/tally.py`); these tests hold it to the
dense definition on random inputs, on thresholds placed exactly on upsampled values, at the
edges of the maps, and when the kernel check rejects the tiles. `benchmarks/baseline.py` is the
dense method the benchmark times.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_dissect as ld
from benchmarks.baseline import dense_tally, dense_thresholds
from lightning_dissect.engine import tally
from tests.conftest import random_broden

SHAPES = [((14, 14), (112, 112)), ((7, 7), (112, 112)), ((13, 13), (113, 113)), ((5, 9), (70, 81)),
          ((4, 4), (8, 8)), ((3, 5), (8, 16)), ((28, 28), (112, 112)), ((6, 6), (10, 10)), ((8, 8), (8, 8)),
          ((20, 20), (8, 8)), ((16, 16), (32, 32)), ((64, 64), (32, 32))]


def dense_pixels(activations: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sorted `map * P + pixel` of every mask pixel: `F.interpolate` of the whole layer tensor
    `(B, K, h, w)`, compared in float64 (SEMANTICS §2)."""
    upsampled = torch.nn.functional.interpolate(activations, size=size, mode="bilinear", align_corners=False)
    masks = upsampled.double() > thresholds.view(1, -1, 1, 1)
    return masks.flatten().nonzero().squeeze(1)


def fast_pixels(activations: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    maps, pixels = tally.mask_pixels(activations, thresholds, size)
    return (maps * size[0] * size[1] + pixels).sort().values


def random_maps(batch: int, units: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Gaussian maps with a ReLU half (many exact zeros), a constant unit and a negative unit."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(batch, units, *shape, generator=g) * torch.rand(1, units, 1, 1, generator=g) * 4
    maps[:, : units // 2] = maps[:, : units // 2].relu()
    maps[:, -1] = 0.75
    maps[:, -2] -= 3
    return maps


@pytest.mark.parametrize("shape,size", SHAPES)
@pytest.mark.parametrize("quantile", [0.005, 0.2])
def test_mask_pixels_equal_layer_tensor_interpolation(shape, size, quantile):
    maps = random_maps(6, 12, shape, seed=shape[0] * 100 + size[0])
    thresholds = torch.quantile(maps.transpose(0, 1).flatten(1).double(), 1 - quantile, dim=1)
    assert torch.equal(fast_pixels(maps, thresholds, size), dense_pixels(maps, thresholds, size))


@pytest.mark.parametrize("shape,size", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[4], ((7, 7), (28, 28)),
                                        ((20, 20), (8, 8)), ((64, 64), (32, 32))])
def test_thresholds_on_upsampled_values_are_decided_like_the_kernel(shape, size, monkeypatch):
    """Thresholds exactly at an upsampled pixel value, one float64 step either side, and at the
    float32 neighbours: the pixels there are within rounding reach and must go to the kernel, and
    for small outputs (where ATen's CPU kernel rounds units 0-7 of a 12-unit tensor through a
    vectorised path and units 8-11 through a scalar one) to the kernel run on the layer tensor."""
    maps = random_maps(4, 12, shape, seed=7)
    upsampled = torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    redone = []
    # Redone maps go to the kernel map by map (`per_map=True`) or on their images' layer tensors; the
    # banded map-by-map pass of downsampling layers (`layer_bits=True`) is a first decision, not a redo.
    for name in ["_dense_mask_pixels", "_layer_mask_pixels"]:
        original = getattr(tally, name)

        def spy(*a, original=original, **k):
            if not k.get("layer_bits"):
                redone.append(1)
            return original(*a, **k)

        monkeypatch.setattr(tally, name, spy)
    g = torch.Generator().manual_seed(3)
    flat = upsampled.transpose(0, 1).flatten(1)  # (units, all pixels)
    random_pixel = flat[torch.arange(12), torch.randint(0, flat.shape[1], (12,), generator=g)].double()
    top_percent = flat.topk(flat.shape[1] // 100, dim=1).values[:, -1].double()
    for values in [random_pixel, top_percent]:
        up64, down64 = torch.nextafter(values, values + 1), torch.nextafter(values, values - 1)
        up32 = torch.nextafter(values.float(), values.float() + 1).double()
        down32 = torch.nextafter(values.float(), values.float() - 1).double()
        for thresholds in [values, up64, down64, up32, down32]:
            assert torch.equal(fast_pixels(maps, thresholds, size), dense_pixels(maps, thresholds, size))
    assert redone, "no pixel came within rounding reach of its threshold: the test exercises nothing"


def test_zero_and_negative_thresholds():
    maps = torch.zeros(3, 4, 7, 7)
    maps[:, 1] = -torch.rand(3, 7, 7)  # all negative: the threshold is negative
    maps[0, 2, 3, 3] = 1.0  # one spike on zeros: threshold 0, the mask is the spike's footprint
    maps[:, 3, :, 0] = 2.0  # a column on the left edge
    thresholds = torch.tensor([0.0, -0.5, 0.0, 0.0], dtype=torch.float64)
    for size in [(112, 112), (113, 57)]:
        assert torch.equal(fast_pixels(maps, thresholds, size), dense_pixels(maps, thresholds, size))


def test_corner_and_edge_cells_reach_the_border_pixels():
    maps = torch.zeros(1, 4, 7, 7)
    for unit, (y, x) in enumerate([(0, 0), (0, 6), (6, 0), (6, 6)]):
        maps[0, unit, y, x] = 1.0
    thresholds = torch.full((4,), 0.3, dtype=torch.float64)
    pixels = fast_pixels(maps, thresholds, (112, 112))
    assert torch.equal(pixels, dense_pixels(maps, thresholds, (112, 112)))
    corners = {0: 0, 1: 111, 2: 111 * 112, 3: 112 * 112 - 1}
    for unit, corner in corners.items():
        assert unit * 112 * 112 + corner in pixels.tolist()


def test_a_kernel_that_disagrees_with_the_tiles_falls_back_to_whole_maps(monkeypatch):
    monkeypatch.setattr(tally, "_PLANS", {})
    real = tally.axis_weights

    def shifted(in_size, out_size, fused=True):  # one source cell off: the probe must reject it
        i0, i1, w0, w1 = real(in_size, out_size, fused)
        return (i0 + 1).clamp(max=in_size - 1), (i1 + 1).clamp(max=in_size - 1), w0, w1

    monkeypatch.setattr(tally, "axis_weights", shifted)
    assert tally._tile_plan((14, 14), (112, 112), torch.device("cpu")) is None
    maps = random_maps(3, 5, (14, 14), seed=1)
    thresholds = torch.quantile(maps.transpose(0, 1).flatten(1).double(), 0.99, dim=1)
    assert torch.equal(fast_pixels(maps, thresholds, (112, 112)), dense_pixels(maps, thresholds, (112, 112)))


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (4, 1), (7, 9)])
def test_block_max_is_two_by_two_max_pooling(shape):
    maps = random_maps(2, 3, shape, seed=shape[1])
    padded = torch.nn.functional.pad(maps, (0, 1, 0, 1), value=-float("inf"))
    assert torch.equal(tally._block_max(maps), torch.nn.functional.max_pool2d(padded, kernel_size=2, stride=1))


def test_layer_kernel_shortcuts_are_taken_only_where_they_give_the_same_bits():
    """Equal sizes skip the kernel (it returns its input); on CPU small outputs run on a
    channels-last copy, which the kernel computes the way it computes an NCHW layer tensor
    anyway; large outputs keep the NCHW tensor. Each choice is checked by running the kernel."""
    cpu = torch.device("cpu")
    assert tally._layer_kernel(12, (8, 8), (8, 8), cpu) == "identity"
    assert tally._layer_kernel(12, (16, 16), (32, 32), cpu) == "channels_last"
    maps = random_maps(3, 12, (9, 9), seed=4)
    for size in [(9, 9), (30, 30), (112, 112)]:
        whole = torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        kernel = tally._layer_kernel(12, (9, 9), size, cpu)
        if kernel == "identity":
            assert torch.equal(whole, maps)
        elif kernel == "channels_last":
            last = maps.contiguous(memory_format=torch.channels_last)
            assert torch.equal(whole, torch.nn.functional.interpolate(last, size=size, mode="bilinear"))
        thresholds = torch.quantile(maps.transpose(0, 1).flatten(1).double(), 0.99, dim=1)
        maps_, pixels = tally._layer_mask_pixels(maps, thresholds, size)
        fast = (maps_ * size[0] * size[1] + pixels).sort().values
        assert torch.equal(fast, dense_pixels(maps, thresholds, size))


def test_tiles_are_trusted_only_where_they_pay():
    cpu = torch.device("cpu")
    assert tally._tile_plan((14, 14), (112, 112), cpu) is not None
    assert tally._tile_plan((28, 28), (112, 112), cpu) is not None
    assert tally._tile_plan((56, 56), (112, 112), cpu) is None  # 2x: whole maps are cheaper
    assert tally._tile_plan((112, 112), (112, 112), cpu) is None
    assert tally._tile_plan((20, 20), (8, 8), cpu) is None  # downsampling


# ---------------------------------------------------------------- whole dissections against the dense method

@pytest.fixture(scope="module")
def probe_112(tmp_path_factory):
    """Eight random 224x224 images with 112x112 label maps: Broden's sizes, every cell form."""
    root = random_broden(tmp_path_factory.mktemp("broden224") / "broden", num_images=8, image_size=224, seed=5)
    return ld.ProbeSet(root, cache_dir=False)


@pytest.mark.parametrize("denominator", ["paper", "lite", "global"])
@pytest.mark.parametrize("shape,quantile", [((14, 14), 0.005), ((7, 7), 0.02), ((13, 13), 0.1)])
def test_dissection_equals_the_dense_method(probe_112, denominator, shape, quantile):
    activations = random_maps(len(probe_112), 12, shape, seed=shape[0])
    result = ld.dissect_activations({"l": activations}, probe_112, quantile=quantile, denominator=denominator,
                                    batch_size=3)["l"]
    thresholds = dense_thresholds(activations, quantile)
    intersection, unit_area = dense_tally(activations, thresholds, probe_112.label_maps, probe_112.image_labels,
                                          probe_112.label_category, len(probe_112.categories), denominator)
    assert torch.equal(result.thresholds, thresholds)
    assert torch.equal(result.intersection, intersection)
    assert torch.equal(result.unit_area, unit_area)
    assert intersection.sum() > 0 and unit_area.sum() > 0


@pytest.mark.parametrize("denominator", ["paper", "lite", "global"])
def test_dissection_on_small_segmentations_equals_the_dense_method(random_dataset, denominator):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    activations = random_maps(len(probe), 6, (4, 4), seed=11)
    result = ld.dissect_activations({"l": activations}, probe, quantile=0.1, denominator=denominator,
                                    batch_size=5)["l"]
    thresholds = dense_thresholds(activations, 0.1)
    intersection, unit_area = dense_tally(activations, thresholds, probe.label_maps, probe.image_labels,
                                          probe.label_category, len(probe.categories), denominator)
    assert torch.equal(result.intersection, intersection)
    assert torch.equal(result.unit_area, unit_area)


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
                                     activation_cache_bytes=budget)
        # 3 batches: pass one runs them all, pass two reruns those beyond the budget.
        assert len(calls) == {2**31: 3, one_batch: 5, 0: 6}[budget]
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
