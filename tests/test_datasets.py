"""The dataset adapters, each on a tiny dataset written here in its format: the probe built from it gives the
dissection of its Broden copy, a planted unit finds its concept, the copy keeps every label, bad files are named.

torchvision (VOC, Cityscapes) and pycocotools (COCO) are optional: their tests are skipped without them; COCO
panoptic needs neither.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lightning_dissect as ld
from lightning_dissect.concept_source import DatasetError
from lightning_dissect.datasets import ImageMaskFolder
from tests.concepts import (
    PlantedRed,
    SmallCNN,
    assert_same_dissection,
    assert_same_probe,
    planted_image,
    planted_quantile,
)

SIZE = 32  # image pixels; the label maps are SIZE // 2, and every region is made of 2 x 2 blocks of them
HALF = SIZE // 2
COUNT = 8


def blocks(rng: np.random.Generator, values: list[int], p: list[float] | None = None) -> np.ndarray:
    """A `(HALF, HALF)` map of `values` drawn in 2 x 2 blocks, so resizing by nearest neighbour is exact."""
    return np.kron(rng.choice(values, size=(HALF // 2, HALF // 2), p=p), np.ones((2, 2), dtype=int))


def full(half_map: np.ndarray) -> np.ndarray:
    """A label-map-sized array at image size (each value on 2 x 2 pixels)."""
    return np.kron(half_map, np.ones((2, 2), dtype=half_map.dtype))


def save_image(path: Path, image: np.ndarray | bytes, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        Image.fromarray(image).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def save_mask(path: Path, values: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.fromarray(values.astype(np.uint8), mode="L")
    if mode == "P":
        mask = mask.convert("P")
        mask.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    mask.save(path)


class Scenes:
    """`COUNT` scenes: a planted `target` value on a random block region, whose image is red exactly there."""

    def __init__(self, values: list[int], target: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.maps, self.images, self.inside = [], [], 0
        for _ in range(COUNT):
            labels = blocks(rng, values)
            region = blocks(rng, [0, 1], [0.7, 0.3]).astype(bool)
            labels[region] = target
            self.inside += int(region.sum())
            self.maps.append(labels)
            self.images.append(planted_image(region, rng))


def label_regions(maps: list[torch.Tensor] | list[np.ndarray]) -> dict[int, np.ndarray]:
    """Per label, the union of its pixels over an item's maps (SEMANTICS §3)."""
    regions: dict[int, np.ndarray] = {}
    for label_map in maps:
        label_map = np.asarray(label_map)
        for label in set(np.unique(label_map).tolist()) - {0}:
            regions[label] = regions.get(label, np.zeros(label_map.shape, bool)) | (label_map == label)
    return regions


def check_adapter(dataset: ld.ConceptDataset, truth: list[dict[str, list[np.ndarray]]], target: str,
                  inside: int, root: Path) -> None:
    """The probe of `dataset` equals that of its Broden copy (every array, two dissections); the planted
    unit gets IoU 1 on `target`; the copy keeps every label; each item's labels are `truth`."""
    probe = ld.ProbeSet.from_dataset(dataset, cache_dir=False, workers=2)
    copy_root = ld.write_broden(dataset, root / "copy", image_format="png", workers=2)
    copy = ld.ProbeSet(copy_root, cache_dir=False)
    assert_same_probe(probe, copy)
    assert_same_dissection(ld.dissect(SmallCNN(), probe, ["block", "head"], quantile=0.05),
                           ld.dissect(SmallCNN(), copy, ["block", "head"], quantile=0.05))
    quantile = planted_quantile(inside, COUNT * HALF * HALF)
    planted = ld.dissect(PlantedRed(), probe, ["features"], quantile=quantile)["features"]
    assert planted.label_name(0) == target and planted.scores[0].item() == 1.0
    broden = ld.Broden(copy_root)
    assert broden.label_names == dataset.label_names
    for i, expected in enumerate(truth):
        for category in dataset.categories:
            maps = broden.read_segmentation(i, [category])[0] if category in broden.categories else []
            got, want = label_regions(maps), label_regions(expected.get(category, []))
            assert sorted(got) == sorted(want) and all((got[c] == want[c]).all() for c in want), (i, category)


# ---------------------------------------------------------------------- a folder of images and masks

FOLDER_OBJECTS = ["background", "target", "car", "tree"]
FOLDER_PARTS = ["-", "wheel", "window"]


