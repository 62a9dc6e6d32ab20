"""Layer outputs (SEMANTICS §2): channels-last layouts, token grids, layers that run once, one position,
reduced-precision weights.

Every dissection of a model is compared with a slow, obviously correct reference: the layer's output
copied in the test's own forward hook, permuted or reshaped by hand to `(N, K, h, w)`, and dissected
from those activations (`dissect_activations` on NCHW maps, itself checked against the brute-force
reference in test_engine.py; the ViT case also directly against the brute force). The models are
small look-alikes written here (a Swin-like model with LayerNorm on NHWC, a ViT-like model with class
and register tokens on a 14 x 20 grid, a ResNet-like block with a reused ReLU); torchvision and timm
models are tried at the end where those packages are installed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_dissect as ld
from lightning_dissect.engine.capture import check_layers
from lightning_dissect.engine.layouts import OutputLayout
from lightning_dissect.report.strips import unit_strips
from tests.reference import reference_dissection

QUANTILE = 0.1


# ---------------------------------------------------------------------- look-alike models


class Permute(nn.Module):
    """torchvision.ops.misc.Permute's look-alike: same class name, same `dims` attribute."""

    def __init__(self, dims):
        super().__init__()
        self.dims = list(dims)

    def forward(self, x):
        return x.permute(*self.dims)


class SwinBlock(nn.Module):
    """A residual MLP on channels-last maps, as a Swin block's second half."""

    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim), nn.Dropout(0.0))

    def forward(self, x):
        return x + self.mlp(self.norm1(x))


class TinySwin(nn.Module):
    """torchvision swin_t's structure: features (NHWC after the stem), norm (NHWC), permute to NCHW, avgpool."""

    def __init__(self, dim=12):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, dim, 4, stride=4), Permute([0, 2, 3, 1]), nn.LayerNorm(dim)),
            nn.Sequential(SwinBlock(dim), SwinBlock(dim)),
        )
        self.norm = nn.LayerNorm(dim)
        self.permute = Permute([0, 3, 1, 2])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.permute(self.norm(self.features(x)))
        return self.head(self.avgpool(x).flatten(1))


class ToChannelsLast(nn.Module):
    """A custom module that permutes in its forward: its type tells nothing."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class Custom(nn.Module):
    def __init__(self, norm: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.to_last = ToChannelsLast()
        self.norm = nn.LayerNorm(6) if norm else nn.Identity()

    def forward(self, x):
        return self.norm(self.to_last(self.conv(x)))


class PatchEmbed(nn.Module):
    """timm's PatchEmbed look-alike: `patch_size`, `grid_size`, `strict_img_size` (False under the model's
    `dynamic_img_size`)."""

    def __init__(self, patch, dim, img_size, dynamic=False):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.patch_size = (patch, patch)
        self.grid_size = (img_size[0] // patch, img_size[1] // patch)
        self.strict_img_size = not dynamic
        self.dynamic_img_pad = False

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class NHWCPatchEmbed(PatchEmbed):
    """timm's PatchEmbed under the model's dynamic_img_size: `output_fmt` NHWC, `flatten` False, (N, h, w, C) out."""

    def __init__(self, patch, dim, img_size):
        super().__init__(patch, dim, img_size, dynamic=True)
        self.output_fmt, self.flatten = "NHWC", False

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """timm's Attention look-alike: `q_norm` returns (N, heads, T, d), a 4-D output that is no map."""

    def __init__(self, dim, heads=2):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.Identity()
        self.heads = heads

    def forward(self, x):
        n, t, k = x.shape
        q = self.q_norm(self.qkv(x)[..., :k].reshape(n, t, self.heads, k // self.heads).transpose(1, 2))
        return x + q.transpose(1, 2).reshape(n, t, k)


class PlainEmbed(nn.Module):
    """A patch embedding that states no grid."""

    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TokenBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TinyViT(nn.Module):
    """A ViT with a class token and `registers` register tokens before the patch tokens."""

    def __init__(self, embed: nn.Module, dim=10, registers=4):
        super().__init__()
        torch.manual_seed(0)
        self.patch_embed = embed
        self.dynamic_img_size = getattr(embed, "strict_img_size", True) is False
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.reg_token = nn.Parameter(torch.randn(1, registers, dim))
        self.blocks = nn.Sequential(TokenBlock(dim), TokenBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        tokens = self.patch_embed(x)
        if tokens.ndim == 4:  # (N, h, w, C), as timm's embedding under dynamic_img_size
            tokens = tokens.flatten(1, 2)
        batch = tokens.shape[0]
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), self.reg_token.expand(batch, -1, -1), tokens], 1)
        return self.head(self.norm(self.blocks(tokens))[:, 0])


class TorchvisionViT(TinyViT):
    """torchvision VisionTransformer's attributes: `patch_size`, `image_size`, `conv_proj`."""

    def __init__(self, patch, dim=10):
        super().__init__(PlainEmbed(patch, dim), dim, registers=0)
        self.patch_size, self.image_size = patch, 224
        self.conv_proj = self.patch_embed.proj


