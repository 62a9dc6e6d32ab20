"""ProbeSet: seeded selection, compact tensors, canonical labels, the on-disk cache, per-batch reads."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_dissect as ld
from lightning_dissect import probe as probe_module
from lightning_dissect import probe_storage
from lightning_dissect.engine.prefetch import prefetched
from tests.conftest import random_broden, write_broden

ARRAYS = ("images", "label_maps", "image_labels", "label_area", "category_present", "image_level_present")


def assert_same_arrays(probe: ld.ProbeSet, reference: ld.ProbeSet) -> None:
    for name in ARRAYS:
        got, expected = getattr(probe, name), getattr(reference, name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


def cache_entries(cache: Path) -> list[str]:
    return sorted(path.name for path in cache.iterdir()) if cache.exists() else []


def test_same_seed_same_rows_and_different_seed_differs(random_dataset):
    a = ld.ProbeSet(random_dataset, size=10, seed=1, cache_dir=False)
    b = ld.ProbeSet(random_dataset, size=10, seed=1, cache_dir=False)
    c = ld.ProbeSet(random_dataset, size=10, seed=2, cache_dir=False)
    assert a.rows == b.rows and a.rows != c.rows
    assert a.rows == sorted(a.rows) and len(set(a.rows)) == 10
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_split_selects_only_rows_of_that_split(random_dataset):
    probe = ld.ProbeSet(random_dataset, split="val", cache_dir=False)
    assert probe.rows and all(probe.broden.splits[i] == "val" for i in probe.rows)
    assert len(probe) == sum(1 for s in probe.broden.splits if s == "val")


def test_images_and_labels_decode_exactly(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    broden = probe.broden
    assert probe.images.dtype == torch.uint8 and probe.label_maps.dtype == torch.int16
    for position, row in enumerate(probe.rows):
        assert torch.equal(probe.images[position], broden.read_image(row))
        maps, image_level = broden.read_segmentation(row)
        scored = {c for c in range(len(probe.label_names)) if probe.label_category[c] >= 0}
        image_set = {c for c in image_level if c in scored}
        assert set(probe.image_labels[position].tolist()) - {0} == image_set
        # Canonical maps: per pixel, the set of labels (minus image-level ones) equals the union of the maps.
        canonical = probe.label_maps[position]
        for y in range(canonical.shape[1]):
            for x in range(canonical.shape[2]):
                expected = {int(m[y, x]) for m in maps} & scored - image_set
                got = [int(v) for v in canonical[:, y, x] if v != 0]
                assert sorted(got) == sorted(expected)  # no label twice at one pixel


def test_label_area_and_presence_follow_semantics(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    broden = probe.broden
    primary = broden.primary_categories()
    area = torch.zeros(len(probe.label_names), dtype=torch.long)
    for position, row in enumerate(probe.rows):
        maps, image_level = broden.read_segmentation(row)
        sh, sw = broden.row(row).segmentation_size
        labels = {int(v) for m in maps for v in m.unique()} | set(image_level)
        labels = {c for c in labels if c and primary[c] is not None}
        for c in labels:
            region = torch.ones(sh, sw, dtype=torch.bool) if c in image_level else \
                torch.stack([m == c for m in maps]).any(0)
            area[c] += int(region.sum())
        present = {primary[c] for c in labels}
        assert probe.category_present[position].tolist() == [k in present for k in probe.categories]
    assert torch.equal(probe.label_area, area)


def test_cache_is_reused_and_keyed_by_selection(random_dataset, tmp_path):
    cache = tmp_path / "cache"
    first = ld.ProbeSet(random_dataset, size=8, seed=0, cache_dir=cache)
    files = list(cache.iterdir())
    assert len(files) == 1
    again = ld.ProbeSet(random_dataset, size=8, seed=0, cache_dir=cache)
    assert torch.equal(again.images, first.images) and torch.equal(again.label_maps, first.label_maps)
    assert len(list(cache.iterdir())) == 1
    ld.ProbeSet(random_dataset, size=8, seed=0, categories=["object"], cache_dir=cache)
    ld.ProbeSet(random_dataset, size=8, seed=5, cache_dir=cache)
    assert len(list(cache.iterdir())) == 3


def test_cache_key_changes_when_the_data_changes(tmp_path):
    root = random_broden(tmp_path / "b", num_images=6)
    first = ld.ProbeSet(root, cache_dir=tmp_path / "cache")
    text = (root / "label.csv").read_text().replace("kitchen", "galley")
    (root / "label.csv").write_text(text)
    second = ld.ProbeSet(root, cache_dir=tmp_path / "cache")
    assert first.fingerprint != second.fingerprint
    assert second.label_names[7] == "galley"


@pytest.mark.parametrize("kwargs,match", [
    ({"size": 0}, "size=0"), ({"size": 1000}, "size=1000"), ({"split": "test"}, "split='test'"),
    ({"categories": ["smell"]}, "smell"), ({"image_size": -3}, "image_size"), ({"seed": "x"}, "seed"),
])
def test_bad_arguments_name_the_argument(random_dataset, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ld.ProbeSet(random_dataset, cache_dir=False, **kwargs)


def test_mixed_segmentation_sizes_name_the_row(tmp_path):
    rows = [{"image": np.zeros((8, 8, 3), np.uint8), "object": [np.ones((4, 4), int)]},
            {"image": np.zeros((6, 6, 3), np.uint8), "object": [np.ones((3, 3), int)]}]
    root = write_broden(tmp_path / "mixed", {"object": "pixel"}, [("a", {"object": 1.0})], rows)
    with pytest.raises(ld.BrodenError, match=r"index.csv row 1"):
        ld.ProbeSet(root, cache_dir=False)


def test_model_input_resizes_and_normalises(random_dataset):
    probe = ld.ProbeSet(random_dataset, image_size=24, cache_dir=False)
    batch = probe.model_input([0, 3], "cpu")
    assert batch.shape == (2, 3, 24, 24) and batch.dtype == torch.float32
    plain = ld.ProbeSet(random_dataset, cache_dir=False).model_input([0], "cpu")
    mean = torch.tensor(ld.probe.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(ld.probe.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(plain, (probe.images[:1].float() / 255 - mean) / std)
    assert probe.segmentation_size == (8, 8)


def test_cache_key_changes_when_an_image_file_changes(tmp_path):
    root = random_broden(tmp_path / "b", num_images=4)
    first = ld.ProbeSet(root, cache_dir=tmp_path / "cache")
    from PIL import Image
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(root / "images" / "img2.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a changed dataset file is a cache miss, not a damaged cache
        second = ld.ProbeSet(root, cache_dir=tmp_path / "cache")
    assert first.fingerprint == second.fingerprint  # same csv files: same recorded identity
    assert not torch.equal(first.images, second.images)
    assert int(second.images[2].float().mean()) == 7
    assert cache_entries(tmp_path / "cache") == [second.cache_folder.name]  # rebuilt in place


# ---------------------------------------------------------------------- the mapped cache


def layer_fields(result: ld.Dissection) -> dict[str, torch.Tensor]:
    return {f"{layer}.{name}": value for layer in result.layers for name, value in vars(result[layer]).items()
            if isinstance(value, torch.Tensor)}


def test_mapped_cache_gives_the_arrays_and_dissections_of_decoding_in_memory(random_dataset, tmp_path):
    in_memory = ld.ProbeSet(random_dataset, cache_dir=False)
    assert isinstance(in_memory._storage, probe_storage.MemoryArrays)
    ld.ProbeSet(random_dataset, cache_dir=tmp_path / "cache")
    mapped = ld.ProbeSet(random_dataset, cache_dir=tmp_path / "cache")  # the second load maps the files
    assert isinstance(mapped._storage, probe_storage.MappedArrays)
    assert mapped.cache_folder is not None and mapped.cache_folder.parent == tmp_path / "cache"
    assert_same_arrays(mapped, in_memory)
    activations = {"layer": torch.randn(len(in_memory), 6, 4, 4, generator=torch.Generator().manual_seed(0))}
    expected = layer_fields(ld.dissect_activations(activations, in_memory, batch_size=5))
    got = layer_fields(ld.dissect_activations(activations, mapped, batch_size=5))
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_cache_manifest_is_written_last_and_describes_the_files(random_dataset, tmp_path):
    probe = ld.ProbeSet(random_dataset, cache_dir=tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    assert folder == probe.cache_folder
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["version"] == probe_storage.CACHE_VERSION and manifest["fingerprint"] == probe.fingerprint
    manifest_time = (folder / "manifest.json").stat().st_mtime_ns
    files = (folder / "files").read_text().split("\0")
    assert manifest["files"]["count"] == len(files) and files[0] == probe.broden.row(probe.rows[0]).image
    assert (folder / "files").stat().st_mtime_ns <= manifest_time
    for name in ARRAYS:
        entry, array = manifest["arrays"][name], getattr(probe, name)
        assert entry["shape"] == list(array.shape) and entry["dtype"] == str(array.dtype).removeprefix("torch.")
        assert (folder / entry["file"]).stat().st_size == entry["bytes"] == array.numel() * array.element_size()
        assert (folder / entry["file"]).stat().st_mtime_ns <= manifest_time


def test_decoding_in_worker_processes_equals_decoding_in_this_process(random_dataset, monkeypatch):
    in_process = ld.ProbeSet(random_dataset, cache_dir=False, workers=1)
    monkeypatch.setattr(probe_module, "_CHUNK_IMAGES", 5)  # 5 chunks for 2 workers
    in_workers = ld.ProbeSet(random_dataset, cache_dir=False, workers=2)
    assert_same_arrays(in_workers, in_process)


def test_a_decoding_error_in_a_worker_is_the_brodenerror_naming_file_and_row(tmp_path, monkeypatch):
    root = random_broden(tmp_path / "b", num_images=12)
    (root / "images" / "img9.png").write_bytes(b"not a png")
    with pytest.raises(ld.BrodenError) as in_process:
        ld.ProbeSet(root, cache_dir=False, workers=1)
    monkeypatch.setattr(probe_module, "_CHUNK_IMAGES", 2)
    with pytest.raises(ld.BrodenError) as in_worker:
        ld.ProbeSet(root, cache_dir=tmp_path / "cache", workers=2)
    assert str(in_worker.value) == str(in_process.value)
    assert "img9.png" in str(in_worker.value) and "row 9" in str(in_worker.value)
    assert cache_entries(tmp_path / "cache") == []  # the failed build left nothing


def test_progress_bar_counts_images(random_dataset, capsys):
    ld.ProbeSet(random_dataset, cache_dir=False, progress=True)
    shown = capsys.readouterr().err
    assert "decode probe" in shown and "24/24" in shown and "image/s" in shown


def test_an_interrupted_decode_leaves_no_cache_that_loads(random_dataset, tmp_path, monkeypatch):
    reference = ld.ProbeSet(random_dataset, cache_dir=False)
    cache = tmp_path / "cache"
    monkeypatch.setattr(probe_module, "_CHUNK_IMAGES", 4)
    written = []
    original = probe_storage.ArrayWriter.append

    def interrupted(self, arrays):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(1)
        original(self, arrays)

    monkeypatch.setattr(probe_storage.ArrayWriter, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ld.ProbeSet(random_dataset, cache_dir=cache)
    assert cache_entries(cache) == []  # no cache folder, no staging folder, no lock file
    monkeypatch.setattr(probe_storage.ArrayWriter, "append", original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: there was no cache
        again = ld.ProbeSet(random_dataset, cache_dir=cache)
    assert_same_arrays(again, reference)


KILLED_BUILD = """
import sys, time
import lightning_dissect as ld
from lightning_dissect import probe

