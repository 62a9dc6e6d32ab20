"""The paper's analyses as tables and figures: emergence, concept switches, basis change, comparisons.

Functions without a `plot_` prefix turn dissections into plain tables of numbers (lists of dicts);
`plot_*` functions draw such a table into an image file with matplotlib's Agg canvas (no pyplot,
no display, safe in a training process). Nothing here trains or dissects: the examples and the
`lightning-dissect` command do that and call these. Every count is one of SEMANTICS §5, read from
`LayerDissection.summary()` or `concept_changes`.

Example:
    >>> history = read_run("lightning_logs/version_0")              # doctest: +SKIP
    >>> plot_emergence(emergence_curve(history, "conv4"), "emergence.png")   # doctest: +SKIP
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_dissect.history import concept_changes
from lightning_dissect.io import atomic_write
from lightning_dissect.report.bargraph import category_color
from lightning_dissect.report.figures import new_figure, plain
from lightning_dissect.result import Dissection, LayerDissection
from lightning_dissect.run_folder import RunFolder

History = Sequence[tuple[int, Dissection]]
"""Dissections of one run in ascending step order: `[(step, Dissection), ...]`."""


# ---------------------------------------------------------------------------------------- runs on disk


def read_run(path: str | os.PathLike) -> list[tuple[int, Dissection]]:
    """Read the dissections saved by a run, in step order.

    Args:
        path: the log directory of a run with `DissectionCallback` (holding
            `dissections/step=<step>/dissection.json`), its `dissections/` folder, or one file
            written by `Dissection.to_json` (its step is `settings["step"]` when recorded, else 0).

    Returns:
        `[(step, Dissection), ...]` sorted by step.

    Raises:
        FileNotFoundError: `path` does not exist or holds no dissection (says what was looked for).
        ValueError: a file that is not a dissection JSON (names the file), or a folder that mixes the
            dissections of several runs.
    """
    path = Path(path)
    if path.is_file():
        dissection = Dissection.from_json(path)
        return [(int(dissection.settings.get("step", 0) or 0), dissection)]
    if not path.exists():
        raise FileNotFoundError(f"run {str(path)!r} does not exist; pass a run directory or a dissection JSON file")
    run = RunFolder.find(path)
    run.check_one_run()
    steps = run.steps
    if not steps:
        raise FileNotFoundError(f"{run.directory}: no step=<step>/ folders with dissections")
    return [(step, run.dissection(step)) for step in steps]


def layer_of(dissection: Dissection, layer: str | None) -> LayerDissection:
    """The `LayerDissection` of `layer`, or of the only (else the last) layer when `layer` is None.

    Raises:
        KeyError: `layer` is not in the dissection (names the layers there).
    """
    if layer is None:
        return dissection[list(dissection)[-1]]
    return dissection[layer]


# ---------------------------------------------------------------------------------------- emergence


def emergence_curve(history: History, layer: str | None = None) -> list[dict[str, float]]:
    """The counts of one layer at every dissection of a run (the paper's emergence plot).

    Args:
        history: `[(step, Dissection), ...]`, e.g. from :func:`read_run` or a callback's history.
        layer: the layer; None for the last layer of each dissection.

    Returns:
        One row per dissection: `step` and every count of `LayerDissection.summary()`
        (`unique_concepts`, `unique_concepts/<category>`, `detectors`, `detectors/<category>`, ...).
    """
    return [dict(step=float(step), **layer_of(dissection, layer).summary()) for step, dissection in history]


def categories_of(rows: Sequence[Mapping[str, Any]], key: str = "unique_concepts") -> list[str]:
    """The categories that appear as `<key>/<category>` in `rows`, in first-seen order."""
    found: dict[str, None] = {}
    for row in rows:
        for name in row:
            if name.startswith(key + "/"):
                found.setdefault(name.split("/", 1)[1])
    return list(found)


# ---------------------------------------------------------------------------------------- concept switches


def switches_per_dissection(history: History, layer: str | None = None) -> list[dict[str, int]]:
    """Concept switches between each dissection and the previous one of the same layer (SEMANTICS §5).

    Returns:
        One row per dissection after the first: `step`, `previous_step`, `switches` (a detector
        in both with a different label), `switch_in` (becomes a detector), `switch_out` (stops
        being one) and `detectors` (after).
    """
    rows = []
    for (before_step, before), (step, after) in zip(history, history[1:]):
        old, new = layer_of(before, layer), layer_of(after, layer)
        changes = concept_changes(old, new)
        rows.append({"step": step, "previous_step": before_step, "switches": changes["switches"],
                     "switch_in": changes["switch_in"], "switch_out": changes["switch_out"],
                     "detectors": int(new.detectors.sum())})
    return rows


def transition_table(before: LayerDissection, after: LayerDissection, examples: int = 5) -> list[dict[str, Any]]:
    """The units that switched concept between two dissections, grouped by transition.

    A unit switches when it is a detector in both with a different label (SEMANTICS §5).

    Args:
        before, after: dissections of the same layer (e.g. before and after fine-tuning).
        examples: how many example units to list per transition.

    Returns:
        One row per transition, most frequent first (ties: by concept names): `from`, `to`,
        `from_category`, `to_category`, `count`, and `units` (the first `examples` unit
        indices, ascending).
    """
    changes = concept_changes(before, after)
    groups: dict[tuple[str, str], list[int]] = {}
    for unit in changes["switched_units"]:
        groups.setdefault((before.label_name(unit), after.label_name(unit)), []).append(unit)
    rows = []
    for (source, target), units in groups.items():
        rows.append({"from": source, "to": target, "from_category": before.unit_category(units[0]),
                     "to_category": after.unit_category(units[0]), "count": len(units), "units": units[:examples]})
    return sorted(rows, key=lambda row: (-row["count"], row["from"], row["to"]))


# ---------------------------------------------------------------------------------------- basis change


def rotation_curve(results: Mapping[tuple[float, int], LayerDissection]) -> list[dict[str, float]]:
    """Counts against the rotation power `alpha` (SEMANTICS §6), over seeds.

    Args:
        results: `{(alpha, seed): LayerDissection}` of one layer.

    Returns:
        One row per `alpha`, ascending: `alpha`, `seeds`, and for `unique_concepts` and
        `detectors` the `mean`, `min` and `max` over seeds (`unique_concepts_mean`, ...).
    """
    by_alpha: dict[float, list[dict[str, float]]] = {}
    for (alpha, _seed), layer in results.items():
        by_alpha.setdefault(float(alpha), []).append(layer.summary())
    rows = []
    for alpha in sorted(by_alpha):
        summaries = by_alpha[alpha]
        row = {"alpha": alpha, "seeds": float(len(summaries))}
        for key in ("unique_concepts", "detectors"):
            values = [summary[key] for summary in summaries]
            row.update({f"{key}_mean": statistics.fmean(values), f"{key}_min": min(values),
                        f"{key}_max": max(values)})
        rows.append(row)
    return rows


def linear_probe_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                          test_labels: torch.Tensor, weight_decay: float = 1e-3, iterations: int = 300) -> float:
    """Test accuracy of a linear classifier (multinomial logistic regression) on features.

    The discriminative power of a representation, for the basis-change experiment: the
    features are centred and whitened with the training covariance (`(C + eps I)^(-1/2)`,
    `eps` a 1e-4 share of its mean eigenvalue), and the classifier is trained from zero by
    full-batch gradient descent with Nesterov momentum, a fixed step and `iterations` steps,
    in float64. Every one of these steps commutes with a rotation of the features, so
    rotating them (`R x`) gives the same classifier, rotated, and the same accuracy up to
    rounding (a prediction that is an exact tie may flip).

    Args:
        train_features, test_features: `(N, K)`.
        train_labels, test_labels: long `(N,)` class indices.
        weight_decay: the L2 penalty on the weights (not the bias).
        iterations: gradient steps.

    Returns:
        The share of test samples classified right, in [0, 1].
    """
    threads = torch.get_num_threads()
    # Hundreds of small matrix products: thread start-up and barriers cost more than they save,
    # many times more on a busy machine.
    torch.set_num_threads(1)
    try:
        return _linear_probe_accuracy(train_features, train_labels, test_features, test_labels, weight_decay,
                                      iterations)
    finally:
        torch.set_num_threads(threads)


def _linear_probe_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                           test_labels: torch.Tensor, weight_decay: float, iterations: int) -> float:
    x, x_test = train_features.double(), test_features.double()
    if x.ndim != 2 or x_test.ndim != 2 or x.shape[1] != x_test.shape[1]:
        raise ValueError(f"features must be (N, K) with the same K; got {tuple(x.shape)} and {tuple(x_test.shape)}")
    mean = x.mean(dim=0)
    centred = x - mean
    covariance = centred.T @ centred / max(len(x) - 1, 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eps = 1e-4 * float(eigenvalues.clamp(min=0).mean()) + 1e-12
    whitening = eigenvectors @ torch.diag((eigenvalues.clamp(min=0) + eps).rsqrt()) @ eigenvectors.T
    x, x_test = centred @ whitening, (x_test - mean) @ whitening
    classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64)
    bias = torch.zeros(classes, dtype=torch.float64)
    velocity_weight, velocity_bias = torch.zeros_like(weight), torch.zeros_like(bias)
    targets = torch.nn.functional.one_hot(train_labels.long(), classes).double()
    step, momentum = 0.5, 0.9
    for _ in range(iterations):
        # Nesterov: the gradient at the look-ahead point.
        ahead_weight, ahead_bias = weight + momentum * velocity_weight, bias + momentum * velocity_bias
        error = torch.softmax(x @ ahead_weight + ahead_bias, dim=1) - targets
        gradient_weight = x.T @ error / len(x) + weight_decay * ahead_weight
        gradient_bias = error.mean(dim=0)
        velocity_weight = momentum * velocity_weight - step * gradient_weight
        velocity_bias = momentum * velocity_bias - step * gradient_bias
        weight, bias = weight + velocity_weight, bias + velocity_bias
    predictions = (x_test @ weight + bias).argmax(dim=1)
    return float((predictions == test_labels.long()).double().mean())


# ---------------------------------------------------------------------------------------- comparisons


def concept_counts(layers: Mapping[str, LayerDissection], key: str = "unique_concepts") -> dict[str, dict[str, int]]:
    """Per-category counts of several dissected layers (of one model, or of several runs).

    Args:
        layers: display name -> `LayerDissection`, in the order to show.
        key: `"unique_concepts"` (the paper's bars) or `"detectors"`.

    Returns:
        `{name: {category: count}}`, categories in each dissection's order.
    """
    if key not in ("unique_concepts", "detectors"):
        raise ValueError(f"key={key!r} must be 'unique_concepts' or 'detectors'")
    counts = {}
    for name, layer in layers.items():
        summary = layer.summary()
        counts[name] = {category: int(summary[f"{key}/{category}"]) for category in layer.categories}
    return counts


def format_counts(counts: Mapping[str, Mapping[str, int]], title: str = "") -> str:
    """`concept_counts` as an aligned text table with a total column."""
    categories: dict[str, None] = {}
    for row in counts.values():
        categories.update(dict.fromkeys(row))
    header = [title or "", *categories, "total"]
    body = [[name, *(str(row.get(c, 0)) for c in categories), str(sum(row.values()))] for name, row in counts.items()]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells))

    return "\n".join([line(header), *(line(cells) for cells in body)])


# ---------------------------------------------------------------------------------------- figures


def _axes_figure(width: float, height: float, columns: int = 1) -> tuple[Any, list[Any]]:
    figure = new_figure(width, height, layout="constrained")
    return figure, [figure.add_subplot(1, columns, i + 1) for i in range(columns)]


def _save(figure: Any, path: str | os.PathLike) -> Path:
    """Write the figure through a temporary file, so a reader never sees half an image."""
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format=path.suffix.lstrip(".") or "png")
    return path


def _log_steps(axis: Any, steps: Sequence[float]) -> None:
    # Step 0 (the untrained model) has no logarithm: a linear stretch below 1 keeps it on the axis.
    axis.set_xscale("symlog", linthresh=1.0, linscale=0.5)
    axis.set_xlim(left=0, right=max(max(steps, default=1) * 1.3, 2))
    axis.set_xlabel("training step (log scale)")


def plot_emergence(rows: Sequence[Mapping[str, float]], path: str | os.PathLike, title: str = "") -> Path:
    """The paper's emergence figure: unique concepts per category against steps on a log axis,
    beside detectors per category.

    Args:
        rows: :func:`emergence_curve` output.
        path: the image file to write (`.png`, `.svg`, `.pdf`).
        title: the figure title, e.g. the layer.

    Returns:
        `path`.
    """
    if not rows:
        raise ValueError("plot_emergence: rows is empty; dissect at least once")
    steps = [row["step"] for row in rows]
    figure, (unique_axis, detector_axis) = _axes_figure(11, 4.2, columns=2)
    for axis, key, label in ((unique_axis, "unique_concepts", "unique concepts (IoU > t)"),
                             (detector_axis, "detectors", "detectors")):
        categories = categories_of(rows, key)
        for category in categories:
            axis.plot(steps, [row[f"{key}/{category}"] for row in rows], marker="o", markersize=3,
                      color=category_color(category, categories), label=plain(category))
        axis.plot(steps, [row[key] for row in rows], color="black", linewidth=2, label="total")
        _log_steps(axis, steps)
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
    unique_axis.set_title("unique concepts per category")
    detector_axis.set_title("detectors per category")
    detector_axis.legend(loc="upper left", fontsize=8, frameon=False)
    if title:
        figure.suptitle(plain(title))
    return _save(figure, path)


def plot_switches(rows: Sequence[Mapping[str, int]], path: str | os.PathLike, title: str = "") -> Path:
    """Switches, switch-ins and switch-outs at every dissection (:func:`switches_per_dissection`)."""
    if not rows:
        raise ValueError("plot_switches: rows is empty; it needs two dissections of the layer or more")
    figure, (axis,) = _axes_figure(8, 4)
    positions = range(len(rows))
    width = 0.27
    for offset, (key, color) in zip((-width, 0.0, width), (("switches", "#d62728"), ("switch_in", "#2ca02c"),
                                                               ("switch_out", "#7f7f7f"))):
        axis.bar([p + offset for p in positions], [row[key] for row in rows], width=width, color=color,
                 label=key.replace("_", " "))
    axis.set_xticks(list(positions), [str(int(row["step"])) for row in rows], rotation=45, fontsize=8)
    axis.set_xlabel("dissection at step (compared with the previous one)")
    axis.set_ylabel("units")
    axis.legend(frameon=False)
    axis.set_title(plain(title or "concept switches per dissection"))
    return _save(figure, path)


def plot_transition_table(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "",
                          max_rows: int = 20) -> Path:
    """The transition table of the units that switched (:func:`transition_table`) as an image."""
    shown = list(rows[:max_rows])
    figure, (axis,) = _axes_figure(8, 0.7 + 0.21 * (max(len(shown), 1) + 1))
    axis.axis("off")
    cells = [[plain(row["from"]), plain(row["to"]), str(row["count"]), ", ".join(str(u) for u in row["units"])]
             for row in shown]
    if cells:
        table = axis.table(cellText=cells, colLabels=["from", "to", "units", "example units"], loc="upper center",
                           cellLoc="left", colLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(9)
        for row_index, row in enumerate(shown, start=1):
            table[row_index, 0].get_text().set_color(category_color(row["from_category"], []))
            table[row_index, 1].get_text().set_color(category_color(row["to_category"], []))
    else:
        axis.text(0.5, 0.5, "no unit switched concept", ha="center", va="center")
    hidden = len(rows) - len(shown)
    axis.set_title(plain(title or "concept transitions") + (f" ({hidden} more not shown)" if hidden else ""))
    return _save(figure, path)


def plot_rotation(rows: Sequence[Mapping[str, float]], path: str | os.PathLike, title: str = "") -> Path:
    """Unique concepts and detectors against the rotation power `alpha` (:func:`rotation_curve`),
    the mean over seeds with the min-max range shaded."""
    if not rows:
        raise ValueError("plot_rotation: rows is empty")
    alphas = [row["alpha"] for row in rows]
    figure, (axis,) = _axes_figure(6, 4)
    for key, color, label in (("unique_concepts", "#1f77b4", "unique concepts"), ("detectors", "#d62728",
                                                                                  "detectors")):
        axis.plot(alphas, [row[f"{key}_mean"] for row in rows], marker="o", color=color, label=label)
        axis.fill_between(alphas, [row[f"{key}_min"] for row in rows], [row[f"{key}_max"] for row in rows],
                          color=color, alpha=0.2)
    axis.set_xlabel("rotation power alpha (0: the layer's own basis, 1: a random basis)")
    axis.set_ylabel("count")
    axis.set_ylim(bottom=0)
    axis.grid(True, alpha=0.3)
    axis.legend(frameon=False)
    axis.set_title(plain(title or "interpretability under a change of basis"))
    return _save(figure, path)


def plot_comparison(counts: Mapping[str, Mapping[str, int]], path: str | os.PathLike, title: str = "",
                    ylabel: str = "unique concepts") -> Path:
    """Stacked bars of per-category counts (:func:`concept_counts`), one bar per layer or run,
    the total written above each bar."""
    if not counts:
        raise ValueError("plot_comparison: counts is empty")
    categories: dict[str, None] = {}
    for row in counts.values():
        categories.update(dict.fromkeys(row))
    names = list(counts)
    figure, (axis,) = _axes_figure(max(5.0, 1.0 + 0.9 * len(names)), 4.5)
    bottom = [0] * len(names)
    for category in categories:
        heights = [counts[name].get(category, 0) for name in names]
        axis.bar([plain(name) for name in names], heights, bottom=bottom,
                 color=category_color(category, list(categories)), label=plain(category))
        bottom = [b + h for b, h in zip(bottom, heights)]
    for position, total in enumerate(bottom):
        axis.text(position, total, str(total), ha="center", va="bottom", fontsize=9)
    axis.set_ylabel(ylabel)
    axis.set_ylim(0, max(max(bottom), 1) * 1.15)
    axis.tick_params(axis="x", labelrotation=30 if len(names) > 3 else 0)
    axis.legend(frameon=False, fontsize=8, loc="upper left")
    axis.set_title(plain(title or f"{ylabel} per category"))
    return _save(figure, path)