def write_folder(root: Path, images: list, objects: list, parts: list) -> Path:
    for i, (image, object_map, part_map) in enumerate(zip(images, objects, parts)):
        name = f"street/img{i}"
        save_image(root / "images" / f"{name}.png", image, "PNG")
        if object_map is not None:
            save_mask(root / "masks" / "object" / f"{name}.png", object_map)
        if part_map is not None:
            save_mask(root / "masks" / "part" / f"{name}.png", part_map, mode="P")
    (root / "objects.txt").write_text("\n".join(FOLDER_OBJECTS) + "\n\n")
    return root


def folder_dataset(root: Path, **options) -> ImageMaskFolder:
    return ImageMaskFolder(root / "images", {"object": root / "masks" / "object", "part": root / "masks" / "part"},
                           {"object": root / "objects.txt", "part": FOLDER_PARTS}, image_size=SIZE,
                           ignore_values=[255], **options)


def test_a_folder_of_images_and_masks_with_objects_and_parts(tmp_path):
    scenes = Scenes([0, 2, 3, 255], target=1)
    rng = np.random.default_rng(3)
    parts = [blocks(rng, [0, 1, 2]) if i % 2 == 0 else None for i in range(COUNT)]
    write_folder(tmp_path / "data", scenes.images, [full(m) for m in scenes.maps],
                 [full(p) if p is not None else None for p in parts])
    dataset = folder_dataset(tmp_path / "data")
    assert dataset.label_names == ["-", "target", "car", "tree", "wheel", "window"]
    assert dataset.categories == ["object", "part"]
    truth = [{"object": [np.where(m == 255, 0, m)], "part": [np.where(p > 0, p + 3, 0)] if p is not None else []}
             for m, p in zip(scenes.maps, parts)]
    check_adapter(dataset, truth, "target", scenes.inside, tmp_path)
    assert ld.Broden(tmp_path / "copy").row(2).image == "street/img2.jpg".replace(".jpg", ".png")


def good_folder_files(count: int = 3) -> tuple[list, list, list]:
    rng = np.random.default_rng(0)
    return ([rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(count)],
            [full(blocks(rng, [0, 1, 2])) for _ in range(count)], [full(blocks(rng, [0, 1]))] + [None] * (count - 1))


@pytest.mark.parametrize("problem, match", [
    ("mask of the wrong size", r"item 1 \(.*street/img1.png\).*mask .*img1.png is 30x32 \(h x w\), its image is 32x32"),
    ("value not in the list", r"item 1 \(.*img1.png\).*mask .*img1.png holds value\(s\) 7 not in the label list "
                              r"\(object values 0 to 3, and ignored 255\)"),
    ("image that does not decode", r"item 1 \(.*img1.png\).*cannot be decoded \(not an image PIL can identify\)"),
    ("truncated image", r"item 1 \(.*img1.png\).*image cannot be decoded"),
])
def test_a_bad_file_of_a_folder_is_named(problem, match, tmp_path):
    images, objects, parts = good_folder_files()
    if problem == "mask of the wrong size":
        objects[1] = objects[1][:30]
    elif problem == "value not in the list":
        objects[1][0, 0] = 7
    elif problem == "image that does not decode":
        images[1] = b"not an image"
    else:
        cut = tmp_path / "cut.png"
        Image.fromarray(images[1]).save(cut)
        images[1] = cut.read_bytes()[:200]
    dataset = folder_dataset(write_folder(tmp_path / "data", images, objects, parts))
    with pytest.raises(DatasetError, match=match):
        ld.ProbeSet.from_dataset(dataset, cache_dir=False, workers=1)


def test_a_folder_refuses_masks_without_images_and_images_without_any_mask(tmp_path):
    images, objects, parts = good_folder_files()
    root = write_folder(tmp_path / "data", images, objects, parts)
    save_mask(root / "masks" / "object" / "street" / "typo.png", objects[0])
    with pytest.raises(DatasetError, match=r"mask .*typo.png has no image .*typo\.\*"):
        folder_dataset(root)
    (root / "masks" / "object" / "street" / "typo.png").unlink()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no image of .* has a mask"):
        ImageMaskFolder(root / "images", tmp_path / "empty", FOLDER_PARTS)


