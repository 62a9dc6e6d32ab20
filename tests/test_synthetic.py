"""The synthetic dataset is written in the exact Broden layout (SEMANTICS §1) and means what it says."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dissect.synthetic import (
    SYNTHETIC_TASKS,
    make_synthetic_broden,
    synthetic_broden_path,
    synthetic_label_names,
    synthetic_targets,
)

CATEGORIES = ["color", "object", "part", "material", "scene", "texture"]
PIXEL_LEVEL = ["color", "object", "part", "material"]
IMAGE_LEVEL = ["scene", "texture"]
CSV_FILES = ["index.csv", "label.csv", "category.csv", "tasks.csv"] + [f"c_{c}.csv" for c in CATEGORIES]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_broden(
        tmp_path_factory.mktemp("synthetic") / "broden", num_images=60, image_size=64
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def header(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        return next(csv.reader(handle))


def label_map(root: Path, item: str) -> np.ndarray:
    pixels = np.asarray(Image.open(root / "images" / item).convert("RGB")).astype(np.int64)
    assert (pixels[..., 2] == 0).all(), f"{item}: the blue channel is unused in Broden label maps"
    return pixels[..., 0] + 256 * pixels[..., 1]


def items(cell: str) -> list[str]:
    return [item for item in cell.split(";") if item]


def test_csv_headers_are_broden_headers(root: Path) -> None:
    assert header(root / "index.csv") == ["image", "split", "ih", "iw", "sh", "sw"] + CATEGORIES
    assert header(root / "label.csv") == ["number", "name", "category", "frequency", "coverage", "syns"]
    assert header(root / "category.csv") == ["name", "first", "last", "count", "frequency"]
    for category in CATEGORIES:
        assert header(root / f"c_{category}.csv") == ["code", "number", "name", "frequency", "coverage"]


def test_index_rows_point_at_files_of_the_stated_sizes(root: Path) -> None:
    rows = read_csv(root / "index.csv")
    assert len(rows) == 60
    for row in rows:
        assert (row["ih"], row["iw"], row["sh"], row["sw"]) == ("64", "64", "32", "32")
        with Image.open(root / "images" / row["image"]) as image:
            assert image.format == "JPEG" and image.size == (64, 64)
        for category in PIXEL_LEVEL:
            for item in items(row[category]):
                assert not item.startswith(("/", "images/")), item
                with Image.open(root / "images" / item) as image:
                    assert image.format == "PNG" and image.size == (32, 32)
        for category in IMAGE_LEVEL:
            assert all(item.isdigit() for item in items(row[category]))


def test_segmentation_size_is_half_the_image_size(tmp_path: Path) -> None:
    root = make_synthetic_broden(tmp_path / "d", num_images=2, image_size=226)
    row = read_csv(root / "index.csv")[0]
    assert (row["ih"], row["sh"]) == ("226", "113")


def test_every_label_number_written_is_in_label_csv(root: Path) -> None:
    labels = read_csv(root / "label.csv")
    assert [int(r["number"]) for r in labels] == list(range(1, len(labels) + 1))
    assert [r["name"] for r in labels] == synthetic_label_names()[1:]
    known = {0} | {int(r["number"]) for r in labels}
    for row in read_csv(root / "index.csv"):
        for category in PIXEL_LEVEL:
            for item in items(row[category]):
                assert set(np.unique(label_map(root, item)).tolist()) <= known, item
        for category in IMAGE_LEVEL:
            assert {int(n) for n in items(row[category])} <= known - {0}


def recount(root: Path) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], float]]:
    """Per (category, label): images where it occurs and mean coverage, from the files themselves."""
    frequency: dict[tuple[str, int], int] = {}
    total: dict[tuple[str, int], float] = {}
    for row in read_csv(root / "index.csv"):
        area = int(row["sh"]) * int(row["sw"])
        for category in CATEGORIES:
            if category in IMAGE_LEVEL:
                fractions = {int(n): 1.0 for n in items(row[category])}
            else:
                maps = [label_map(root, item) for item in items(row[category])]
                union: dict[int, np.ndarray] = {}
                for labels in maps:
                    for number in np.unique(labels[labels > 0]).tolist():
                        union[number] = union.get(number, False) | (labels == number)
                fractions = {number: mask.sum() / area for number, mask in union.items()}
            for number, fraction in fractions.items():
                frequency[category, number] = frequency.get((category, number), 0) + 1
                total[category, number] = total.get((category, number), 0.0) + fraction
    return frequency, {key: total[key] / frequency[key] for key in frequency}


def test_statistics_files_agree_with_the_label_maps(root: Path) -> None:
    frequency, coverage = recount(root)
    written = {}
    for category in CATEGORIES:
        rows = read_csv(root / f"c_{category}.csv")
        assert [int(r["code"]) for r in rows] == list(range(1, len(rows) + 1))
        for r in rows:
            assert r["name"] == synthetic_label_names()[int(r["number"])]
            written[category, int(r["number"])] = (int(r["frequency"]), float(r["coverage"]))
    assert set(written) == set(frequency)
    for key, (count, mean) in written.items():
        assert count == frequency[key], key
        assert mean == pytest.approx(coverage[key], abs=1e-6), key

    for r in read_csv(root / "label.csv"):
        number = int(r["number"])
        listed = dict(re.fullmatch(r"(\w+)\((\d+)\)", part).groups() for part in items(r["category"]))
        assert {c: int(n) for c, n in listed.items()} == {
            c: frequency[c, number] for c in CATEGORIES if (c, number) in frequency
        }
        assert int(r["frequency"]) == sum(int(n) for n in listed.values())

    categories = read_csv(root / "category.csv")
    assert [r["name"] for r in categories] == CATEGORIES
    for r in categories:
        numbers = [n for c, n in frequency if c == r["name"]]
        assert (int(r["first"]), int(r["last"]), int(r["count"])) == (
            min(numbers),
            max(numbers),
            len(numbers),
        )
        assert int(r["frequency"]) == sum(frequency[r["name"], n] for n in numbers)


def test_fabric_is_both_a_material_and_an_object_with_more_coverage_as_material(root: Path) -> None:
    fabric = next(r for r in read_csv(root / "label.csv") if r["name"] == "fabric")
    assert [part.split("(")[0] for part in items(fabric["category"])] == ["material", "object"]
    as_material = next(r for r in read_csv(root / "c_material.csv") if r["name"] == "fabric")
    as_object = next(r for r in read_csv(root / "c_object.csv") if r["name"] == "fabric")
    assert as_material["number"] == as_object["number"] == fabric["number"]
    assert float(as_material["coverage"]) > float(as_object["coverage"])


def test_empty_cells_occur_and_each_image_has_a_scene_or_a_texture(root: Path) -> None:
    rows = read_csv(root / "index.csv")
    for category in ["color", "part", "scene", "texture"]:
        assert any(row[category] == "" for row in rows), category
        assert any(row[category] != "" for row in rows), category
    assert all(row["object"] != "" for row in rows)
    assert all(len(items(row["scene"])) + len(items(row["texture"])) == 1 for row in rows)


def test_some_images_have_a_fine_part_map_inside_the_coarse_one(root: Path) -> None:
    rows = [row for row in read_csv(root / "index.csv") if len(items(row["part"])) == 2]
    assert rows
    for row in rows:
        coarse, fine = (label_map(root, item) for item in items(row["part"]))
        assert (fine > 0).any() and (coarse[fine > 0] > 0).all()


def test_parts_and_materials_lie_on_the_visible_object(root: Path) -> None:
    names = synthetic_label_names()
    for row in read_csv(root / "index.csv"):
        objects = label_map(root, items(row["object"])[0])
        for item in items(row["part"]):
            parts = label_map(root, item)
            for number in np.unique(parts[parts > 0]).tolist():
                shape = names[number].split("-")[0]
                assert {names[n] for n in np.unique(objects[parts == number]).tolist()} == {shape}
        shapes = np.isin(objects, [names.index(s) for s in SYNTHETIC_TASKS["objects"]])
        material = label_map(root, items(row["material"])[0])
        assert (material[shapes] > 0).all()


def test_colour_labels_follow_the_decoded_pixels(root: Path) -> None:
    names = synthetic_label_names()
    dominant = {"red-c": 0, "green-c": 1, "blue-c": 2}
    hits = {name: [0, 0] for name in dominant}
    for row in read_csv(root / "index.csv"):
        if not row["color"]:
            continue
        rgb = np.asarray(Image.open(root / "images" / row["image"]), dtype=np.float64)
        blocks = rgb.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))  # one value per label-map pixel
        colours = label_map(root, row["color"])
        assert (colours > 0).all()
        for name, channel in dominant.items():
            pixels = blocks[colours == names.index(name)]
            others = np.delete(pixels, channel, axis=1)
            hits[name][0] += int((pixels[:, channel] > others.max(axis=1) + 10).sum())
            hits[name][1] += len(pixels)
    for name, (agree, total) in hits.items():
        assert total > 50 and agree / total > 0.95, (name, agree, total)


def test_split_is_seventy_thirty(root: Path) -> None:
    splits = [row["split"] for row in read_csv(root / "index.csv")]
    assert splits.count("train") == 42 and splits.count("val") == 18


def dataset_contents(root: Path) -> tuple[dict[str, bytes], list[np.ndarray]]:
    csvs = {name: (root / name).read_bytes() for name in CSV_FILES}
    arrays = [np.asarray(Image.open(path)) for path in sorted((root / "images").rglob("*.*"))]
    return csvs, arrays


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    first = dataset_contents(make_synthetic_broden(tmp_path / "a", num_images=12, image_size=32, seed=3))
    again = dataset_contents(make_synthetic_broden(tmp_path / "b", num_images=12, image_size=32, seed=3))
    other = dataset_contents(make_synthetic_broden(tmp_path / "c", num_images=12, image_size=32, seed=4))
    assert first[0] == again[0]
    assert len(first[1]) == len(again[1]) and all(np.array_equal(a, b) for a, b in zip(first[1], again[1]))
    assert first[0]["index.csv"] != other[0]["index.csv"] or first[0]["label.csv"] != other[0]["label.csv"]


def test_worker_processes_write_the_same_dataset(tmp_path: Path) -> None:
    serial = dataset_contents(make_synthetic_broden(tmp_path / "a", num_images=10, image_size=32))
    parallel = dataset_contents(
        make_synthetic_broden(tmp_path / "b", num_images=10, image_size=32, workers=2)
    )
    assert serial[0] == parallel[0]
    assert all(np.array_equal(a, b) for a, b in zip(serial[1], parallel[1]))


def test_a_complete_dataset_is_reused_and_other_parameters_replace_it(tmp_path: Path) -> None:
    root = make_synthetic_broden(tmp_path / "d", num_images=4, image_size=32)
    stamp = (root / "index.csv").stat().st_mtime_ns
    assert make_synthetic_broden(root, num_images=4, image_size=32) == root
    assert (root / "index.csv").stat().st_mtime_ns == stamp
    make_synthetic_broden(root, num_images=5, image_size=32)
    assert len(read_csv(root / "index.csv")) == 5
    assert json.loads((root / "synthetic.json").read_text())["num_images"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no staging directory left behind


def test_a_foreign_directory_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        make_synthetic_broden(tmp_path / "mine", num_images=2, image_size=32)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"image_size": 33}, "image_size=33 must be even"),
        ({"image_size": 30}, "image_size=30 must be an integer >= 32"),
        ({"num_images": 0}, "num_images=0"),
        ({"seed": -1}, "seed=-1"),
        ({"jpeg_quality": 100}, "jpeg_quality=100"),
    ],
)
def test_invalid_arguments_name_the_argument(tmp_path: Path, arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_synthetic_broden(tmp_path / "d", **{"num_images": 2, "image_size": 32, **arguments})


def test_cached_path_lives_under_the_cache_root_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIGHTNING_DISSECT_CACHE", str(tmp_path))
    root = synthetic_broden_path(num_images=3, image_size=32, seed=1)
    assert root.parent.parent == tmp_path and (root / "index.csv").is_file()
    assert synthetic_broden_path(num_images=3, image_size=32, seed=1) == root


def test_targets_agree_with_the_labels(root: Path) -> None:
    targets = synthetic_targets(root)
    names = synthetic_label_names()
    rows = read_csv(root / "index.csv")
    assert targets["background"].dtype == torch.long and targets["background"].shape == (60,)
    assert targets["objects"].shape == (60, len(SYNTHETIC_TASKS["objects"]))
    assert targets["materials"].shape == (60, len(SYNTHETIC_TASKS["materials"]))
    assert targets["train"].tolist() == [row["split"] == "train" for row in rows]
    for i, row in enumerate(rows):
        background = int(row["scene"] or row["texture"])
        assert SYNTHETIC_TASKS["background"][targets["background"][i]] == names[background]
        objects = set(np.unique(label_map(root, items(row["object"])[0])).tolist())
        expected = [float(names.index(s) in objects) for s in SYNTHETIC_TASKS["objects"]]
        assert targets["objects"][i].tolist() == expected
    assert targets["objects"].sum(1).min() >= 1


def test_broden_reader_reads_the_synthetic_dataset(root: Path) -> None:
    broden_module = pytest.importorskip("lightning_dissect.broden")
    broden = broden_module.Broden(root)
    assert len(broden) == 60
    assert broden.categories == CATEGORIES
    assert broden.label_names == synthetic_label_names()
    assert broden.primary_category[synthetic_label_names().index("fabric")] == "material"
    row = read_csv(root / "index.csv")[5]
    maps, image_labels = broden.read_segmentation(5)
    expected = [label_map(root, item) for c in PIXEL_LEVEL for item in items(row[c])]
    assert [m.tolist() for m in maps] == [e.tolist() for e in expected]
    assert image_labels == [int(n) for c in IMAGE_LEVEL for n in items(row[c])]
    assert tuple(broden.read_image(5).shape) == (3, 64, 64)
