"""The first minutes of a new user: what `probe=` says when there is no data, a misspelt name, or the
synthetic dataset is generated for the first time."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import urllib.error

import pytest

import lightning_dissect as ld
from lightning_dissect import probe_source
from lightning_dissect.probe_source import dataset_of, load_probe, short_reason

UNREACHABLE = "http://127.0.0.1:9/data/"  # nothing listens there: the download fails at once, as offline

ZERO_CONFIGURATION_FIT = textwrap.dedent("""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dissect import DissectionCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

        def training_step(self, batch, index):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 2, (8,))), batch_size=4)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[DissectionCallback()])
    trainer.fit(Net(), data)
""")


def test_zero_configuration_offline_is_one_short_error_that_starts_with_the_way_out(tmp_path):
    environment = {name: value for name, value in os.environ.items() if name != probe_source.BRODEN_ENV}
    environment.update(LIGHTNING_DISSECT_CACHE=str(tmp_path / "cache"), LIGHTNING_DISSECT_BRODEN_URL=UNREACHABLE,
                       PYTHONWARNINGS="ignore")
    script = tmp_path / "fit.py"
    script.write_text(ZERO_CONFIGURATION_FIT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=environment,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert done.stderr.count("Traceback (most recent call last)") == 1, done.stderr
    assert "During handling" not in done.stderr and "direct cause" not in done.stderr
    assert len(lines) < 45, done.stderr  # three chained tracebacks made 97 lines; Lightning's frames remain
    name, _, message = lines[-1].partition(": ")
    assert name == "lightning_dissect.engine.errors.DissectionError"
    assert message.startswith("No probe dataset: pass probe='synthetic'")
    assert probe_source.BRODEN_ENV in message.split(". ")[0]  # the ways out come first
    assert str(tmp_path / "cache" / "broden" / "broden1_224") in message
    assert message.endswith("downloading it failed (Connection refused).")
    assert "download_broden() again" not in message


def test_zero_configuration_error_in_process_names_the_dataset_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(probe_source.BRODEN_ENV, raising=False)
    monkeypatch.setenv("LIGHTNING_DISSECT_CACHE", str(tmp_path))
    monkeypatch.setenv("LIGHTNING_DISSECT_BRODEN_URL", UNREACHABLE)
    with pytest.raises(ld.DissectionError) as raised:
        load_probe(None)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert f"looked for in {tmp_path / 'broden' / 'broden1_224'};" in str(raised.value)


def test_short_reason_is_the_bottom_of_the_chain():
    try:
        try:
            raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))
        except urllib.error.URLError as error:
            raise ld.BrodenError("the transfer failed after 0 bytes; call download_broden() again") from error
    except ld.BrodenError as error:
        assert short_reason(error) == "Temporary failure in name resolution"
    assert short_reason(ld.BrodenError("size differs")) == "size differs"
    assert short_reason(TimeoutError("timed out")) == "timed out"


@pytest.mark.parametrize("name", ["synthtic", "Synthetic", "synthetc", "synth"])
def test_a_misspelt_synthetic_is_named_with_the_right_spelling(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ld.BrodenError, match=rf"probe='{name}' is not a folder .* did you mean probe='synthetic'"):
        load_probe(name)
    with pytest.raises(ld.BrodenError, match=rf"--broden='{name}' is not a folder"):
        dataset_of(name, argument="--broden")


def test_an_existing_folder_is_a_path_whatever_its_name_and_other_names_are_not_suggested(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "synthtic").mkdir()
    assert dataset_of("synthtic") == tmp_path.joinpath("synthtic").relative_to(tmp_path)
    with pytest.raises(ld.BrodenError, match="does not exist") as raised:
        load_probe("broden1_224")
    assert "did you mean" not in str(raised.value)


def test_the_first_use_of_the_synthetic_dataset_says_it_generates_it_where_and_how_long(tmp_path, monkeypatch,
                                                                                         caplog):
    monkeypatch.setenv("LIGHTNING_DISSECT_CACHE", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="lightning_dissect"):
        first = load_probe("synthetic", probe_size=4, image_size=32)
    messages = [record.getMessage() for record in caplog.records if record.name == "lightning_dissect"]
    assert len(messages) == 1
    root = first.broden.root
    assert root.parent == tmp_path / "synthetic"
    assert messages[0].startswith(f"generating the synthetic dataset (500 images of 32 px) into {root}, once")
    assert "s with" in messages[0] and "(an estimate" in messages[0]
    caplog.clear()
    told: list[str] = []
    with caplog.at_level(logging.INFO, logger="lightning_dissect"):
        again = load_probe("synthetic", probe_size=4, image_size=32, info=told.append)
    assert again.broden.root == root and told == [] and caplog.records == []


def test_the_synthetic_generation_estimate_grows_with_images_and_size_and_shrinks_with_workers():
    from lightning_dissect.synthetic import SECONDS_PER_IMAGE, SECONDS_PER_PIXEL, estimated_seconds

    assert estimated_seconds(500, 64) == pytest.approx(500 * (SECONDS_PER_IMAGE + SECONDS_PER_PIXEL * 64 * 64))
    assert estimated_seconds(1000, 64) == pytest.approx(2 * estimated_seconds(500, 64))
    assert estimated_seconds(500, 224) > estimated_seconds(500, 64)
    cores = os.cpu_count() or 1
    assert estimated_seconds(500, 224, workers=4) == pytest.approx(estimated_seconds(500, 224) / min(4, cores))