def test_a_folder_probe_is_cached_until_a_mask_changes(tmp_path, monkeypatch):
    images, objects, parts = good_folder_files()
    root = write_folder(tmp_path / "data", images, objects, parts)
    first = ld.ProbeSet.from_dataset(folder_dataset(root), cache_dir=tmp_path / "cache", workers=1)
    calls = []
    monkeypatch.setattr(ImageMaskFolder, "labels", lambda self, i: calls.append(i) or {})
    again = ld.ProbeSet.from_dataset(folder_dataset(root), cache_dir=tmp_path / "cache", workers=1)
    assert calls == [] and again.cache_folder == first.cache_folder  # neither indexed nor decoded again
    assert_same_probe(again, first)
    monkeypatch.undo()
    changed = objects[2].copy()
    changed[changed == 2] = 1
    save_mask(root / "masks" / "object" / "street" / "img2.png", changed)
    fresh = ld.ProbeSet.from_dataset(folder_dataset(root), cache_dir=tmp_path / "cache", workers=1)
    assert not torch.equal(fresh.label_area, first.label_area)
    assert_same_probe(fresh, ld.ProbeSet.from_dataset(folder_dataset(root), cache_dir=False, workers=1))


# ---------------------------------------------------------------------- PASCAL VOC (torchvision)


def write_voc(root: Path, images: list, masks: list) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    ids = [f"2007_{i:06d}" for i in range(len(images))]
    for name, image, mask in zip(ids, images, masks):
        save_image(voc / "JPEGImages" / f"{name}.jpg", image, "JPEG")
        save_mask(voc / "SegmentationClass" / f"{name}.png", mask, mode="P")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def voc_dataset(root: Path) -> ld.ConceptDataset:
    pytest.importorskip("torchvision", reason="VOCSegmentationConcepts reads VOC with torchvision")
    from lightning_dissect.datasets import VOCSegmentationConcepts

    return VOCSegmentationConcepts(root, year="2012", image_set="val", image_size=SIZE)


def test_pascal_voc_through_torchvision(tmp_path):
    scenes = Scenes([0, 8, 255], target=15)  # person, on background, cats and the void band
    dataset = voc_dataset(write_voc(tmp_path / "voc", scenes.images, [full(m) for m in scenes.maps]))
    assert dataset.label_names[15] == "person" and dataset.label_names[8] == "cat"
    truth = [{"object": [np.where(m == 255, 0, m)]} for m in scenes.maps]
    check_adapter(dataset, truth, "person", scenes.inside, tmp_path)
    assert {dataset.split(i) for i in range(len(dataset))} == {"val"}


# ---------------------------------------------------------------------- Cityscapes (torchvision)


