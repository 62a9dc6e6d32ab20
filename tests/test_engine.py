"""The engine against SEMANTICS.md: brute-force references, hand-computed cases, planted units."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lightning_dissect as ld
from lightning_dissect.engine.reference import reference_path
from lightning_dissect.engine.thresholds import (
    ActivationThresholds,
    Frontier,
    quantile_from_top,
    top_count,
    top_values_update,
)
from tests.conftest import write_broden
from tests.reference import reference_dissection


def random_activations(n: int, units: int, size: int, seed: int, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, units, size, size, generator=g)
    if ties:  # coarse values: many exact ties at the threshold
        acts = (acts * 2).round() / 2
    return acts


def running_top(units: int, k: int, batches: list[torch.Tensor]) -> torch.Tensor:
    """The engine's running top-k state after `batches` `(B, K, ...)`, from empty, sorted (the state
    holds its values in no particular order)."""
    top, seen = torch.full((units, k), -float("inf")), 0
    for batch in batches:
        top = top_values_update(top, batch, seen)
        seen += batch[:, 0].numel()
    return top.sort(dim=1, descending=True).values


@pytest.mark.parametrize("n,q", [(1, 0.005), (7, 0.005), (640, 0.005), (641, 0.1), (5000, 0.01), (333, 0.5)])
def test_thresholds_equal_torch_quantile_in_float64(n, q):
    values = torch.randn(4, n, generator=torch.Generator().manual_seed(n))
    thresholds = ActivationThresholds(4, n, q)
    for part in values.split(13, dim=1):
        thresholds.update(part.t())  # 13 images of one value per unit
    expected = torch.stack([torch.quantile(v.double(), 1 - q) for v in values])
    assert torch.equal(quantile_from_top(thresholds.top, n, q), expected)
    assert torch.equal(thresholds.compute(), expected)


@pytest.mark.parametrize("kind", ["normal", "sparse", "ties", "constant"])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_running_top_k_equals_the_top_k_of_everything(kind, k, monkeypatch):
    """On the fast path, large first batches take a bound from a strided sample (`_sample_bound`);
    it must hold for every row, and rows where fewer than k values lie above it (mostly exact zeros)
    fall back. The reference path (a plain top-k) keeps the same values."""
    from lightning_dissect.engine import thresholds

    g = torch.Generator().manual_seed(k)
    values = torch.randn(6, 4000, generator=g)
    if kind == "sparse":  # the first batch: about 12 positive values per row, the rest exactly 0
        values = torch.cat([(values[:, :2000] - 2.5).relu(), -1 - values[:, 2000:].abs()], dim=1)
    elif kind == "ties":
        values = (values * 2).round() / 2
    elif kind == "constant":
        values[2] = 0.25
    sampled = []
    real = thresholds._sample_bound
    monkeypatch.setattr(thresholds, "_sample_bound", lambda v, kk: sampled.append(1) or real(v, kk))
    parts = [part.unsqueeze(0) for part in values.split([2000, 1, 999, 1000], dim=1)]
    with reference_path(False):
        top = running_top(6, k, parts)
    assert sampled, "the first batch did not take the sampled bound"
    assert torch.equal(top, values.topk(k, dim=1).values)
    with reference_path():
        assert torch.equal(running_top(6, k, parts), top)


@pytest.mark.parametrize("shape", [(9, 5, 4, 4), (3, 2, 1, 7), (40, 3, 2, 2)])
@pytest.mark.parametrize("k", [1, 6, 30])
def test_running_top_k_of_maps_equals_the_top_k_of_each_unit(shape, k):
    """The running top-k takes batches `(B, K, h, w)` without reordering them unit by unit; whatever the
    batch, map size and k (first batches sampled within maps, across images, or too small to sample)."""
    g = torch.Generator().manual_seed(k + shape[0])
    batches = [(torch.randn(*shape, generator=g) * 2).round() / 2 for _ in range(4)]  # many ties
    batches[1][:, 1] = 0.0
    top = running_top(shape[1], k, batches)
    everything = torch.cat(batches).transpose(0, 1).flatten(1)
    assert torch.equal(top, everything.topk(min(k, everything.shape[1]), dim=1).values)


def test_top_count_matches_semantics_formula():
    for n in [2, 10, 100, 201, 1000, 12544, 10**6 + 3]:
        assert top_count(n, 0.005) in (int(0.005 * (n - 1)) + 2, int(0.005 * (n - 1)) + 1)
        assert top_count(n, 0.005) <= n


@pytest.mark.parametrize("denominator", ["paper", "lite", "global"])
@pytest.mark.parametrize("quantile,ties", [(0.005, False), (0.15, False), (0.2, True)])
def test_random_activations_match_brute_force_reference(random_dataset, denominator, quantile, ties):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    acts = random_activations(len(probe), 6, 4, seed=int(quantile * 1000), ties=ties)
    result = ld.dissect_activations({"layer": acts}, probe, quantile=quantile, denominator=denominator,
                                    batch_size=5)["layer"]
    expected = reference_dissection(acts, probe.broden, probe.rows, probe.categories, quantile, 0.04, denominator)
    assert torch.equal(result.thresholds, expected["thresholds"])
    assert torch.equal(result.label_area.double(), expected["label_area"])
    assert torch.equal(result.intersection.double(), expected["intersection"])
    assert torch.equal(result.unit_area.double(), expected["unit_area"])
    assert torch.equal(result.iou, expected["iou"])
    assert torch.equal(result.category_labels, expected["category_labels"])
    assert torch.equal(result.category_scores, expected["category_scores"])
    assert torch.equal(result.labels, expected["labels"])
    assert torch.equal(result.scores, expected["scores"])
    summary = result.summary()
    assert summary["unique_concepts"] == expected["unique_concepts"]
    assert summary["unique_top_concepts"] == expected["unique_top_concepts"]
    assert summary["detectors"] == expected["detectors"]
    for category in probe.categories:
        assert summary[f"unique_concepts/{category}"] == expected["unique_per_category"][category]
        assert summary[f"detectors/{category}"] == expected["detectors_per_category"][category]


@pytest.mark.parametrize("denominator", ["paper", "lite", "global"])
def test_category_subset_matches_reference(random_dataset, denominator):
    probe = ld.ProbeSet(random_dataset, categories=["part", "object"], cache_dir=False)
    assert probe.categories == ["object", "part"]
    acts = random_activations(len(probe), 5, 4, seed=3)
    result = ld.dissect_activations({"l": acts}, probe, quantile=0.1, denominator=denominator)["l"]
    expected = reference_dissection(acts, probe.broden, probe.rows, probe.categories, 0.1, 0.04, denominator)
    assert torch.equal(result.iou, expected["iou"])
    assert torch.equal(result.labels, expected["labels"])


def test_layer_outputs_of_another_resolution_and_tokens(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    grid = random_activations(len(probe), 4, 3, seed=5)  # 3x3 upsampled to 8x8
    tokens = torch.cat([torch.randn(len(probe), 1, 4), grid.flatten(2).transpose(1, 2)], dim=1)  # CLS + 9
    from_grid = ld.dissect_activations({"l": grid}, probe, quantile=0.1)["l"]
    from_tokens = ld.dissect_activations({"l": tokens}, probe, quantile=0.1)["l"]
    explicit = ld.dissect_activations({"l": tokens}, probe, quantile=0.1, prefix_tokens=1)["l"]
    assert torch.equal(from_grid.iou, from_tokens.iou) and torch.equal(from_grid.iou, explicit.iou)
    expected = reference_dissection(grid, probe.broden, probe.rows, probe.categories, 0.1, 0.04, "paper")
    assert torch.equal(from_grid.iou, expected["iou"])


# ---------------------------------------------------------------- hand-computed cases

def _hand_dataset(tmp_path):
    """Two 4x4 images (segmentation 2x2). Labels: 1 'a' (object), 2 'b' (part), 3 's' (scene)."""
    categories = {"object": "pixel", "part": "pixel", "scene": "image"}
    labels = [("a", {"object": 0.5}), ("b", {"part": 0.5}), ("s", {"scene": 1.0})]
    rows = [
        {"image": np.zeros((4, 4, 3), np.uint8), "object": [np.array([[1, 1], [0, 0]])], "part": [],
         "scene": []},
        {"image": np.zeros((4, 4, 3), np.uint8), "object": [], "part": [np.array([[2, 0], [0, 0]])],
         "scene": [3]},
    ]
    return write_broden(tmp_path / "hand", categories, labels, rows)


def test_hand_computed_iou_for_each_denominator(tmp_path):
    probe = ld.ProbeSet(_hand_dataset(tmp_path), cache_dir=False)
    # One unit at segmentation resolution (2x2 -> 2x2 is the identity). 8 values; q = 0.3:
    # rank 0.7 * 7 = 4.9 -> T = lerp(sorted[4], sorted[5], 0.9) with sorted = [0,0,0,0,0,1,1,1] -> 0.9.
    acts = torch.zeros(2, 1, 2, 2)
    acts[0, 0, 0, 0] = 1  # on label a
    acts[0, 0, 1, 1] = 1  # outside every label of image 0
    acts[1, 0, 0, 0] = 1  # on label b, inside scene s
    results = {d: ld.dissect_activations({"l": acts}, probe, quantile=0.3, denominator=d)["l"] for d in
               ["paper", "lite", "global"]}
    paper = results["paper"]
    assert paper.thresholds.tolist() == [pytest.approx(0.9, abs=1e-15)]
    # I: a=1, b=1, s=1 (image-level covers all 4 pixels). G: a=2, b=1, s=4.
    assert paper.intersection[0].tolist() == [0, 1, 1, 1]
    assert paper.label_area.tolist() == [0, 2, 1, 4]
    # paper: object present in image 0 only (mask area 2); part and scene present in image 1 (area 1).
    assert paper.unit_area[0].tolist() == [2, 1, 1]
    assert paper.iou[0, 1:].tolist() == [1 / (2 + 2 - 1), 1 / (1 + 1 - 1), 1 / (1 + 4 - 1)]
    # lite: image 0's mask touches label a (object) -> 2; image 1's mask touches b (part) and s is image-level.
    assert results["lite"].unit_area[0].tolist() == [2, 1, 1]
    # global: every mask pixel counts for every category: 3.
    assert results["global"].unit_area[0].tolist() == [3, 3, 3]
    assert results["global"].iou[0, 1:].tolist() == [1 / (3 + 2 - 1), 1 / (3 + 1 - 1), 1 / (3 + 4 - 1)]
    assert paper.labels.tolist() == [2] and paper.scores.tolist() == [1.0]


def test_lite_denominator_skips_images_where_the_mask_misses_the_category(tmp_path):
    probe = ld.ProbeSet(_hand_dataset(tmp_path), cache_dir=False)
    acts = torch.zeros(2, 1, 2, 2)
    acts[0, 0, 1, 1] = 1  # image 0: object present, but the mask touches no object pixel
    acts[1, 0, 0, 0] = 1
    q = 0.2  # rank 0.8 * 7 = 5.6 -> lerp(0, 1, 0.6) on [0]*6 + [1]*2
    paper = ld.dissect_activations({"l": acts}, probe, quantile=q, denominator="paper")["l"]
    lite = ld.dissect_activations({"l": acts}, probe, quantile=q, denominator="lite")["l"]
    assert paper.unit_area[0].tolist() == [1, 1, 1]
    assert lite.unit_area[0].tolist() == [0, 1, 1]


def test_all_zero_unit_gets_first_label_of_first_category_with_score_zero(tmp_path):
    probe = ld.ProbeSet(_hand_dataset(tmp_path), cache_dir=False)
    acts = torch.zeros(2, 1, 2, 2)  # threshold 0, nothing strictly above it: empty masks
    layer = ld.dissect_activations({"l": acts}, probe)["l"]
    assert layer.labels.tolist() == [1] and layer.scores.tolist() == [0.0]
    assert layer.summary()["detectors"] == 0


# ---------------------------------------------------------------- planted model

class PlantedDetector(nn.Module):
    """Unit 0 is the red channel averaged over 2x2 cells; unit 1 is constant."""

    def __init__(self):
        super().__init__()
        self.features = nn.Identity()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        red = nn.functional.avg_pool2d(x[:, :1], 2) * self.scale
        return self.features(torch.cat([red, torch.zeros_like(red)], dim=1))


def test_planted_unit_reproducing_a_label_mask_gets_iou_one(tmp_path):
    rng = np.random.default_rng(0)
    categories = {"object": "pixel", "color": "pixel"}
    labels = [("target", {"object": 0.3}), ("other", {"object": 0.3}), ("hue", {"color": 0.2})]
    rows = []
    for _ in range(6):
        target = rng.random((4, 4)) < 0.3
        image = np.zeros((8, 8, 3), np.uint8)
        image[..., 0] = np.kron(target, np.ones((2, 2))) * 255  # red exactly where the label is
        other = np.where(~target & (rng.random((4, 4)) < 0.5), 2, 0)
        rows.append({"image": image, "object": [np.where(target, 1, 0) + other],
                     "color": [np.where(rng.random((4, 4)) < 0.3, 3, 0)]})
    probe = ld.ProbeSet(write_broden(tmp_path / "planted", categories, labels, rows), cache_dir=False)
    inside = sum(int((r["object"][0] == 1).sum()) for r in rows)
    n = 6 * 16
    quantile = (inside - 0.5) / (n - 1)  # puts the threshold halfway between the outside and inside values
    model = PlantedDetector()
    layer = ld.dissect(model, probe, ["features"], quantile=quantile)["features"]
    assert layer.labels[0].item() == 1
    assert layer.scores[0].item() == 1.0
    assert layer.label_name(0) == "target" and layer.unit_category(0) == "object"


# ---------------------------------------------------------------- model safety and errors

class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Sequential(nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.head(self.block(x)).mean((2, 3)))


def test_dissect_leaves_model_untouched_and_matches_activation_path(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    torch.manual_seed(0)
    model = SmallCNN().train()
    model.head.eval()  # a mixed-mode model: every flag must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    rng_state = torch.get_rng_state()
    result = ld.dissect(model, probe, ["block.1", "head"], quantile=0.05, batch_size=7)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    # The same numbers from activations captured by hand.
    captured = {}
    model.eval()
    with torch.no_grad():
        hooks = [model.block[1].register_forward_hook(lambda m, i, o: captured.setdefault("block.1", o)),
                 model.head.register_forward_hook(lambda m, i, o: captured.setdefault("head", o))]
        model(probe.model_input(range(len(probe)), "cpu"))
        for h in hooks:
            h.remove()
    expected = ld.dissect_activations(captured, probe, quantile=0.05)
    for name in ["block.1", "head"]:
        assert torch.equal(result[name].iou, expected[name].iou)
        assert torch.equal(result[name].thresholds, expected[name].thresholds)
    uncached = ld.dissect(model, probe, ["head"], quantile=0.05, activation_cache_bytes=0)
    assert not uncached.settings["activations_cached"]
    assert torch.equal(uncached["head"].iou, expected["head"].iou)


def test_unknown_layer_fails_before_work_with_close_matches(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    with pytest.raises(ld.DissectionError, match=r"'blok\.1'.*block\.1"):
        ld.dissect(SmallCNN(), probe, ["blok.1"])


def test_layer_without_spatial_output_is_rejected(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    with pytest.raises(ld.DissectionError, match="'fc'.*no spatial axes"):
        ld.dissect(SmallCNN(), probe, ["fc"])


@pytest.mark.parametrize("option,value", [("quantile", 0), ("quantile", 1.5), ("iou_threshold", -1),
                                          ("denominator", "union"), ("batch_size", 0)])
def test_bad_options_name_the_argument(random_dataset, option, value):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    with pytest.raises(ValueError, match=option):
        ld.dissect_activations({"l": torch.zeros(len(probe), 2, 2, 2)}, probe, **{option: value})


def test_non_finite_activations_are_reported(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    acts = torch.zeros(len(probe), 2, 2, 2)
    acts[3, 1, 0, 0] = float("nan")
    with pytest.raises(ld.DissectionError, match="non-finite"):
        ld.dissect_activations({"l": acts}, probe)


# ---------------------------------------------------------------- rotation

def test_rotation_matrix_properties():
    r = ld.random_rotation(9, seed=4)
    eye = torch.eye(9, dtype=torch.float64)
    assert torch.allclose(r @ r.T, eye, atol=1e-12) and torch.linalg.det(r) == pytest.approx(1.0)
    assert torch.equal(ld.fractional_power(r, 0.0), eye)
    assert torch.equal(ld.fractional_power(r, 1.0), r)
    half = ld.fractional_power(r, 0.5)
    assert torch.allclose(half @ half, r, atol=1e-10)
    assert torch.allclose(half @ half.T, eye, atol=1e-10)
    third = ld.fractional_power(r, 1 / 3)
    assert torch.allclose(third @ third @ third, r, atol=1e-10)
    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))  # a pair of -1 eigenvalues
    root = ld.fractional_power(flip, 0.5)
    assert torch.allclose(root @ root, flip, atol=1e-12)
    assert torch.equal(ld.random_rotation(9, seed=4), r)


def test_rotated_dissection_equals_dissection_of_rotated_activations(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    acts = random_activations(len(probe), 5, 4, seed=9)
    matrix = ld.fractional_power(ld.random_rotation(5, seed=1), 0.5)
    rotated = torch.einsum("ij,njhw->nihw", matrix, acts.double()).float()
    by_option = ld.dissect_activations({"l": acts}, probe, quantile=0.1, rotation={"seed": 1, "alpha": 0.5})["l"]
    by_matrix = ld.dissect_activations({"l": acts}, probe, quantile=0.1, rotation=matrix)["l"]
    direct = ld.dissect_activations({"l": rotated}, probe, quantile=0.1)["l"]
    assert torch.equal(by_option.iou, by_matrix.iou)
    assert torch.allclose(by_option.thresholds, direct.thresholds, atol=1e-6)
    identity = ld.dissect_activations({"l": acts}, probe, quantile=0.1, rotation={"seed": 1, "alpha": 0.0})["l"]
    plain = ld.dissect_activations({"l": acts}, probe, quantile=0.1)["l"]
    assert torch.equal(identity.iou, plain.iou)


# ---------------------------------------------------------------- results

def test_json_round_trip_is_exact_and_csv_has_netdissect_columns(random_dataset, tmp_path):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    result = ld.dissect_activations({"l": random_activations(len(probe), 4, 4, seed=2)}, probe, quantile=0.1)
    result.to_json(tmp_path / "r.json")
    again = ld.Dissection.from_json(tmp_path / "r.json")
    assert again.settings == result.settings
    for field in ["thresholds", "iou", "intersection", "unit_area", "label_area", "labels", "scores",
                  "category_labels", "category_scores", "top_images", "top_activations"]:
        assert torch.equal(getattr(again["l"], field), getattr(result["l"], field)), field
    assert again["l"].summary() == result["l"].summary()
    assert result.settings["probe_fingerprint"] == probe.fingerprint
    result["l"].to_csv(tmp_path / "l.csv")
    import csv
    with open(tmp_path / "l.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["unit", "category", "label", "score"]
    assert "object-intersect" in rows[0] and "texture-iou" in rows[0]
    assert [int(r["unit"]) for r in rows] == [1, 2, 3, 4]
    layer = result["l"]
    assert [r["label"] for r in rows] == [layer.label_name(u) for u in range(4)]
    assert [float(r["score"]) for r in rows] == layer.scores.tolist()
    for unit, row in enumerate(rows):
        for k, category in enumerate(layer.categories):
            label = int(layer.category_labels[unit, k])
            expected = ([layer.label_names[label], int(layer.label_area[label]), int(layer.unit_area[unit, k]),
                         int(layer.intersection[unit, label]), float(layer.category_scores[unit, k])]
                        if label >= 0 else ["", 0, int(layer.unit_area[unit, k]), 0, 0.0])
            got = [row[f"{category}-{column}"] for column in ("label", "truth", "activation", "intersect", "iou")]
            assert [got[0], int(got[1]), int(got[2]), int(got[3]), float(got[4])] == expected, (unit, category)


def test_top_images_equal_brute_force(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    acts = random_activations(len(probe), 4, 4, seed=11, ties=True)
    layer = ld.dissect_activations({"l": acts}, probe, top_k=5, batch_size=4)["l"]
    peaks = acts.amax(dim=(2, 3))
    for u in range(4):
        expected = sorted(range(len(probe)), key=lambda x: (-peaks[x, u].item(), x))[:5]
        assert layer.top_images[u].tolist() == expected


def test_concept_changes_counts_switches(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    before = ld.dissect_activations({"l": random_activations(len(probe), 6, 4, seed=1)}, probe, quantile=0.1)["l"]
    after = ld.dissect_activations({"l": random_activations(len(probe), 6, 4, seed=2)}, probe, quantile=0.1)["l"]
    changes = ld.concept_changes(before, after)
    was, now = before.detectors, after.detectors
    assert changes["switch_in"] == int((~was & now).sum())
    assert changes["switch_out"] == int((was & ~now).sum())
    expected = [u for u in range(6) if was[u] and now[u] and before.labels[u] != after.labels[u]]
    assert changes["switched_units"] == expected and changes["switches"] == len(expected)
    assert sum(changes["transitions"].values()) == len(expected)


def test_result_files_get_ordinary_permissions(random_dataset, tmp_path):
    import os
    import stat
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    result = ld.dissect_activations({"l": random_activations(len(probe), 2, 4, seed=0)}, probe)
    result.to_json(tmp_path / "r.json")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("units", [9, 12, 16])
def test_masks_follow_the_layer_tensor_interpolation_for_many_units(random_dataset, units):
    # On CPU, ATen upsamples small outputs of tensors with 8+ channels through a vectorised path that
    # rounds differently from the per-channel one; SEMANTICS §2 defines the mask on the layer's own
    # contiguous (N, K, h, w) output, so the engine must reproduce that tensor's bits. Coarse values
    # put many upsampled pixels exactly at the threshold, where a one-ulp difference flips them.
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    acts = random_activations(len(probe), units, 3, seed=units, ties=True)
    acts = acts / 3  # thirds are inexact in float32: the interpolation rounds
    for quantile in (0.1, 0.3):
        result = ld.dissect_activations({"l": acts}, probe, quantile=quantile, batch_size=7)["l"]
        expected = reference_dissection(acts, probe.broden, probe.rows, probe.categories, quantile, 0.04, "paper")
        assert torch.equal(result.intersection.double(), expected["intersection"])
        assert torch.equal(result.unit_area.double(), expected["unit_area"])


def test_a_full_state_takes_a_batch_in_place_with_the_exact_top_k():
    """Once k values were seen, the few values that enter replace the state's smallest in the state
    itself (no second copy of a state that grows with the probe), and it holds the top k of all."""
    g = torch.Generator().manual_seed(3)
    first, second = (torch.randn(4, 5, 8, 8, generator=g) * 4).round() / 4, torch.randn(2, 5, 8, 8, generator=g)
    k = 40
    top = top_values_update(torch.full((5, k), -float("inf")), first, 0)
    state = top.data_ptr()
    top = top_values_update(top, second, 4 * 64)
    assert top.data_ptr() == state
    everything = torch.cat([first, second]).transpose(0, 1).flatten(1)
    assert torch.equal(top.sort(dim=1, descending=True).values, everything.topk(k, dim=1).values)


def assert_updated_in_place_with_the_exact_top_k(batches: list[torch.Tensor], k: int) -> None:
    """Feed `batches` `(B, K, h, w)` to an empty state: after each, the state is the same tensor and
    holds the top k of every value so far (the top `seen` while fewer than k were seen)."""
    top, seen = torch.full((batches[0].shape[1], k), -float("inf")), 0
    state = top.data_ptr()
    for count, batch in enumerate(batches, 1):
        top = top_values_update(top, batch, seen)
        seen += batch[:, 0].numel()
        assert top.data_ptr() == state
        everything = torch.cat(batches[:count]).transpose(0, 1).flatten(1)
        expected = everything.topk(min(k, everything.shape[1]), dim=1).values
        assert torch.equal(top.sort(dim=1, descending=True).values[:, : expected.shape[1]], expected)


@pytest.mark.parametrize("limit", [1, 40, 700])
@pytest.mark.parametrize("k", [5, 90, 300])
def test_an_update_split_by_units_keeps_the_exact_top_k_in_place(limit, k, monkeypatch):
    """Steps with more than `UPDATE_VALUES` values to handle (a large first batch, the fill, the first
    batches after the state fills, a wide packed block) are done a group of units at a time, down to one
    unit: the state stays the same tensor and holds the top k of everything, ties included."""
    from lightning_dissect.engine import thresholds

    monkeypatch.setattr(thresholds, "UPDATE_VALUES", limit)
    g = torch.Generator().manual_seed(k + limit)
    batches = [(torch.randn(3, 7, 6, 6, generator=g) * 2).round() / 2 for _ in range(6)]
    batches[3][:, 2] += 5  # one unit gets many entering values at once
    with reference_path(False):
        assert_updated_in_place_with_the_exact_top_k(batches, k)


PEAK_OF_UPDATE = """
import gc, json, sys
import torch
from lightning_dissect.engine.reference import reference_path
from lightning_dissect.engine.thresholds import top_values_update

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

