"""The static HTML report: one page per layer, one card per unit.

`write_report` writes a folder that opens from the file system with no network
request: `index.html` (the settings and the summary of every layer), one
`layer-<name>.html` per layer (summary counts, bar graph, IoU histogram, one
card per unit) and the images under `images/`. Given a file name ending in
`.html` (`report.html`) it writes that file as the index instead, and the
layer pages and images beside it in `report_files/`, as a browser saves a
page. CSS and JavaScript are inline.
A card shows the unit's strip, concept, category and IoU, the best concept of
every category, and for a training run the unit's concept over time. The
cards sort by IoU, unit or concept and filter by category and detector; the
choice is kept in the address (`layer-x.html#sort=concept&category=object`), so
a view can be bookmarked.
"""

from __future__ import annotations

import html
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_dissect.engine.dissect import DissectionNumbers, LayerNumbers
from lightning_dissect.io import atomic_write
from lightning_dissect.report.bargraph import bar_graph, category_color, iou_histogram
from lightning_dissect.report.media import STRIP_SUFFIX, safe_name, save_image
from lightning_dissect.report.strips import unit_strips

if TYPE_CHECKING:
    from torch import nn

    from lightning_dissect.history import HistoryEntry
    from lightning_dissect.probe import ProbeSet

SORT_KEYS = ("iou", "unit", "concept")


def write_report(
    source: DissectionNumbers | LayerNumbers,
    directory: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    probe: ProbeSet | None = None,
    activations: Mapping[str, Any] | None = None,
    units: Mapping[str, Sequence[int]] | None = None,
    num_images: int | None = 5,
    strips: Mapping[str, Mapping[int, str | os.PathLike]] | None = None,
    strip_notes: Mapping[str, Mapping[int, str]] | None = None,
    history: Mapping[str, Sequence[HistoryEntry]] | None = None,
    step: int | None = None,
    title: str | None = None,
    **options: Any,
) -> Path:
    """Write the HTML report of a dissection into the folder `directory`, or as the file `directory`
    when its name ends in `.html`.

    Strips come from the model (`model` and `probe`: the top images are run
    through it once, `unit_strips`), from precomputed `activations` (with
    `probe`), or from image files already saved (`strips`, e.g. by the
    callback); a unit without one gets a card without a picture.

    Args:
        source: a `Dissection`, or one `LayerDissection`.
        directory: the report folder (created; files of an earlier report there are replaced), whose
            index is `index.html`; or the index file itself (`report.html`), its layer pages and
            images then in `report_files/` beside it.
        model: the dissected model, unchanged since the dissection.
        probe: the probe set of the dissection.
        activations: layer -> activations in probe order, instead of `model`.
        units: layer -> units to draw strips for (default: every unit).
        num_images: top images per strip (None: all the dissection kept).
        strips: layer -> unit -> saved strip image, copied into the report.
        strip_notes: layer -> unit -> a line shown under its strip (e.g. "strip from step 400").
        history: layer -> its `HistoryEntry`s in step order: each unit's concept over a training run.
        step: the training step of this dissection, shown in the title.
        title: the report title.
        **options: passed to `unit_strips` (`device`, `batch_size`, `forward_context`).

    Returns:
        The path of the index page: `<directory>/index.html`, or `directory` itself for an `.html` name.

    Raises:
        ValueError: `model` or `activations` without `probe`.
        IsADirectoryError: an `.html` name that is an existing folder.

    Example:
        >>> result.to_html("report", model=model, probe=probe)        # doctest: +SKIP
        PosixPath('report/index.html')
        >>> result.to_html("report.html")                              # doctest: +SKIP
        PosixPath('report.html')
    """
    if isinstance(source, LayerNumbers):
        source = DissectionNumbers({source.layer: source})
    if (model is not None or activations is not None) and probe is None:
        raise ValueError("write_report draws strips from the model or activations over the probe images: pass "
                         "probe= (the ProbeSet the dissection used)")
    index, directory = report_paths(directory)
    images = directory / "images"
    directory.mkdir(parents=True, exist_ok=True)
    title = title or "Network Dissection report" + (f" (step {step})" if step is not None else "")
    pages = _page_names(list(source))
    for name, layer_result in source.items():
        folder = images / pages[name][: -len(".html")]
        save_image(bar_graph(layer_result), folder / "bar_graph.png")
        save_image(iou_histogram(layer_result), folder / "iou_histogram.png")
        strip_files: dict[int, Path] = {}
        if probe is not None and (model is not None or activations is not None):
            if layer_result.top_images.numel():
                drawn = unit_strips(
                    model, probe, layer_result, (units or {}).get(name), num_images=num_images,
                    activations=activations[name] if activations is not None else None,
                    rotation=source.settings.get("rotation"), prefix_tokens=source.settings.get("prefix_tokens"),
                    layout=(source.settings.get("layer_outputs") or {}).get(name),
                    **options,
                )
                for unit, strip in drawn.items():
                    strip_files[unit] = save_image(strip.image, folder / "strips" / f"unit_{unit}{STRIP_SUFFIX}")
        for unit, path in (strips or {}).get(name, {}).items():
            if int(unit) in strip_files:
                continue
            target = folder / "strips" / f"unit_{int(unit)}{Path(path).suffix}"
            if not Path(path).is_file():
                raise FileNotFoundError(f"strips[{name!r}][{unit}]: {path} does not exist")
            if Path(path).resolve() != target.resolve():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
            strip_files[int(unit)] = target
        page = _layer_page(layer_result, directory, folder, strip_files, (strip_notes or {}).get(name, {}),
                           (history or {}).get(name), title, pages, _relative(index, directory))
        _write_text(directory / pages[name], page)
    links = {name: _relative(directory / page, index.parent) for name, page in pages.items()}
    _write_text(index, _index_page(source, links, title, step))
    return index