def write_cityscapes(root: Path, images: list, ids: list) -> Path:
    for i, (image, label_ids) in enumerate(zip(images, ids)):
        city = ["bonn", "aachen"][i % 2]
        stem = f"{city}_{i:06d}_000019"
        save_image(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", image, "PNG")
        save_mask(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", label_ids)
    return root


def cityscapes_dataset(root: Path) -> ld.ConceptDataset:
    pytest.importorskip("torchvision", reason="CityscapesConcepts reads Cityscapes with torchvision")
    from lightning_dissect.datasets import CityscapesConcepts

    return CityscapesConcepts(root, split="val", image_size=SIZE)


def test_cityscapes_through_torchvision(tmp_path):
    scenes = Scenes([0, 1, 7], target=26)  # cars on the road, unlabeled pixels and the ego vehicle
    dataset = cityscapes_dataset(write_cityscapes(tmp_path / "cityscapes", scenes.images,
                                                  [full(m) for m in scenes.maps]))
    assert dataset.label_names[1] == "road" and dataset.label_names[14] == "car" and len(dataset.label_names) == 20
    # items in path order: aachen's (odd) before bonn's (even)
    order = [i for i in range(COUNT) if i % 2] + [i for i in range(COUNT) if not i % 2]
    truth = [{"object": [np.select([scenes.maps[i] == 7, scenes.maps[i] == 26], [1, 14], 0)]} for i in order]
    check_adapter(dataset, truth, "car", scenes.inside, tmp_path)


def write_voc_pairs(root: Path, images: list, values: list) -> ld.ConceptDataset:
    return voc_dataset(write_voc(root, images, values))


def write_cityscapes_pairs(root: Path, images: list, values: list) -> ld.ConceptDataset:
    return cityscapes_dataset(write_cityscapes(root, images, [np.select([v == 1, v == 2], [7, 26], v) for v in values]))


@pytest.mark.parametrize("problem", ["mask of the wrong size", "value not in the list", "image that does not decode"])
@pytest.mark.parametrize("make, item, bad_value, message", [
    (write_voc_pairs, r"item 2 \(.*2007_000002.jpg\)", 21, "VOC values 0 to 20, and 255"),
    (write_cityscapes_pairs, r"item \d \(.*bonn_000002_000019_leftImg8bit.png\)", 40,
     "Cityscapes label ids 0 to 33"),
], ids=["voc", "cityscapes"])
def test_a_bad_file_read_by_torchvision_is_named(make, item, bad_value, message, problem, tmp_path):
    images, values, _ = good_folder_files()
    if problem == "mask of the wrong size":
        values[2], match = values[2][:30], rf"{item}.* is 30x32 \(h x w\), its image is 32x32"
    elif problem == "value not in the list":
        values[2][4, 4], match = bad_value, rf"{item}.*holds value\(s\) {bad_value} not in the label list \({message}\)"
    else:
        images[2], match = b"\x89PNG broken", rf"{item}.*cannot be decoded"
    with pytest.raises(DatasetError, match=match):
        ld.ProbeSet.from_dataset(make(tmp_path / "data", images, values), cache_dir=False, workers=1)


# ---------------------------------------------------------------------- COCO (pycocotools)

COCO_THINGS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
COCO_STUFF = [{"id": 92, "name": "banner"}, {"id": 149, "name": "grass"}, {"id": 183, "name": "other"}]


def rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as coco_mask

    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def write_coco(root: Path, images: list, annotations: dict[str, list[list[tuple[int, dict]]]],
               categories: dict[str, list[dict]], sizes: list[tuple[int, int]] | None = None) -> dict[str, Path]:
    """COCO files: per category a JSON of the images and their annotations `(category_id, segmentation)`."""
    entries = []
    for i, image in enumerate(images):
        name = f"{i + 1:012d}.jpg"
        save_image(root / "val2017" / name, image, "JPEG")
        height, width = sizes[i] if sizes else (SIZE, SIZE)
        entries.append({"id": 100 + i, "file_name": name, "height": height, "width": width})
    files, number = {}, 1
    for category, per_image in annotations.items():
        anns = []
        for i, image_annotations in enumerate(per_image):
            for category_id, segmentation in image_annotations:
                anns.append({"id": number, "image_id": 100 + i, "category_id": category_id, "iscrowd": 0,
                             "segmentation": segmentation, "area": 1.0, "bbox": [0, 0, 1, 1]})
                number += 1
        files[category] = root / f"{category}_val2017.json"
        files[category].write_text(json.dumps({"images": entries, "annotations": anns,
                                               "categories": categories[category]}))
    return files


def coco_dataset(root: Path, files: dict[str, Path]) -> ld.ConceptDataset:
    pytest.importorskip("pycocotools", reason="COCOConcepts reads COCO annotations with pycocotools")
    from lightning_dissect.datasets import COCOConcepts

    return COCOConcepts(root / "val2017", files, image_size=SIZE, exclude=["other"])


def test_coco_things_and_stuff_with_rle_masks_through_pycocotools(tmp_path):
    pytest.importorskip("pycocotools", reason="COCOConcepts reads COCO annotations with pycocotools")
    scenes = Scenes([0, 3], target=1)  # a person (the planted region) and cars
    rng = np.random.default_rng(5)
    things, stuff, truth = [], [], []
    for i, labels in enumerate(scenes.maps):
        person, car = labels == 1, labels == 3
        # a dog overlapping the person: it cannot share the person's map, so it lands in a second map
        dog = blocks(rng, [0, 1], [0.6, 0.4]).astype(bool) & (person | (labels == 0))
        image_things = [(1, rle(full(person))), (3, rle(full(car)))] + ([(18, rle(full(dog)))] if i % 2 else [])
        grass = blocks(rng, [0, 1]).astype(bool)
        things.append(image_things)
        stuff.append([(149, rle(full(grass))), (183, rle(full(~grass)))] if i != 3 else [])
        object_maps = [np.select([person, car], [1, 2], 0)] + ([np.where(dog, 3, 0)] if i % 2 else [])
        truth.append({"object": object_maps, "stuff": [np.where(grass, 5, 0)] if i != 3 else []})
    files = write_coco(tmp_path / "coco", scenes.images, {"object": things, "stuff": stuff},
                       {"object": COCO_THINGS, "stuff": COCO_STUFF})
    dataset = coco_dataset(tmp_path / "coco", files)
    assert dataset.label_names == ["-", "person", "car", "dog", "banner", "grass"]
    assert dataset.categories == ["object", "stuff"]
    check_adapter(dataset, truth, "person", scenes.inside, tmp_path)
    assert ld.ProbeSet.from_dataset(dataset, cache_dir=False).label_maps.shape[1] == 3  # person/car, dog, grass


@pytest.mark.parametrize("problem, match", [
    ("mask of the wrong size", r"item 1 \(image id 101, .*000000000002.jpg\).*mask of annotation 2 is 30x32"),
    ("label not in the list", r"item 1 \(image id 101, .*000000000002.jpg\).*annotation 2 .*has category_id 99, not "
                              r"one of its categories"),
    ("image that does not decode", r"item 1 \(image id 101, .*000000000002.jpg\).*cannot be decoded"),
])
def test_a_bad_annotation_or_image_of_coco_is_named(problem, match, tmp_path):
    pytest.importorskip("pycocotools", reason="COCOConcepts reads COCO annotations with pycocotools")
    images, masks, _ = good_folder_files()
    things = [[(1, rle(m == 1))] for m in masks]
    if problem == "mask of the wrong size":
        things[1] = [(1, rle(masks[1][:30] == 1))]
    elif problem == "label not in the list":
        things[1] = [(99, rle(masks[1] == 1))]
    else:
        images[1] = b"\xff\xd8 not a jpeg"
    files = write_coco(tmp_path / "coco", images, {"object": things}, {"object": COCO_THINGS})
    with pytest.raises(DatasetError, match=match):
        ld.ProbeSet.from_dataset(coco_dataset(tmp_path / "coco", files), cache_dir=False, workers=1)



# ---------------------------------------------------------------------- COCO panoptic (JSON + PNG segments)

PANOPTIC_CATEGORIES = [{**c, "isthing": 1} for c in COCO_THINGS] + [{**c, "isthing": 0} for c in COCO_STUFF]


def save_segments(path: Path, ids: np.ndarray) -> None:
    """A panoptic PNG: segment id `R + 256 G + 256^2 B`, written channel by channel here (panopticapi's id2rgb)."""
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256**2 % 256], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, mode="RGB").save(path)