class Block(nn.Module):
    """ResNet's BasicBlock: one `relu` module applied twice."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(Block(6), Block(6))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.avgpool(self.layer1(self.stem(x))).flatten(1))


class Shared(nn.Module):
    """Issue 13's model: `self.shared(relu(self.shared(self.stem(x))))`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 5, 3, padding=1)
        self.shared = nn.Conv2d(5, 5, 3, padding=1)

    def forward(self, x):
        return self.shared(torch.relu(self.shared(self.stem(x))))


# ---------------------------------------------------------------------- the reference


def hooked_output(model: nn.Module, probe: ld.ProbeSet, layer: str) -> torch.Tensor:
    """The layer's raw output on every probe image: copied in the test's own hook, one batch."""
    kept = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, args, output: kept.append(output.detach().clone()))
    try:
        with torch.no_grad():
            inputs = probe.model_input(list(range(len(probe))), "cpu")
            dtype = next((p.dtype for p in model.parameters()), torch.float32)
            model.eval()(inputs.to(dtype))
    finally:
        handle.remove()
    assert len(kept) == 1
    return kept[0].float()


def nhwc_by_hand(output: torch.Tensor) -> torch.Tensor:
    n, h, w, k = output.shape
    maps = torch.empty(n, k, h, w)
    for unit in range(k):
        maps[:, unit] = output[:, :, :, unit]
    return maps


def tokens_by_hand(output: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    n, tokens, k = output.shape
    assert tokens == prefix + grid[0] * grid[1]
    maps = torch.empty(n, k, *grid)
    for row in range(grid[0]):
        for column in range(grid[1]):
            maps[:, :, row, column] = output[:, prefix + row * grid[1] + column, :]
    return maps


def assert_same_numbers(result, reference):
    assert torch.equal(result.thresholds, reference.thresholds)
    assert torch.equal(result.iou, reference.iou)
    assert torch.equal(result.labels, reference.labels)
    assert torch.equal(result.top_images, reference.top_images)


@pytest.fixture
def probe(random_dataset):
    return ld.ProbeSet(random_dataset, image_size=(16, 16), cache_dir=False)


@pytest.fixture
def wide_probe(random_dataset):
    """Non-square model input: 28 x 40 images (14 x 20 patches of 2 pixels)."""
    return ld.ProbeSet(random_dataset, image_size=(28, 40), cache_dir=False)


# ---------------------------------------------------------------------- channels-last


@pytest.mark.parametrize("layer,layout", [
    ("features", "NHWC"),            # a stage: the layout of its last output of that shape (a Linear)
    ("features.0", "NHWC"),          # conv, Permute(0, 2, 3, 1), LayerNorm
    ("features.1.1", "NHWC"),        # a block
    ("features.1.0.mlp.1", "NHWC"),  # a GELU between the MLP's Linears
    ("norm", "NHWC"),                # nn.LayerNorm over the last axis
    ("permute", "NCHW"),             # Permute(0, 3, 1, 2)
    ("features.0.0", "NCHW"),        # the stem convolution
])
def test_channels_last_outputs_are_read_from_the_model(probe, layer, layout):
    model = TinySwin()
    result = ld.dissect(model, probe, [layer], quantile=QUANTILE)
    assert result.settings["layer_outputs"][layer] == {"layout": layout}
    output = hooked_output(model, probe, layer)
    maps = nhwc_by_hand(output) if layout == "NHWC" else output
    assert maps.shape[1] == result[layer].num_units
    reference = ld.dissect_activations({layer: maps}, probe, quantile=QUANTILE)[layer]
    assert_same_numbers(result[layer], reference)


def test_swin_like_norm_and_permute_give_the_same_dissection(probe):
    model = TinySwin()
    result = ld.dissect(model, probe, ["norm", "permute"], quantile=QUANTILE)
    assert result["norm"].num_units == 12
    assert torch.equal(result["norm"].iou, result["permute"].iou)


def test_an_ambiguous_4d_output_is_refused_with_the_way_to_state_it(probe):
    model = Custom(norm=True)  # a model with channels-last outputs: a custom permuting module tells nothing
    with pytest.raises(ld.DissectionError) as raised:
        ld.dissect(model, probe, ["to_last"])
    message = str(raised.value)
    assert "'to_last'" in message and "(2, 8, 8, 6)" in message
    assert "layouts={'to_last': 'NHWC'}" in message and "layouts={'to_last': 'NCHW'}" in message
    result = ld.dissect(model, probe, ["to_last"], quantile=QUANTILE, layouts={"to_last": "NHWC"})
    reference = ld.dissect_activations({"l": nhwc_by_hand(hooked_output(model, probe, "to_last"))}, probe,
                                       quantile=QUANTILE)["l"]
    assert_same_numbers(result["to_last"], reference)
    assert result.settings["layouts"] == {"to_last": "NHWC"}


def test_a_permuted_copy_of_a_known_output_is_refused_in_a_model_without_channels_last_modules(probe):
    model = Custom(norm=False)  # conv, then a custom permute: the shape is the conv's moved channels-last
    with pytest.raises(ld.DissectionError, match=r"could be the 6 channels of an output of shape \(2, 6, 8, 8\)"):
        ld.dissect(model, probe, ["to_last"])
    stated = ld.dissect(model, probe, ["to_last", "conv"], quantile=QUANTILE, layouts={"to_last": "NHWC"})
    assert_same_numbers(stated["to_last"], stated["conv"])


def test_ordinary_convolutional_outputs_stay_nchw_also_in_channels_last_memory(probe):
    model = TinyResNet().to(memory_format=torch.channels_last)
    layers = ["stem", "stem.1", "layer1.0", "layer1"]
    result = ld.dissect(model, probe, layers, quantile=QUANTILE)
    for layer in layers:
        assert result.settings["layer_outputs"][layer] == {"layout": "NCHW"}
        reference = ld.dissect_activations({layer: hooked_output(model, probe, layer)}, probe, quantile=QUANTILE)
        assert_same_numbers(result[layer], reference[layer])


def test_a_functional_model_without_known_modules_is_read_as_nchw(probe):
    class Planted(nn.Module):
        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x, 2) * torch.arange(1.0, 4.0).view(1, 3, 1, 1)

    model = nn.Sequential(Planted())
    result = ld.dissect(model, probe, ["0"], quantile=QUANTILE)
    reference = ld.dissect_activations({"0": hooked_output(model, probe, "0")}, probe, quantile=QUANTILE)["0"]
    assert_same_numbers(result["0"], reference)


