"""Broden: reading, the primary-category rule, and every error a user can cause (SEMANTICS §1)."""

from __future__ import annotations

import csv
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dissect.broden import Broden, BrodenError, BrodenRow

# ---------------------------------------------------------------------- a tiny Broden, written here

CATEGORIES = ["color", "object", "part", "scene"]
INDEX_HEADER = ["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES]
IMAGE_SIZE = (8, 6)
SEGMENTATION_SIZE = (4, 3)


def label_maps() -> dict[str, np.ndarray]:
    """The PNG label maps of the tiny dataset, by file name (global label numbers, 4 x 3)."""
    color = np.ones(SEGMENTATION_SIZE, dtype=np.int64)
    color[0] = 0
    obj = np.full(SEGMENTATION_SIZE, 2, dtype=np.int64)
    obj[2:] = 300  # 300 = 44 + 256 * 1: the green channel carries the high byte
    part1 = np.zeros(SEGMENTATION_SIZE, dtype=np.int64)
    part1[:, 0] = 3
    part2 = np.zeros(SEGMENTATION_SIZE, dtype=np.int64)
    part2[0, 0] = 5
    return {
        "a_color.png": color,
        "a_object.png": obj,
        "a_part1.png": part1,
        "a_part2.png": part2,
        "b_object.png": obj,
    }


def tiny_tables(zero_rows: bool = False) -> dict[str, list[list[str]]]:
    """The csv files of the tiny dataset, header first; tests edit them before write_broden.

    Labels 1..5, 7 and 300 (6 and 8..299 are gaps); 7 is in no c_ file. Label 2's name holds a comma and
    label 3's syns a line break, so the csv module's quoting is exercised. Primary categories: 2 is in
    object (0.3) and part (0.1) -> object; 3 ties object/part at 0.2 -> object (first in category.csv);
    5 is in object (0.4) and part (0.6) -> part.
    """
    zero_label = [["0", "-", "", "0", "0", ""]] if zero_rows else []
    zero_code = [["0", "0", "-", "0", "0"]] if zero_rows else []
    coverage = {
        "color": [(1, 0.5)],
        "object": [(2, 0.3), (3, 0.2), (5, 0.4), (300, 0.1)],
        "part": [(2, 0.1), (3, 0.2), (5, 0.6)],
        "scene": [(4, 1.0)],
    }
    names = {1: "red", 2: "bag, handbag", 3: "wheel", 4: "street", 5: "sky", 7: "orphan", 300: "door"}
    tables = {
        "category.csv": [["name", "first", "last", "count", "frequency"]]
        + [[name, "1", "300", "1", "1"] for name in CATEGORIES],
        "label.csv": [["number", "name", "category", "frequency", "coverage", "syns"]]
        + zero_label
        + [
            [str(n), name, "object(1)", "1", "0.5", "rim\nhub" if n == 3 else ""] for n, name in names.items()
        ],
        "index.csv": [
            list(INDEX_HEADER),  # a copy: tests edit the tables in place
            "a.jpg,train,8,6,4,3,a_color.png,a_object.png,a_part1.png;a_part2.png,4".split(","),
            "b.jpg,val,8,6,4,3,,b_object.png,,".split(","),
            "c.png,val,8,6,4,3,,,,7;4".split(","),
        ],
    }
    for category, rows in coverage.items():
        tables[f"c_{category}.csv"] = (
            [["code", "number", "name", "frequency", "coverage"]]
            + zero_code
            + [[str(code), str(n), names[n], "1", str(value)] for code, (n, value) in enumerate(rows, 1)]
        )
    return tables


def write_csv(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="") as file:
        csv.writer(file).writerows(rows)


def write_label_map(path: Path, labels: np.ndarray) -> None:
    """Encodes global label numbers as R + 256 * G, as Broden does."""
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    Image.fromarray(rgb, "RGB").save(path)


def write_broden(root: Path, tables: dict[str, list[list[str]]] | None = None) -> Path:
    """Writes the tiny dataset (or ``tables`` with its images) under ``root``; returns ``root``."""
    images = root / "images"
    images.mkdir(parents=True)
    for name, rows in (tables or tiny_tables()).items():
        write_csv(root / name, rows)
    h, w = IMAGE_SIZE
    Image.new("RGB", (w, h), (200, 30, 10)).save(images / "a.jpg")
    Image.new("L", (w, h), 90).save(images / "b.jpg")
    Image.new("RGBA", (w, h), (1, 2, 3, 4)).save(images / "c.png")
    for name, labels in label_maps().items():
        write_label_map(images / name, labels)
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_broden(tmp_path / "broden")


# ---------------------------------------------------------------------- reading


@pytest.mark.parametrize("zero_rows", [False, True], ids=["no-label-0-rows", "label-0-rows"])
def test_labels_and_primary_categories(tmp_path: Path, zero_rows: bool) -> None:
    broden = Broden(write_broden(tmp_path / "b", tiny_tables(zero_rows)))
    assert broden.categories == CATEGORIES
    assert len(broden.label_names) == 301
    assert broden.label_names[:8] == ["-", "red", "bag, handbag", "wheel", "street", "sky", "", "orphan"]
    assert broden.label_names[300] == "door"
    assert broden.primary_category[:8] == [None, "color", "object", "object", "scene", "part", None, None]
    assert broden.primary_category[300] == "object"
    assert broden.coverage["part"] == {2: 0.1, 3: 0.2, 5: 0.6}
    assert all(0 not in coverage for coverage in broden.coverage.values())


def test_primary_categories_among_a_subset_in_any_order(root: Path) -> None:
    broden = Broden(root)
    primary = broden.primary_categories(["scene", "part"])
    assert primary[:8] == [None, None, "part", "part", "scene", "part", None, None]
    assert primary[300] is None
    assert broden.primary_categories(["object", "color", "part", "scene"]) == broden.primary_category


def test_primary_category_tie_goes_to_category_first_in_category_csv(tmp_path: Path) -> None:
    tables = tiny_tables()
    # Put part before object in category.csv: label 3 (0.2 in both) now goes to part.
    tables["category.csv"][2], tables["category.csv"][3] = (
        tables["category.csv"][3],
        tables["category.csv"][2],
    )
    broden = Broden(write_broden(tmp_path / "b", tables))
    assert broden.categories == ["color", "part", "object", "scene"]
    assert broden.primary_category[3] == "part"
    assert broden.primary_category[2] == "object"


def test_unknown_or_empty_category_selection_lists_the_categories(root: Path) -> None:
    broden = Broden(root)
    with pytest.raises(BrodenError, match=r"'texture'.* are color, object, part, scene"):
        broden.primary_categories(["part", "texture"])
    with pytest.raises(BrodenError, match="categories is empty"):
        broden.read_segmentation(0, [])
    with pytest.raises(BrodenError, match=r"categories=\['part'\]"):
        broden.primary_categories("part")


def test_rows_cells_and_splits(root: Path) -> None:
    broden = Broden(root)
    assert len(broden) == 3
    assert broden.splits == ["train", "val", "val"]
    assert broden.row(0) == BrodenRow(
        image="a.jpg",
        split="train",
        image_size=(8, 6),
        segmentation_size=(4, 3),
        cells={
            "color": ["a_color.png"],
            "object": ["a_object.png"],
            "part": ["a_part1.png", "a_part2.png"],
            "scene": [4],
        },
    )
    assert broden.row(1).cells == {"color": [], "object": ["b_object.png"], "part": [], "scene": []}
    assert broden.row(2).cells["scene"] == [7, 4]
    with pytest.raises(IndexError, match="rows 0 to 2"):
        broden.row(3)


def test_read_segmentation_decodes_every_map_of_the_selected_categories(root: Path) -> None:
    maps, image_labels = Broden(root).read_segmentation(0)
    expected = label_maps()
    assert [m.dtype for m in maps] == [torch.int32] * 4
    for got, name in zip(maps, ["a_color.png", "a_object.png", "a_part1.png", "a_part2.png"], strict=True):
        assert torch.equal(got, torch.from_numpy(expected[name]).int()), name
    assert image_labels == [4]


def test_read_segmentation_reads_only_the_selected_columns(root: Path) -> None:
    (root / "images" / "a_color.png").unlink()
    (root / "images" / "a_object.png").unlink()
    broden = Broden(root)
    maps, image_labels = broden.read_segmentation(0, categories=["scene", "part"])
    assert len(maps) == 2 and image_labels == [4]
    assert broden.read_segmentation(2, categories=["scene"]) == ([], [7, 4])
    assert broden.read_segmentation(1, categories=["color", "scene"]) == ([], [])


def test_read_image_converts_to_rgb(root: Path) -> None:
    broden = Broden(root)
    rgb = broden.read_image(0)
    assert rgb.dtype == torch.uint8 and rgb.shape == (3, 8, 6)
    assert (rgb.int() - torch.tensor([200, 30, 10]).view(3, 1, 1)).abs().max() <= 3  # JPEG is lossy
    gray = broden.read_image(1)
    assert gray.shape == (3, 8, 6) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    rgba = broden.read_image(2)
    assert rgba.shape == (3, 8, 6) and rgba[:, 0, 0].tolist() == [1, 2, 3]


def test_index_csv_may_have_extra_columns(tmp_path: Path) -> None:
    tables = tiny_tables()
    for row, extra in zip(tables["index.csv"], ["notes", "x", "", "y"], strict=True):
        row.insert(2, extra)
    broden = Broden(write_broden(tmp_path / "b", tables))
    assert broden.row(0).image_size == (8, 6)
    assert broden.categories == CATEGORIES


def test_fingerprint_is_stable_and_follows_the_csv_bytes(tmp_path: Path) -> None:
    first = Broden(write_broden(tmp_path / "a")).fingerprint()
    assert len(first) == 64 and first == Broden(write_broden(tmp_path / "b")).fingerprint()
    tables = tiny_tables()
    tables["c_part.csv"][1][-1] = "0.11"
    assert Broden(write_broden(tmp_path / "c", tables)).fingerprint() != first


# ---------------------------------------------------------------------- csv errors, raised by Broden()


def test_missing_root_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(BrodenError, match=r"nowhere does not exist; download it with download_broden"):
        Broden(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["index.csv", "label.csv", "category.csv", "c_part.csv"])
def test_missing_file_is_named(root: Path, name: str) -> None:
    (root / name).unlink()
    with pytest.raises(BrodenError, match=rf"{name} is missing"):
        Broden(root)


@pytest.mark.parametrize(
    ("name", "column"), [("index.csv", "sh"), ("label.csv", "number"), ("c_object.csv", "coverage")]
)
def test_missing_column_is_named(tmp_path: Path, name: str, column: str) -> None:
    tables = tiny_tables()
    position = tables[name][0].index(column)
    tables[name] = [row[:position] + row[position + 1 :] for row in tables[name]]
    with pytest.raises(BrodenError, match=rf"{name} has no column '{column}'"):
        Broden(write_broden(tmp_path / "b", tables))


def test_category_without_index_column_names_both_files(tmp_path: Path) -> None:
    tables = tiny_tables()
    tables["category.csv"].append(["texture", "1", "1", "1", "1"])
    tables["c_texture.csv"] = [["code", "number", "name", "frequency", "coverage"]]
    with pytest.raises(
        BrodenError, match=r"index.csv has no column for the category texture listed in .*category.csv"
    ):
        Broden(write_broden(tmp_path / "b", tables))


# (file, row in the table (0 is the header), column, new value, expected message); the row numbers of the
# messages are 0-based data rows, the line numbers 1-based lines of the file.
BAD_CELLS = {
    "ih": ("index.csv", 2, "ih", "eight", "index.csv row 1 (line 3): ih is 'eight', not an integer >= 1"),
    "iw": ("index.csv", 1, "iw", "6.0", "index.csv row 0 (line 2): iw is '6.0', not an integer >= 1"),
    "sh": ("index.csv", 3, "sh", "0", "index.csv row 2 (line 4): sh is '0', not an integer >= 1"),
    "sw": ("index.csv", 2, "sw", "", "index.csv row 1 (line 3): sw is '', not an integer >= 1"),
    "scene": ("index.csv", 3, "scene", "4;6", "index.csv row 2 (line 4): scene label number 6 is not in"),
    # label.csv row 2 ("wheel") spans lines 4-5 (its syns hold a line break), so row 3 is on line 6.
    "label-twice": ("label.csv", 4, "number", "1", "label.csv row 3 (line 6): label number 1 is listed"),
    "label-number": ("label.csv", 1, "number", "one", "label.csv row 0 (line 2): number is 'one', not an"),
    "c-unknown": ("c_object.csv", 2, "number", "6", "c_object.csv row 1 (line 3): label number 6 is not"),
    "c-twice": ("c_object.csv", 2, "number", "2", "c_object.csv row 1 (line 3): label number 2 is listed"),
    "c-coverage": ("c_part.csv", 1, "coverage", "", "c_part.csv row 0 (line 2): coverage is '', not a"),
    "category-twice": ("category.csv", 3, "name", "color", "category.csv row 2 (line 4): category 'color'"),
    "category-fixed": ("category.csv", 1, "name", "split", "category.csv row 0 (line 2): 'split' cannot"),
    # Python's int() and float() accept "1_2", " 7", "+7", "７" (full-width) and "-0.5"; a Broden number is
    # ASCII digits (coverage: a plain decimal >= 0), so each of these is refused.
    "label-underscore": ("label.csv", 1, "number", "1_2", "label.csv row 0 (line 2): number is '1_2'"),
    "label-space": ("label.csv", 1, "number", " 1", "label.csv row 0 (line 2): number is ' 1'"),
    "label-plus": ("label.csv", 1, "number", "+1", "label.csv row 0 (line 2): number is '+1'"),
    "label-fullwidth": ("label.csv", 1, "number", "\uff11", "label.csv row 0 (line 2): number is '\uff11'"),
    "c-number": ("c_object.csv", 1, "number", "0_2", "c_object.csv row 0 (line 2): number is '0_2'"),
    "size-underscore": ("index.csv", 1, "ih", "0_8", "index.csv row 0 (line 2): ih is '0_8'"),
    "size-space": ("index.csv", 2, "sw", "3 ", "index.csv row 1 (line 3): sw is '3 '"),
    "coverage-negative": ("c_part.csv", 1, "coverage", "-0.1", "c_part.csv row 0 (line 2): coverage is '-0.1'"),
    "coverage-underscore": ("c_part.csv", 2, "coverage", "0_2", "c_part.csv row 1 (line 3): coverage is '0_2'"),
    "coverage-infinite": ("c_part.csv", 2, "coverage", "1e999", "c_part.csv row 1 (line 3): coverage is '1e999'"),
}


@pytest.mark.parametrize(("name", "row", "column", "value", "expected"), BAD_CELLS.values(), ids=BAD_CELLS)
def test_bad_cell_is_named_by_file_row_and_line(
    tmp_path: Path, name: str, row: int, column: str, value: str, expected: str
) -> None:
    tables = tiny_tables()
    tables[name][row][tables[name][0].index(column)] = value
    with pytest.raises(BrodenError) as error:
        Broden(write_broden(tmp_path / "b", tables))
    assert expected in str(error.value)
    assert "fix the file, or download the dataset again" in str(error.value)


def test_row_with_missing_cells_is_named(tmp_path: Path) -> None:
    tables = tiny_tables()
    tables["index.csv"][2] = tables["index.csv"][2][:-1]
    with pytest.raises(BrodenError, match=r"index.csv row 1 \(line 3\): 9 cells where the header has 10"):
        Broden(write_broden(tmp_path / "b", tables))


# ---------------------------------------------------------------------- image errors, raised by read_*


def test_missing_image_names_path_and_row(root: Path) -> None:
    (root / "images" / "b.jpg").unlink()
    with pytest.raises(BrodenError, match=r"index.csv row 1 \(line 3\): .*b.jpg is missing"):
        Broden(root).read_image(1)


def test_unreadable_image_names_path_and_row(root: Path) -> None:
    (root / "images" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BrodenError, match=r"index.csv row 0 \(line 2\): .*a.jpg cannot be decoded"):
        Broden(root).read_image(0)


def test_image_of_wrong_size_is_refused(root: Path) -> None:
    Image.new("RGB", (7, 8)).save(root / "images" / "b.jpg")
    with pytest.raises(BrodenError, match=r"index.csv row 1 \(line 3\): image .*b.jpg is 8x7 .* say 8x6"):
        Broden(root).read_image(1)


def test_missing_label_map_names_png_and_row(root: Path) -> None:
    (root / "images" / "a_part2.png").unlink()
    with pytest.raises(BrodenError, match=r"index.csv row 0 \(line 2\): .*a_part2.png is missing"):
        Broden(root).read_segmentation(0)


def test_label_map_of_wrong_size_is_refused(root: Path) -> None:
    write_label_map(root / "images" / "b_object.png", np.ones((4, 4), dtype=np.int64))
    with pytest.raises(
        BrodenError, match=r"row 1 \(line 3\): object label map .*b_object.png is 4x4 .* say 4x3"
    ):
        Broden(root).read_segmentation(1)


@pytest.mark.parametrize("number", [6, 301, 65535])
def test_pixel_label_not_in_label_csv_is_named(root: Path, number: int) -> None:
    labels = label_maps()["b_object.png"]
    labels[1, 1] = number
    write_label_map(root / "images" / "b_object.png", labels)
    with pytest.raises(
        BrodenError,
        match=rf"row 1 \(line 3\): object label map .*b_object.png holds label number\(s\) {number} ",
    ):
        Broden(root).read_segmentation(1)


# ---------------------------------------------------------------------- numbers, cells and csv syntax


@pytest.mark.parametrize("coverage", ["0.25", "1", ".5", "2.5e-05", "3E2"])
def test_plain_decimal_coverage_is_read(tmp_path: Path, coverage: str) -> None:
    tables = tiny_tables()
    tables["c_part.csv"][1][4] = coverage
    assert Broden(write_broden(tmp_path / "b", tables)).coverage["part"][2] == float(coverage)


@pytest.mark.parametrize("item", ["-3", "+4"])
def test_signed_number_in_an_image_level_cell_is_an_invalid_label_number(tmp_path: Path, item: str) -> None:
    tables = tiny_tables()
    tables["index.csv"][3][-1] = f"4;{item}"
    with pytest.raises(BrodenError, match=rf"index.csv row 2 \(line 4\): scene item '\{item}' is not a label num"):
        Broden(write_broden(tmp_path / "b", tables))


@pytest.mark.parametrize("number", [65536, 300_000_000, 4_000_000_000, 10**30])
def test_label_number_above_the_label_map_range_is_refused(tmp_path: Path, number: int) -> None:
    tables = tiny_tables()
    tables["label.csv"].append([str(number), "huge", "object(1)", "1", "0.5", ""])
    with pytest.raises(BrodenError, match=rf"label.csv row 7 \(line 10\): number is '{number}', above 65535"):
        Broden(write_broden(tmp_path / "b", tables))


def test_label_number_65535_is_the_largest_accepted(tmp_path: Path) -> None:
    tables = tiny_tables()
    tables["label.csv"].append(["65535", "last", "object(1)", "1", "0.5", ""])
    broden = Broden(write_broden(tmp_path / "b", tables))
    assert len(broden.label_names) == 65536 and broden.label_names[65535] == "last"


def test_image_level_number_with_thousands_of_digits_is_unknown_not_a_crash(tmp_path: Path) -> None:
    tables = tiny_tables()
    tables["index.csv"][3][-1] = "4;" + "9" * 5000
    with pytest.raises(BrodenError, match=r"index.csv row 2 \(line 4\): scene label number 9999.* not in label"):
        Broden(write_broden(tmp_path / "b", tables))


def test_cell_over_the_csv_field_limit_names_file_row_and_line(tmp_path: Path) -> None:
    root = write_broden(tmp_path / "b")
    text = (root / "index.csv").read_text()
    # A quote that never closes makes the rest of the file one cell, past the csv module's limit.
    (root / "index.csv").write_text(text + 'd.jpg,val,8,6,4,3,,"' + "x" * 200_000 + "\n")
    with pytest.raises(BrodenError, match=r"index.csv row 3 \(line 5\): .*field larger than field limit"):
        Broden(root)


# ---------------------------------------------------------------------- paths stay inside images/

# (row of the table (0 is the header), column, cell, what the message says); checked by Broden(), for
# every row and column, before any file is opened.
ESCAPING_PATHS = {
    "image-parent": (2, "image", "../../outside.png", "climbs out of images/ with '..'"),
    "image-absolute": (1, "image", "{outside}", "is absolute"),
    "map-parent": (1, "object", "../../outside.png", "climbs out of images/ with '..'"),
    "map-inner-parent": (1, "part", "a_part1.png;x/../../outside.png", "climbs out of images/ with '..'"),
    "map-absolute": (2, "color", "{outside}", "is absolute"),
    "map-drive": (1, "object", "C:/outside.png", "is absolute"),
    "map-backslash": (1, "object", "..\\outside.png", "holds a backslash"),
    "map-nul": (2, "object", "b_object.png\0x", "holds a NUL character"),
}


@pytest.mark.parametrize(("row", "column", "cell", "problem"), ESCAPING_PATHS.values(), ids=ESCAPING_PATHS)
def test_path_that_leaves_images_is_refused_naming_file_row_and_column(
    tmp_path: Path, row: int, column: str, cell: str, problem: str
) -> None:
    outside = tmp_path / "outside.png"  # a valid label map and image, outside the dataset
    write_label_map(outside, label_maps()["b_object.png"])
    tables = tiny_tables()
    tables["index.csv"][row][INDEX_HEADER.index(column)] = cell.format(outside=outside)
    with pytest.raises(BrodenError) as error:
        Broden(write_broden(tmp_path / "b", tables))
    message = str(error.value)
    assert f"index.csv row {row - 1} (line {row + 1}): {column} path " in message and problem in message


def test_empty_image_cell_is_refused(tmp_path: Path) -> None:
    tables = tiny_tables()
    tables["index.csv"][3][0] = ""
    with pytest.raises(BrodenError, match=r"index.csv row 2 \(line 4\): the image cell is empty"):
        Broden(write_broden(tmp_path / "b", tables))


def test_names_with_dots_colons_and_subfolders_are_paths_inside_images(tmp_path: Path) -> None:
    tables = tiny_tables()
    tables["index.csv"][2][INDEX_HEADER.index("object")] = "sub/b..object:1.png"
    root = write_broden(tmp_path / "b", tables)
    (root / "images" / "sub").mkdir()
    (root / "images" / "b_object.png").rename(root / "images" / "sub" / "b..object:1.png")
    maps, _ = Broden(root).read_segmentation(1)
    assert torch.equal(maps[0], torch.from_numpy(label_maps()["b_object.png"]).int())


@pytest.mark.parametrize("target", ["outside", "dangling-outside"])
def test_symlink_out_of_images_is_refused_when_the_file_is_read(root: Path, target: str) -> None:
    outside = root.parent / "outside.png"
    if target == "outside":
        write_label_map(outside, label_maps()["b_object.png"])
    link = root / "images" / "b_object.png"
    link.unlink()
    link.symlink_to(Path("..") / ".." / outside.name)  # relative: images/../../outside.png
    broden = Broden(root)  # the csv files are fine; the link is followed only when the file is read
    with pytest.raises(
        BrodenError, match=r"index.csv row 1 \(line 3\): object file .*b_object.png resolves to .*outside.png, out"
    ):
        broden.read_segmentation(1)


def test_symlinks_inside_images_and_a_linked_images_folder_are_read(root: Path, tmp_path: Path) -> None:
    maps = root / "images" / "maps"
    maps.mkdir()
    (root / "images" / "b_object.png").rename(maps / "b_object.png")
    (root / "images" / "b_object.png").symlink_to(Path("maps") / "b_object.png")
    moved = tmp_path / "elsewhere"
    (root / "images").rename(moved)
    (root / "images").symlink_to(moved)  # e.g. the images kept on another disk
    maps_read, _ = Broden(root).read_segmentation(1)
    assert torch.equal(maps_read[0], torch.from_numpy(label_maps()["b_object.png"]).int())


@pytest.fixture
def fail_on_hang() -> Iterator[None]:
    """Turns a hang into a failure where signals allow it (a FIFO opened for reading blocks in open())."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def hung(*_: object) -> None:
        raise TimeoutError("hung for 20 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind", ["FIFO", "directory"])
def test_only_regular_files_are_opened(root: Path, kind: str, fail_on_hang: None) -> None:
    path = root / "images" / "a_part2.png"
    path.unlink()
    if kind == "FIFO":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this platform")
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(
        BrodenError, match=rf"index.csv row 0 \(line 2\): part file .*a_part2.png is a {kind}, not a regular file"
    ):
        Broden(root).read_segmentation(0)


@pytest.mark.parametrize("name", ["index.csv", "c_part.csv"])
def test_csv_file_that_is_a_fifo_is_refused(root: Path, name: str, fail_on_hang: None) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    (root / name).unlink()
    os.mkfifo(root / name)
    with pytest.raises(BrodenError, match=rf"{name} is a FIFO, not a regular file"):
        Broden(root)


@pytest.mark.parametrize(("format", "mode"), [("JPEG", "RGB"), ("PNG", "L"), ("PNG", "I;16")])
def test_label_map_must_be_an_rgb_png(root: Path, format: str, mode: str) -> None:
    # Label 1 everywhere except row 0 (as in a_color.png), saved in a lossy format or without R and G.
    labels = label_maps()["a_color.png"].astype(np.uint8)
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[..., 0] = labels
    image = Image.fromarray(rgb, "RGB") if mode == "RGB" else Image.fromarray(labels, "L").convert(mode)
    image.save(root / "images" / "a_color.png", format=format, **({"quality": 100} if format == "JPEG" else {}))
    expected = f"holds {format} data, not PNG" if format == "JPEG" else f"is a PNG of mode {mode}"
    with pytest.raises(BrodenError, match=rf"row 0 \(line 2\): color label map .*a_color.png {expected}"):
        Broden(root).read_segmentation(0)


def test_where_names_row_and_line_with_blank_lines(root: Path) -> None:
    lines = (root / "index.csv").read_text().splitlines(keepends=True)
    (root / "index.csv").write_text(lines[0] + "\n" + lines[1] + "\n\n" + "".join(lines[2:]))
    broden = Broden(root)
    assert broden.where(0).endswith("index.csv row 0 (line 3)")
    assert broden.where(2).endswith("index.csv row 2 (line 7)")
    with pytest.raises(IndexError):
        broden.where(3)


def test_probe_size_error_names_the_line_of_the_row(tmp_path: Path) -> None:
    from lightning_dissect.probe import ProbeSet

    tables = tiny_tables()
    tables["index.csv"][3][2:4] = ["6", "8"]  # row 2: another image size than rows 0 and 1
    root = write_broden(tmp_path / "b", tables)
    lines = (root / "index.csv").read_text().splitlines(keepends=True)
    (root / "index.csv").write_text("".join(lines[:3]) + "\n\n" + lines[3])  # row 2 moves to line 6
    with pytest.raises(BrodenError, match=r"index.csv row 2 \(line 6\): image/segmentation size \(6, 8\)"):
        ProbeSet(root, cache_dir=False)