def write_panoptic(root: Path, images: list, segments: list[np.ndarray], infos: list[list[tuple[int, int]]],
                   categories: list[dict] = PANOPTIC_CATEGORIES) -> Path:
    """A COCO panoptic dataset: images, per image a segment-id map and its `(segment id, category_id)` list."""
    entries, annotations = [], []
    for i, (image, ids, info) in enumerate(zip(images, segments, infos)):
        name = f"{i + 1:012d}"
        save_image(root / "val2017" / f"{name}.jpg", image, "JPEG")
        save_segments(root / "annotations" / "panoptic_val2017" / f"{name}.png", ids)
        entries.append({"id": 100 + i, "file_name": f"{name}.jpg", "height": ids.shape[0], "width": ids.shape[1]})
        annotations.append({"image_id": 100 + i, "file_name": f"{name}.png", "segments_info": [
            {"id": segment, "category_id": category, "iscrowd": 0, "area": 1, "bbox": [0, 0, 1, 1]}
            for segment, category in info]})
    path = root / "annotations" / "panoptic_val2017.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return path


def panoptic_dataset(root: Path) -> ld.ConceptDataset:
    from lightning_dissect.datasets import COCOPanopticConcepts

    return COCOPanopticConcepts(root / "val2017", root / "annotations" / "panoptic_val2017.json", image_size=SIZE,
                                exclude=["other"])