probe._CHUNK_IMAGES = 2
decode = probe._ChunkDecoder.__call__
def slow(self, rows):
    time.sleep(0.3)
    return decode(self, rows)
probe._ChunkDecoder.__call__ = slow
ld.ProbeSet(sys.argv[1], cache_dir=sys.argv[2], workers=1)
"""


def test_a_killed_decode_leaves_no_cache_that_loads_and_is_cleaned_up(random_dataset, tmp_path):
    cache = tmp_path / "cache"
    environment = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    child = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(random_dataset), str(cache)], env=environment)
    try:
        deadline = time.monotonic() + 60
        while not any(path.stat().st_size for path in cache.glob(".probe-*.partial/images.bin")):
            assert child.poll() is None and time.monotonic() < deadline, "the child ended before it was killed"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert [name for name in cache_entries(cache) if not name.endswith((".partial", ".lock"))] == []
    reference = ld.ProbeSet(random_dataset, cache_dir=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebuilt = ld.ProbeSet(random_dataset, cache_dir=cache)
    assert_same_arrays(rebuilt, reference)
    assert cache_entries(cache) == [rebuilt.cache_folder.name]  # the killed build's staging folder is gone


def truncate_images(folder: Path) -> None:
    with open(folder / "images.bin", "r+b") as handle:
        handle.truncate(100)


def set_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def other_shape(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["arrays"]["label_maps"]["shape"][1] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [
    truncate_images,
    lambda folder: (folder / "label_area.bin").unlink(),
    lambda folder: (folder / "manifest.json").unlink(),
    lambda folder: (folder / "manifest.json").write_text("{not json"),
    lambda folder: set_manifest(folder, version=1),
    lambda folder: set_manifest(folder, fingerprint="0" * 64),
    other_shape,
    lambda folder: (folder / "files").write_bytes((folder / "files").read_bytes()[:-3]),
], ids=["truncated file", "missing file", "no manifest", "garbled manifest", "other version", "other probe",
        "manifest not matching the files", "truncated file list"])
def test_a_damaged_cache_is_rebuilt_not_trusted(random_dataset, tmp_path, damage):
    cache = tmp_path / "cache"
    folder = ld.ProbeSet(random_dataset, cache_dir=cache).cache_folder  # not read after the damage: a mapped
    damage(folder)                                                         # file truncated under it would SIGBUS
    with pytest.warns(UserWarning, match="unreadable or incomplete.*decoding again"):
        again = ld.ProbeSet(random_dataset, cache_dir=cache)
    assert_same_arrays(again, ld.ProbeSet(random_dataset, cache_dir=False))
    assert cache_entries(cache) == [folder.name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(ld.ProbeSet(random_dataset, cache_dir=cache)._storage, probe_storage.MappedArrays)


class FullDisk(io.FileIO):
    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def full_disk(monkeypatch, tmp_path):
    monkeypatch.setattr(probe_storage, "open", FullDisk, raising=False)  # the array files fill the disk
    return tmp_path / "cache", "No space left on device"


def under_a_file(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    return tmp_path / "file" / "cache", "Not a directory"


def too_little_space(monkeypatch, tmp_path):
    monkeypatch.setattr(probe_storage.shutil, "disk_usage",
                        lambda path: types.SimpleNamespace(total=10**12, used=10**12 - 1000, free=1000))
    return tmp_path / "cache", "GiB needed"


@pytest.mark.parametrize("fault", [full_disk, under_a_file, too_little_space])
def test_a_cache_that_cannot_be_written_warns_once_and_the_probe_runs_from_memory(random_dataset, tmp_path,
                                                                                   monkeypatch, fault):
    reference = ld.ProbeSet(random_dataset, cache_dir=False)
    cache, reason = fault(monkeypatch, tmp_path)
    with pytest.warns(UserWarning, match=f"probe cache at .* cannot be written .*{reason}.*runs from memory"):
        probe = ld.ProbeSet(random_dataset, cache_dir=cache)
    assert_same_arrays(probe, reference)
    assert probe.cache_folder is None and isinstance(probe._storage, probe_storage.MemoryArrays)
    assert cache_entries(cache) == []  # nothing left behind: no staging folder, no temporary file, no lock
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per cache folder
        assert_same_arrays(ld.ProbeSet(random_dataset, size=20, cache_dir=cache),
                           ld.ProbeSet(random_dataset, size=20, cache_dir=False))


def test_a_large_probe_without_cache_runs_from_deleted_temporary_files(random_dataset, tmp_path, monkeypatch):
    reference = ld.ProbeSet(random_dataset, cache_dir=False)
    monkeypatch.setattr(probe_module, "MEMORY_PROBE_BYTES", 0)
    monkeypatch.setattr(probe_module.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    assert isinstance(probe._storage, probe_storage.MappedArrays) and probe._storage.folder is None
    assert list((tmp_path / "tmp").iterdir()) == []  # deleted already: a crash leaves nothing either
    assert_same_arrays(probe, reference)
    assert torch.equal(probe._storage.gather("label_maps", [3, 4, 9]), reference.label_maps[[3, 4, 9]])
    assert_same_arrays(pickle.loads(pickle.dumps(probe)), reference)


def test_processes_asking_for_one_probe_at_once_decode_it_once(random_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(probe_module, "_CHUNK_IMAGES", 4)
    decoded = []
    decode = probe_module._ChunkDecoder.__call__

    def counted(self, rows):
        time.sleep(0.05)
        decoded.append(len(rows))
        return decode(self, rows)

    monkeypatch.setattr(probe_module._ChunkDecoder, "__call__", counted)
    probes = []
    threads = [threading.Thread(target=lambda: probes.append(ld.ProbeSet(random_dataset, cache_dir=tmp_path / "c",
                                                                         workers=1)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(probes) == 3 and sum(decoded) == 24  # one build; the others waited and mapped it
    for probe in probes[1:]:
        assert_same_arrays(probe, probes[0])
    assert cache_entries(tmp_path / "c") == [probes[0].cache_folder.name]


def test_a_pickled_cached_probe_maps_the_same_files(random_dataset, tmp_path):
    probe = ld.ProbeSet(random_dataset, cache_dir=tmp_path / "cache")
    probe.tensors("cpu")
    data = pickle.dumps(probe)
    assert len(data) < probe.images.numel()  # a reference to the cache, not the images
    copy = pickle.loads(data)
    assert isinstance(copy._storage, probe_storage.MappedArrays)
    assert_same_arrays(copy, probe)


PEAK_OF_LOAD = """
import gc, json, sys
import lightning_dissect as ld

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