def report_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """`(index page, folder of the layer pages and images)` of a report written to `path`:
    `(path/index.html, path)` for a folder, `(path, <stem>_files/ beside it)` for a name ending in `.html`.

    Raises:
        IsADirectoryError: an `.html` name that is an existing folder.
    """
    path = Path(path)
    if path.suffix.lower() != ".html":
        return path / "index.html", path
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder (an earlier report written as a folder?): pass the folder "
                                f"without .html to replace that report, or another file name")
    return path, path.with_name(f"{path.stem}_files")


def _page_names(layers: list[str]) -> dict[str, str]:
    """layer -> `layer-<name>.html`, distinct even where two names sanitise alike."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for layer in layers:
        base = f"layer-{safe_name(layer)}"
        name, number = base, 1
        while name.lower() in taken:
            number += 1
            name = f"{base}-{number}"
        taken.add(name.lower())
        names[layer] = f"{name}.html"
    return names


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def _relative(path: Path, directory: Path) -> str:
    return Path(os.path.relpath(path, directory)).as_posix()


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1em 0 .4em}
a{color:#2456a6}table{border-collapse:collapse;margin:.4em 0}
td,th{border:1px solid #ddd;padding:.2em .6em;text-align:right;font-size:.9em}
th{background:#eee}td:first-child,th:first-child{text-align:left}
.figures img{max-width:100%;border:1px solid #ddd;background:#fff;margin:.2em .4em .2em 0;vertical-align:top}
.controls{position:sticky;top:0;background:#fafafa;padding:.5em 0;border-bottom:1px solid #ddd;z-index:1}
.controls label{margin-right:1em;font-size:.9em}
.cards{display:flex;flex-wrap:wrap;gap:.6em;margin-top:.6em}
.card{background:#fff;border:1px solid #ddd;border-radius:4px;padding:.4em;max-width:100%}
.card.hidden{display:none}.card img{display:block;max-width:100%;image-rendering:pixelated}
.card .head{font-size:.9em;margin-bottom:.3em}.card .iou{font-variant-numeric:tabular-nums}
.tag{display:inline-block;padding:0 .4em;border-radius:3px;color:#fff;font-size:.8em}
.missing{color:#888;font-size:.8em;padding:1em 0}.muted{color:#888}.note{font-size:.8em}
.timeline{font-size:.8em;margin-top:.3em}.timeline svg{display:block}
details{font-size:.8em;margin-top:.2em}details table td{font-size:.95em}
"""