def test_stated_layouts_for_precomputed_activations(probe):
    g = torch.Generator().manual_seed(3)
    maps = torch.randn(len(probe), 5, 4, 6, generator=g)
    channels_last = maps.permute(0, 2, 3, 1).contiguous()
    expected = reference_dissection(maps, probe.broden, probe.rows, probe.categories, QUANTILE, 0.04, "paper")
    result = ld.dissect_activations({"l": channels_last}, probe, quantile=QUANTILE, layouts={"l": "NHWC"})["l"]
    assert torch.equal(result.iou, expected["iou"]) and torch.equal(result.thresholds, expected["thresholds"])
    with pytest.raises(ld.DissectionError, match=r"layouts names \['m'\]"):
        ld.dissect_activations({"l": channels_last}, probe, layouts={"m": "NHWC"})


@pytest.mark.parametrize("layouts,message", [
    ({"norm": "CHW"}, r"layouts\['norm'\]='CHW' must be one of \['NCHW', 'NHWC', 'NLC'\]"),
    (["norm"], r"layouts=\['norm'\] must be a dict of layer name -> 'NCHW' or 'NHWC' .*e.g. layouts=\{'features.7'"),
])
def test_bad_layouts_are_refused_naming_the_argument(probe, layouts, message):
    with pytest.raises(ValueError, match=message):
        ld.dissect(TinySwin(), probe, ["norm"], layouts=layouts)
    with pytest.raises(ValueError, match=message):
        ld.DissectionCallback(probe, layouts=layouts)


def test_a_layout_naming_no_module_or_the_wrong_rank_is_refused(probe):
    with pytest.raises(ld.DissectionError, match=r"layouts names 'nrom'.*did you mean \['norm'\]"):
        ld.dissect(TinySwin(), probe, ["norm"], layouts={"nrom": "NHWC"})
    with pytest.raises(ld.DissectionError, match=r"'NLC' is for token outputs"):
        ld.dissect(TinySwin(), probe, ["norm"], layouts={"norm": "NLC"})


def test_strips_read_the_layer_with_the_recorded_layout(probe):
    model = TinySwin()
    result = ld.dissect(model, probe, ["norm"], quantile=QUANTILE, top_k=3)
    layout = result.settings["layer_outputs"]["norm"]
    from_model = unit_strips(model, probe, result["norm"], [0, 5], layout=layout)
    reference = nhwc_by_hand(hooked_output(model, probe, "norm"))
    from_reference = unit_strips(None, probe, result["norm"], [0, 5], activations=reference)
    for unit in (0, 5):
        assert from_model[unit].masks.any()
        assert (from_model[unit].masks == from_reference[unit].masks).all()
    # The media hook and the HTML report read the recorded layout from the settings, for the model and
    # for raw activations alike.
    from lightning_dissect.report.media import strip_media

    drawn = strip_media(model, probe, result, 2, num_images=2)
    raw = strip_media(None, probe, result, 2, num_images=2, activations={"norm": hooked_output(model, probe, "norm")})
    assert drawn.keys() == raw.keys() and len(drawn) == 2
    assert all((drawn[tag] == raw[tag]).all() for tag in drawn)


# ---------------------------------------------------------------------- token grids


