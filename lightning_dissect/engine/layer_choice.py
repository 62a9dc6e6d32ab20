"""`choose_layers`: which layers to dissect when the user names none (`layers=None`).

One forward pass of a probe batch records every module call: which call it ran inside, its
output's shape, and whether its output is the very tensor a module inside it returned (its
*tail*: a container ending in a max-pool returns the pool's output). From that call tree:

1. **Kinds.** Pooling, dropout, identity, flatten, normalisation layers, permutes (a parameterless
   module that only reorders its input's axes), softmax and attention modules (and everything
   inside them) are never features. A container takes the kind of its tail: `features` of a VGG
   returns its last max-pool's output (pooled), a ViT's `encoder` its final LayerNorm's, a
   patch embedding its norm's.
2. **Stages.** The model's children, in call order, form the stage list; a child is replaced by its
   own children when it is a *trunk* (its feature children produce outputs on different grids, where
   two 4-D shapes are on one grid when they differ at most in their first or in their last axis,
   the channel axis of NCHW or NHWC; 3-D tokens when their token counts match: VGG's
   `features`, RegNet's `trunk_output`, Swin's `features`/`layers`) or when it ends in a
   normalisation or permute (ViT's `encoder`). A ResNet's `layer3` is a stage (its blocks share
   one shape); a DenseNet transition (norm, relu, conv, pool) is a stage that ends pooled.
3. **Eligible stages** run once per forward pass, return a tensor with more than one position
   (`(N, K, h, w)` or `(N, h, w, K)` with `h * w > 1`, or `(N, T, K)` tokens with `T > 1`), are
   features by kind, and are not the stem: the first stage with a spatial output, or one that is
   handed the model's input itself (stems and patch embeddings).
4. **Choice.** The last eligible stage, then going back, each eligible stage whose output shape
   differs from those chosen, up to `count`. When fewer stages differ (a transformer's blocks all
   have one shape), the deepest chosen stage, if it holds several blocks of its own shape, gives
   its last blocks instead: a ViT's last two encoder layers.

The result on common models is listed in README.md ("Architectures"); docs/callback.md states
the rule for users.
"""

from __future__ import annotations

import itertools
import re
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_dissect.engine.compiled import uncompiled
from lightning_dissect.engine.errors import DissectionError

__all__ = ["choose_layers"]

_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                 nn.Identity)
_POOLING = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
            nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd)
# Normalisation across units or per image (a batch norm, per-channel affine in eval mode, is part of
# the feature it normalises and is not listed).
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm, nn.modules.instancenorm._InstanceNorm)
_RESHAPES = (nn.Flatten, nn.Unflatten)
_ATTENTION = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.MultiheadAttention)
# Class names of normalisation and attention modules of other libraries (timm's LayerNorm2d and
# BatchNormAct2d, torchvision's ShiftedWindowAttention, ...).
_NORM_CLASS = re.compile(r"(Layer|Group|Rms|RMS|Instance)Norm")
_ATTENTION_CLASS = re.compile(r"(Attention|Softmax)$")
_ATTENTION_NAME = re.compile(r"^(attn|attention|self_attn|self_attention|qkv|q_proj|k_proj|v_proj|softmax|attn_drop)$")
# Kinds whose output is not a feature of its own: a container ending in one of them is not a stage.
_NOT_FEATURES = ("pass", "pooling", "norm", "reshape", "permute", "attention")


@dataclass(eq=False)
class _Call:
    """One module call of the recorded forward pass."""

    name: str
    module: nn.Module
    parent: _Call | None
    takes_input: bool  # handed the model's input tensor itself
    input_shape: tuple[int, ...] | None
    input_id: int | None  # id() of the first argument (compared with the caller's while both run)
    children: list[_Call] = field(default_factory=list)
    shape: tuple[int, ...] | None = None  # the output's shape, when a tensor
    output: Any = None  # a weak reference to the output tensor
    version: int | None = None  # the output's version counter when the call returned
    tail: _Call | None = None  # the last call inside that returned this call's output tensor itself
    kind: str | None = None  # one of _NOT_FEATURES, or None for a feature
    returns_map: bool = False  # returns a tensor of 3 or more axes, or a tuple or list starting with one