_SCRIPT = """
(function () {
  var body = document.body;
  try {
    var container = document.getElementById("cards");
    var cards = Array.prototype.slice.call(container.querySelectorAll(".card"));
    var sortBox = document.getElementById("sort");
    var categoryBox = document.getElementById("category");
    var detectorBox = document.getElementById("detectors");
    var compare = {
      iou: function (a, b) { return (b.iou - a.iou) || (a.unit - b.unit); },
      unit: function (a, b) { return a.unit - b.unit; },
      concept: function (a, b) {
        return a.concept.localeCompare(b.concept) || (b.iou - a.iou) || (a.unit - b.unit);
      }
    };
    var items = cards.map(function (card) {
      return {card: card, unit: Number(card.dataset.unit), iou: Number(card.dataset.iou),
              concept: card.dataset.concept, category: card.dataset.category,
              detector: card.dataset.detector === "1"};
    });
    function readHash() {
      var state = {};
      location.hash.replace(/^#/, "").split("&").forEach(function (part) {
        var pair = part.split("=");
        if (pair[0]) { state[decodeURIComponent(pair[0])] = decodeURIComponent(pair[1] || ""); }
      });
      if (compare[state.sort]) { sortBox.value = state.sort; }
      if (state.category !== undefined &&
          Array.prototype.some.call(categoryBox.options, function (o) { return o.value === state.category; })) {
        categoryBox.value = state.category;
      }
      if (state.detectors !== undefined) { detectorBox.checked = state.detectors === "1"; }
    }
    function apply(writeHash) {
      var key = sortBox.value, category = categoryBox.value, onlyDetectors = detectorBox.checked;
      items.sort(compare[key]);
      var visible = 0;
      items.forEach(function (item) {
        var show = (!category || item.category === category) && (!onlyDetectors || item.detector);
        item.card.classList.toggle("hidden", !show);
        if (show) { visible += 1; }
        container.appendChild(item.card);
      });
      container.dataset.visible = String(visible);
      document.getElementById("shown").textContent = visible + " of " + items.length + " units shown";
      if (writeHash) {
        var hash = "sort=" + key + "&category=" + encodeURIComponent(category) +
                   "&detectors=" + (onlyDetectors ? "1" : "0");
        if (history.replaceState) { history.replaceState(null, "", "#" + hash); } else { location.hash = hash; }
      }
    }
    [sortBox, categoryBox, detectorBox].forEach(function (box) {
      box.addEventListener("change", function () { apply(true); });
    });
    window.addEventListener("hashchange", function () { readHash(); apply(false); });
    readHash();
    apply(false);
    body.dataset.status = "ready";
    window.addEventListener("load", function () {
      var broken = Array.prototype.filter.call(document.images, function (image) {
        return image.loading !== "lazy" && image.complete && image.naturalWidth === 0;
      });
      body.dataset.brokenImages = String(broken.length);
    });
  } catch (error) {
    body.dataset.status = "error: " + error;
    throw error;
  }
})();
"""


def _document(title: str, content: str, script: str = "") -> str:
    # Content-Security-Policy: the page may load nothing from the network, only its own files and inline code.
    policy = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{policy}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body data-status=\"{'loading' if script else 'ready'}\">\n{content}\n"
        + (f"<script>{script}</script>\n" if script else "")
        + "</body>\n</html>\n"
    )


def _summary_table(summaries: Mapping[str, Mapping[str, float]], categories: list[str],
                   links: Mapping[str, str] | None = None) -> str:
    columns = [("units", "units"), ("detectors", "detectors"), ("unique_concepts", "unique concepts"),
               ("unique_top_concepts", "unique top concepts"), ("mean_score", "mean IoU")]
    head = "".join(f"<th rowspan=\"2\">{html.escape(label)}</th>" for _, label in columns)
    if categories:
        head += f"<th colspan=\"{len(categories)}\">unique concepts / detectors per category</th>"
    categories_head = "".join(f"<th>{html.escape(c)}</th>" for c in categories)
    rows = []
    for layer, summary in summaries.items():
        name = html.escape(layer)
        if links:
            name = f"<a href=\"{html.escape(links[layer])}\">{name}</a>"
        cells = []
        for key, _ in columns:
            value = summary.get(key, 0)
            cells.append(f"<td>{value:.3f}</td>" if key == "mean_score" else f"<td>{int(value)}</td>")
        for category in categories:
            cells.append(f"<td>{int(summary.get(f'unique_concepts/{category}', 0))} / "
                         f"{int(summary.get(f'detectors/{category}', 0))}</td>")
        rows.append(f"<tr><td>{name}</td>{''.join(cells)}</tr>")
    return (f"<table><tr><th rowspan=\"2\">layer</th>{head}</tr><tr>{categories_head}</tr>"
            f"{''.join(rows)}</table>")