g = torch.Generator().manual_seed(0)
top = torch.rand(256, 60_000, generator=g)  # a full state of 59 MiB
batch = torch.rand(64, 256, 14, 14, generator=g)  # nearly all of it above the state's smallest values
top_values_update(top[:, :20].clone(), batch[:2], 10**6)  # code and allocator pools once
with reference_path(sys.argv[1] == "reference"):
    gc.collect()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS
    top = top_values_update(top, batch, 10**6)
    print(json.dumps({"peak": status("VmHWM") - before, "state": top.numel() * 4}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_threshold_update_works_in_memory_bounded_whatever_the_state():
    """A batch whose values nearly all enter a large full state (as right after it fills): the fast
    update's peak above the state is a few MiB, not a copy of the state or of index tensors per value,
    where the reference path (a top-k of the state and the batch) takes more than the state again."""
    environment = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
                       MALLOC_MMAP_THRESHOLD_="131072")  # freed buffers leave the resident set

    def measure(path: str) -> dict:
        output = subprocess.run([sys.executable, "-c", PEAK_OF_UPDATE, path], env=environment,
                                capture_output=True, text=True, check=True)
        return json.loads(output.stdout)

    fast, reference = measure("fast"), measure("reference")
    assert reference["peak"] > reference["state"]  # the measurement sees the state held again...
    assert fast["peak"] < 24 * 2**20  # ...and the fast path holds a bounded working set (measured: ~13 MiB)


@pytest.mark.parametrize("ties", [False, True])
def test_a_state_larger_than_a_batch_fills_and_merges_in_place(ties):
    """With k above a batch's values per unit (large probes), batches first fill the empty slots, then
    merge into the full state, always in the state itself, keeping the exact top k."""
    g = torch.Generator().manual_seed(int(ties))
    batches = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(7)]
    if ties:
        batches = [(batch * 2).round() / 2 for batch in batches]
    assert_updated_in_place_with_the_exact_top_k(batches, k=300)


