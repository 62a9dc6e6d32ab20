"""Automatic layer choice (`layers=None`): small look-alikes of the common families, written here, and the
real torchvision and timm models where those packages are installed.

Each look-alike reproduces what decided the choice on its family (the module tree, the call order, shared
modules, functional ops between modules, channels-last stages, tokens); the expected names are the ones the
rule of `engine/layer_choice.py` gives, listed for the real models in README.md ("Architectures").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_dissect as ld
from lightning_dissect.engine.layer_choice import choose_layers


def chosen(model: nn.Module, size: int = 32, count: int = 2) -> list[str]:
    with torch.no_grad():
        return choose_layers(model.eval(), torch.randn(2, 3, size, size), count)


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


# ---------------------------------------------------------------------- convolutional families


def vgg_like() -> nn.Module:
    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1),
                nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 0-4: 16x16
                nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1),
                nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 5-9: 8x8
                nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1),
                nn.ReLU(inplace=True), nn.MaxPool2d(2))  # 10-14: 4x4, the same shape as the stage before
            self.avgpool = nn.AdaptiveAvgPool2d(4)
            self.classifier = nn.Sequential(nn.Linear(8 * 16, 10), nn.ReLU(True), nn.Dropout(), nn.Linear(10, 10))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return VGG()


def test_vgg_like_gets_the_last_relu_before_each_of_the_last_two_max_pools_never_the_pooled_features():
    # The last stage's ReLU (8 x 8 x 8) and the one before (8 x 16 x 16): never the pooled `features`.
    assert chosen(vgg_like()) == ["features.8", "features.13"]


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)  # shared, called twice per block as in torchvision
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))
                           if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        identity = self.downsample(x) if self.downsample is not None else x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place, as torchvision does
        return self.relu(out)


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        widths = [4, 4, 8, 16, 16]
        for stage in range(1, 5):
            setattr(self, f"layer{stage}", nn.Sequential(BasicBlock(widths[stage - 1], widths[stage], 1 + (stage > 1)),
                                                         BasicBlock(widths[stage], widths[stage])))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_resnet_like_gets_its_last_two_stages_whether_alone_or_inside_a_lightning_module():
    assert chosen(ResNetLike()) == ["layer3", "layer4"]

    class Holder(nn.Module):  # a LightningModule holding the network as `self.model`
        def __init__(self):
            super().__init__()
            self.model = ResNetLike()

        def forward(self, x):
            return self.model(x)

    assert chosen(Holder()) == ["model.layer3", "model.layer4"]
    assert chosen(ResNetLike(), count=1) == ["layer4"]
    assert chosen(ResNetLike(), count=3) == ["layer2", "layer3", "layer4"]


def test_regnet_like_gets_the_last_two_blocks_of_its_trunk_never_the_stem():
    class RegNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn_relu(3, 8, 2)
            self.trunk_output = nn.Sequential()
            widths = [8, 8, 16, 24, 32]
            for block in range(1, 5):
                self.trunk_output.add_module(f"block{block}", nn.Sequential(
                    conv_bn_relu(widths[block - 1], widths[block], 1 + (block > 1)), conv_bn_relu(widths[block],
                                                                                                  widths[block])))
            self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(self.avgpool(self.trunk_output(self.stem(x))).flatten(1))

    assert chosen(RegNet(), size=64) == ["trunk_output.block3", "trunk_output.block4"]


def test_densenet_like_gets_the_last_dense_block_before_the_transition_and_the_final_norm():
    class DenseBlock(nn.Module):
        def __init__(self, c_in: int, growth: int, layers: int):
            super().__init__()
            for i in range(layers):
                self.add_module(f"denselayer{i + 1}", conv_bn_relu(c_in + i * growth, growth))

        def forward(self, x):
            features = [x]
            for layer in self.children():
                features.append(layer(torch.cat(features, 1)))
            return torch.cat(features, 1)

    class DenseNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential()
            self.features.add_module("conv0", nn.Conv2d(3, 8, 3, 1, 1))
            self.features.add_module("norm0", nn.BatchNorm2d(8))
            self.features.add_module("relu0", nn.ReLU(inplace=True))
            self.features.add_module("pool0", nn.MaxPool2d(2))
            self.features.add_module("denseblock1", DenseBlock(8, 4, 2))  # 16 channels, 16x16
            self.features.add_module("transition1", nn.Sequential(  # norm, relu, conv on 16x16, then a pool
                nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.Conv2d(16, 8, 1), nn.AvgPool2d(2)))
            self.features.add_module("denseblock2", DenseBlock(8, 4, 2))  # 16 channels, 8x8
            self.features.add_module("norm5", nn.BatchNorm2d(16))
            self.classifier = nn.Linear(16, 10)

        def forward(self, x):
            out = F.relu(self.features(x), inplace=True)  # functional, as torchvision does
            return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

    # The transition's conv (8 x 16 x 16) is not a stage: the transition ends pooled, on the next grid.
    assert chosen(DenseNet()) == ["features.denseblock1", "features.norm5"]


def test_mobilenet_like_blocks_are_stages_even_when_their_residual_is_added_in_place_after_a_batch_norm():
    class InvertedResidual(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int):
            super().__init__()
            hidden = 2 * c_in
            self.block = nn.Sequential(conv_bn_relu(c_in, hidden, stride),
                                       nn.Sequential(nn.Conv2d(hidden, c_out, 1), nn.BatchNorm2d(c_out)))
            self.residual = stride == 1 and c_in == c_out

        def forward(self, x):
            result = self.block(x)
            if self.residual:
                result += x  # the block's output tensor, changed in place after its batch norm
            return result

    class MobileNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(conv_bn_relu(3, 8, 2), InvertedResidual(8, 8, 1),
                                          InvertedResidual(8, 16, 2), InvertedResidual(16, 16, 1),
                                          InvertedResidual(16, 24, 2), InvertedResidual(24, 24, 1),
                                          conv_bn_relu(24, 48))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(48, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, 10))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    assert chosen(MobileNet()) == ["features.5", "features.6"]


def test_inception_like_parallel_branches_are_one_stage_not_a_trunk_to_open():
    class Branches(nn.Module):  # an Inception block that downsamples: branches on two grids, concatenated
        def __init__(self, c_in: int):
            super().__init__()
            self.branch3x3_1 = nn.Conv2d(c_in, 4, 1)
            self.branch3x3_2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
            self.branch_pool = nn.MaxPool2d(2)

        def forward(self, x):
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), self.branch_pool(x)], 1)

    class Inception(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn_relu(3, 8)
            self.mixed_a = Branches(8)  # 12 channels, 16x16
            self.mixed_b = Branches(12)  # 16 channels, 8x8
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(self.mixed_b(self.mixed_a(self.stem(x))), 1).flatten(1))

    assert chosen(Inception()) == ["mixed_a", "mixed_b"]


def test_a_single_stage_network_gets_two_of_its_blocks_and_a_stem_only_network_is_refused():
    class OneStage(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn_relu(3, 8, 2)
            self.layer1 = nn.Sequential(conv_bn_relu(8, 8), conv_bn_relu(8, 8), conv_bn_relu(8, 8))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

        def forward(self, x):
            return self.head(self.layer1(self.stem(x)))

    assert chosen(OneStage()) == ["layer1.1", "layer1.2"]
    stem_only = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ld.DissectionError, match="layers=None: no module of Sequential returns a spatial"):
        chosen(stem_only)


def test_a_module_that_runs_twice_is_never_chosen_and_one_position_outputs_are_skipped():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = conv_bn_relu(3, 4)
            self.down = conv_bn_relu(4, 8, 2)  # 8 x 16 x 16
            self.twice = nn.Conv2d(8, 8, 3, padding=1)  # runs twice, the last module on the grid
            self.squeeze = nn.Conv2d(8, 8, 16)  # 8 x 1 x 1: one position

        def forward(self, x):
            return self.squeeze(self.twice(self.twice(self.down(self.stem(x))))).flatten(1)

    assert chosen(Shared()) == ["down"]  # the only stage left: not its conv, batch norm and ReLU


# ---------------------------------------------------------------------- transformers and channels-last stages


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)  # a module: its (N, heads, T, T) output looks like a feature map

    def forward(self, x):
        *lead, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(-1, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attention = self.softmax(q @ k.transpose(-2, -1))
        return self.proj((attention @ v).transpose(1, 2).reshape(*lead, tokens, dim))


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                                                nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTLike(nn.Module):
    """timm's layout: `patch_embed` (a conv), a class token, `blocks`, a final `norm`, a head on the class token."""

    def __init__(self, dim: int = 8, depth: int = 4, module_list: bool = False):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        blocks = [Block(dim) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks) if module_list else nn.Sequential(*blocks)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        if isinstance(self.blocks, nn.ModuleList):
            for block in self.blocks:
                x = block(x)
        else:
            x = self.blocks(x)
        return self.head(self.norm(x)[:, 0])