broden = ld.Broden(sys.argv[1])
ld.ProbeSet(broden, size=50, cache_dir=sys.argv[2])  # first calls page in code and allocator pools once
gc.collect()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # VmHWM := VmRSS
probe = ld.ProbeSet(broden, cache_dir=sys.argv[2])
loaded = status("VmHWM") - before
copies = [getattr(probe, name).clone() for name in ("images", "label_maps", "image_labels")]
read = status("VmHWM") - before
print(json.dumps({"loaded": loaded, "read": read, "mapped": type(probe._storage).__name__,
                  "bytes": sum(c.numel() * c.element_size() for c in copies)}))
"""


@pytest.fixture(scope="module")
def large_dataset(tmp_path_factory) -> Path:
    return random_broden(tmp_path_factory.mktemp("large") / "broden", num_images=2000, image_size=48)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_a_large_cached_probe_keeps_peak_memory_flat(large_dataset, tmp_path):
    ld.ProbeSet(large_dataset, size=50, cache_dir=tmp_path / "cache")
    ld.ProbeSet(large_dataset, cache_dir=tmp_path / "cache")
    environment = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    output = subprocess.run([sys.executable, "-c", PEAK_OF_LOAD, str(large_dataset), str(tmp_path / "cache")],
                            env=environment, capture_output=True, text=True, check=True).stdout
    measured = json.loads(output)
    assert measured["mapped"] == "MappedArrays"
    assert measured["bytes"] > 20 * 2**20
    assert measured["read"] > 0.9 * measured["bytes"]  # the measurement sees memory that is used...
    assert measured["loaded"] < measured["bytes"] / 20  # ...and loading uses next to none


PEAK_OF_DISSECTION = """
import gc, json, sys
import torch
import lightning_dissect as ld
from lightning_dissect.probe import ProbeSet

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