class CountedFrontier(Frontier):
    """A `Frontier` that counts its searches and the batches it took without one."""

    def __init__(self) -> None:
        super().__init__()
        self.searches, self.taken = 0, 0

    def find(self, top: torch.Tensor, width: int) -> None:
        self.searches += 1
        super().find(top, width)

    def take(self, top: torch.Tensor, candidates: torch.Tensor) -> bool:
        taken = super().take(top, candidates)
        self.taken += taken
        return taken


@pytest.mark.parametrize("ties", [False, True])
def test_a_frontier_keeps_the_exact_top_k_batch_after_batch(ties, monkeypatch):
    """With a `Frontier` a full state takes each batch's entering values in the slots of its smallest
    values found by an earlier search, and searches again when they are used up: after every batch the
    state is the same tensor and holds the top k of everything, ties included, whether the frontier is
    a few slots per unit (used up again and again) or the whole state."""
    from lightning_dissect.engine import thresholds

    searches = {}
    for slots, share in ((4, 4), (10**6, 1)):  # a few slots per unit (a quarter of the state); the whole state
        monkeypatch.setattr(thresholds, "FRONTIER_VALUES", slots)
        monkeypatch.setattr(thresholds, "FRONTIER_SHARE", share)
        g = torch.Generator().manual_seed(int(ties))
        batches = [torch.randn(4, 6, 5, 5, generator=g) * (1 + number / 10) for number in range(40)]
        if ties:
            batches = [(batch * 2).round() / 2 for batch in batches]
        k = 120
        top, seen, frontier = torch.full((6, k), -float("inf")), 0, CountedFrontier()
        state = top.data_ptr()
        with reference_path(False):
            for count, batch in enumerate(batches, 1):
                top = top_values_update(top, batch, seen, frontier)
                seen += batch[:, 0].numel()
                assert top.data_ptr() == state
                everything = torch.cat(batches[:count]).transpose(0, 1).flatten(1)
                expected = everything.topk(min(k, everything.shape[1]), dim=1).values
                assert torch.equal(top.sort(dim=1, descending=True).values[:, : expected.shape[1]], expected)
        assert frontier.taken > frontier.searches  # batches were taken without a search
        searches[slots] = frontier.searches
    assert searches[4] > searches[10**6]  # a few slots per unit are used up, and searched again


