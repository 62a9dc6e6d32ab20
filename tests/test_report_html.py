"""The HTML report: every unit rendered, every link resolving, offline, and working in a headless browser."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import lightning_dissect as ld
from lightning_dissect.report import strip_media, unit_strips, write_report
from lightning_dissect.report.run import add_report_command, report_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page(HTMLParser):
    """Every tag with its attributes, in document order."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {name: value or "" for name, value in attrs}))

    def cards(self) -> list[dict[str, str]]:
        return [attrs for tag, attrs in self.tags if tag == "div" and "card" in attrs.get("class", "").split()]

    def references(self) -> list[str]:
        return [attrs[name] for _, attrs in self.tags for name in ("src", "href") if name in attrs]


def assert_links_resolve(page: Page) -> None:
    for reference in page.references():
        assert not reference.startswith(("http:", "https:", "//")), f"{page.path.name} loads {reference}"
        if reference.startswith("#"):
            continue
        target = (page.path.parent / reference.split("#")[0]).resolve()
        assert target.is_file(), f"{page.path.name} links to missing {reference}"
        assert page.path.parent.resolve() in target.parents, f"{reference} leaves the report folder"


@pytest.fixture
def dissected(random_dataset):
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2, padding=1))
    result = ld.dissect(model, probe, ["0", "2"], quantile=0.1, top_k=3)
    return model, probe, result


def test_report_renders_every_unit_and_every_link_resolves(dissected, tmp_path):
    model, probe, result = dissected
    index = write_report(result, tmp_path / "report", model=model, probe=probe)
    assert index == tmp_path / "report" / "index.html"
    index_page = Page(index)
    assert_links_resolve(index_page)
    pages = [tmp_path / "report" / reference for reference in index_page.references()]
    assert [page.name for page in pages] == ["layer-0.html", "layer-2.html"]
    for layer, path in zip(result, pages):
        page = Page(path)
        assert_links_resolve(page)
        layer_result = result[layer]
        cards = page.cards()
        assert [int(card["data-unit"]) for card in cards] == list(range(layer_result.num_units))
        for unit, card in enumerate(cards):
            assert card["data-concept"] == layer_result.label_name(unit)
            assert card["data-category"] == layer_result.unit_category(unit)
            assert float(card["data-iou"]) == float(layer_result.scores[unit])
            assert card["data-detector"] == str(int(layer_result.scores[unit] > layer_result.iou_threshold))
        strips = [attrs["src"] for tag, attrs in page.tags if tag == "img" and attrs.get("alt", "").startswith("top")]
        assert len(strips) == layer_result.num_units
        drawn = unit_strips(model, probe, layer_result, [1])[1]
        shown = np.asarray(Image.open(path.parent / strips[1]).convert("RGB")).astype(float)
        assert shown.shape == drawn.image.shape and np.abs(shown - drawn.image).mean() < 4  # a JPEG of the strip


def test_report_without_a_model_still_shows_every_unit(dissected, tmp_path):
    _, _, result = dissected
    index = result.to_html(tmp_path / "report")
    page = Page(index.parent / "layer-2.html")
    assert len(page.cards()) == result["2"].num_units
    assert page.path.read_text().count("no strip saved for this unit") == result["2"].num_units
    assert_links_resolve(page)
    single = result["0"].to_html(tmp_path / "single")
    assert [p.name for p in sorted(single.parent.glob("*.html"))] == ["index.html", "layer-0.html"]


def test_report_needs_the_probe_to_draw_strips(dissected, tmp_path):
    model, _, result = dissected
    with pytest.raises(ValueError, match="pass probe="):
        write_report(result, tmp_path / "report", model=model)


def _history_line(step: int, layer_result: ld.LayerDissection, switches: int | None) -> str:
    """A `history.jsonl` line as the Dissector writes it (the keys the report reads)."""
    return json.dumps({
        "step": step, "epoch": 0, "layer": layer_result.layer, "summary": layer_result.summary(),
        "label": [layer_result.label_name(u) for u in range(layer_result.num_units)],
        "category": [layer_result.unit_category(u) for u in range(layer_result.num_units)],
        "label_number": layer_result.labels.tolist(), "score": layer_result.scores.tolist(), "switches": switches,
    })


