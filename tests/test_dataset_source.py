"""Any dataset as a probe: the same arrays and dissection as its Broden copy, statistics, fingerprints, errors."""

from __future__ import annotations

import csv
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lightning_dissect as ld
from lightning_dissect import probe as probe_module
from lightning_dissect.concept_source import ConceptDataset, DatasetError
from lightning_dissect.dataset_source import DatasetSource
from lightning_dissect.probe_source import probe_at_input_size
from tests.concepts import (
    RANDOM_CATEGORIES,
    RANDOM_NAMES,
    PlantedRed,
    SmallCNN,
    assert_same_dissection,
    assert_same_probe,
    planted_image,
    planted_quantile,
    random_items,
)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def item_arrays(items):
    """Per item: uint8 (H, W, 3) pixels, and per category the maps (int arrays) and ints, as given."""
    out = []
    for image, labels in items:
        if isinstance(image, Image.Image):
            pixels = np.asarray(image.convert("RGB"))
        else:
            tensor = image if image.dtype == torch.uint8 else (image.double() * 255).round().to(torch.uint8)
            pixels = tensor.permute(1, 2, 0).numpy()
        cells = {}
        for category in RANDOM_CATEGORIES:
            value = labels.get(category, [])
            value = value if isinstance(value, list) else [value]
            cells[category] = [v if isinstance(v, int) else np.asarray(v) for v in value]
        out.append((pixels, cells))
    return out


@pytest.fixture(scope="module")
def items():
    return random_items(count=20, size=16, seed=0)


@pytest.fixture(scope="module")
def copy_root(items, tmp_path_factory):
    return ld.write_broden(items, tmp_path_factory.mktemp("copy") / "broden", RANDOM_NAMES, RANDOM_CATEGORIES,
                           image_format="png", workers=2)


@pytest.mark.parametrize("denominator", ["paper", "lite", "global"])
def test_a_dataset_probe_gives_the_dissection_of_its_broden_copy(items, copy_root, denominator):
    probe = ld.ProbeSet.from_dataset(items, RANDOM_NAMES, RANDOM_CATEGORIES, cache_dir=False, workers=2)
    copy = ld.ProbeSet(copy_root, cache_dir=False)
    assert_same_probe(probe, copy)
    model = SmallCNN()
    options = dict(quantile=0.05, denominator=denominator, batch_size=6)
    assert_same_dissection(ld.dissect(model, probe, ["block", "head"], **options),
                           ld.dissect(model, copy, ["block", "head"], **options))


def test_subsets_and_category_selections_of_a_dataset_equal_those_of_its_copy(items, copy_root):
    source = DatasetSource(ConceptDataset.wrap(items, RANDOM_NAMES, RANDOM_CATEGORIES), cache_dir=False)
    for options in ({"size": 7, "seed": 3}, {"categories": ["object", "part"]}, {"categories": ["scene"], "size": 9}):
        assert_same_probe(ld.ProbeSet(source, cache_dir=False, **options),
                          ld.ProbeSet(copy_root, cache_dir=False, **options))