def _own_kind(call: _Call) -> str | None:
    module, cls = call.module, type(call.module).__name__
    if isinstance(module, _PASS_THROUGH):
        return "pass"
    if isinstance(module, _POOLING):
        return "pooling"
    if isinstance(module, _NORMS) or _NORM_CLASS.search(cls):
        return "norm"
    if isinstance(module, _RESHAPES):
        return "reshape"
    if (isinstance(module, _ATTENTION) or _ATTENTION_CLASS.search(cls)
            or _ATTENTION_NAME.match(call.name.rsplit(".", 1)[-1])):
        return "attention"
    if (not call.children and call.shape is not None and call.input_shape is not None
            and call.shape != call.input_shape and sorted(call.shape) == sorted(call.input_shape)
            and next(module.parameters(), None) is None):
        return "permute"  # only reorders the axes of its input
    return None


def _trace(model: nn.Module, inputs: torch.Tensor) -> tuple[_Call, Counter[str]]:
    """Run `model(inputs)` once with a pre- and a post-hook on every module: the call tree and the
    number of calls of each module name."""
    names = {id(module): name for name, module in model.named_modules()}
    counts: Counter[str] = Counter()
    stack: list[_Call] = []
    finished: list[_Call] = []
    starts: dict[int, int] = {}  # id(call) -> len(finished) when it started
    roots: list[_Call] = []

    def before(module: nn.Module, args: tuple[Any, ...]) -> None:
        first = args[0] if args else None
        call = _Call(names.get(id(module), ""), module, stack[-1] if stack else None,
                     takes_input=first is inputs,
                     input_shape=tuple(first.shape) if isinstance(first, torch.Tensor) else None,
                     input_id=id(first) if first is not None else None)
        (call.parent.children if call.parent is not None else roots).append(call)
        counts[call.name] += 1
        starts[id(call)] = len(finished)
        stack.append(call)

    def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        call = stack.pop()
        call.returns_map = _returns_map(output)
        if isinstance(output, torch.Tensor):
            call.shape, call.output, call.version = tuple(output.shape), weakref.ref(output), _version(output)
            inner = finished[starts.pop(id(call)):]
            # Unless changed in place since (a residual `+=`), the output of the last call inside that returned it.
            call.tail = next((c for c in reversed(inner) if c.output is not None and c.output() is output
                              and c.version == call.version and _own_kind(c) != "pass"), None)
        call.kind = _own_kind(call)
        if call.kind is None and call.tail is not None and call.tail.kind in _NOT_FEATURES:
            call.kind = call.tail.kind
        finished.append(call)

    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
        model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return roots[0], counts


def _returns_map(output: Any) -> bool:
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return isinstance(output, torch.Tensor) and output.ndim >= 3


def _positions_ok(shape: tuple[int, ...] | None) -> bool:
    """A tensor output with more than one position, whichever axis holds the units."""
    if shape is None:
        return False
    if len(shape) == 4:
        return shape[1] * shape[2] > 1 and shape[2] * shape[3] > 1
    return len(shape) == 3 and shape[1] > 1 and shape[2] > 0


def _grids(shape: tuple[int, ...]) -> set[tuple[int, ...]]:
    """The position grids an output may be on: `(h, w)` of `(N, K, h, w)` or of `(N, h, w, K)`;
    `(T,)` of tokens `(N, T, K)`."""
    return {shape[2:], shape[1:3]} if len(shape) == 4 else {shape[1:2]}


