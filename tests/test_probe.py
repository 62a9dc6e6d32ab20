"""ProbeSet: seeded selection, compact tensors, canonical labels, the on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lightning_dissect as ld
from tests.conftest import random_broden, write_broden


def test_same_seed_same_rows_and_different_seed_differs(random_dataset):
    a = ld.ProbeSet(random_dataset, size=10, seed=1, cache_dir=False)
    b = ld.ProbeSet(random_dataset, size=10, seed=1, cache_dir=False)
    c = ld.ProbeSet(random_dataset, size=10, seed=2, cache_dir=False)
    assert a.rows == b.rows and a.rows != c.rows
    assert a.rows == sorted(a.rows) and len(set(a.rows)) == 10
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_split_selects_only_rows_of_that_split(random_dataset):
    probe = ld.ProbeSet(random_dataset, split="val", cache_dir=False)
    assert probe.rows and all(probe.broden.splits[i] == "val" for i in probe.rows)
    assert len(probe) == sum(1 for s in probe.broden.splits if s == "val")


def test_images_and_labels_decode_exactly(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    broden = probe.broden
    assert probe.images.dtype == torch.uint8 and probe.label_maps.dtype == torch.int16
    for position, row in enumerate(probe.rows):
        assert torch.equal(probe.images[position], broden.read_image(row))
        maps, image_level = broden.read_segmentation(row)
        scored = {c for c in range(len(probe.label_names)) if probe.label_category[c] >= 0}
        image_set = {c for c in image_level if c in scored}
        assert set(probe.image_labels[position].tolist()) - {0} == image_set
        # Canonical maps: per pixel, the set of labels (minus image-level ones) equals the union of the maps.
        canonical = probe.label_maps[position]
        for y in range(canonical.shape[1]):
            for x in range(canonical.shape[2]):
                expected = {int(m[y, x]) for m in maps} & scored - image_set
                got = [int(v) for v in canonical[:, y, x] if v != 0]
                assert sorted(got) == sorted(expected)  # no label twice at one pixel


def test_label_area_and_presence_follow_semantics(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    broden = probe.broden
    primary = broden.primary_categories()
    area = torch.zeros(len(probe.label_names), dtype=torch.long)
    for position, row in enumerate(probe.rows):
        maps, image_level = broden.read_segmentation(row)
        sh, sw = broden.row(row).segmentation_size
        labels = {int(v) for m in maps for v in m.unique()} | set(image_level)
        labels = {c for c in labels if c and primary[c] is not None}
        for c in labels:
            region = torch.ones(sh, sw, dtype=torch.bool) if c in image_level else \
                torch.stack([m == c for m in maps]).any(0)
            area[c] += int(region.sum())
        present = {primary[c] for c in labels}
        assert probe.category_present[position].tolist() == [k in present for k in probe.categories]
    assert torch.equal(probe.label_area, area)


def test_cache_is_reused_and_keyed_by_selection(random_dataset, tmp_path):
    cache = tmp_path / "cache"
    first = ld.ProbeSet(random_dataset, size=8, seed=0, cache_dir=cache)
    files = list(cache.iterdir())
    assert len(files) == 1
    again = ld.ProbeSet(random_dataset, size=8, seed=0, cache_dir=cache)
    assert torch.equal(again.images, first.images) and torch.equal(again.label_maps, first.label_maps)
    assert len(list(cache.iterdir())) == 1
    ld.ProbeSet(random_dataset, size=8, seed=0, categories=["object"], cache_dir=cache)
    ld.ProbeSet(random_dataset, size=8, seed=5, cache_dir=cache)
    assert len(list(cache.iterdir())) == 3


def test_cache_key_changes_when_the_data_changes(tmp_path):
    root = random_broden(tmp_path / "b", num_images=6)
    first = ld.ProbeSet(root, cache_dir=tmp_path / "cache")
    text = (root / "label.csv").read_text().replace("kitchen", "galley")
    (root / "label.csv").write_text(text)
    second = ld.ProbeSet(root, cache_dir=tmp_path / "cache")
    assert first.fingerprint != second.fingerprint
    assert second.label_names[7] == "galley"


def test_corrupt_cache_file_is_rebuilt_not_trusted(random_dataset, tmp_path):
    cache = tmp_path / "cache"
    first = ld.ProbeSet(random_dataset, cache_dir=cache)
    (path,) = list(cache.iterdir())
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = ld.ProbeSet(random_dataset, cache_dir=cache)
    assert torch.equal(again.images, first.images)


@pytest.mark.parametrize("kwargs,match", [
    ({"size": 0}, "size=0"), ({"size": 1000}, "size=1000"), ({"split": "test"}, "split='test'"),
    ({"categories": ["smell"]}, "smell"), ({"image_size": -3}, "image_size"), ({"seed": "x"}, "seed"),
])
def test_bad_arguments_name_the_argument(random_dataset, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ld.ProbeSet(random_dataset, cache_dir=False, **kwargs)


def test_mixed_segmentation_sizes_name_the_row(tmp_path):
    rows = [{"image": np.zeros((8, 8, 3), np.uint8), "object": [np.ones((4, 4), int)]},
            {"image": np.zeros((6, 6, 3), np.uint8), "object": [np.ones((3, 3), int)]}]
    root = write_broden(tmp_path / "mixed", {"object": "pixel"}, [("a", {"object": 1.0})], rows)
    with pytest.raises(ld.BrodenError, match=r"index.csv row 1"):
        ld.ProbeSet(root, cache_dir=False)


def test_model_input_resizes_and_normalises(random_dataset):
    probe = ld.ProbeSet(random_dataset, image_size=24, cache_dir=False)
    batch = probe.model_input([0, 3], "cpu")
    assert batch.shape == (2, 3, 24, 24) and batch.dtype == torch.float32
    plain = ld.ProbeSet(random_dataset, cache_dir=False).model_input([0], "cpu")
    mean = torch.tensor(ld.probe.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(ld.probe.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(plain, (probe.images[:1].float() / 255 - mean) / std)
    assert probe.segmentation_size == (8, 8)


def test_cache_key_changes_when_an_image_file_changes(tmp_path):
    root = random_broden(tmp_path / "b", num_images=4)
    first = ld.ProbeSet(root, cache_dir=tmp_path / "cache")
    from PIL import Image
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(root / "images" / "img2.png")
    second = ld.ProbeSet(root, cache_dir=tmp_path / "cache")
    assert first.fingerprint == second.fingerprint  # same csv files: same recorded identity
    assert not torch.equal(first.images, second.images)
    assert int(second.images[2].float().mean()) == 7