root, cache, size, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if path == "whole":  # the probe indexed whole on the CPU: what the engine read before it streamed
    ProbeSet.kept_on = lambda self, device: True
broden = ld.Broden(root)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU())
options = dict(quantile=0.01, batch_size=50, activation_cache_bytes=0)
ld.dissect(model, ld.ProbeSet(broden, size=50, cache_dir=cache), ["0"], **options)  # code, pools, kernel probes
probe = ld.ProbeSet(broden, size=size, cache_dir=cache)
gc.collect()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # VmHWM := VmRSS
ld.dissect(model, probe, ["0"], **options)
print(json.dumps({"peak": status("VmHWM") - before, "bytes": probe.nbytes}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_peak_memory_of_a_dissection_does_not_grow_with_the_probe(large_dataset, tmp_path):
    """A dissection bounded by the threshold state (activation_cache_bytes=0) on 200 and on 2000 images of
    48 px: the peak above the loaded probe is the same (one batch), where indexing the mapped probe whole
    (the engine before it streamed) grows with it by the probe's bytes."""
    for size in (50, 200, None):
        ld.ProbeSet(large_dataset, size=size, cache_dir=tmp_path / "cache")
    environment = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
                       MALLOC_MMAP_THRESHOLD_="131072")  # freed batch buffers leave the resident set

    def measure(size: int, path: str) -> dict:
        output = subprocess.run([sys.executable, "-c", PEAK_OF_DISSECTION, str(large_dataset), str(tmp_path / "cache"),
                                 str(size), path], env=environment, capture_output=True, text=True, check=True)
        return json.loads(output.stdout)

    small, large = measure(200, "streamed"), measure(2000, "streamed")
    whole = measure(2000, "whole")
    added = large["bytes"] - small["bytes"]
    assert added > 15 * 2**20
    assert whole["peak"] - small["peak"] > 0.5 * added  # the measurement sees a probe read whole...
    assert large["peak"] - small["peak"] < added / 10  # ...and a dissection holds none of it (measured: 1/18)


# ---------------------------------------------------------------------- per-batch reads and streaming

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_the_image_transform_normalises_as_written_bit_for_bit_and_leaves_its_input_alone(device):
    """`(x - mean) / std` per channel, spelled out channel by channel in float32 (the transform makes one
    new tensor and divides it in place: the same two roundings), on values a uint8 image gives and on
    arbitrary floats."""
    generator = torch.Generator().manual_seed(0)
    mean, std = (0.3, 0.55, 0.47), (0.21, 0.33, 0.29)
    transform = ld.ImageTransform(mean, std)
    for images in (torch.randint(0, 256, (4, 3, 9, 7), generator=generator).float().div_(255),
                   torch.randn(2, 3, 5, 6, generator=generator) * 3):
        images = images.to(device)
        before = images.clone()
        expected = torch.stack([(images[:, c] - torch.tensor(mean[c], device=device))
                                / torch.tensor(std[c], device=device) for c in range(3)], dim=1)
        got = transform(images)
        assert torch.equal(got, expected)
        assert torch.equal(images, before)


@pytest.fixture
def cached_probes(random_dataset, tmp_path):
    """The same mapped probe kept whole on the device, and read from the cache batch by batch."""
    ld.ProbeSet(random_dataset, cache_dir=tmp_path / "cache")
    kept = ld.ProbeSet(random_dataset, cache_dir=tmp_path / "cache")
    streamed = ld.ProbeSet(random_dataset, cache_dir=tmp_path / "cache", device_budget_bytes=0)
    assert kept.fits_device and not streamed.fits_device
    return kept, streamed


@pytest.mark.parametrize("device", DEVICES)
def test_batches_equal_the_whole_arrays_whether_kept_on_the_device_or_streamed(cached_probes, device):
    in_memory = ld.ProbeSet(cached_probes[0].broden, cache_dir=False)
    reference = in_memory.transform(in_memory.images.float() / 255)
    batches = [[0, 1, 2, 3, 4], [5, 7, 6], [23], [10, 11, 12, 20, 21, 22, 2]]
    for probe in cached_probes:
        for positions in batches:
            assert torch.equal(probe.model_input(positions, device).cpu(), reference[positions])
            labels = probe.labels(torch.tensor(positions), device)
            for got, name in zip(labels, ("label_maps", "image_labels", "category_present", "image_level_present")):
                assert got.device.type == device and torch.equal(got.cpu(), getattr(in_memory, name)[positions])
        streamed = list(probe.stream(batches, device))
        assert [batch.positions for batch in streamed] == batches
        for batch in streamed:
            assert torch.equal(batch.inputs.cpu(), reference[batch.positions])
            assert all(torch.equal(got, expected)
                       for got, expected in zip(batch.labels, probe.labels(batch.positions, device)))
        only_labels = next(iter(probe.stream(batches, device, images=False)))
        assert only_labels.inputs is None and torch.equal(only_labels.labels.label_maps.cpu(),
                                                          in_memory.label_maps[batches[0]])


def test_stream_raises_the_readers_error_at_its_batch(cached_probes, monkeypatch):
    streamed = cached_probes[1]
    gather = streamed._storage.gather

    def failing(name, positions, pin=False):
        if positions[0] == 5:
            raise OSError(errno.EIO, "disk read error")
        return gather(name, positions, pin)

    monkeypatch.setattr(streamed._storage, "gather", failing)
    batches = streamed.stream([[0, 1], [2, 3], [5, 6], [7]], "cpu")
    assert next(batches).positions == [0, 1] and next(batches).positions == [2, 3]
    with pytest.raises(OSError, match="disk read error"):
        next(batches)


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "probe-prefetch"]


