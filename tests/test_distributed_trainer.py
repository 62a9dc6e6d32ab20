"""The callback under Lightning's DDP on CPU (gloo): exact results on every rank, resume, failures.

Spawning processes that import Lightning is the slow part, so each test runs
one short fit of a tiny model; the two `ddp_spawn` tests share a fit.
"""

from __future__ import annotations

import datetime
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lightning_dissect as ld
from lightning_dissect.engine.sync import RankFailedError
from tests.conftest import random_broden
from tests.test_distributed import run_ranks

pl = pytest.importorskip("lightning.pytorch")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

PROBE_SIZE = 23  # odd: shards of 12 and 11 images
OPTIONS = dict(layers=["features.0", "features"], quantile=0.05, top_k=3, batch_size=1)
STEPS_PER_EPOCH = 2  # per rank, with 2 ranks: 16 training images in batches of 4


class TinyNet(pl.LightningModule):
    """Two conv layers with BatchNorm between them on 16 x 16 images; `fail_at_step` makes the dissection
    forward raise on rank 1. Plain DDP (no SyncBatchNorm): each rank's BatchNorm statistics follow its own
    batches between DDP's buffer broadcasts, so the ranks' models differ when a dissection runs."""

    def __init__(self, fail_at_step: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Linear(4, 2)
        self.fail_at_step = fail_at_step
        self.armed = False

    def forward(self, x):
        if self.armed and not self.training:
            raise RuntimeError("simulated out of memory during the dissection")
        return self.head(self.features(x).mean((2, 3)))

    def on_train_batch_start(self, batch, batch_idx):
        # Callbacks' on_train_batch_end runs before the module's: arm here for the dissection after this step.
        self.armed = self.global_rank == 1 and self.trainer.global_step + 1 == self.fail_at_step

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return nn.functional.cross_entropy(self(images), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.rand(16, 3, 16, 16, generator=g),
                                              torch.randint(0, 2, (16,), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=4)


class SaveRankState(pl.Callback):
    """Writes every rank's dissection history and `dissect/` metrics at the end of the fit."""

    def __init__(self, out: Path):
        self.out = Path(out)

    def on_train_end(self, trainer, pl_module):
        saved = {"weights": {name: value.clone() for name, value in pl_module.state_dict().items()}}
        callback = next((c for c in trainer.callbacks if isinstance(c, ld.DissectionCallback)), None)
        if callback is not None:  # listed first: its final dissection ran already
            metrics = {name: value.item() for name, value in trainer.callback_metrics.items()
                       if name.startswith("dissect")}
            history = [entry.to_dict() for entry in callback.dissector.history]  # plain values for weights_only
            saved.update(history=history, state=callback.state_dict(), metrics=metrics)
        torch.save(saved, self.out / f"rank{trainer.global_rank}.pt")


def entries(history: list[dict]) -> list[ld.HistoryEntry]:
    return [ld.HistoryEntry.from_dict(entry) for entry in history]


def with_entries(saved: dict) -> dict:
    """A rank's saved results with its history as `HistoryEntry`s again."""
    return dict(saved, history=entries(saved["history"]))


def ddp_spawn_trainer(tmp: Path, max_steps: int, dissect: bool = True, **callback_options) -> pl.Trainer:
    # strategy="ddp_spawn" with a finite collective timeout, so a bug fails instead of hanging the suite.
    strategy = pl.strategies.DDPStrategy(start_method="spawn", timeout=datetime.timedelta(seconds=60))
    callbacks = [ld.DissectionCallback(**OPTIONS, every_n_steps=2, dirpath=tmp / "dissections", max_overhead=None,
                                       **callback_options)] if dissect else []
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp / "checkpoints", save_last=True)
    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=max_steps, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
                      callbacks=[*callbacks, checkpoints, SaveRankState(tmp)])


def single_process(model: nn.Module, probe: ld.ProbeSet) -> ld.Dissection:
    options = {name: value for name, value in OPTIONS.items()}
    return ld.dissect(model, probe, options.pop("layers"), **options)