def test_coco_panoptic_things_and_stuff_from_png_segments(tmp_path):
    scenes = Scenes([0, 3], target=1)  # a person (the planted region) and cars
    rng = np.random.default_rng(11)
    segments, infos, truth = [], [], []
    for i, labels in enumerate(scenes.maps):
        person, car = labels == 1, labels == 3
        left = np.zeros_like(car)
        left[:, : HALF // 2] = True
        grass = blocks(rng, [0, 1]).astype(bool) & (labels == 0)
        other = (labels == 0) & ~grass & (i % 2 == 1)  # excluded: no label
        # segment ids over 255 and 65535 use the G and B channels; two cars are two segments of one category
        ids = np.select([person, car & left, car & ~left, grass, other], [70000 + i, 300, 301, 5, 9], 0)
        segments.append(full(ids))
        infos.append([(70000 + i, 1), (300, 3), (301, 3), (5, 149), (9, 183)])
        truth.append({"object": [np.select([person, car], [1, 2], 0)], "stuff": [np.where(grass, 5, 0)]})
    write_panoptic(tmp_path / "coco", scenes.images, segments, infos)
    dataset = panoptic_dataset(tmp_path / "coco")
    assert dataset.label_names == ["-", "person", "car", "dog", "banner", "grass"]
    assert dataset.categories == ["object", "stuff"]
    check_adapter(dataset, truth, "person", scenes.inside, tmp_path)


@pytest.mark.parametrize("problem, match", [
    ("map of the wrong size", r"item 1 \(image id 101, .*000000000002.jpg\).*segment map 000000000002.png is 30x32"),
    ("segment not listed", r"item 1 \(image id 101, .*000000000002.jpg\).*holds segment id\(s\) 7 that its "
                           r"segments_info does not list"),
    ("label not in the list", r"item 1 \(image id 101, .*000000000002.jpg\).*segment 7 .*has category_id 99, not "
                              r"one of its categories"),
    ("image that does not decode", r"item 1 \(image id 101, .*000000000002.jpg\).*cannot be decoded"),
])
def test_a_bad_segment_map_or_image_of_coco_panoptic_is_named(problem, match, tmp_path):
    images, masks, _ = good_folder_files()
    segments = [np.where(m == 1, 7, 0) for m in masks]
    infos = [[(7, 1)] for _ in masks]
    if problem == "map of the wrong size":
        segments[1] = segments[1][:30]
    elif problem == "segment not listed":
        infos[1] = []
    elif problem == "label not in the list":
        infos[1] = [(7, 99)]
    else:
        images[1] = b"\xff\xd8 not a jpeg"
    write_panoptic(tmp_path / "coco", images, segments, infos)
    with pytest.raises(DatasetError, match=match):
        ld.ProbeSet.from_dataset(panoptic_dataset(tmp_path / "coco"), cache_dir=False, workers=1)


def test_missing_optional_readers_are_named_with_the_way_to_install_them(monkeypatch, tmp_path):
    import builtins

    real_import: Callable = builtins.__import__

    def without(name, *args, **kwargs):
        if name.startswith(("torchvision", "pycocotools")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    from lightning_dissect.datasets import COCOConcepts, VOCSegmentationConcepts

    with pytest.raises(ImportError, match="pip install torchvision"):
        VOCSegmentationConcepts(tmp_path)
    with pytest.raises(ImportError, match=r"pip install lightning-dissect\[coco\]"):
        COCOConcepts(tmp_path, tmp_path / "x.json")


# ---------------------------------------------------------------------- the callback


def test_the_callback_takes_a_dataset_probe_or_the_dataset_itself(tmp_path):
    from tests.test_callback import fit, without_seconds

    scenes = Scenes([0, 2, 3], target=1)
    write_folder(tmp_path / "data", scenes.images, [full(m) for m in scenes.maps], [None] * COUNT)
    dataset = ImageMaskFolder(tmp_path / "data" / "images", tmp_path / "data" / "masks" / "object",
                              tmp_path / "data" / "objects.txt", image_size=SIZE)
    histories = []
    for given in (ld.ProbeSet.from_dataset(dataset, cache_dir=False), dataset):
        callback = ld.DissectionCallback(given, layers="block2", every_n_steps=4, max_overhead=None,
                                         dirpath=tmp_path / f"run{len(histories)}")
        fit([callback], max_epochs=1)
        assert callback.dissector.probe.fingerprint == ld.ProbeSet.from_dataset(dataset, cache_dir=False).fingerprint
        histories.append(without_seconds(callback.dissector.history))
    assert histories[0] == histories[1] and [entry["step"] for entry in histories[0]] == [0, 4]
    cut = ld.DissectionCallback(dataset, layers="block2", probe_size=5, every_n_steps=4, dirpath=tmp_path / "cut")
    fit([cut], max_epochs=1)
    assert len(cut.dissector.probe) <= 5 and cut.dissector.probe.source.dataset is dataset