def _same_grid(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Two outputs on one grid of positions: the units' axis first or last (a permute stays on its grid),
    or a map and its `h * w` tokens (a flatten stays on its grid)."""
    if len(a) == len(b):
        return bool(_grids(a) & _grids(b))
    tokens, maps = (a, b) if len(a) == 3 else (b, a)
    return len(tokens) == 3 and len(maps) == 4 and any(tokens[1] == h * w for h, w in _grids(maps))


def _choosing(counts: Counter[str]) -> tuple[Callable[[_Call], bool], Callable[[_Call], list[_Call]]]:
    def feature(call: _Call) -> bool:
        inside_attention = False
        parent = call.parent
        while parent is not None and not inside_attention:
            inside_attention, parent = parent.kind == "attention", parent.parent
        return (counts[call.name] == 1 and call.name != "" and call.kind is None and not inside_attention
                and _positions_ok(call.shape))

    def expands(call: _Call) -> bool:
        if not call.children or counts[call.name] != 1 or call.kind == "attention":
            return False
        if call.kind in ("norm", "permute") or (call.kind is None and not call.returns_map):
            # Ends in a normalisation or a permute, or returns no map (a whole model's logits, a dict):
            # its children are the stages.
            return True
        # A trunk: its children run one after the other (at most one is handed the container's input,
        # unlike the parallel branches of an Inception block) and change the grid.
        if sum(child.input_id == call.input_id for child in call.children) > 1:
            return False
        shapes = [child.shape for child in call.children if feature(child)]
        return any(not _same_grid(shapes[0], shape) for shape in shapes[1:])  # type: ignore[arg-type]

    def stages(call: _Call) -> list[_Call]:
        return list(itertools.chain.from_iterable(stages(child) if expands(child) else [child]
                                                  for child in call.children))

    return feature, stages


def choose_layers(model: nn.Module, inputs: torch.Tensor, count: int = 2) -> list[str]:
    """The outputs of the model's last feature stages, found by one forward pass of `inputs`.

    The rule (module docstring): among the stages of the model's trunk, the last one that runs once
    and has a spatial or token output (never pooling, normalisation, a permute, attention internals,
    the stem or a patch embedding), then the last ones before it with other output shapes; a
    transformer's last blocks when its stages share one shape. A ResNet gets `layer3`, `layer4`; a
    VGG its last two ReLUs before a max-pool; a ViT its last two encoder blocks. A compiled model is
    run (and named) as its original.

    Args:
        model: the model, in the mode it is to be dissected in (the caller's `frozen()`).
        inputs: a small batch of the model's input (the probe's first images).
        count: how many layers to choose.

    Returns:
        Up to `count` module names, shallowest first.

    Raises:
        DissectionError: no module has a spatial or token output to dissect.
    """
    with uncompiled(model) as plain:
        root, counts = _trace(plain, inputs)
    feature, stages = _choosing(counts)
    listed = stages(root)
    spatial = [call for call in listed if _positions_ok(call.shape)]
    stem = spatial[0] if spatial else None
    eligible = [call for call in listed if feature(call) and call is not stem and not call.takes_input]
    if not eligible:
        raise DissectionError(
            f"layers=None: no module of {type(plain).__name__} returns a spatial (N, K, h, w) or token (N, T, K) "
            "output after its stem that could be chosen automatically; name the layers to dissect, e.g. "
            "layers=['backbone.layer4']"
        )
    chosen: list[_Call] = []
    for call in reversed(eligible):
        if len(chosen) == count:
            break
        if all(call.shape != other.shape for other in chosen):
            chosen.append(call)
    deepest = chosen[0]
    blocks = [child for child in deepest.children
              if child.children and feature(child) and child.shape == deepest.shape]
    if len(chosen) < count and len(blocks) > 1:
        # Stages of one shape (a transformer's blocks): the last blocks of the deepest stage.
        chosen = chosen[1:] + blocks[-(count - len(chosen) + 1):]
    elif len(chosen) < count:
        # Blocks that are stages themselves (a ModuleList the model loops over): the ones before the deepest.
        before = [call for call in eligible[:eligible.index(deepest)] if call.shape == deepest.shape]
        chosen += before[len(before) - (count - len(chosen)):]
    order = {id(call): number for number, call in enumerate(_walk(root))}
    return [call.name for call in sorted(chosen, key=lambda call: order[id(call)])]


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor has no version counter
        return None


def _walk(call: _Call) -> list[_Call]:
    """Every call of the tree in the order the calls started."""
    return [call] + [inner for child in call.children for inner in _walk(child)]