def _index_page(dissection: DissectionNumbers, links: Mapping[str, str], title: str, step: int | None) -> str:
    first = next(iter(dissection.values()), None)
    categories = first.categories if first is not None else []
    settings = {key: value for key, value in dissection.settings.items() if key not in ("layers",)}
    if isinstance(settings.get("rotation"), dict) and "matrix" in settings["rotation"]:
        settings["rotation"] = "explicit matrix"
    rows = "".join(f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(_short(value))}</td></tr>"
                   for key, value in settings.items())
    content = (
        f"<h1>{html.escape(title)}</h1>\n"
        "<p class=\"muted\">Network Dissection (Bau, Zhou et al., CVPR 2017). A unit is a detector when the IoU "
        "of its concept is above the threshold; <i>unique concepts</i> counts distinct concepts per category "
        "(the paper's figures), <i>unique top concepts</i> distinct labels of detectors.</p>\n"
        f"<h2>Layers</h2>\n{_summary_table(dissection.summary(), categories, links)}\n"
        + (f"<h2>Settings</h2>\n<table>{rows}</table>\n" if rows else "")
    )
    return _document(title, content)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _layer_page(layer_result: LayerNumbers, directory: Path, folder: Path, strip_files: Mapping[int, Path],
                strip_notes: Mapping[int, str], history: Sequence[HistoryEntry] | None, title: str,
                pages: Mapping[str, str], index: str) -> str:
    name = html.escape(layer_result.layer)
    summary = layer_result.summary()
    categories = layer_result.categories
    options = "".join(f"<option value=\"{html.escape(c)}\">{html.escape(c)}</option>" for c in categories)
    navigation = " · ".join(
        f"<a href=\"{html.escape(page)}\">{html.escape(layer)}</a>" if layer != layer_result.layer
        else f"<b>{html.escape(layer)}</b>" for layer, page in pages.items()
    )
    cards = "\n".join(_card(layer_result, unit, strip_files.get(unit), strip_notes.get(unit, ""), directory, history)
                      for unit in range(layer_result.num_units))
    content = (
        f"<p><a href=\"{html.escape(index)}\">index</a> · {navigation}</p>\n"
        f"<h1>{name}</h1>\n<p class=\"muted\">{html.escape(title)}</p>\n"
        f"{_summary_table({layer_result.layer: summary}, categories)}\n"
        f"{_over_training(history) if history else ''}"
        "<div class=\"figures\">"
        f"<img src=\"{html.escape(_relative(folder / 'bar_graph.png', directory))}\" alt=\"detectors per concept\">"
        f"<img src=\"{html.escape(_relative(folder / 'iou_histogram.png', directory))}\" alt=\"IoU histogram\">"
        "</div>\n"
        "<div class=\"controls\">"
        "<label>sort by <select id=\"sort\"><option value=\"iou\">IoU</option><option value=\"unit\">unit</option>"
        "<option value=\"concept\">concept</option></select></label>"
        f"<label>category <select id=\"category\"><option value=\"\">all</option>{options}</select></label>"
        "<label><input type=\"checkbox\" id=\"detectors\"> detectors only "
        f"(IoU &gt; {layer_result.iou_threshold:g})</label>"
        "<span id=\"shown\" class=\"muted\"></span></div>\n"
        f"<div id=\"cards\" class=\"cards\">\n{cards}\n</div>"
    )
    return _document(f"{layer_result.layer} - {title}", content, _SCRIPT)


def _over_training(history: Sequence[HistoryEntry]) -> str:
    """The layer's counts at every dissection of the run (the emergence of concepts)."""
    columns = [("detectors", "detectors"), ("unique_concepts", "unique concepts"),
               ("unique_top_concepts", "unique top concepts"), ("mean_score", "mean IoU"), ("switches", "switches")]
    rows = []
    for entry in history:
        cells = []
        for key, _ in columns:
            value = entry.switches if key == "switches" else entry.summary.get(key)
            cells.append("<td>-</td>" if value is None else
                         f"<td>{value:.3f}</td>" if key == "mean_score" else f"<td>{int(value)}</td>")
        rows.append(f"<tr><td>{entry.step}</td>{''.join(cells)}</tr>")
    head = "".join(f"<th>{label}</th>" for _, label in columns)
    return (f"<details><summary>over training ({len(rows)} dissections)</summary>"
            f"<table><tr><th>step</th>{head}</tr>{''.join(rows)}</table></details>\n")