def assert_same_dissection(got: ld.Dissection, expected: ld.Dissection) -> None:
    assert list(got) == list(expected)
    for layer in expected:
        for field in ["thresholds", "iou", "intersection", "unit_area", "label_area", "category_labels",
                      "category_scores", "labels", "scores", "top_images", "top_activations"]:
            assert torch.equal(getattr(got[layer], field), getattr(expected[layer], field)), (layer, field)
        assert got[layer].summary() == expected[layer].summary()


def assert_history_matches(entries: list[dict], step: int, expected: ld.Dissection) -> None:
    assert [entry.layer for entry in entries] == list(expected)
    for entry in entries:
        layer = expected[entry.layer]
        assert entry.step == step and entry.probe_size == PROBE_SIZE
        assert entry.label_number == layer.labels.tolist() and entry.score == layer.scores.tolist()
        assert entry.summary == {name: value for name, value in layer.summary().items() if name != "units"}


@pytest.fixture(scope="module")
def probe_root(tmp_path_factory) -> Path:
    return random_broden(tmp_path_factory.mktemp("ddp") / "broden", num_images=PROBE_SIZE)


@pytest.fixture(scope="module")
def first_run(probe_root, tmp_path_factory):
    """One epoch under ddp_spawn, dissections at steps 0 and 2, a checkpoint at its end."""
    tmp = tmp_path_factory.mktemp("first")
    model = TinyNet()
    initial = TinyNet()  # the same seeded weights
    ddp_spawn_trainer(tmp, max_steps=STEPS_PER_EPOCH, probe=str(probe_root), probe_size=PROBE_SIZE).fit(model)
    # ddp_spawn loads rank zero's final weights back into `model`.
    return tmp, initial, model, [with_entries(torch.load(tmp / f"rank{rank}.pt")) for rank in range(2)]


def test_ddp_spawn_with_batchnorm_trains_bit_identically_on_every_rank(probe_root, first_run, tmp_path):
    """Every rank dissects rank zero's model and gets its own BatchNorm statistics back: each rank's weights
    and statistics at the end equal those of the same run without the callback."""
    ddp_spawn_trainer(tmp_path, max_steps=STEPS_PER_EPOCH, dissect=False).fit(TinyNet())
    plain = [torch.load(tmp_path / f"rank{rank}.pt")["weights"] for rank in range(2)]
    dissected = [ranks["weights"] for ranks in first_run[3]]
    assert not torch.equal(plain[0]["features.1.running_mean"], plain[1]["features.1.running_mean"])  # drifted
    for rank in range(2):
        assert plain[rank].keys() == dissected[rank].keys()
        for name, value in plain[rank].items():
            assert torch.equal(value, dissected[rank][name]), (rank, name)


def test_ddp_spawn_dissections_equal_single_process_on_every_rank(probe_root, first_run):
    tmp, initial, trained, ranks = first_run
    probe = ld.ProbeSet(probe_root, size=PROBE_SIZE, cache_dir=False)
    expected = {0: single_process(initial, probe), STEPS_PER_EPOCH: single_process(trained, probe)}
    for step, dissection in expected.items():
        assert_same_dissection(ld.Dissection.from_json(tmp / "dissections" / f"step={step}" / "dissection.json"),
                               dissection)
    assert ranks[0]["history"] == ranks[1]["history"]  # seconds included: the slowest rank's, agreed
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    for step, dissection in expected.items():
        assert_history_matches([e for e in ranks[1]["history"] if e.step == step], step, dissection)
    assert sorted(path.name for path in (tmp / "dissections").iterdir()) == ["history.jsonl", "run.json", "step=0",
                                                                             "step=2"]


# ---------------------------------------------------------------- two "nodes" launched externally

def external_trainer(out: Path, world_size: int, max_steps: int, **callback_options) -> pl.Trainer:
    callback = ld.DissectionCallback(**OPTIONS, every_n_steps=2, dirpath=out / "dissections",
                                     max_overhead=None, **callback_options)
    strategy = pl.strategies.DDPStrategy(timeout=datetime.timedelta(seconds=30))
    return pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, num_nodes=world_size, max_steps=max_steps,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=out, callbacks=[callback])