def test_the_copy_reads_back_every_image_and_label_exactly(items, copy_root):
    broden = ld.Broden(copy_root)
    assert broden.label_names == RANDOM_NAMES
    assert broden.categories == RANDOM_CATEGORIES
    assert len(broden) == len(items)
    for i, (pixels, cells) in enumerate(item_arrays(items)):
        assert torch.equal(broden.read_image(i), torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        maps, image_labels = broden.read_segmentation(i)
        expected_maps = [m for c in RANDOM_CATEGORIES for m in cells[c] if not isinstance(m, int)]
        assert [m.tolist() for m in maps] == [m.tolist() for m in expected_maps]
        assert image_labels == [v for c in RANDOM_CATEGORIES for v in cells[c] if isinstance(v, int)]


def recount(items):
    """Per (category, label): the items where it occurs and its mean coverage there, pixel by pixel."""
    frequency, total = {}, {}
    for _, cells in item_arrays(items):
        for category, cell in cells.items():
            maps = [m for m in cell if not isinstance(m, int)]
            found = {}
            if maps:
                h, w = maps[0].shape
                for label in {int(v) for m in maps for v in m.ravel()} - {0}:
                    covered = sum(1 for y in range(h) for x in range(w) if any(m[y, x] == label for m in maps))
                    found[label] = covered / (h * w)
            for label in (v for v in cell if isinstance(v, int)):
                found[label] = 1.0
            for label, fraction in found.items():
                frequency[category, label] = frequency.get((category, label), 0) + 1
                total[category, label] = total.get((category, label), 0.0) + fraction
    return frequency, {key: total[key] / frequency[key] for key in frequency}


def test_written_statistics_are_those_of_the_items(items, copy_root):
    frequency, coverage = recount(items)
    written = {}
    for category in RANDOM_CATEGORIES:
        rows = read_csv(copy_root / f"c_{category}.csv")
        assert [int(r["code"]) for r in rows] == list(range(1, len(rows) + 1))
        for r in rows:
            written[category, int(r["number"])] = (int(r["frequency"]), r["coverage"])
    assert set(written) == set(frequency)
    for key, (count, mean) in written.items():
        assert count == frequency[key] and mean == f"{coverage[key]:.6f}", key  # as NetDissect reads them
    for r in read_csv(copy_root / "label.csv"):
        number = int(r["number"])
        listed = dict(re.fullmatch(r"(\w+)\((\d+)\)", p).groups() for p in r["category"].split(";") if p)
        assert {c: int(n) for c, n in listed.items()} == {c: frequency[c, number] for c in RANDOM_CATEGORIES
                                                          if (c, number) in frequency}
    assert [r["name"] for r in read_csv(copy_root / "category.csv")] == RANDOM_CATEGORIES


def test_primary_categories_follow_the_written_coverage_and_a_label_that_never_occurs_is_not_scored(items, copy_root):
    source = DatasetSource(ConceptDataset.wrap(items, RANDOM_NAMES, RANDOM_CATEGORIES), cache_dir=False)
    frequency, coverage = recount(items)
    expected = [None] * len(RANDOM_NAMES)
    for number in range(1, len(RANDOM_NAMES)):
        candidates = [(round(coverage[c, number], 6), -k, c) for k, c in enumerate(RANDOM_CATEGORIES)
                      if (c, number) in coverage]
        expected[number] = max(candidates)[2] if candidates else None
    assert source.primary_category == expected == ld.Broden(copy_root).primary_category
    assert expected[RANDOM_NAMES.index("orphan")] is None
    assert expected[RANDOM_NAMES.index("blue")] in ("color", "object")  # it occurs in both
    orphan = next(r for r in read_csv(copy_root / "label.csv") if r["name"] == "orphan")
    assert (orphan["category"], orphan["frequency"]) == ("", "0")


def test_a_planted_unit_gets_iou_one_on_its_planted_concept(tmp_path):
    rng = np.random.default_rng(1)
    items, inside = [], 0
    for _ in range(8):
        region = rng.random((4, 4)) < 0.3
        other = np.where(~region & (rng.random((4, 4)) < 0.5), 2, 0)
        inside += int(region.sum())
        items.append((Image.fromarray(planted_image(region, rng)), {"object": np.where(region, 1, other)}))
    names, categories = ["-", "target", "other"], ["object"]
    probe = ld.ProbeSet.from_dataset(items, names, categories, cache_dir=False)
    result = ld.dissect(PlantedRed(), probe, ["features"], quantile=planted_quantile(inside, 8 * 16))["features"]
    assert result.label_name(0) == "target" and result.scores[0].item() == 1.0
    root = ld.write_broden(items, tmp_path / "copy", names, categories, image_format="png")
    copy = ld.ProbeSet(root, cache_dir=False)
    assert_same_dissection(ld.dissect(PlantedRed(), probe, ["features"], quantile=0.3),
                           ld.dissect(PlantedRed(), copy, ["features"], quantile=0.3))


def test_a_dataset_of_image_level_labels_only_takes_half_the_image_size(tmp_path):
    items = [(torch.rand(3, 12, 10), {"scene": [1 + i % 2]}) for i in range(6)]
    probe = ld.ProbeSet.from_dataset(items, ["-", "kitchen", "beach"], ["scene"], fingerprint="scenes", cache_dir=False)
    copy = ld.ProbeSet(ld.write_broden(items, tmp_path / "copy", ["-", "kitchen", "beach"], ["scene"],
                                       image_format="png"), cache_dir=False)
    assert probe.segmentation_size == (6, 5)
    assert_same_probe(probe, copy)


def test_the_default_copy_holds_jpeg_images_of_broden_quality(items, tmp_path):
    root = ld.write_broden(items[:3], tmp_path / "jpeg", RANDOM_NAMES, RANDOM_CATEGORIES)
    for row in read_csv(root / "index.csv"):
        assert row["image"].endswith(".jpg")
        with Image.open(root / "images" / row["image"]) as image:
            assert image.format == "JPEG" and image.size == (16, 16)
    assert ld.ProbeSet(root, cache_dir=False).images.shape == (3, 3, 16, 16)


def test_write_broden_never_writes_into_a_folder_that_holds_something(items, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        ld.write_broden(items, tmp_path / "mine", RANDOM_NAMES, RANDOM_CATEGORIES)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    assert (ld.write_broden(items[:2], tmp_path / "empty", RANDOM_NAMES, RANDOM_CATEGORIES) / "index.csv").is_file()


def test_a_failing_write_leaves_nothing_behind(items, tmp_path):
    broken = items[:4] + [(torch.full((3, 16, 16), 2.0), {"color": np.zeros((8, 8), int)})]
    with pytest.raises(DatasetError, match=r"item 4 .* outside \[0, 1\]"):
        ld.write_broden(broken, tmp_path / "copy", RANDOM_NAMES, RANDOM_CATEGORIES, workers=1)
    assert list(tmp_path.iterdir()) == []


def bad(item_labels=None, image=None):
    """Six good items, then item 6 with the given image or labels."""
    good = [(torch.rand(3, 8, 8), {"object": np.ones((4, 4), int)}) for _ in range(6)]
    return good + [(image if image is not None else torch.rand(3, 8, 8),
                    item_labels if item_labels is not None else {"object": np.ones((4, 4), int)})]


def truncated_png(tmp_path: Path) -> Image.Image:
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    return Image.open(path)


@pytest.mark.parametrize("case, match", [
    ("float image outside [0, 1]", r"item 6 .*outside \[0, 1\]"),
    ("image of shape (8, 8, 3)", r"item 6 .*shape \(8, 8, 3\).*\(3, H, W\)"),
    ("image that does not decode", r"item 6 .*image cannot be decoded"),
    ("map of floats", r"item 6 .*object label map is of type float64"),
    ("map of three axes", r"item 6 .*object label map has shape \(2, 4, 4\)"),
    ("pixel label not in the list", r"item 6 .*object label map holds label number\(s\) 5 not in the label list"),
    ("image-level label not in the list", r"item 6 .*object image-level label 7 is not in the label list"),
    ("category not in the list", r"item 6 .*category 'parts' is not in the dataset's categories"),
    ("maps of two sizes", r"item 6 .*4x3 \(h x w\), another map of the item is 4x4"),
    ("labels that are no mapping", r"item 6 .*labels are a list"),
    ("colour mask", r"item 6 .*PIL image of mode RGB"),
])
def test_a_bad_item_is_refused_naming_the_item(case, match, tmp_path):
    labels, image = None, None
    if case == "float image outside [0, 1]":
        image = torch.full((3, 8, 8), -0.5)
    elif case == "image of shape (8, 8, 3)":
        image = torch.rand(8, 8, 3)
    elif case == "image that does not decode":
        image = truncated_png(tmp_path)
    elif case == "map of floats":
        labels = {"object": np.ones((4, 4))}
    elif case == "map of three axes":
        labels = {"object": np.ones((2, 4, 4), int)}
    elif case == "pixel label not in the list":
        labels = {"object": np.full((4, 4), 5)}
    elif case == "image-level label not in the list":
        labels = {"object": [7]}
    elif case == "category not in the list":
        labels = {"parts": [1]}
    elif case == "maps of two sizes":
        labels = {"object": [np.ones((4, 4), int), np.ones((4, 3), int)]}
    elif case == "labels that are no mapping":
        labels = [np.ones((4, 4), int)]
    elif case == "colour mask":
        labels = {"object": Image.new("RGB", (4, 4))}
    with pytest.raises(DatasetError, match=match):
        ld.ProbeSet.from_dataset(bad(labels, image), ["-", "a", "b"], ["object"], cache_dir=False, workers=1)


@pytest.mark.parametrize("names, categories, match", [
    (["background", "a"], ["object"], r"label_names\[0\] is 'background'.*'-'"),
    (["-", "a", ""], ["object"], r"label_names\[2\] is ''"),
    (["-", "a"], ["object", "object"], "lists a category twice"),
    (["-", "a"], ["obj;ect"], "cannot be a category"),
    (["-", "a"], ["split"], "cannot be a category"),
])
def test_bad_label_or_category_lists_are_refused_naming_them(names, categories, match):
    with pytest.raises(DatasetError, match=match):
        ld.ProbeSet.from_dataset(bad(), names, categories, cache_dir=False)


def test_images_of_two_sizes_are_refused_naming_the_item_when_decoded():
    items = [(torch.rand(3, 8, 8), {"object": np.ones((4, 4), int)}) for _ in range(3)]
    items.append((torch.rand(3, 10, 8), {"object": np.ones((4, 4), int)}))
    with pytest.raises(DatasetError, match=r"item 3 .*10x8 \(h x w\), the probe's images are 8x8"):
        ld.ProbeSet.from_dataset(items, ["-", "a"], ["object"], cache_dir=False, workers=1)


def test_an_item_without_maps_among_maps_of_several_sizes_is_refused_naming_it(tmp_path):
    items = [(torch.rand(3, 8, 8), {"object": np.ones((4, 4), int)}), (torch.rand(3, 8, 8), {"object": [1]}),
             (torch.rand(3, 6, 6), {"object": np.ones((3, 3), int)})]
    with pytest.raises(DatasetError, match=r"item 1 .*has no label map.*several sizes \(3x3, 4x4\)"):
        ld.write_broden(items, tmp_path / "copy", ["-", "a"], ["object"], workers=1)


def test_the_content_fingerprint_follows_every_pixel_and_label(items):
    def fingerprint(data):
        return ld.ProbeSet.from_dataset(data, RANDOM_NAMES, RANDOM_CATEGORIES, cache_dir=False, workers=1).fingerprint

    base = fingerprint(items)
    assert fingerprint(list(items)) == base
    pixel = list(items)
    pixel[4] = (items[4][0].clone(), items[4][1])
    pixel[4][0][0, 0, 0] = 1 - pixel[4][0][0, 0, 0]
    label = list(items)
    changed = np.array(items[5][1]["color"])
    changed[0, 0] = 2 if changed[0, 0] != 2 else 1
    label[5] = (items[5][0], {**items[5][1], "color": changed})
    assert len({base, fingerprint(pixel), fingerprint(label)}) == 3


class Counted(list):
    """A list that counts its item reads."""

    reads = 0

    def __getitem__(self, i):
        Counted.reads += 1
        return super().__getitem__(i)


def test_a_declared_fingerprint_reuses_the_index_and_the_probe_cache(items, tmp_path, monkeypatch):
    data = Counted(items)
    first = ld.ProbeSet.from_dataset(data, RANDOM_NAMES, RANDOM_CATEGORIES, fingerprint="v1", cache_dir=tmp_path,
                                     workers=1)
    assert Counted.reads >= 2 * len(items)  # indexed, then decoded
    Counted.reads = 0
    again = ld.ProbeSet.from_dataset(data, RANDOM_NAMES, RANDOM_CATEGORIES, fingerprint="v1", cache_dir=tmp_path,
                                     workers=1)
    assert Counted.reads == 1  # the first item's image, for the probe's size
    assert again.fingerprint == first.fingerprint and again.cache_folder == first.cache_folder
    assert_same_probe(again, first)
    other = ld.ProbeSet.from_dataset(data, RANDOM_NAMES, RANDOM_CATEGORIES, fingerprint="v2", cache_dir=tmp_path,
                                     workers=1)
    assert other.fingerprint != first.fingerprint
    assert_same_probe(other, first)


def test_a_dataset_probe_is_resized_viewed_at_another_input_size_and_pickled(items):
    probe = ld.ProbeSet.from_dataset(items, RANDOM_NAMES, RANDOM_CATEGORIES, size=12, cache_dir=False, workers=1)
    smaller = probe.resized(5)
    assert set(smaller.rows) <= set(probe.rows) and smaller.source is probe.source
    assert_same_probe(smaller, ld.ProbeSet(probe.source, size=5, cache_dir=False))
    assert smaller.fingerprint == ld.ProbeSet(probe.source, size=5, cache_dir=False).fingerprint
    view = probe_at_input_size(probe, (24, 24))
    assert view.model_input([0], "cpu").shape == (1, 3, 24, 24) and view.images is probe.images
    resized = probe.resized(5, image_size=(20, 24))
    assert resized.model_input([0], "cpu").shape == (1, 3, 20, 24)
    assert torch.equal(resized.model_input([0], "cpu"), probe_at_input_size(smaller, (20, 24)).model_input([0], "cpu"))
    assert probe.broden is None and ld.ProbeSet(probe.source, cache_dir=False).broden is None
    restored = pickle.loads(pickle.dumps(probe))
    assert_same_probe(restored, probe)


def test_the_worker_processes_decode_the_same_probe(items, monkeypatch):
    monkeypatch.setattr(probe_module, "_CHUNK_IMAGES", 4)
    serial = ld.ProbeSet.from_dataset(items, RANDOM_NAMES, RANDOM_CATEGORIES, cache_dir=False, workers=1)
    parallel = ld.ProbeSet.from_dataset(items, RANDOM_NAMES, RANDOM_CATEGORIES, cache_dir=False, workers=2)
    assert_same_probe(parallel, serial)


def test_a_concept_dataset_refuses_label_names_of_its_own_and_a_plain_one_needs_them(items):
    dataset = ConceptDataset.wrap(items, RANDOM_NAMES, RANDOM_CATEGORIES)
    with pytest.raises(DatasetError, match="label_names given for"):
        ld.ProbeSet.from_dataset(dataset, RANDOM_NAMES, cache_dir=False)
    with pytest.raises(DatasetError, match="a plain dataset needs label_names"):
        ld.ProbeSet.from_dataset(items, cache_dir=False)


def test_a_damaged_index_is_built_again(items, tmp_path):
    first = ld.ProbeSet.from_dataset(items, RANDOM_NAMES, RANDOM_CATEGORIES, fingerprint="v1", cache_dir=tmp_path,
                                     workers=1)
    (index,) = tmp_path.glob("dataset-*.npz")
    index.write_bytes(index.read_bytes()[:100])
    again = ld.ProbeSet.from_dataset(items, RANDOM_NAMES, RANDOM_CATEGORIES, fingerprint="v1", cache_dir=tmp_path,
                                     workers=1)
    assert_same_probe(again, first)
    assert index.stat().st_size > 100  # written again, whole


def test_the_copy_parses_with_netdissect_lites_conventions(items, tmp_path):
    """NetDissect-Lite's loader (loader/data_loader.py) parses label.csv's category cells with
    `^([^(]*)\\(([^)]*)\\)$`, numbers with `^\\d+$`, coverages with `^\\d+\\.\\d*$`, and reads a c_ file for every
    category of category.csv (failing on an empty one)."""
    root = ld.write_broden(items, tmp_path / "copy", RANDOM_NAMES[:-1], RANDOM_CATEGORIES, workers=1)  # no orphan
    for row in read_csv(root / "label.csv"):
        parsed = {name: int(count) for name, count in
                  (re.match(r"^([^(]*)\(([^)]*)\)$", part).groups() for part in row["category"].split(";"))}
        assert sum(parsed.values()) == int(row["frequency"]) and re.match(r"^\d+\.\d*$", row["coverage"])
    categories = [row["name"] for row in read_csv(root / "category.csv")]
    for category in categories:
        rows = read_csv(root / f"c_{category}.csv")
        assert rows and all(re.match(r"^\d+$", r["code"]) and re.match(r"^\d+$", r["number"])
                            and re.match(r"^\d+\.\d*$", r["coverage"]) for r in rows)
    for row in read_csv(root / "index.csv"):
        assert all(re.match(r"^\d+$", row[column]) for column in ("ih", "iw", "sh", "sw"))
        for category in categories:
            for item in filter(None, row[category].split(";")):
                if not re.match(r"^\d+$", item):
                    rgb = np.asarray(Image.open(root / "images" / item))
                    assert rgb.shape == (int(row["sh"]), int(row["sw"]), 3) and not rgb[..., 2].any()
