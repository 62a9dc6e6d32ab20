"""What one Trainer run with TensorBoard, W&B (offline), MLflow (file store), CSV and an unknown
logger leaves behind, read back with each tool's own reader, against the callback's history."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lightning_dissect as ld
from tests import test_callback as shared
from tests.test_callback import fit

probe, synthetic_root = shared.probe, shared.synthetic_root  # fixtures

STEPS = [0, 2, 4]
CATEGORIES = ["color", "object", "part", "material", "scene", "texture"]
COUNTS = ["detectors", "unique_concepts", "unique_top_concepts", "mean_score"]
COUNTS += [f"{name}/{category}" for name in ("detectors", "unique_concepts") for category in CATEGORIES]
SWITCHES = ["switches", "switch_in", "switch_out"]


def expected_scalars(history: list[dict]) -> dict[str, dict[int, float]]:
    """name -> {step: value}, written out from the history by hand."""
    scalars: dict[str, dict[int, float]] = {}
    for entry in history:
        for name in COUNTS:
            scalars.setdefault(f"dissect/block2/{name}", {})[entry.step] = entry.summary[name]
        if entry.switches is not None:
            for name in SWITCHES:
                scalars.setdefault(f"dissect/block2/{name}", {})[entry.step] = getattr(entry, name)
        scalars.setdefault("dissect/seconds", {})[entry.step] = entry.seconds
    return scalars


def wandb_records(path: Path) -> list:
    """The records of a `.wandb` file: a ':W&B' header, then LevelDB-log records (7-byte headers, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, records, pending = 7, 32768, [], b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


@pytest.fixture(scope="module")
def run(tmp_path_factory, probe):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

    class RecordingLogger(Logger):  # a logger the callback has no adapter for
        name, version = "recording", 0

        def __init__(self):
            super().__init__()
            self.metrics = []

        def log_metrics(self, metrics, step=None):
            self.metrics.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    root = tmp_path_factory.mktemp("loggers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind a flag
        for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            patch.setenv(variable, str(root / "wandb-home"))
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        loggers = [TensorBoardLogger(root, name="tb"), CSVLogger(root, name="csv"),
                   WandbLogger(save_dir=root, offline=True, project="lightning-dissect-test"),
                   MLFlowLogger(experiment_name="dissect", tracking_uri=f"file:{root / 'mlruns'}"), RecordingLogger()]
        callback = ld.DissectionCallback(probe, layers="block2", every_n_steps=2, figure_budget=None, max_overhead=None)
        checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", monitor="dissect/block2/unique_concepts", mode="max")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer, _ = fit([callback, checkpoint], logger=loggers, max_steps=4, log_every_n_steps=50,
                             enable_checkpointing=True)
        loggers[2].experiment.finish()
    return {"root": root, "trainer": trainer, "callback": callback, "checkpoint": checkpoint, "loggers": loggers,
            "history": callback.dissector.history, "warnings": [str(w.message) for w in caught]}


def test_the_run_dissected_at_the_scheduled_steps(run):
    assert [entry.step for entry in run["history"]] == STEPS
    assert set(expected_scalars(run["history"])) == {f"dissect/block2/{name}" for name in COUNTS + SWITCHES} | {
        "dissect/seconds"}


def test_metrics_are_in_callback_metrics_and_model_checkpoint_monitors_them(run):
    last = run["history"][-1]
    metrics = run["trainer"].callback_metrics
    for name, values in expected_scalars(run["history"]).items():
        assert float(metrics[name]) == pytest.approx(values[4], rel=1e-6), name
    assert float(run["checkpoint"].best_model_score) == last.summary["unique_concepts"]


def test_tensorboard_event_file_holds_scalars_unit_tables_and_figures(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run["loggers"][0].log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    for name, values in expected_scalars(run["history"]).items():
        logged = {event.step: event.value for event in events.Scalars(name)}
        assert logged == pytest.approx(values, rel=1e-6), name
    tables = events.Tensors("dissect/block2/units/text_summary")
    assert [table.step for table in tables] == STEPS
    lines = tables[-1].tensor_proto.string_val[0].decode().splitlines()
    last = run["history"][-1]
    assert lines[0] == "| unit | label | category | score | detector |" and len(lines) == 2 + 16
    assert lines[2 + 5] == (f"| 5 | {last.label[5]} | {last.category[5]} | {round(last.score[5], 4)} | "
                            f"{last.score[5] > 0.04} |")
    for tag in ("dissect/block2/detectors_per_category", "dissect/block2/emergence"):
        images = events.Images(tag)
        assert [image.step for image in images] == STEPS
        assert (images[0].width, images[0].height) == (600, 320)


def test_wandb_offline_run_holds_scalars_tables_and_images(run):
    run_dir = next((run["root"] / "wandb").glob("offline-run-*"))
    logged: dict[str, dict[int, object]] = {}
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") != "history":
            continue
        items: dict[str, object] = {}
        for item in record.history.item:  # a dict value (a table, an image) comes as one item per field
            name, *field = list(item.nested_key) or [item.key]
            if field:
                items.setdefault(name, {})[field[0]] = json.loads(item.value_json)
            else:
                items[name] = json.loads(item.value_json)
        for name, value in items.items():
            if name.startswith("dissect/"):
                logged.setdefault(name, {})[items["trainer/global_step"]] = value
    for name, values in expected_scalars(run["history"]).items():
        assert logged[name] == pytest.approx(values, rel=1e-6), name
    units = logged["dissect/block2/units"]
    assert sorted(units) == STEPS and all(value["_type"] == "table-file" for value in units.values())
    table = json.loads((run_dir / "files" / units[4]["path"]).read_text())
    assert table["columns"] == ["unit", "label", "category", "score", "detector"]
    assert [row[1] for row in table["data"]] == run["history"][-1].label
    for tag in ("dissect/block2/detectors_per_category", "dissect/block2/emergence"):
        assert sorted(logged[tag]) == STEPS
        image = logged[tag][4]
        assert image["_type"] == "image-file" and (run_dir / "files" / image["path"]).is_file()


def test_wandb_shows_each_dissection_in_one_history_row(run):
    run_dir = next((run["root"] / "wandb").glob("offline-run-*"))
    rows: list[tuple[int, set[str]]] = []  # (trainer/global_step, dissect/ keys) of each history row
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            names = [(list(item.nested_key) or [item.key])[0] for item in record.history.item]
            keys = set(names)
            step = next((json.loads(item.value_json) for name, item in zip(names, record.history.item)
                         if name == "trainer/global_step"), None)
            if any(key.startswith("dissect/") for key in keys):
                rows.append((step, {key for key in keys if key.startswith("dissect/")}))
    assert [step for step, _ in rows] == STEPS
    for step, keys in rows:
        scalars = {name for name, values in expected_scalars(run["history"]).items() if step in values}
        media = {"dissect/block2/units", "dissect/block2/detectors_per_category", "dissect/block2/emergence",
                 "dissect/block2/bar_graph", "dissect/block2/iou_histogram"}
        assert scalars | media <= keys, step


def test_mlflow_file_store_holds_metrics_and_artifacts(run):
    logger = run["loggers"][3]
    folder = run["root"] / "mlruns" / logger.experiment_id / logger.run_id
    for name, values in expected_scalars(run["history"]).items():
        # the file store cannot hold a metric file and a folder of the same name (MLflowAdapter)
        stored = name + "/all" if name.rsplit("/", 1)[-1] in ("detectors", "unique_concepts") else name
        lines = (folder / "metrics" / stored).read_text().split("\n")
        logged = {int(step): float(value) for _, value, step in (line.split() for line in lines if line)}
        assert logged == pytest.approx(values, rel=1e-6), name
    for step in STEPS:
        rows = list(csv.reader((folder / "artifacts" / "dissect" / "block2" / "units" / f"step={step}.csv").open()))
        assert rows[0] == ["unit", "label", "category", "score", "detector"] and len(rows) == 17
        for figure in ("detectors_per_category", "emergence"):
            assert Image.open(folder / "artifacts" / "dissect" / "block2" / figure / f"step={step}.png").size == \
                (600, 320)


def test_csv_logger_gets_metrics_and_media_files_beside_them(run):
    logger = run["loggers"][1]
    logged: dict[str, dict[int, float]] = {}
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            for name, value in row.items():
                if name.startswith("dissect/") and value != "":
                    logged.setdefault(name, {})[int(row["step"])] = float(value)
    for name, values in expected_scalars(run["history"]).items():
        assert logged[name] == pytest.approx(values, rel=1e-6), name
    media = Path(logger.log_dir) / "media" / "dissect" / "block2"
    for step in STEPS:
        table = list(csv.reader((media / "units" / f"step={step}.csv").open()))
        labels = run["history"][STEPS.index(step)].label
        assert [row[1] for row in table[1:]] == labels
        emergence = np.asarray(Image.open(media / "emergence" / f"step={step}.png"))
        assert emergence.shape == (320, 600, 3)


def test_unknown_logger_gets_the_scalars_and_one_warning(run):
    recorded = run["loggers"][4].metrics
    dissections = [(step, metrics) for step, metrics in recorded if "dissect/seconds" in metrics]
    assert [step for step, _ in dissections] == STEPS
    assert dissections[-1][1]["dissect/block2/unique_concepts"] == run["history"][-1].summary["unique_concepts"]
    assert sum("no adapter for RecordingLogger" in message for message in run["warnings"]) == 1


def test_files_in_the_log_directory_hold_every_dissection_and_the_history(run):
    folder = Path(run["loggers"][0].log_dir) / "dissections"  # trainer.log_dir is the first logger's
    lines = (folder / "history.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [entry.to_dict() for entry in run["history"]]
    for entry in run["history"]:
        step_folder = folder / f"step={entry.step}"
        saved = ld.Dissection.from_json(step_folder / "dissection.json")["block2"]
        assert {name: value for name, value in saved.summary().items() if name != "units"} == entry.summary
        rows = list(csv.reader((step_folder / "block2.csv").open()))
        assert [row[2] for row in rows[1:]] == entry.label
    assert not list(folder.rglob(".*"))  # no temporary files left
