"""Compiled models (`torch.compile`): the dissection runs the original modules, never the compiled code.

The compiled runs use Dynamo with the `aot_eager` backend: the same tracing, guards, cache and recompiles
as the default `inductor`, without generating and building C++ kernels (about 40 s on this CPU for the
tiny CNN, against 2 s); what is tested is whether the dissection goes through the compiled wrapper.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import lightning_dissect as ld
from lightning_dissect.engine.compiled import is_compiled, plain_name, uncompiled
from tests import test_callback as shared
from tests.test_callback import fit, loader

_in_tmp_path, probe, synthetic_root = shared._in_tmp_path, shared.probe, shared.synthetic_root  # fixtures
BACKEND = "aot_eager"


def cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


class Counting:
    """A Dynamo backend that counts the graphs it compiles and every run of compiled code."""

    def __init__(self) -> None:
        self.compiled = self.runs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.compiled += 1

        def run(*args):
            self.runs += 1
            return graph.forward(*args)

        return run


def dynamo_counts() -> dict[str, dict[str, int]]:
    return {key: dict(counters[key]) for key in ("frames", "stats", "recompiles")}


def test_plain_names_leave_out_the_wrappers_part():
    assert plain_name("model._orig_mod.layer4") == "model.layer4"
    assert plain_name("_orig_mod.layer4.0") == "layer4.0"
    assert plain_name("model.layer4") == "model.layer4"


def test_uncompiled_swaps_in_the_originals_for_a_while_and_restores_every_compiled_part():
    torch._dynamo.reset()

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.compile(cnn(), backend=BACKEND)
            self.head = cnn()
            self.head.compile(backend=BACKEND)  # compiled in place

        def forward(self, x):
            return self.head(self.model(x))

    holder = Holder()
    wrapper, compiled_call = holder.model, holder.head._compiled_call_impl
    assert is_compiled(holder) and not is_compiled(cnn())
    with uncompiled(holder) as plain:
        assert plain is holder and holder.model is wrapper._orig_mod and not is_compiled(holder)
        names = [name for name, _ in holder.named_modules()]
        assert "model.0" in names and not any("_orig_mod" in name for name in names)
    assert holder.model is wrapper and holder.head._compiled_call_impl is compiled_call

    with pytest.raises(RuntimeError, match="inside"), uncompiled(holder):
        raise RuntimeError("inside")
    assert holder.model is wrapper and holder.head._compiled_call_impl is compiled_call

    whole = torch.compile(cnn(), backend=BACKEND)
    with uncompiled(whole) as plain:
        assert plain is whole._orig_mod
    model = cnn()
    with uncompiled(model) as plain:  # nothing compiled: nothing touched
        assert plain is model and model.__dict__.keys() == cnn().__dict__.keys()


def test_lightning_compiled_forward_is_swapped_for_its_original():
    from lightning.pytorch.utilities.compile import from_compiled

    lit = from_compiled(torch.compile(shared.tiny_cnn(), backend=BACKEND))  # what trainer.fit does with it
    compiled_forward = lit.forward
    assert is_compiled(lit)
    with uncompiled(lit):
        assert not is_compiled(lit) and lit.forward == lit._compiler_ctx["original_forward"]
    assert lit.forward is compiled_forward


def test_dissect_of_a_compiled_model_equals_the_original_and_never_runs_or_compiles_its_code(probe):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = cnn().eval()
    backend = Counting()
    compiled = torch.compile(model, backend=backend)
    compiled(torch.randn(2, 3, 32, 32))
    before = (backend.compiled, backend.runs)
    assert before == (1, 1)
    reference = ld.dissect(model, probe, ["2", "5"])
    for layers in (["_orig_mod.2", "_orig_mod.5"], ["2", "5"]):
        result = ld.dissect(compiled, probe, layers)
        assert list(result) == ["2", "5"] and result.settings["layers"] == ["2", "5"]
        for name in result:
            for field in ("thresholds", "iou", "intersection", "unit_area", "labels", "scores", "top_images"):
                assert torch.equal(getattr(result[name], field), getattr(reference[name], field)), (name, field)
    assert (backend.compiled, backend.runs) == before
    compiled(torch.randn(2, 3, 32, 32))  # the cache still serves the model: no compilation
    assert (backend.compiled, backend.runs) == (1, 2)


def lit_module(compile_inside: bool):
    lightning = importlib.import_module("lightning.pytorch")

    class Compiled(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.compile(cnn(), backend=BACKEND) if compile_inside else cnn()

        def forward(self, images):
            return self.model(images)

        def training_step(self, batch, batch_idx):
            images, targets = batch
            return F.cross_entropy(self(images), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return Compiled()


@pytest.mark.parametrize("where", ["submodule", "fit"])
def test_a_compiled_run_with_the_callback_ends_bit_identical_to_the_run_without_and_compiles_nothing_more(
        probe, tmp_path, where):
    """`self.model = torch.compile(net)` with layers named with and without `_orig_mod.`, and
    `trainer.fit(torch.compile(module))` with the layers chosen automatically."""
    runs = []
    for with_callback in (False, True):
        callbacks = []
        if with_callback:
            layers = ["model._orig_mod.2", "model.5"] if where == "submodule" else None
            callbacks = [ld.DissectionCallback(probe, layers, every_n_steps=2, max_overhead=None, dirpath=tmp_path)]
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        module = lit_module(compile_inside=where == "submodule")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(compile|Dynamo|dynamo).*")
            fit(callbacks, model=module if where == "submodule" else torch.compile(module, backend=BACKEND),
                data=loader(shuffle=True), max_epochs=2, strips=where == "submodule")
        counts = dynamo_counts()
        assert counts["stats"].get("unique_graphs", 0) >= 1  # the training steps ran compiled
        runs.append((module.state_dict(), counts, callbacks))
    (without, counts_without, _), (with_, counts_with, callbacks) = runs
    assert without.keys() == with_.keys()
    for name, value in without.items():  # parameters and BatchNorm statistics
        assert torch.equal(value, with_[name]), name
    assert counts_with == counts_without  # the dissections compiled nothing, recompiled nothing
    history = callbacks[0].dissector.history
    assert sorted({entry.step for entry in history}) == [0, 2, 4, 6, 8]
    assert sorted({entry.layer for entry in history}) == ["model.2", "model.5"]  # named without _orig_mod


def test_dissecting_a_model_never_compiled_does_not_import_dynamo(tmp_path):
    """No model is compiled before torch._dynamo is imported, so an uncompiled dissection never imports it
    (over a second and a half on a CPU, paid by the first dissection of every process that did)."""
    import subprocess
    import sys

    from tests.conftest import random_broden

    root = random_broden(tmp_path / "broden", num_images=6, image_size=32)
    script = (f"import sys, torch\nimport lightning_dissect as ld\n"
              f"model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))\n"
              f"ld.dissect(model.eval(), ld.ProbeSet({str(root)!r}, cache_dir=False), ['0', '2'])\n"
              f"print(sorted(name for name in sys.modules if name.startswith('torch._dynamo')))\n")
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent.parent)
    assert output.stdout.strip().splitlines()[-1] == "[]"
