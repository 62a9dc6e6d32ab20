"""Unit strips, bar graphs and the callback's media hook, against planted units and brute force."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import lightning_dissect as ld
from lightning_dissect.report import (
    bar_graph,
    bar_graph_media,
    detectors_per_concept,
    iou_histogram,
    saved_strips,
    select_units,
    strip_media,
    unit_strips,
)
from lightning_dissect.report.bargraph import CATEGORY_COLORS
from lightning_dissect.report.strips import DIM, draw_mask
from tests.conftest import write_broden

SIZE = 16  # image side; segmentations are 8 x 8


class ChannelBlocks(nn.Module):
    """Unit i of `pool` is the mean of image channel `channels[i]` over each 2x2 block (one segmentation
    pixel); `swap` exchanges the units."""

    def __init__(self, channels: tuple[int, ...] = (0, 1)) -> None:
        super().__init__()
        self.pick = nn.Conv2d(3, len(channels), 1, bias=False)
        with torch.no_grad():
            self.pick.weight.zero_()
            for unit, channel in enumerate(channels):
                self.pick.weight[unit, channel] = 1.0
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.pick(x)).mean(dim=(2, 3))

    def swap(self) -> None:
        with torch.no_grad():
            self.pick.weight.copy_(self.pick.weight.flip(0))


def planted_dataset(root, num_images: int = 10, seed: int = 0):
    """Images whose red channel is 200 + 5 i exactly on a random block region (the label `blob`) and
    at most 100 elsewhere; green and blue are at least 64, so dimming changes every outside pixel."""
    rng = np.random.default_rng(seed)
    rows, regions = [], []
    for i in range(num_images):
        region = np.zeros((SIZE // 2, SIZE // 2), dtype=bool)
        if i % 4 != 3:  # some images have no blob
            top, left = rng.integers(0, 5, size=2)
            height, width = rng.integers(1, 4, size=2)
            region[top : top + height, left : left + width] = True
        image = rng.integers(64, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
        image[..., 0] = rng.integers(0, 101, size=(SIZE, SIZE))
        image[..., 0][np.kron(region, np.ones((2, 2), dtype=bool))] = 200 + 5 * i
        rows.append({"image": image, "object": [region.astype(np.int64)], "split": "train"})
        regions.append(region)
    root = write_broden(root, {"object": "pixel", "scene": "image"},
                        [("blob", {"object": 1.0}), ("park", {"scene": 1.0})], rows)
    return root, regions


@pytest.fixture
def planted(tmp_path):
    root, regions = planted_dataset(tmp_path / "planted")
    probe = ld.ProbeSet(root, cache_dir=False)
    model = ChannelBlocks()
    cells = probe.images.shape[0] * (SIZE // 2) ** 2
    inside = int(sum(r.sum() for r in regions))
    # The threshold falls halfway between the largest outside value and the smallest inside value.
    quantile = (inside - 0.5) / (cells - 1)
    result = ld.dissect(model, probe, ["pool"], quantile=quantile, top_k=4)
    return model, probe, result, regions


def test_planted_unit_strip_shows_its_mask_exactly_on_the_planted_label(planted):
    model, probe, result, regions = planted
    layer = result["pool"]
    assert layer.label_name(0) == "blob" and float(layer.scores[0]) == 1.0
    strip = unit_strips(model, probe, layer, [0])[0]
    # Most active first: the blob's red value grows with the image index.
    with_blob = [i for i, r in enumerate(regions) if r.any()]
    assert strip.positions == sorted(with_blob, reverse=True)[:4]
    scale = 7  # 16-pixel images are shown as 112-pixel tiles (MIN_TILE), each pixel a 7 x 7 block
    assert strip.scale == scale and strip.tiles.shape[1:] == (SIZE * scale, SIZE * scale, 3)
    for j, position in enumerate(strip.positions):
        expected = np.kron(regions[position], np.ones((2, 2), dtype=bool))
        np.testing.assert_array_equal(strip.masks[j], expected)
        original = probe.images[position].permute(1, 2, 0).numpy()
        tile = strip.tiles[j]
        expected, original = np.kron(expected, np.ones((scale, scale), dtype=bool)), original.repeat(
            scale, axis=0).repeat(scale, axis=1)
        np.testing.assert_array_equal(tile[expected], original[expected])       # inside: untouched
        assert (tile[~expected] != original[~expected]).any(axis=-1).all()     # outside: every pixel changed
        top, left = strip.tile_boxes[j]
        np.testing.assert_array_equal(strip.image[top : top + SIZE * scale, left : left + SIZE * scale], tile)
    assert strip.caption == "pool unit 0: blob (object) IoU 1.000"


def test_draw_mask_dims_outside_and_outlines_just_outside_the_mask():
    image = np.full((6, 6, 3), 200, dtype=np.uint8)
    mask = np.zeros((6, 6), dtype=bool)
    mask[2:4, 2:4] = True
    tile = draw_mask(image, mask, dim=DIM, border=1, border_color=(1, 2, 3))
    ring = np.zeros((6, 6), dtype=bool)
    ring[1:5, 1:5] = True
    ring &= ~mask
    assert (tile[mask] == 200).all()
    assert (tile[ring] == (1, 2, 3)).all()
    assert (tile[~mask & ~ring] == 50).all()


def test_strips_need_no_warning_when_the_model_is_unchanged_and_warn_when_it_changed(planted):
    model, probe, result, _ = planted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unit_strips(model, probe, result["pool"], [0, 1])
    with torch.no_grad():
        model.pick.weight[0, 0] = 2.0
    with pytest.warns(UserWarning, match="unit 0: probe image .* the model changed"):
        unit_strips(model, probe, result["pool"], [0])


def test_top_images_of_a_rotated_dissection_equal_brute_force_and_strips_use_the_rotation(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, stride=2, padding=1))
    rotation = {"seed": 3, "alpha": 0.5}
    result = ld.dissect(model, probe, ["2"], rotation=rotation, top_k=30, batch_size=5)  # k > N: all images
    layer = result["2"]
    with torch.no_grad():
        raw = model(probe.model_input(range(len(probe)), "cpu"))
    maps = ld.rotate_units(raw, ld.Rotation(**rotation).resolve(4))
    peaks = maps.amax(dim=(2, 3))
    for unit in range(4):
        expected = sorted(range(len(probe)), key=lambda x: (-peaks[x, unit].item(), x))
        assert layer.top_images[unit].tolist() == expected
        assert torch.equal(layer.top_activations[unit], peaks[expected, unit])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recomputed maxima match: the rotation was applied
        media = strip_media(model, probe, result, units_per_layer=2)
    assert sorted(media) == [f"dissect/2/strips/unit_{u}" for u in sorted(select_units(layer, 2))]
    with pytest.warns(UserWarning, match="model changed"):
        unit_strips(model, probe, layer, [0])  # no rotation passed: other maps


def test_strips_from_activations_equal_strips_from_the_model(planted):
    model, probe, result, _ = planted
    with torch.no_grad():
        activations = model.pool(model.pick(probe.model_input(range(len(probe)), "cpu")))
    from_model = unit_strips(model, probe, result["pool"], [0, 1], num_images=3)
    from_activations = unit_strips(None, probe, result["pool"], [0, 1], activations=activations, num_images=3)
    for unit in (0, 1):
        assert len(from_model[unit].positions) == 3
        np.testing.assert_array_equal(from_model[unit].image, from_activations[unit].image)


def test_unit_strips_reject_bad_input_naming_it(planted):
    model, probe, result, _ = planted
    with pytest.raises(ValueError, match="unit 2 is not a unit of layer 'pool'"):
        unit_strips(model, probe, result["pool"], [2])
    with pytest.raises(ValueError, match="needs the model"):
        unit_strips(None, probe, result["pool"], [0])
    bare = ld.dissect(model, probe, ["pool"], quantile=0.1, top_k=0)
    with pytest.raises(ValueError, match="top_k=0"):
        unit_strips(model, probe, bare["pool"], [0])


def test_select_units_takes_the_best_scores_then_bounded_switched_units(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    acts = torch.randn(len(probe), 6, 4, 4, generator=torch.Generator().manual_seed(1))
    layer = ld.dissect_activations({"l": acts}, probe, quantile=0.1)["l"]
    layer.scores = torch.tensor([0.1, 0.3, 0.3, 0.0, 0.2, 0.05], dtype=torch.float64)
    assert select_units(layer, 3) == [1, 2, 4]
    assert select_units(layer, 2, switched=[2, 5, 3, 0], max_switched=2) == [1, 2, 5, 3]
    assert select_units(layer, 0, switched=[5, 5]) == [5]
    assert select_units(layer, 1, switched=[5], max_switched=0) == [1]


def test_strip_media_is_bounded_named_by_unit_and_saved_as_images(planted, tmp_path):
    model, probe, result, _ = planted
    media = strip_media(model, probe, result, units_per_layer=1, switched={"pool": [1]}, directory=tmp_path)
    assert sorted(media) == ["dissect/pool/strips/unit_0", "dissect/pool/strips/unit_1"]
    saved = saved_strips(tmp_path, "pool")
    assert saved == {unit: tmp_path / "strips" / "pool" / f"unit_{unit}.jpg" for unit in (0, 1)}
    for unit, path in saved.items():
        image = media[f"dissect/pool/strips/unit_{unit}"]
        decoded = np.asarray(Image.open(path).convert("RGB")).astype(float)
        assert decoded.shape == image.shape and np.abs(decoded - image).mean() < 4  # JPEG, quality 90


def test_strip_media_notes_the_previous_concept_of_switched_units(planted):
    model, probe, result, _ = planted
    previous = ld.Dissection({"pool": ld.LayerDissection(**vars(result["pool"]))}, result.settings)
    previous["pool"].labels = result["pool"].labels.clone()
    previous["pool"].labels[0] = 2  # unit 0 was a "park" detector
    assert ld.concept_changes(previous["pool"], result["pool"])["switched_units"] == [0]
    media = strip_media(model, probe, result, units_per_layer=0, previous=previous)
    assert list(media) == ["dissect/pool/strips/unit_0"]
    strips = unit_strips(model, probe, result["pool"], [0], notes={0: "(was: park)"})
    np.testing.assert_array_equal(media["dissect/pool/strips/unit_0"], strips[0].image)
    assert strips[0].caption.endswith("(was: park)")


def test_detectors_per_concept_equals_a_count_of_detector_labels(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    acts = torch.randn(len(probe), 12, 4, 4, generator=torch.Generator().manual_seed(4))
    layer = ld.dissect_activations({"l": acts}, probe, quantile=0.1, iou_threshold=0.02)["l"]
    groups = detectors_per_concept(layer)
    expected = Counter(layer.label_name(u) for u in range(12) if layer.scores[u] > 0.02)
    assert {concept: count for _, concepts in groups for concept, count in concepts} == dict(expected)
    for category, concepts in groups:
        assert all(layer.categories[int(layer.label_category[layer.label_names.index(c)])] == category
                   for c, _ in concepts)
        assert [count for _, count in concepts] == sorted((count for _, count in concepts), reverse=True)
    assert [category for category, _ in groups] == [c for c in layer.categories if c in {g for g, _ in groups}]


def _has_color(image: np.ndarray, hex_color: str) -> bool:
    rgb = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
    return bool((image == rgb).all(axis=-1).any())


def test_bar_graph_colours_bars_by_category(planted):
    _, _, result, _ = planted
    image = bar_graph(result["pool"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert _has_color(image, CATEGORY_COLORS["object"])   # the blob detector
    assert not _has_color(image, CATEGORY_COLORS["scene"])
    histogram = iou_histogram(result["pool"])
    assert histogram.dtype == np.uint8 and histogram.shape[2] == 3
    assert sorted(bar_graph_media(result)) == ["dissect/pool/bar_graph", "dissect/pool/iou_histogram"]


@pytest.mark.parametrize("outside", [False, True])
def test_figures_are_trimmed_to_their_content_and_never_clipped(outside):
    """One draw, cut to the content plus the padding; content past the figure's edge (here a
    label at x = -0.3) grows the canvas instead of being cut off."""
    from lightning_dissect.report.figures import figure_to_array, new_figure

    figure = new_figure(4.0, 2.0)
    figure.text(-0.3 if outside else 0.5, 0.5, "a label", fontsize=20, color="black", ha="center")
    image = figure_to_array(figure, pad_inches=0.1)
    dark = (image < 128).all(axis=2)
    rows, columns = dark.any(axis=1).nonzero()[0], dark.any(axis=0).nonzero()[0]
    # The dark pixels sit about 0.1 inch (10 px) inside every edge; a wider margin or a cut would show.
    margins = [rows[0], image.shape[0] - 1 - rows[-1], columns[0], image.shape[1] - 1 - columns[-1]]
    assert all(3 <= margin <= 20 for margin in margins), margins  # the bottom one holds the font descent
    assert image.shape[1] < 400  # trimmed well inside the 400 px wide figure, or the label alone when outside


@pytest.mark.parametrize(("side", "tile"), [(16, 112), (64, 128), (100, 200), (112, 112), (224, 224)])
def test_small_images_are_enlarged_by_a_whole_factor_to_tiles_of_at_least_112_pixels(side, tile):
    from lightning_dissect.report.strips import MIN_TILE, enlarge, tile_scale

    scale = tile_scale((side, side + 5))
    assert scale * side == tile and MIN_TILE == 112
    pixels = np.arange(side * 3).reshape(side, 3)
    enlarged = enlarge(pixels, scale)
    assert enlarged.shape == (side * scale, 3 * scale)
    for row in range(0, side * scale, max(1, side * scale // 7)):
        for column in range(3 * scale):
            assert enlarged[row, column] == pixels[row // scale, column // scale]


def test_strips_of_one_layer_have_the_same_height_whatever_their_captions():
    from lightning_dissect.report.strips import compose_strip

    tiles = np.zeros((2, 112, 112, 3), dtype=np.uint8)
    heights = {compose_strip(tiles, caption)[0].shape[0] for caption in ("conv unit 1: sky (scene)", "jpgqy", "a")}
    assert len(heights) == 1


def test_captions_are_set_in_the_dejavu_sans_that_matplotlib_ships():
    import matplotlib
    from PIL import ImageDraw, ImageFont

    from lightning_dissect.report.strips import GAP, compose_strip

    caption = "layer4 unit 12: dog (object) IoU 0.081"
    strip, boxes = compose_strip(np.zeros((3, 128, 128, 3), dtype=np.uint8), caption)
    font = ImageFont.truetype(f"{matplotlib.get_data_path()}/fonts/ttf/DejaVuSans.ttf", 14)  # 128 // 9
    expected = Image.new("RGB", (strip.shape[1], boxes[0][0]), (255, 255, 255))
    ImageDraw.Draw(expected).text((GAP, GAP), caption, fill=(0, 0, 0), font=font)
    np.testing.assert_array_equal(strip[: boxes[0][0]], np.asarray(expected))


def test_bar_graph_title_names_unique_concepts_as_the_scalar_does_and_the_bars_as_unique_top_concepts(
        random_dataset):
    from lightning_dissect.report.bargraph import bar_graph_figure

    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    acts = torch.randn(len(probe), 12, 4, 4, generator=torch.Generator().manual_seed(4))
    layer = ld.dissect_activations({"l": acts}, probe, quantile=0.1, iou_threshold=0.02)["l"]
    summary = layer.summary()
    assert summary["unique_concepts"] != summary["unique_top_concepts"]  # the two counts differ here
    title = bar_graph_figure(layer).get_suptitle()
    assert title.startswith(f"l: {summary['unique_concepts']:.0f} unique concepts, {summary['detectors']:.0f} "
                            "detectors of 12 units")
    assert f"{summary['unique_top_concepts']:.0f} unique top concepts" in title
    bars = sum(len(concepts) for _, concepts in detectors_per_concept(layer))
    assert bars == summary["unique_top_concepts"]


def test_category_counts_figure_explains_a_category_with_unique_concepts_and_no_detector():
    from lightning_dissect.report.figures import category_counts_figure

    categories = ["color", "texture"]
    # Two "red" detectors; one of them also passes the threshold with its best texture.
    summary = {"detectors/color": 2, "detectors/texture": 0, "unique_concepts/color": 1,
               "unique_concepts/texture": 1}
    figure = category_counts_figure(summary, categories, "conv, step 3", 0.04)
    axes = figure.axes[0]
    heights = [patch.get_height() for patch in axes.patches]
    assert heights == [2, 0, 1, 1]  # detectors per category, then unique concepts per category
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend == ["detectors (in the category of their label)", "unique concepts (best labels with IoU > 0.04)"]
    footnote = " ".join(text.get_text() for text in figure.texts)
    assert "a category can have unique concepts and no detector" in footnote


def test_strip_media_of_several_layers_runs_the_model_once_a_batch_and_draws_what_each_layer_alone_draws(
        random_dataset):
    """Every layer's top images in one forward pass (not one per layer); each strip equals the strip of
    its layer drawn alone (`unit_strips`, the model run for that layer only), rotation included."""
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, stride=2, padding=1))
    rotation = {"seed": 3, "alpha": 0.5}
    result = ld.dissect(model, probe, ["0", "2"], rotation=rotation, quantile=0.1, top_k=3)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, inputs: calls.append(inputs[0].shape[0]))
    try:
        media = strip_media(model, probe, result, units_per_layer=3, batch_size=64)
    finally:
        handle.remove()
    union = {int(p) for name in ("0", "2") for u in select_units(result[name], 3)
             for p in result[name].top_images[u][:5].tolist()}
    assert calls == [len(union)]  # one pass over the union of both layers' top images
    for name in ("0", "2"):
        alone = unit_strips(model, probe, result[name], select_units(result[name], 3), num_images=5,
                            rotation=rotation)
        for unit, strip in alone.items():
            np.testing.assert_array_equal(media[f"dissect/{name}/strips/unit_{unit}"], strip.image)


@pytest.mark.parametrize("scale, border", [(1, 1), (2, 1), (2, 2), (3, 3)])
def test_draw_mask_at_a_scale_equals_drawing_on_the_enlarged_image(scale, border):
    rng = np.random.default_rng(scale * 10 + border)
    images = rng.integers(0, 256, (3, 9, 7, 3), dtype=np.uint8)
    masks = rng.random((3, 9, 7)) < 0.2
    enlarged = draw_mask(images.repeat(scale, 1).repeat(scale, 2), masks.repeat(scale, 1).repeat(scale, 2),
                         border=border)
    np.testing.assert_array_equal(draw_mask(images, masks, border=border, scale=scale), enlarged)
    np.testing.assert_array_equal(draw_mask(images[1], masks[1], border=border, scale=scale), enlarged[1])