def _card(layer_result: LayerNumbers, unit: int, strip: Path | None, note: str, directory: Path,
          history: Sequence[HistoryEntry] | None) -> str:
    label = layer_result.label_name(unit)
    category = layer_result.unit_category(unit)
    score = float(layer_result.scores[unit])
    detector = bool(layer_result.detectors[unit])
    color = category_color(category, layer_result.categories) if category else "#888888"
    attributes = (f"data-unit=\"{unit}\" data-iou=\"{score!r}\" data-concept=\"{html.escape(label)}\" "
                  f"data-category=\"{html.escape(category)}\" data-detector=\"{int(detector)}\"")
    head = (f"<div class=\"head\">unit {unit} · <b>{html.escape(label or '-')}</b> "
            f"<span class=\"tag\" style=\"background:{color}\">{html.escape(category or '-')}</span> "
            f"<span class=\"iou\">IoU {score:.3f}</span>{'' if detector else ' <span class=muted>(no detector)</span>'}"
            "</div>")
    if strip is not None:
        picture = (f"<img src=\"{html.escape(_relative(strip, directory))}\" loading=\"lazy\" "
                   f"alt=\"top images of unit {unit}\">")
        if note:
            picture += f"<div class=\"note muted\">{html.escape(note)}</div>"
    else:
        picture = "<div class=\"missing\">no strip saved for this unit</div>"
    rows = []
    for k, name in enumerate(layer_result.categories):
        best = int(layer_result.category_labels[unit, k])
        if best >= 0:
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(layer_result.label_names[best])}</td>"
                        f"<td>{float(layer_result.category_scores[unit, k]):.3f}</td></tr>")
    best_table = (f"<details><summary>best per category</summary><table>{''.join(rows)}</table></details>"
                  if rows else "")
    timeline = _timeline(history, unit, layer_result.categories) if history else ""
    return f"<div class=\"card\" {attributes}>{head}{picture}{timeline}{best_table}</div>"


def _timeline(history: Sequence[HistoryEntry], unit: int, all_categories: list[str], width: int = 240,
              height: int = 44) -> str:
    """An inline SVG of the unit's IoU over the dissections, and its concept at each."""
    scores = [entry.score[unit] if unit < entry.num_units else 0.0 for entry in history]
    labels = [entry.label[unit] if unit < entry.num_units else "" for entry in history]
    categories = [entry.category[unit] if unit < entry.num_units else "" for entry in history]
    steps = [entry.step for entry in history]
    iou_threshold = history[-1].iou_threshold
    top = max(max(scores), 2 * iou_threshold, 1e-9)
    count = len(scores)

    def x(i: int) -> float:
        return 4 + (width - 8) * (i / (count - 1) if count > 1 else 0.5)

    def y(value: float) -> float:
        return height - 4 - (height - 8) * value / top

    points = " ".join(f"{x(i):.1f},{y(s):.1f}" for i, s in enumerate(scores))
    marks = []
    for i, (score, label, category) in enumerate(zip(scores, labels, categories)):
        detector = score > iou_threshold
        fill = category_color(category, all_categories) if detector and category else "#bbbbbb"
        tip = html.escape(f"step {steps[i]}: {label or '-'} ({category or '-'}) IoU {score:.3f}")
        marks.append(f"<circle cx=\"{x(i):.1f}\" cy=\"{y(score):.1f}\" r=\"2.5\" fill=\"{fill}\"><title>{tip}"
                     "</title></circle>")
    line = y(iou_threshold)
    svg = (f"<svg width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\">"
           f"<line x1=\"0\" x2=\"{width}\" y1=\"{line:.1f}\" y2=\"{line:.1f}\" stroke=\"#999\" "
           "stroke-dasharray=\"3,3\"/>"
           f"<polyline points=\"{points}\" fill=\"none\" stroke=\"#555\" stroke-width=\"1\"/>{''.join(marks)}</svg>")
    # The concept as a detector at each dissection, runs of the same concept merged.
    runs: list[list[Any]] = []
    for step, score, label in zip(steps, scores, labels):
        concept = label if score > iou_threshold else "no detector"
        if runs and runs[-1][0] == concept:
            runs[-1][2] = step
        else:
            runs.append([concept, step, step])
    text = " → ".join(
        f"{html.escape(concept)} <span class=\"muted\">"
        f"({f'step {first}' if first == last else f'steps {first}–{last}'})</span>"
        for concept, first, last in runs
    )
    return f"<div class=\"timeline\" title=\"IoU over training; dashed: detector threshold\">{svg}{text}</div>"