@pytest.mark.parametrize("layer", ["blocks.1", "norm", "patch_embed"])
def test_rectangular_token_grid_from_timm_style_grid_size(wide_probe, layer):
    model = TinyViT(PatchEmbed(2, 10, (28, 40)))
    result = ld.dissect(model, wide_probe, [layer], quantile=QUANTILE)
    prefix = 0 if layer == "patch_embed" else 5
    assert result.settings["layer_outputs"][layer] == {"layout": "NLC", "grid": [14, 20], "prefix_tokens": prefix}
    maps = tokens_by_hand(hooked_output(model, wide_probe, layer), prefix, (14, 20))
    expected = reference_dissection(maps, wide_probe.broden, wide_probe.rows, wide_probe.categories, QUANTILE, 0.04,
                                    "paper")
    assert torch.equal(result[layer].thresholds, expected["thresholds"])
    assert torch.equal(result[layer].iou, expected["iou"])


@pytest.mark.parametrize("told_by", ["the embedding's strict_img_size", "the model's dynamic_img_size"])
def test_dynamic_img_size_takes_the_grid_from_the_input(wide_probe, told_by):
    model = TinyViT(PatchEmbed(2, 10, (224, 224), dynamic=True))  # grid_size says 112 x 112: not this input's
    if told_by == "the model's dynamic_img_size":
        del model.patch_embed.strict_img_size
    else:
        model.dynamic_img_size = False
    layout = check_layers(model, wide_probe.model_input([0, 1], "cpu"), ["blocks.1"])["blocks.1"]
    assert layout == OutputLayout("NLC", (14, 20), 5)


def test_a_timm_style_patch_embedding_tells_its_channels_last_output_by_output_fmt(wide_probe):
    model = TinyViT(NHWCPatchEmbed(2, 10, (224, 224)))
    result = ld.dissect(model, wide_probe, ["patch_embed", "blocks.1"], quantile=QUANTILE)
    assert result.settings["layer_outputs"]["patch_embed"] == {"layout": "NHWC"}
    assert result.settings["layer_outputs"]["blocks.1"] == {"layout": "NLC", "grid": [14, 20], "prefix_tokens": 5}
    maps = nhwc_by_hand(hooked_output(model, wide_probe, "patch_embed"))
    assert_same_numbers(result["patch_embed"], ld.dissect_activations({"l": maps}, wide_probe, quantile=QUANTILE)["l"])
    del model.patch_embed.output_fmt  # nothing tells: the conv's (N, 10, 14, 20) with its channels moved last
    with pytest.raises(ld.DissectionError, match=r"'patch_embed' \(NHWCPatchEmbed\) returns shape \(2, 14, 20, 10\)"):
        ld.dissect(model, wide_probe, ["patch_embed"])


def test_a_4d_output_inside_a_token_model_that_nothing_explains_is_refused(wide_probe):
    model = TinyViT(PatchEmbed(2, 10, (28, 40)))
    model.blocks[0] = Attention(10)
    with pytest.raises(ld.DissectionError) as raised:
        ld.dissect(model, wide_probe, ["blocks.0.q_norm"])
    message = str(raised.value)
    assert "'blocks.0.q_norm' (Identity) returns shape (2, 2, 285, 5)" in message
    assert "token outputs (N, T, K)" in message and "layouts={'blocks.0.q_norm': 'NCHW'}" in message
    result = ld.dissect(model, wide_probe, ["blocks.0"], quantile=QUANTILE)  # the block around it: tokens
    assert result.settings["layer_outputs"]["blocks.0"] == {"layout": "NLC", "grid": [14, 20], "prefix_tokens": 5}


def test_torchvision_style_patch_size_and_input_size(wide_probe):
    model = TorchvisionViT(2)
    result = ld.dissect(model, wide_probe, ["blocks.0"], quantile=QUANTILE)
    assert result.settings["layer_outputs"]["blocks.0"] == {"layout": "NLC", "grid": [14, 20], "prefix_tokens": 1}
    maps = tokens_by_hand(hooked_output(model, wide_probe, "blocks.0"), 1, (14, 20))
    reference = ld.dissect_activations({"l": maps}, wide_probe, quantile=QUANTILE)["l"]
    assert_same_numbers(result["blocks.0"], reference)


