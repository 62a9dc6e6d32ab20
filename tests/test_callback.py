"""DissectionCallback in real Trainer runs on the synthetic dataset: safety, resume, schedules, errors.

The helpers here (a tiny CNN for either Lightning package, its data, the
synthetic probe) serve the other `test_callback_*` modules too.
"""

from __future__ import annotations

import importlib
import json
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dissect as ld
from lightning_dissect import dissector as dissector_module
from lightning_dissect import probe_source
from lightning_dissect.synthetic import make_synthetic_broden

TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, log_every_n_steps=1)
_modules: dict[str, type] = {}


def tiny_cnn(namespace: str = "lightning.pytorch", **kwargs):
    """A LightningModule of the given package: two conv blocks with BatchNorm, pooling, dropout, a linear head."""
    if namespace not in _modules:
        lightning = importlib.import_module(namespace)

        class TinyCNN(lightning.LightningModule):
            def __init__(self, dropout: float = 0.2, lr: float = 0.1) -> None:
                super().__init__()
                self.block1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
                self.pool = nn.AdaptiveAvgPool2d(1)
                self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(16, 4))
                self.lr = lr
                self.seen: list[float] = []  # one checksum per training batch, in order
                self.validated = 0

            def forward(self, images):
                return self.head(self.pool(self.block2(self.block1(images))))

            def training_step(self, batch, batch_idx):
                images, targets = batch
                self.seen.append(float(images.double().sum()))
                return F.cross_entropy(self(images), targets)

            def validation_step(self, batch, batch_idx):
                images, targets = batch
                self.validated += 1
                self.log("val_loss", F.cross_entropy(self(images), targets))

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

        _modules[namespace] = TinyCNN
    return _modules[namespace](**kwargs)


def loader(num_images: int = 32, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(num_images, 3, 32, 32, generator=generator),
                         torch.randint(0, 4, (num_images,), generator=generator))
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Trainers without a logger write under the working directory: keep that in tmp_path."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    return make_synthetic_broden(tmp_path_factory.mktemp("synthetic") / "broden", num_images=48, image_size=32)


@pytest.fixture(scope="session")
def probe(synthetic_root):
    return ld.ProbeSet(synthetic_root, cache_dir=False)


def steps_of(callback) -> list[int]:
    return sorted({entry.step for entry in callback.dissector.history})


def without_seconds(history: list[ld.HistoryEntry]) -> list[dict]:
    return [{key: value for key, value in entry.to_dict().items() if key != "seconds"} for entry in history]


def fit(callbacks, model=None, data=None, val=None, ckpt_path=None, dropout=0.2, strips=False, **kwargs):
    """Seed, then fit `model` (by default a `tiny_cnn(dropout)` made after seeding) for 2 epochs of 4 steps.

    Unit strips (issue 7's media, tested in test_report*) are turned off unless `strips`: they cost time.
    """
    for callback in callbacks:
        if isinstance(callback, ld.DissectionCallback) and not strips:
            callback.dissector.strips_per_layer = 0  # a plain option of the dissector, set here for every test
    lightning = importlib.import_module("lightning.pytorch")
    lightning.seed_everything(0, verbose=False)
    model = model if model is not None else tiny_cnn(dropout=dropout)
    trainer = lightning.Trainer(callbacks=callbacks, **{**TRAINER, "max_epochs": 2, **kwargs})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|log_every_n_steps|LeafSpec|val_dataloader).*")
        trainer.fit(model, data or loader(), val, ckpt_path=ckpt_path)
    return trainer, model


# ---------------------------------------------------------------------- the run is unchanged


@pytest.mark.parametrize("options", [dict(every_n_steps=3, max_overhead=None), {}], ids=["every_3_steps", "defaults"])
def test_run_with_callback_ends_bit_identical_to_run_without(probe, tmp_path, options):
    runs = []
    for callbacks in ([], [ld.DissectionCallback(probe, dirpath=tmp_path, **options)]):
        trainer, model = fit(callbacks, data=loader(shuffle=True), max_epochs=3, strips=True)
        runs.append({
            "weights": model.state_dict(),  # includes BatchNorm running statistics
            "optimizer": trainer.optimizers[0].state_dict(),
            "batches": list(model.seen),
            "modes": [module.training for module in model.modules()],
            "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()),
            "steps": steps_of(callbacks[0]) if callbacks else None,
        })
    without, with_callback = runs
    if options:
        assert with_callback["steps"] == [0, 3, 6, 9, 12]
    else:  # the budget may skip early log-spaced steps (step 0 too, in a run this short), never the final model
        assert with_callback["steps"][-1] == 12
    assert without["weights"].keys() == with_callback["weights"].keys()
    for name, value in without["weights"].items():
        assert torch.equal(value, with_callback["weights"][name]), name
    momentum = [state["momentum_buffer"] for state in without["optimizer"]["state"].values()]
    momentum_with = [state["momentum_buffer"] for state in with_callback["optimizer"]["state"].values()]
    assert len(momentum) == 10 and all(torch.equal(a, b) for a, b in zip(momentum, momentum_with))
    assert without["batches"] == with_callback["batches"]  # same data order
    assert without["modes"] == with_callback["modes"]
    assert torch.equal(without["rng"][0], with_callback["rng"][0])
    assert without["rng"][1] == with_callback["rng"][1]
    assert all(np.array_equal(a, b) for a, b in zip(without["rng"][2], with_callback["rng"][2]))