def test_vit_like_gets_its_last_two_blocks_never_the_patch_embedding_the_softmax_or_the_final_norm():
    assert chosen(ViTLike()) == ["blocks.2", "blocks.3"]
    assert chosen(ViTLike(module_list=True)) == ["blocks.2", "blocks.3"]  # blocks the model loops over


def test_torchvision_vit_like_gets_the_last_two_encoder_layers_inside_the_normalised_encoder():
    class Encoder(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.dropout = nn.Dropout(0.1)
            self.layers = nn.Sequential(*(Block(dim) for _ in range(3)))
            self.ln = nn.LayerNorm(dim)

        def forward(self, x):
            return self.ln(self.layers(self.dropout(x)))

    class VisionTransformer(nn.Module):
        def __init__(self, dim: int = 8):
            super().__init__()
            self.conv_proj = nn.Conv2d(3, dim, 4, 4)
            self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.encoder = Encoder(dim)
            self.heads = nn.Sequential(nn.Linear(dim, 10))

        def forward(self, x):
            x = self.conv_proj(x).reshape(len(x), 8, -1).permute(0, 2, 1)
            x = self.encoder(torch.cat([self.class_token.expand(len(x), -1, -1), x], 1))
            return self.heads(x[:, 0])

    assert chosen(VisionTransformer()) == ["encoder.layers.1", "encoder.layers.2"]


class Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class SwinBlock(nn.Module):
    """Channels-last (N, h, w, C) in and out, attention over 2x2 windows."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x):
        n, h, w, c = x.shape
        windows = x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
        attended = self.attn(self.norm(windows)).reshape(n, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        x = x + attended.reshape(n, h, w, c)
        return x + self.mlp(x)


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim)

    def forward(self, x):
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


def test_swin_like_channels_last_stages_are_chosen_never_the_attention_softmax_the_final_norm_or_permute():
    class Swin(nn.Module):  # torchvision's layout
        def __init__(self, dim: int = 8):
            super().__init__()
            self.features = nn.Sequential(
                nn.Sequential(nn.Conv2d(3, dim, 4, 4), Permute(0, 2, 3, 1), nn.LayerNorm(dim)),  # patch embedding
                nn.Sequential(SwinBlock(dim), SwinBlock(dim)), PatchMerging(dim),  # 8x8, then 4x4
                nn.Sequential(SwinBlock(2 * dim), SwinBlock(2 * dim)), PatchMerging(2 * dim),
                nn.Sequential(SwinBlock(4 * dim), SwinBlock(4 * dim)))  # 2x2
            self.norm, self.permute = nn.LayerNorm(4 * dim), Permute(0, 3, 1, 2)
            self.avgpool, self.flatten, self.head = nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4 * dim, 10)

        def forward(self, x):
            return self.head(self.flatten(self.avgpool(self.permute(self.norm(self.features(x))))))

    assert chosen(Swin()) == ["features.3", "features.5"]

    class TimmSwin(nn.Module):  # timm's layout: stages of (downsample, blocks), a final norm, the head
        def __init__(self, dim: int = 8):
            super().__init__()
            self.patch_embed = nn.Sequential(nn.Conv2d(3, dim, 4, 4), Permute(0, 2, 3, 1), nn.LayerNorm(dim))
            self.layers = nn.Sequential()
            for i, width in enumerate([dim, 2 * dim, 4 * dim]):
                stage = nn.Module()
                stage.downsample = PatchMerging(width // 2) if i else nn.Identity()
                stage.blocks = nn.Sequential(SwinBlock(width), SwinBlock(width))
                stage.forward = lambda x, stage=stage: stage.blocks(stage.downsample(x))  # type: ignore[method-assign]
                self.layers.add_module(str(i), stage)
            self.norm, self.head = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 10)

        def forward(self, x):
            return self.head(self.norm(self.layers(self.patch_embed(x))).mean((1, 2)))

    assert chosen(TimmSwin()) == ["layers.1", "layers.2"]


def test_convnext_like_stages_with_channels_last_insides_and_norm_ended_stems_and_downsamples():
    class CNBlock(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
            self.block = nn.Sequential(Permute(0, 2, 3, 1), nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                       nn.Linear(2 * dim, dim), Permute(0, 3, 1, 2))

        def forward(self, x):
            return x + self.block(self.dwconv(x))

    class LayerNorm2d(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class ConvNeXt(nn.Module):
        def __init__(self, dim: int = 8):
            super().__init__()
            self.features = nn.Sequential(nn.Sequential(nn.Conv2d(3, dim, 4, 4), LayerNorm2d(dim)),
                                          nn.Sequential(CNBlock(dim), CNBlock(dim)),
                                          nn.Sequential(LayerNorm2d(dim), nn.Conv2d(dim, 2 * dim, 2, 2)),
                                          nn.Sequential(CNBlock(2 * dim), CNBlock(2 * dim)),
                                          nn.Sequential(LayerNorm2d(2 * dim), nn.Conv2d(2 * dim, 4 * dim, 2, 2)),
                                          nn.Sequential(CNBlock(4 * dim), CNBlock(4 * dim)))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(LayerNorm2d(4 * dim), nn.Flatten(1), nn.Linear(4 * dim, 10))

        def forward(self, x):
            return self.classifier(self.avgpool(self.features(x)))

    assert chosen(ConvNeXt()) == ["features.3", "features.5"]


def test_the_dissector_logs_the_automatic_choice_and_checks_it(tmp_path):
    from lightning_dissect.synthetic import make_synthetic_broden

    probe = ld.ProbeSet(make_synthetic_broden(tmp_path / "broden", num_images=4, image_size=32), cache_dir=False)
    messages: list[str] = []
    assert ld.Dissector(probe, max_overhead=None).setup(ViTLike(), ld.RunContext(info=messages.append)) == [
        "blocks.2", "blocks.3"]
    assert messages == ["DissectionCallback: dissecting ['blocks.2', 'blocks.3'], chosen automatically (the last "
                        "outputs of the deepest feature stages; pass layers=[...] to choose)"]


# ---------------------------------------------------------------------- the real models


TORCHVISION = [  # (constructor, input size, the names chosen)
    ("resnet18", 64, ["layer3", "layer4"]),
    ("resnet50", 64, ["layer3", "layer4"]),
    ("vgg16", 64, ["features.22", "features.29"]),
    ("densenet121", 64, ["features.denseblock3", "features.norm5"]),
    ("mobilenet_v3_large", 64, ["features.15", "features.16"]),
    ("efficientnet_b0", 64, ["features.7", "features.8"]),
    ("convnext_tiny", 64, ["features.5", "features.7"]),
    ("regnet_y_400mf", 64, ["trunk_output.block3", "trunk_output.block4"]),
    ("vit_b_16", 224, ["encoder.layers.encoder_layer_10", "encoder.layers.encoder_layer_11"]),
    ("swin_t", 224, ["features.5", "features.7"]),
]


@pytest.mark.parametrize(("name", "size", "expected"), TORCHVISION, ids=[case[0] for case in TORCHVISION])
def test_torchvision_models(name, size, expected):
    models = pytest.importorskip("torchvision.models", reason="the torchvision architectures need torchvision")
    torch.manual_seed(0)
    assert chosen(getattr(models, name)(weights=None), size=size) == expected


TIMM = [
    ("resnet50", 64, ["layer3", "layer4"]),
    ("densenet121", 64, ["features.denseblock3", "features.norm5"]),
    ("efficientnet_b0", 64, ["blocks.6", "bn2"]),
    ("convnext_tiny", 64, ["stages.2", "stages.3"]),
    ("regnety_004", 64, ["s3", "s4"]),
    ("vit_small_patch16_224", 224, ["blocks.10", "blocks.11"]),
    ("swin_tiny_patch4_window7_224", 224, ["layers.2", "layers.3"]),
]


@pytest.mark.parametrize(("name", "size", "expected"), TIMM, ids=[case[0] for case in TIMM])
def test_timm_models(name, size, expected):
    timm = pytest.importorskip("timm", reason="the timm architectures need timm")
    torch.manual_seed(0)
    assert chosen(timm.create_model(name, pretrained=False), size=size) == expected