def test_a_rectangular_grid_nothing_states_is_refused_then_stated(wide_probe):
    model = TinyViT(PlainEmbed(2, 10))
    with pytest.raises(ld.DissectionError) as raised:
        ld.dissect(model, wide_probe, ["blocks.1"])
    message = str(raised.value)
    assert "'blocks.1' has 285 tokens for 28x40 input" in message
    assert "grid=(h, w)" in message and "prefix_tokens=" in message
    maps = tokens_by_hand(hooked_output(model, wide_probe, "blocks.1"), 5, (14, 20))
    reference = ld.dissect_activations({"l": maps}, wide_probe, quantile=QUANTILE)["l"]
    for options in (dict(grid=(14, 20)), dict(grid={"blocks.1": [14, 20]}), dict(grid=(14, 20), prefix_tokens=5)):
        result = ld.dissect(model, wide_probe, ["blocks.1"], quantile=QUANTILE, **options)
        assert_same_numbers(result["blocks.1"], reference)
        assert result.settings["layer_outputs"]["blocks.1"]["prefix_tokens"] == 5
    tokens = hooked_output(model, wide_probe, "blocks.1")
    from_activations = ld.dissect_activations({"l": tokens}, wide_probe, quantile=QUANTILE, grid=(14, 20))["l"]
    assert_same_numbers(from_activations, reference)
    with pytest.raises(ld.DissectionError, match="for 28x40 input"):
        ld.dissect_activations({"l": tokens}, wide_probe)


@pytest.mark.parametrize("options,message", [
    (dict(prefix_tokens=1), r"'blocks.1' has 285 tokens, and none of the model's patch grids \[\(14, 20\)\] and "
                            r"prefix_tokens=1 explain them"),
    (dict(grid=(15, 20)), r"'blocks.1' has 285 tokens, which the stated grid=\(15, 20\) does not explain"),
    (dict(grid=(14, 20), prefix_tokens=2), r"stated grid=\(14, 20\) and prefix_tokens=2 does not explain"),
])
def test_a_token_count_no_stated_grid_explains_is_refused(wide_probe, options, message):
    model = TinyViT(PatchEmbed(2, 10, (28, 40)))
    with pytest.raises(ld.DissectionError, match=message) as raised:
        ld.dissect(model, wide_probe, ["blocks.1"], **options)
    assert "grid=(h, w)" in str(raised.value) and "prefix_tokens=" in str(raised.value)


def test_square_inputs_without_a_stated_grid_drop_the_fewest_leading_tokens(probe):
    model = TinyViT(PlainEmbed(2, 10), registers=0)  # 16 x 16 input: 64 patches and a class token
    result = ld.dissect(model, probe, ["blocks.1"], quantile=QUANTILE)
    assert result.settings["layer_outputs"]["blocks.1"] == {"layout": "NLC", "grid": [8, 8], "prefix_tokens": 1}
    maps = tokens_by_hand(hooked_output(model, probe, "blocks.1"), 1, (8, 8))
    assert_same_numbers(result["blocks.1"], ld.dissect_activations({"l": maps}, probe, quantile=QUANTILE)["l"])


@pytest.mark.parametrize("grid,message", [
    ((0, 4), r"grid=\(0, 4\) must be \(h, w\), two positive integers"),
    ({"blocks.1": 14}, r"grid\['blocks.1'\]=14 must be \(h, w\)"),
])
def test_bad_grids_are_refused_naming_the_argument(probe, grid, message):
    with pytest.raises(ValueError, match=message):
        ld.dissect(TinyViT(PlainEmbed(2, 10)), probe, ["blocks.1"], grid=grid)
    with pytest.raises(ValueError, match=message):
        ld.Dissector(probe, grid=grid)


# ---------------------------------------------------------------------- once per forward, more than one position


def test_a_module_that_runs_twice_is_refused_naming_how_often_and_the_enclosing_block(probe):
    model = TinyResNet()
    for check in (lambda: ld.dissect(model, probe, ["layer1.0.relu"]),
                  lambda: check_layers(model, probe.model_input([0, 1], "cpu"), ["layer1.0.relu"]),
                  lambda: ld.Dissector(probe, layers=["layer1.0.relu"], max_overhead=None).setup(model)):
        with pytest.raises(ld.DissectionError) as raised:
            check()
        message = str(raised.value)
        assert "'layer1.0.relu' ran 2 times in one forward pass" in message and "'layer1.0'" in message
    result = ld.dissect(model, probe, ["layer1.0"], quantile=QUANTILE)  # the way out
    reference = ld.dissect_activations({"l": hooked_output(model, probe, "layer1.0")}, probe, quantile=QUANTILE)
    assert_same_numbers(result["layer1.0"], reference["l"])


def test_a_reused_top_level_module_is_refused_with_a_way_out(probe):
    with pytest.raises(ld.DissectionError, match="'shared' ran 2 times.*Give each use its own module"):
        ld.dissect(Shared(), probe, ["shared"])


def test_an_output_whose_first_axis_is_not_the_batch_is_refused(probe):
    class Windows(nn.Module):
        def forward(self, x):  # (N, K, h, w) -> (4 N, K, h / 2, w / 2): windows along the batch axis
            n, k, h, w = x.shape
            return x.reshape(n, k, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5).reshape(4 * n, k, h // 2, w // 2)

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Windows())
    with pytest.raises(ld.DissectionError, match=r"'1' returns shape \(8, 4, 8, 8\) for a batch of 2 images"):
        ld.dissect(model, probe, ["1"])