def two_node_worker(rank: int, world_size: int, port: int, root: str, checkpoint: str, out: str) -> None:
    """One process per node, as torchrun or SLURM would start them (Lightning launches nothing):
    a resumed fit, then a fit where rank 1 fails in the dissection at step 2, under each `on_error`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(rank), LOCAL_RANK="0",
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    out = Path(out)
    outcomes: dict = {}

    model = TinyNet()
    trainer = external_trainer(out / "resumed", world_size, 2 * STEPS_PER_EPOCH, probe=root, probe_size=PROBE_SIZE)
    trainer.fit(model, ckpt_path=checkpoint)
    callback = next(c for c in trainer.callbacks if isinstance(c, ld.DissectionCallback))
    outcomes["resumed"] = {"state": callback.state_dict(), "weights": model.state_dict()}

    for on_error in ["warn", "raise"]:
        trainer = external_trainer(out / on_error, world_size, 4, probe=root, probe_size=PROBE_SIZE,
                                   on_error=on_error)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trainer.fit(TinyNet(fail_at_step=2))
                error = None
            except Exception as raised:  # noqa: BLE001 - the test records what each rank raised
                error = type(raised).__name__ + (str(raised.ranks) if isinstance(raised, RankFailedError) else "")
        history = next(c for c in trainer.callbacks if isinstance(c, ld.DissectionCallback)).dissector.history
        outcomes[on_error] = {
            "error": error, "global_step": trainer.global_step, "history": [entry.to_dict() for entry in history],
            "history_steps": [entry.step for entry in history],
            "warnings": [str(w.message) for w in caught if "dissection at step" in str(w.message)],
        }
    torch.save(outcomes, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_node_run(probe_root, first_run, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("two_nodes")
    checkpoint = first_run[0] / "checkpoints" / "last.ckpt"
    run_ranks(two_node_worker, 2, str(probe_root), str(checkpoint), str(out), timeout=300)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def test_ddp_run_resumed_from_checkpoint_continues_the_same_history(probe_root, first_run, two_node_run):
    first_history = first_run[3][0]["history"]
    rank0, rank1 = (outcome["resumed"] for outcome in two_node_run)
    assert rank0["state"] == rank1["state"]
    history = entries(rank1["state"]["history"])
    assert history[: len(first_history)] == first_history  # steps 0 and 2, from the ddp_spawn checkpoint
    assert len(history) == 3 * len(OPTIONS["layers"])
    model = TinyNet()
    model.load_state_dict(rank0["weights"])
    probe = ld.ProbeSet(probe_root, size=PROBE_SIZE, cache_dir=False)
    last = [entry for entry in history if entry.step == 2 * STEPS_PER_EPOCH]
    assert_history_matches(last, 2 * STEPS_PER_EPOCH, single_process(model, probe))


def test_failure_on_one_rank_during_a_periodic_dissection_stalls_no_rank(two_node_run):
    rank0, rank1 = two_node_run
    layers = len(OPTIONS["layers"])
    # on_error="warn": both ranks skip the dissection at step 2 and train on to step 4.
    for outcome in (rank0["warn"], rank1["warn"]):
        assert outcome["error"] is None and outcome["global_step"] == 4
        assert outcome["history_steps"] == [0] * layers + [4] * layers
    assert rank0["warn"]["history"] == rank1["warn"]["history"]
    assert len(rank0["warn"]["warnings"]) == 1 and "rank(s) [1]" in rank0["warn"]["warnings"][0]
    # Rank zero, the one that logs, shows rank 1's own error.
    assert "rank 1: RuntimeError: simulated out of memory during the dissection" in rank0["warn"]["warnings"][0]
    # on_error="raise": the fit stops on both ranks at step 2, each with its own reason.
    assert rank0["raise"]["error"] == "RankFailedError[1]" and rank1["raise"]["error"] == "RuntimeError"
    assert rank0["raise"]["global_step"] == rank1["raise"]["global_step"] == 2