@pytest.fixture
def run_dir(random_dataset, tmp_path):
    """A callback log directory with three dissections; strips of unit 0 saved at every step, of unit 3 only
    at step 10."""
    probe = ld.ProbeSet(random_dataset, cache_dir=False)
    folder = tmp_path / "logs" / "dissections"
    lines, previous = [], None
    for seed, step in enumerate([0, 10, 20]):
        acts = torch.randn(len(probe), 4, 4, 4, generator=torch.Generator().manual_seed(seed))
        result = ld.dissect_activations({"conv": acts}, probe, quantile=0.1, top_k=3)
        result["conv"].labels[1] = [7, 3, 7][seed]  # unit 1: kitchen, dog, kitchen
        result["conv"].scores[1] = 0.5
        result.to_json(folder / f"step={step}" / "dissection.json")
        result["conv"].to_csv(folder / f"step={step}" / "conv.csv")
        switches = None if previous is None else ld.concept_changes(previous, result["conv"])["switches"]
        lines.append(_history_line(step, result["conv"], switches))
        strip_media(None, probe, result, units_per_layer=0, switched={"conv": [0, 3] if step == 10 else [0]},
                    activations={"conv": acts}, directory=folder / f"step={step}")
        previous = result["conv"]
    (folder / "history.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "logs", result


def test_run_report_shows_the_last_step_with_saved_strips_and_each_units_concept_over_time(run_dir, tmp_path):
    logs, last = run_dir
    index = report_run(logs, tmp_path / "out")
    text = index.read_text()
    assert "step 20" in text
    page = Page(index.parent / "layer-conv.html")
    assert_links_resolve(page)
    assert [float(card["data-iou"]) for card in page.cards()] == last["conv"].scores.tolist()
    strips = {attrs["alt"]: attrs["src"] for tag, attrs in page.tags if tag == "img" and "unit" in attrs.get("alt", "")}
    assert sorted(strips) == ["top images of unit 0", "top images of unit 3"]
    saved = logs / "dissections" / "step=10" / "strips" / "conv" / "unit_3.jpg"
    assert (index.parent / strips["top images of unit 3"]).read_bytes() == saved.read_bytes()
    html = page.path.read_text()
    assert html.count("strip from step 10") == 1  # unit 3's newest strip is older than the report
    assert "kitchen <span class=\"muted\">(step 0)</span> → dog <span class=\"muted\">(step 10)</span> → " \
           "kitchen <span class=\"muted\">(step 20)</span>" in html
    assert "over training (3 dissections)" in html


def test_run_report_of_an_earlier_step_ignores_later_files(run_dir, tmp_path):
    logs, _ = run_dir
    index = report_run(logs / "dissections", tmp_path / "out", step=10)
    html = (index.parent / "layer-conv.html").read_text()
    assert "over training (2 dissections)" in html and "strip from step" not in html
    with pytest.raises(FileNotFoundError, match=r"no dissection at step 5; steps: \[0, 10, 20\]"):
        report_run(logs, tmp_path / "out", step=5)


def test_report_command_writes_the_report_and_names_a_bad_path(run_dir, tmp_path, capsys):
    logs, _ = run_dir
    parser = argparse.ArgumentParser(prog="lightning-dissect")
    add_report_command(parser.add_subparsers())
    args = parser.parse_args(["report", str(logs), "-o", str(tmp_path / "out")])
    assert args.handler(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "index.html")
    (tmp_path / "empty").mkdir()
    args = parser.parse_args(["report", str(tmp_path / "empty")])
    assert args.handler(args) == 2
    assert f"{tmp_path / 'empty'}: no dissections found" in capsys.readouterr().err
    args = parser.parse_args(["report", str(tmp_path / "nowhere")])
    assert args.handler(args) == 2
    assert f"RUN_DIR {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    from lightning_dissect.cli import main  # the installed `lightning-dissect` registers the same command

    assert main(["report", str(logs), "--step", "10", "-o", str(tmp_path / "cli")]) == 0
    assert "(step 10)" in (tmp_path / "cli" / "index.html").read_text()
    json_file = logs / "dissections" / "step=0" / "dissection.json"
    args = parser.parse_args(["report", str(json_file)])
    assert args.handler(args) == 0
    assert (json_file.parent / "report" / "layer-conv.html").is_file()


def _dump_dom(url: str, profile: Path) -> Page:
    completed = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    dumped = profile / "dom.html"
    dumped.write_text(completed.stdout, encoding="utf-8")
    return Page(dumped)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium) to load "
                                             "the report in a headless browser")