def test_a_state_written_by_anything_else_is_searched_again():
    """The frontier describes the state as the update last wrote it: a state replaced (as a sync or
    `reset` does) or changed in place (`load_state_dict`) is searched again, and the thresholds stay exact."""
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(3, 4, 6, 6, generator=g) for _ in range(12)]
    metric = ActivationThresholds(4, 12 * 3 * 36, 0.05)  # k = 82: full after the first batch
    for batch in batches[:4]:
        metric.update(batch)
    # In place: the state's smallest values raised (as loading a checkpoint would write them).
    metric.top.copy_(metric.top.clamp(min=1.0))
    for batch in batches[4:8]:
        metric.update(batch)
    everything = torch.cat([torch.cat(batches[:4]).transpose(0, 1).flatten(1).clamp(min=1.0),
                            torch.cat(batches[4:8]).transpose(0, 1).flatten(1)], 1)
    assert torch.equal(metric.top.sort(dim=1, descending=True).values, everything.topk(metric.k, dim=1).values)
    # Replaced: another tensor with other values (as a sync across processes gives).
    metric.top = metric.top * 0.5
    for batch in batches[8:]:
        metric.update(batch)
    everything = torch.cat([everything.topk(metric.k, dim=1).values * 0.5,
                            torch.cat(batches[8:]).transpose(0, 1).flatten(1)], 1)
    assert torch.equal(metric.top.sort(dim=1, descending=True).values, everything.topk(metric.k, dim=1).values)