def test_a_layer_that_does_not_run_is_refused(probe):
    model = TinyResNet()
    model.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(ld.DissectionError, match="'unused' did not run"):
        ld.dissect(model, probe, ["unused"])


def test_one_position_outputs_are_refused_by_dissect_like_the_callback(probe):
    model = TinyResNet()
    with pytest.raises(ld.DissectionError, match=r"'avgpool' output has shape \(2, 6, 1, 1\): a single spatial"):
        ld.dissect(model, probe, ["avgpool"])
    with pytest.raises(ld.DissectionError, match=r"a single spatial position"):
        ld.dissect_activations({"pooled": torch.rand(len(probe), 6, 1, 1)}, probe)
    with pytest.raises(ld.DissectionError, match=r"'fc' output has shape \(2, 3\): no spatial axes"):
        ld.dissect(model, probe, ["fc"])


# ---------------------------------------------------------------------- reduced-precision weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_weights_take_input_in_their_dtype(probe, dtype):
    model = TinyResNet().to(dtype)
    try:
        model(torch.zeros(1, 3, 16, 16, dtype=dtype))
    except RuntimeError as error:  # an operation this build lacks on the CPU in this dtype
        pytest.skip(f"{dtype} convolutions on the CPU: {error}")
    result = ld.dissect(model, probe, ["layer1"], quantile=QUANTILE)
    output = hooked_output(model, probe, "layer1")  # float32 copy of the reduced-precision output
    assert output.dtype == torch.float32
    reference = ld.dissect_activations({"layer1": output}, probe, quantile=QUANTILE)["layer1"]
    assert_same_numbers(result["layer1"], reference)
    assert result["layer1"].top_activations.dtype == torch.float32
    assert all(p.dtype == dtype for p in model.parameters())
    strips = unit_strips(model, probe, result["layer1"], [0])
    assert strips[0].masks.shape[0] == len(result["layer1"].top_images[0])


def test_a_plain_loop_dissector_takes_a_bf16_model(probe, tmp_path):
    model = TinyResNet().to(torch.bfloat16)
    dissector = ld.Dissector(probe, layers=["layer1"], max_overhead=None, dirpath=tmp_path, strips_per_layer=0)
    report = dissector.maybe_run(model, 0)
    assert report is not None and report.dissection["layer1"].num_units == 6


# ---------------------------------------------------------------------- the callback