def test_stream_stops_its_thread_when_the_consumer_stops_early(cached_probes):
    batches = cached_probes[1].stream([[i] for i in range(24)], "cpu", prefetch=2)
    next(batches)
    assert len(prefetch_threads()) == 1
    batches.close()
    assert prefetch_threads() == []


def test_prefetched_reads_ahead_but_at_most_depth_items():
    produced = []

    def produce(item):
        produced.append(item)
        return item * 10

    results = prefetched(produce, range(100), depth=3)
    assert next(results) == 0
    time.sleep(0.3)
    assert len(produced) <= 1 + 3 + 1  # the item yielded, `depth` queued, one waiting to be queued
    assert list(results) == [10 * i for i in range(1, 100)]


@pytest.mark.parametrize("call", [
    lambda probe: probe.model_input([24], "cpu"),
    lambda probe: probe.labels([-1], "cpu"),
    lambda probe: probe.stream([[0], [30]], "cpu"),
])
def test_positions_outside_the_probe_are_refused(random_dataset, call):
    with pytest.raises(IndexError, match="positions 0 to 23"):
        call(ld.ProbeSet(random_dataset, cache_dir=False))


def test_stream_needs_something_to_read(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    with pytest.raises(ValueError, match="reads nothing"):
        probe.stream([[0]], "cpu", images=False, labels=False)
    with pytest.raises(ValueError, match="prefetch=0"):
        probe.stream([[0]], "cpu", prefetch=0)


def test_a_subset_is_the_smaller_draw_without_decoding_again(random_dataset, tmp_path, monkeypatch):
    whole = ld.ProbeSet(random_dataset, seed=3, cache_dir=tmp_path / "cache")
    decoded = ld.ProbeSet(random_dataset, size=10, seed=3, cache_dir=False)
    monkeypatch.setattr(ld.Broden, "read_image", lambda *args: pytest.fail("a subset decoded an image"))
    subset = whole.subset(10)
    assert subset.rows == decoded.rows and subset.fingerprint == decoded.fingerprint
    for name in ["images", "label_maps", "image_labels", "label_area", "category_present", "image_level_present"]:
        assert torch.equal(getattr(subset, name), getattr(decoded, name)), name
    acts = torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ld.dissect_activations({"l": acts}, subset, quantile=0.1)["l"].iou,
                       ld.dissect_activations({"l": acts}, decoded, quantile=0.1)["l"].iou)
    assert whole.subset(len(whole)) is whole and len(whole) == 24


def test_a_subset_with_another_seed_is_that_seeds_draw(random_dataset, tmp_path, monkeypatch):
    whole = ld.ProbeSet(random_dataset, seed=3, cache_dir=tmp_path / "cache")
    decoded = ld.ProbeSet(random_dataset, size=10, seed=5, cache_dir=False)
    monkeypatch.setattr(ld.Broden, "read_image", lambda *args: pytest.fail("a subset decoded an image"))
    subset = whole.subset(10, seed=5)
    assert subset.rows == decoded.rows != whole.subset(10).rows
    assert subset.seed == 5 and subset.fingerprint == decoded.fingerprint
    for name in ["images", "label_maps", "image_labels", "label_area", "category_present", "image_level_present"]:
        assert torch.equal(getattr(subset, name), getattr(decoded, name)), name
    with pytest.raises(ValueError, match="size=None"):
        whole.subset(10).subset(5, seed=6)