def test_report_loads_in_a_headless_browser_and_sorts_and_filters_from_the_address(dissected, tmp_path):
    model, probe, result = dissected
    index = write_report(result, tmp_path / "report", model=model, probe=probe)
    layer = result["2"]
    category = layer.unit_category(0)
    page = _dump_dom(f"{(index.parent / 'layer-2.html').as_uri()}#sort=concept&category={category}&detectors=0",
                     tmp_path / "profile")
    body = next(attrs for tag, attrs in page.tags if tag == "body")
    assert body["data-status"] == "ready"          # the script ran to its end without an error
    assert body["data-broken-images"] == "0"      # the figures loaded from the report folder
    order = sorted(range(layer.num_units), key=lambda u: (layer.label_name(u), -float(layer.scores[u]), u))
    cards = page.cards()
    assert [int(card["data-unit"]) for card in cards] == order
    shown = [int(card["data-unit"]) for card in cards if "hidden" not in card["class"].split()]
    assert shown == [u for u in order if layer.unit_category(u) == category]
    container = next(attrs for tag, attrs in page.tags if attrs.get("id") == "cards")
    assert container["data-visible"] == str(len(shown))
    page = _dump_dom(f"{(index.parent / 'layer-2.html').as_uri()}#sort=iou&detectors=1", tmp_path / "profile")
    order = sorted(range(layer.num_units), key=lambda u: (-float(layer.scores[u]), u))
    assert [int(card["data-unit"]) for card in page.cards()] == order
    shown = [int(card["data-unit"]) for card in page.cards() if "hidden" not in card["class"].split()]
    assert shown == [u for u in order if layer.scores[u] > layer.iou_threshold]


def test_summary_tables_show_the_unique_concepts_scalar_per_category_under_its_name(dissected, tmp_path):
    _, _, result = dissected
    index = result.to_html(tmp_path / "report")
    text = index.read_text()
    layer_result = result["2"]
    summary = layer_result.summary()
    assert text.count(f"<th colspan=\"{len(layer_result.categories)}\">unique concepts / detectors per category</th>"
                      ) == 1
    assert "".join(f"<th>{c}</th>" for c in layer_result.categories) in text
    cells = [f"<td>{summary[f'unique_concepts/{c}']:.0f} / {summary[f'detectors/{c}']:.0f}</td>"
             for c in layer_result.categories]
    assert "".join(cells) in text
    assert "<th rowspan=\"2\">unique concepts</th><th rowspan=\"2\">unique top concepts</th>" in text


def assert_report_links_resolve(index: Path) -> list[Page]:
    """Every page reachable from `index`, each with every link resolving inside the index's folder."""
    pages, queue = {}, [index.resolve()]
    while queue:
        path = queue.pop()
        if path in pages:
            continue
        pages[path] = page = Page(path)
        for reference in page.references():
            assert not reference.startswith(("http:", "https:", "//")), f"{path.name} loads {reference}"
            if reference.startswith("#"):
                continue
            target = (path.parent / reference.split("#")[0]).resolve()
            assert target.is_file(), f"{path.name} links to missing {reference}"
            assert index.parent.resolve() in target.parents, f"{reference} leaves the report's folder"
            if target.suffix == ".html":
                queue.append(target)
    return list(pages.values())


def test_an_html_file_name_is_written_as_the_index_with_its_pages_beside_it(dissected, tmp_path):
    model, probe, result = dissected
    (tmp_path / "out").mkdir()
    index = result.to_html(tmp_path / "out" / "report.html", model=model, probe=probe)
    assert index == tmp_path / "out" / "report.html" and index.is_file()
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["report.html", "report_files"]
    pages = assert_report_links_resolve(index)
    assert sorted(page.path.name for page in pages) == ["layer-0.html", "layer-2.html", "report.html"]
    for page in pages:
        if page.path != index:
            assert page.path.parent == tmp_path / "out" / "report_files"
            assert len(page.cards()) == result[page.path.stem.removeprefix("layer-")].num_units
            assert "../report.html" in page.references()  # back to the index
    strips = [src for page in pages for src in page.references() if "/strips/" in src]
    assert len(strips) == sum(layer.num_units for layer in result.values())


def test_a_folder_name_keeps_the_folder_with_index_html_and_an_html_folder_is_refused(dissected, tmp_path):
    _, _, result = dissected
    index = write_report(result, tmp_path / "report")
    assert index == tmp_path / "report" / "index.html"
    assert {page.path.name for page in assert_report_links_resolve(index)} == {"index.html", "layer-0.html",
                                                                               "layer-2.html"}
    (tmp_path / "old.html").mkdir()
    with pytest.raises(IsADirectoryError, match="old.html is a folder"):
        result.to_html(tmp_path / "old.html")