def swin_module(layouts=None):
    lightning = pytest.importorskip("lightning.pytorch")
    import torch.nn.functional as F

    class SwinClassifier(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = Custom(norm=True)
            self.head = nn.Linear(6, 4)
            self.seen: list[float] = []

        def forward(self, images):
            return self.head(self.model(images).mean(dim=(1, 2)))

        def training_step(self, batch, batch_idx):
            images, targets = batch
            self.seen.append(float(images.sum()))
            return F.cross_entropy(self(images), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return SwinClassifier()


def test_callback_refuses_an_ambiguous_layer_before_training_and_takes_layouts(tmp_path):
    from tests.test_callback import fit, loader

    probe = ld.ProbeSet(ld.synthetic.make_synthetic_broden(tmp_path / "broden", num_images=24, image_size=32),
                        cache_dir=False)
    model = swin_module()
    with pytest.raises(ld.DissectionError, match=r"layouts=\{'model.to_last': 'NHWC'\}"):
        fit([ld.DissectionCallback(probe, layers=["model.to_last"], max_overhead=None)], model=model,
            default_root_dir=tmp_path)
    assert model.seen == []

    model = swin_module()
    callback = ld.DissectionCallback(probe, layers=["model.to_last", "model.norm"], every_n_steps=100,
                                     max_overhead=None, layouts={"model.to_last": "NHWC"}, dirpath=tmp_path / "d")
    fit([callback], model=model, data=loader(), max_epochs=1, default_root_dir=tmp_path)
    first = [entry for entry in callback.dissector.history if entry.step == 0]
    assert [entry.layer for entry in first] == ["model.to_last", "model.norm"]
    assert all(len(entry.label) == 6 for entry in first)  # 6 units, not 8 columns

    model = swin_module()
    with pytest.raises(ld.DissectionError, match=r"layouts names 'model.cnv', which is not a module"):
        fit([ld.DissectionCallback(probe, layers=["model.conv"], max_overhead=None, layouts={"model.cnv": "NHWC"})],
            model=model, default_root_dir=tmp_path)
    assert model.seen == []


def test_callback_refuses_a_reused_module_before_training(tmp_path):
    from tests.test_callback import fit, tiny_cnn

    probe = ld.ProbeSet(ld.synthetic.make_synthetic_broden(tmp_path / "broden", num_images=24, image_size=32),
                        cache_dir=False)
    model = tiny_cnn()
    relu = nn.ReLU()
    model.block1[2] = relu
    model.block2[2] = relu  # one module at two places
    with pytest.raises(ld.DissectionError, match=r"'block1.2' ran 2 times.*'block1'"):
        fit([ld.DissectionCallback(probe, layers=["block1.2"], max_overhead=None)], model=model,
            default_root_dir=tmp_path)
    assert model.seen == []


# ---------------------------------------------------------------------- torchvision and timm, where installed
#
# Random weights, no downloads. Each model's layers are read by the engine (the check pass decides the layout or
# grid without `layouts=` or `grid=`, then `LayerCapture` and `as_unit_maps`, as `ld.dissect` reads every batch)
# and compared with the output copied in the test's own hook and permuted or reshaped by hand. The expected layout
# is what the model's code does (a Swin stage ends with a Linear on (N, h, w, C); a ViT block returns
# (N, prefix + h * w, C)); the unit count is checked against the model's own channel count.


def engine_read(model: nn.Module, inputs: torch.Tensor, layers: list[str], **options):
    """(decided layouts, the engine's (N, K, h, w) maps, the raw outputs copied in the test's own hooks)."""
    from lightning_dissect.engine.capture import LayerCapture, as_unit_maps, resolve_layers

    decided = check_layers(model, inputs, layers, **options)
    copies: dict[str, torch.Tensor] = {}
    modules = resolve_layers(model, layers)
    handles = [module.register_forward_hook(lambda m, a, output, name=name: copies.setdefault(
        name, output.detach().clone())) for name, module in modules.items()]  # before the capture's hooks
    try:
        with LayerCapture(modules) as capture:
            outputs = capture.run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return decided, {name: as_unit_maps(outputs[name], name, decided[name]) for name in layers}, copies


def by_hand(output: torch.Tensor, layout: str, prefix: int = 0, grid: tuple[int, int] | None = None):
    if layout == "NCHW":
        return output.float()
    if layout == "NHWC":
        return nhwc_by_hand(output.float())
    assert grid is not None
    return tokens_by_hand(output.float(), prefix, grid)


def _torchvision(name, **kwargs):
    def build():
        models = pytest.importorskip("torchvision.models", reason="torchvision is not installed")
        return getattr(models, name)(weights=None, **kwargs)
    return build


def _timm(name, **kwargs):
    def build():
        timm = pytest.importorskip("timm", reason="timm is not installed")
        return timm.create_model(name, pretrained=False, **kwargs)
    return build


def _vit_tokens(model, size):
    """(prefix tokens, grid) from a ViT's own attributes: timm's num_prefix_tokens and patch size, torchvision's
    class token and patch_size."""
    if hasattr(model, "num_prefix_tokens"):
        patch = model.patch_embed.patch_size
        return model.num_prefix_tokens, (size[0] // patch[0], size[1] // patch[1])
    return 1, (size[0] // model.patch_size, size[1] // model.patch_size)


def case(name, build, size, expected, channels=None, heavy=False):
    """One model: its input size, {layer: the layout its code gives}, and the model's channel count for the
    channels-last layers (their units)."""
    return pytest.param(build, size, expected, channels, id=name, marks=[pytest.mark.heavy] if heavy else [])


REAL_MODELS = [
    case("tv-resnet18", _torchvision("resnet18"), (224, 224), {"layer3": "NCHW", "layer4": "NCHW"}),
    case("tv-vgg16", _torchvision("vgg16"), (224, 224), {"features.29": "NCHW"}, heavy=True),
    case("tv-densenet121", _torchvision("densenet121"), (224, 224),
         {"features.denseblock4": "NCHW", "features.norm5": "NCHW"}),
    case("tv-mobilenet_v3_small", _torchvision("mobilenet_v3_small"), (224, 224), {"features.12": "NCHW"}),
    case("tv-efficientnet_b0", _torchvision("efficientnet_b0"), (224, 224), {"features.8": "NCHW"}),
    case("tv-regnet_y_400mf", _torchvision("regnet_y_400mf"), (224, 224), {"trunk_output.block4": "NCHW"}),
    case("tv-convnext_tiny", _torchvision("convnext_tiny"), (224, 224),
         {"features.7": "NCHW", "features.7.2.block.2": "NHWC", "features.7.2.block.5": "NHWC"},
         lambda model: model.classifier[2].in_features),
    case("tv-swin_t", _torchvision("swin_t"), (224, 224), {"features.7": "NHWC", "norm": "NHWC", "permute": "NCHW"},
         lambda model: model.head.in_features),
    case("tv-vit_b_16", _torchvision("vit_b_16"), (224, 224),
         {"encoder.layers.encoder_layer_11": "NLC", "encoder": "NLC"}, heavy=True),
    case("timm-vit_base_patch16_224-224x320", _timm("vit_base_patch16_224", dynamic_img_size=True), (224, 320),
         {"blocks.11": "NLC", "norm": "NLC", "patch_embed": "NHWC"}, lambda model: model.embed_dim, heavy=True),
    case("timm-vit_little_patch16_reg4_gap_256-224x320",
         _timm("vit_little_patch16_reg4_gap_256", dynamic_img_size=True), (224, 320),
         {"blocks.11": "NLC", "blocks.5": "NLC", "patch_embed": "NHWC"}, lambda model: model.embed_dim),
    case("timm-swin_tiny_patch4_window7_224", _timm("swin_tiny_patch4_window7_224"), (224, 224),
         {"layers.3": "NHWC", "norm": "NHWC"}, lambda model: model.num_features),
    case("timm-convnext_tiny", _timm("convnext_tiny"), (224, 224),
         {"stages.3": "NCHW", "stages.3.blocks.2.norm": "NHWC", "stages.3.blocks.2.mlp": "NHWC"},
         lambda model: model.num_features),
]


@pytest.mark.parametrize("build,size,expected,channels", REAL_MODELS)
def test_real_models_are_read_as_their_code_lays_them_out(build, size, expected, channels):
    model = build().eval()
    inputs = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        decided, maps, copies = engine_read(model, inputs, list(expected))
    for layer, layout in expected.items():
        prefix, grid = _vit_tokens(model, size) if layout == "NLC" else (0, None)
        assert decided[layer] == OutputLayout(layout, grid, prefix), (layer, decided[layer])
        assert torch.equal(maps[layer], by_hand(copies[layer], layout, prefix, grid)), layer
        if layout == "NHWC":
            assert maps[layer].shape[1] == channels(model), layer  # the units are the model's channels


def test_real_models_refuse_layers_that_run_twice_or_have_one_position():
    models = pytest.importorskip("torchvision.models", reason="torchvision is not installed")
    inputs = torch.randn(2, 3, 224, 224)
    resnet = models.resnet18(weights=None).eval()
    with torch.no_grad():
        with pytest.raises(ld.DissectionError, match=r"'layer4.0.relu' ran 2 times.*'layer4.0'"):
            check_layers(resnet, inputs, ["layer4.0.relu"])
        with pytest.raises(ld.DissectionError, match="single spatial position"):
            check_layers(resnet, inputs, ["avgpool"])


def test_real_vit_attention_internals_are_refused():
    timm = pytest.importorskip("timm", reason="timm is not installed")
    vit = timm.create_model("vit_little_patch16_reg4_gap_256", pretrained=False, dynamic_img_size=True).eval()
    with torch.no_grad(), pytest.raises(ld.DissectionError, match=r"'blocks.0.attn.q_norm' \(Identity\) returns "
                                                                   r"shape \(2, 5, 74, 64\).*token outputs"):
        check_layers(vit, torch.randn(2, 3, 112, 160), ["blocks.0.attn.q_norm"])


def test_torchvision_vit_takes_square_inputs_only():
    """torchvision's VisionTransformer asserts its `image_size` (an int) on every input: a rectangular grid cannot
    happen there, so only timm's ViTs are tried on 224 x 320 (above)."""
    models = pytest.importorskip("torchvision.models", reason="torchvision is not installed")
    vit = models.vit_b_16(weights=None, image_size=64).eval()  # 4 x 4 patches: cheap
    with torch.no_grad():
        with pytest.raises(AssertionError):
            vit(torch.randn(1, 3, 64, 96))
        layouts = check_layers(vit, torch.randn(2, 3, 64, 64), ["encoder.layers.encoder_layer_11"])
    assert layouts["encoder.layers.encoder_layer_11"] == OutputLayout("NLC", (4, 4), 1)


@pytest.fixture
def synthetic_probe(tmp_path):
    def make(size):
        root = ld.synthetic.make_synthetic_broden(tmp_path / "broden", num_images=4, image_size=64)
        return ld.ProbeSet(root, image_size=size, cache_dir=False)
    return make


@pytest.mark.parametrize("build,size,layers", [
    (_torchvision("swin_t"), (112, 112), ["features.7", "norm"]),
    (_timm("vit_little_patch16_reg4_gap_256", dynamic_img_size=True), (112, 160), ["blocks.11"]),
], ids=["tv-swin_t-112x112", "timm-vit_little_patch16_reg4_gap_256-112x160"])
def test_dissect_end_to_end_on_a_real_channels_last_model_and_a_rectangular_vit(synthetic_probe, build, size,
                                                                                 layers):
    torch.manual_seed(0)
    model = build().eval()
    probe = synthetic_probe(size)
    result = ld.dissect(model, probe, layers, quantile=QUANTILE)  # one batch, as the reference's
    for layer in layers:
        recorded = result.settings["layer_outputs"][layer]
        output = hooked_output(model, probe, layer)
        if recorded["layout"] == "NLC":
            prefix, grid = _vit_tokens(model, size)
            assert recorded == {"layout": "NLC", "grid": list(grid), "prefix_tokens": prefix}
            maps = tokens_by_hand(output, prefix, grid)
        else:
            assert recorded == {"layout": "NHWC"}
            maps = nhwc_by_hand(output)
        reference = ld.dissect_activations({layer: maps}, probe, quantile=QUANTILE)[layer]
        assert_same_numbers(result[layer], reference)