def test_dissection_restores_every_random_stream_and_train_flag(probe):
    class Noisy(nn.Module):  # draws from every stream during the dissection's forward passes
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, images):
            torch.rand(3), random.random(), np.random.rand(2)
            return self.conv(images)

    model = Noisy()
    model.train()
    model.conv.eval()  # a mixed state, restored exactly
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    ld.Dissector(probe, ["conv"], max_overhead=None).run(model, step=0)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert model.training and not model.conv.training
    assert all(parameter.grad is None for parameter in model.parameters())


def test_forward_runs_in_the_trainers_precision_context(probe):
    class Recording(type(tiny_cnn())):
        def forward(self, images):
            if not self.training:
                self.autocast.append(torch.is_autocast_enabled("cpu"))
            return super().forward(images)

    model = Recording(dropout=0.0)
    model.autocast = []
    fit([ld.DissectionCallback(probe, layers="block2", every_n_steps=1, max_overhead=None)], model=model, max_steps=1,
        precision="bf16-mixed")
    assert len(model.autocast) >= 2 and all(model.autocast)


# ---------------------------------------------------------------------- history and resume


def test_resumed_run_has_the_same_history_as_an_uninterrupted_run(probe, tmp_path):
    def callback(directory):
        return ld.DissectionCallback(probe, layers=["block1", "block2"], dirpath=tmp_path / directory,
                                     max_overhead=None)

    uninterrupted = callback("whole")
    fit([uninterrupted], dropout=0.0, max_epochs=3)

    first = callback("first")
    trainer, _ = fit([first], dropout=0.0, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = callback("resumed")
    fit([resumed], dropout=0.0, max_epochs=3, ckpt_path=tmp_path / "epoch1.ckpt")

    assert steps_of(uninterrupted) == [0, 1, 2, 4, 9, 12]  # 12: the final model
    assert steps_of(first) == [0, 1, 2, 4]  # its final model, step 4, was on the schedule
    assert without_seconds(resumed.dissector.history) == without_seconds(uninterrupted.dissector.history)
    lines = (tmp_path / "resumed" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 0, 1, 1, 2, 2, 4, 4, 9, 9, 12, 12]


def test_state_key_names_layers_and_options_and_old_state_loads():
    a = ld.DissectionCallback(layers=["block2"])
    assert a.state_key == ld.DissectionCallback(layers=["block2"]).state_key
    assert "block2" in a.state_key and "'quantile': 0.005" in a.state_key
    for other in (ld.DissectionCallback(layers=["block1"]), ld.DissectionCallback(layers=["block2"], quantile=0.01)):
        assert other.state_key != a.state_key
    # Not the schedule: a resumed run with another schedule keeps its history (and is warned).
    assert ld.DissectionCallback(layers=["block2"], every_n_steps=5).state_key == a.state_key
    a.load_state_dict({})  # a checkpoint from before any state was kept
    assert a.dissector.history == [] and a.dissector.last_step is None


# ---------------------------------------------------------------------- when it runs


def test_nothing_is_dissected_during_the_sanity_check(probe):
    callback = ld.DissectionCallback(probe, layers="block2", every_n_steps=1, max_overhead=None)
    _, model = fit([callback], val=loader(num_images=8), max_steps=2, num_sanity_val_steps=2)
    assert model.validated == 1  # the sanity check ran its one batch
    assert [entry.step for entry in callback.dissector.history] == [0, 1, 2]


def test_fast_dev_run_and_validate_dissect_nothing_and_load_no_probe(tmp_path):
    missing = tmp_path / "no-broden-here"  # would fail if it were loaded
    callback = ld.DissectionCallback(missing, every_n_steps=1)
    trainer, model = fit([callback], fast_dev_run=2)
    assert model.seen and callback.dissector.history == [] and callback.dissector.probe is None
    lightning = importlib.import_module("lightning.pytorch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lightning.Trainer(callbacks=[callback], **TRAINER).validate(tiny_cnn(), loader(num_images=8))
    assert callback.dissector.history == [] and callback.dissector.probe is None


def test_every_n_epochs_dissects_at_epoch_ends(probe):
    callback = ld.DissectionCallback(probe, layers="block2", every_n_epochs=2, max_overhead=None)
    fit([callback], max_epochs=4)  # 4 steps an epoch
    assert [(entry.step, entry.epoch) for entry in callback.dissector.history] == [(0, 0), (8, 1), (16, 3)]


def test_automatic_layers_are_the_last_feature_stages_never_the_stem(probe):
    # TinyCNN's block1 is handed the images: its stem. block2 is the only stage after it.
    callback = ld.DissectionCallback(probe, every_n_steps=100, max_overhead=None, at_end=False)
    fit([callback], max_steps=1)
    assert callback.dissector.layers == ["block2"]
    assert [entry.layer for entry in callback.dissector.history] == ["block2"]


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("layers,error,message", [
    (["block3"], ld.DissectionError, r"'block3' is not a module of TinyCNN. Did you mean \['block2', 'block1'"),
    (["pool"], ld.DissectionError, r"'pool' output has shape \(2, 16, 1, 1\): a single spatial position"),
    (["head"], ld.DissectionError, r"'head' output has shape \(2, 4\): no spatial axes"),
])
def test_bad_layers_fail_before_the_first_training_step(probe, layers, error, message):
    model = tiny_cnn()
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(error, match=message):
        fit([ld.DissectionCallback(probe, layers=layers, max_overhead=None)], model=model)
    assert model.seen == []
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in weights.items())


def test_a_probe_that_does_not_load_fails_at_setup(tmp_path):
    model = tiny_cnn()
    with pytest.raises(ld.BrodenError, match="no-broden-here does not exist"):
        fit([ld.DissectionCallback(tmp_path / "no-broden-here")], model=model)
    assert model.seen == []


def test_zero_configuration_without_network_says_how_to_point_at_data(monkeypatch):
    monkeypatch.delenv(probe_source.BRODEN_ENV, raising=False)
    monkeypatch.setenv("LIGHTNING_DISSECT_BRODEN_URL", "http://127.0.0.1:9/data/")  # nothing listens there
    with pytest.raises(ld.DissectionError) as raised:
        ld.Dissector().load_probe()
    message = str(raised.value)
    assert "probe=None" in message and "LIGHTNING_DISSECT_BRODEN" in message and "probe='synthetic'" in message


def test_zero_configuration_reads_the_broden_of_the_environment_variable(monkeypatch, synthetic_root):
    monkeypatch.setenv(probe_source.BRODEN_ENV, str(synthetic_root))
    probe = ld.Dissector().load_probe()
    assert probe.broden.root == synthetic_root and len(probe) == 48


@pytest.mark.parametrize("options,message", [
    (dict(quantile=0), "quantile=0"),
    (dict(iou_threshold=1.5), "iou_threshold=1.5"),
    (dict(denominator="union"), "denominator='union'"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(rotation="haar"), "rotation='haar'"),
    (dict(probe_size=0), "probe_size=0"),
    (dict(image_size=2.5), "image_size=2.5"),
    (dict(max_seconds=0), "max_seconds=0"),
    (dict(on_error="ignore"), "on_error='ignore'"),
    (dict(layers=[]), r"layers=\[\]"),
    (dict(probe=3), "probe=3"),
    (dict(schedule=5), "schedule=5"),
    (dict(every_n_steps=2, every_n_epochs=1), "not every_n_steps and every_n_epochs"),
    (dict(every_n_steps=0), "every_n_steps=0"),
])
def test_bad_options_are_refused_in_init_naming_the_argument(options, message):
    with pytest.raises(ValueError, match=message):
        ld.DissectionCallback(**options)


def test_a_failing_periodic_dissection_warns_and_training_goes_on(probe, monkeypatch):
    engine_dissect = dissector_module.dissect
    calls = []

    def out_of_memory_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return engine_dissect(*args, **kwargs)

    monkeypatch.setattr(dissector_module, "dissect", out_of_memory_at_step_2)
    callback = ld.DissectionCallback(probe, layers="block2", every_n_steps=1, max_overhead=None)
    with pytest.warns(UserWarning, match="dissection at step 1 failed and was skipped.*out of memory"):
        trainer, model = fit([callback], max_steps=3)
    assert trainer.global_step == 3 and len(model.seen) == 3
    assert steps_of(callback) == [0, 2, 3]

    calls.clear()
    raising = ld.DissectionCallback(probe, layers="block2", every_n_steps=1, on_error="raise", max_overhead=None)
    with pytest.raises(RuntimeError, match="out of memory"):
        fit([raising], max_steps=3)


# ---------------------------------------------------------------------- both Lightning packages


def test_pytorch_lightning_package_has_its_own_callback_class(probe):
    pytorch_lightning = importlib.import_module("pytorch_lightning")
    lightning = importlib.import_module("lightning.pytorch")
    assert issubclass(ld.PLDissectionCallback, pytorch_lightning.Callback)
    assert not issubclass(ld.PLDissectionCallback, lightning.Callback)
    assert issubclass(ld.DissectionCallback, lightning.Callback)
    callback = ld.PLDissectionCallback(probe, layers="block2", every_n_steps=2, max_overhead=None)
    pytorch_lightning.seed_everything(0, verbose=False)
    trainer = pytorch_lightning.Trainer(callbacks=[callback], max_steps=4, **TRAINER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(tiny_cnn("pytorch_lightning"), loader())
    assert steps_of(callback) == [0, 2, 4]
    assert float(trainer.callback_metrics["dissect/block2/unique_concepts"]) == \
        callback.dissector.history[-1].summary["unique_concepts"]
