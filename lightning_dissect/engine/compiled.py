"""Compiled models: the dissection runs the original modules, never the compiled ones.

`torch.compile` wraps a module in an `OptimizedModule` (its submodules appear under
`_orig_mod.`), `nn.Module.compile()` compiles a module in place, and Lightning's
`trainer.fit(torch.compile(lit_module))` unwraps the module and compiles its `forward`
and step methods in place. A forward pass of the dissection through any of these would
compile the model again for eval mode and the probe's batch size, add guards and cache
entries, and can exhaust Dynamo's recompile limit, after which training runs uncompiled
and is no longer the same run. `uncompiled` swaps the original modules in for the length
of a dissection (the compiled wrappers and their caches are not called, so nothing about
them changes) and `plain_name` names layers as the original model does.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

ORIG_MOD = "_orig_mod"


def _optimized_module_type() -> type[nn.Module] | None:
    """Dynamo's `OptimizedModule`, or None where Dynamo was never imported: then no module is one.

    Importing `torch._dynamo` takes over a second and a half on a CPU; a model compiled with
    `torch.compile` has imported it already, so an uncompiled run never pays for it.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    return optimized if isinstance(optimized, type) else None


def plain_name(name: str) -> str:
    """A layer name without the `_orig_mod.` parts a compiled wrapper adds (`model._orig_mod.layer4` ->
    `model.layer4`): the name of that layer in the original model, the one the dissection runs."""
    return ".".join(part for part in name.split(".") if part != ORIG_MOD)


def plain_names(layers: str | Sequence[str]) -> list[str]:
    """`plain_name` of each layer name (a single name: a list of one)."""
    return [plain_name(name) for name in ([layers] if isinstance(layers, str) else layers)]


def original(model: nn.Module) -> nn.Module:
    """`model` itself, or the module `torch.compile(model)` wrapped (through nested wrappers)."""
    optimized = _optimized_module_type()
    while optimized is not None and isinstance(model, optimized):
        inner = model._orig_mod
        assert isinstance(inner, nn.Module)
        model = inner
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether `model` or any of its submodules would run through a compiled function when called."""
    optimized = _optimized_module_type()
    return any((optimized is not None and isinstance(module, optimized)) or _compiled_forward(module) is not None
               or module._compiled_call_impl is not None for module in model.modules())


def _compiled_forward(module: nn.Module) -> Any:
    """The original of a compiled `forward` set on the module itself (Lightning's `from_compiled`), or None."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "_torchdynamo_orig_callable", None) if forward is not None else None


@contextlib.contextmanager
def uncompiled(model: nn.Module) -> Iterator[nn.Module]:
    """For a while, `model` with every compiled part replaced by its original; yields the model to run.

    Each `OptimizedModule` child is replaced on its parent by the module it wraps (a compiled `model`
    itself: its original is yielded), modules compiled in place (`nn.Module.compile()`) run their
    uncompiled call, and a `forward` compiled in place (Lightning's `trainer.fit(torch.compile(module))`)
    is its original function. Everything is restored on exit, even on error; the compiled wrappers are
    never called, so their caches and guards stay as they were. A model without compiled parts is
    yielded unchanged and nothing is touched.
    """
    optimized = _optimized_module_type()
    root = original(model)
    restore: list[tuple[dict[str, Any], str, Any]] = []  # (a dict, a key, the value to put back)
    try:
        changed = True
        while changed:  # replacing a wrapper shows its original's submodules: look again until none is left
            changed = False
            for module in list(root.modules()):
                children = module._modules
                for key, child in list(children.items()):
                    if optimized is not None and isinstance(child, optimized):
                        restore.append((children, key, child))
                        children[key] = original(child)
                        changed = True
        for module in root.modules():
            if module.__dict__.get("_compiled_call_impl") is not None:
                restore.append((module.__dict__, "_compiled_call_impl", module.__dict__["_compiled_call_impl"]))
                module.__dict__["_compiled_call_impl"] = None
            forward = _compiled_forward(module)
            if forward is not None:
                restore.append((module.__dict__, "forward", module.__dict__["forward"]))
                module.__dict__["forward"] = forward
        yield root
    finally:
        for mapping, key, value in reversed(restore):
            mapping[key] = value
