"""The analyses' tables against slow loops over units, and their figures written as real images."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_dissect import analysis
from lightning_dissect.result import Dissection, LayerDissection

CATEGORIES = ["object", "scene"]
LABEL_NAMES = ["-", "dog", "cat", "car", "kitchen", "beach"]
LABEL_CATEGORY = torch.tensor([-1, 0, 0, 0, 1, 1])


def layer(labels: list[int], scores: list[float], name: str = "conv4") -> LayerDissection:
    """A dissection whose units have the given labels and scores; each unit scores 0 in the other category."""
    k = len(labels)
    labels_t, scores_t = torch.tensor(labels), torch.tensor(scores, dtype=torch.float64)
    category_labels = torch.tensor([[1, 4]] * k)
    category_scores = torch.zeros(k, 2, dtype=torch.float64)
    for unit, (label, score) in enumerate(zip(labels, scores)):
        column = int(LABEL_CATEGORY[label])
        category_labels[unit, column] = label
        category_scores[unit, column] = score
    zeros = torch.zeros(k, len(LABEL_NAMES))
    return LayerDissection(
        layer=name, categories=CATEGORIES, label_names=LABEL_NAMES, label_category=LABEL_CATEGORY,
        iou_threshold=0.04, thresholds=torch.zeros(k, dtype=torch.float64), iou=zeros.double(),
        intersection=zeros.long(), unit_area=torch.zeros(k, 2, dtype=torch.long),
        label_area=torch.zeros(len(LABEL_NAMES), dtype=torch.long), category_labels=category_labels,
        category_scores=category_scores, labels=labels_t, scores=scores_t,
    )


def random_layer(seed: int, units: int = 40) -> LayerDissection:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, len(LABEL_NAMES), (units,), generator=generator).tolist()
    scores = (torch.rand(units, generator=generator, dtype=torch.float64) * 0.1).tolist()
    return layer(labels, scores)


def slow_transitions(before: LayerDissection, after: LayerDissection) -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = {}
    for unit in range(before.num_units):
        was = float(before.scores[unit]) > 0.04
        now = float(after.scores[unit]) > 0.04
        old, new = LABEL_NAMES[int(before.labels[unit])], LABEL_NAMES[int(after.labels[unit])]
        if was and now and old != new:
            found.setdefault((old, new), []).append(unit)
    return found


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_transition_table_groups_exactly_the_units_that_switched(seed):
    before, after = random_layer(seed), random_layer(seed + 100)
    expected = slow_transitions(before, after)
    rows = analysis.transition_table(before, after, examples=2)
    assert {(row["from"], row["to"]): row["count"] for row in rows} == {key: len(units) for key, units in
                                                                      expected.items()}
    assert all(row["units"] == expected[row["from"], row["to"]][:2] for row in rows)
    assert [row["count"] for row in rows] == sorted((row["count"] for row in rows), reverse=True)
    for row in rows:
        assert row["from_category"] == CATEGORIES[int(LABEL_CATEGORY[LABEL_NAMES.index(row["from"])])]


def test_transition_table_of_a_hand_made_case():
    before = layer([1, 1, 2, 4, 3], [0.05, 0.05, 0.05, 0.2, 0.01])
    after = layer([4, 4, 2, 5, 1], [0.05, 0.06, 0.30, 0.2, 0.30])
    # unit 2 keeps its label, unit 4 becomes a detector (switch in, not a switch).
    assert analysis.transition_table(before, after) == [
        {"from": "dog", "to": "kitchen", "from_category": "object", "to_category": "scene", "count": 2,
         "units": [0, 1]},
        {"from": "kitchen", "to": "beach", "from_category": "scene", "to_category": "scene", "count": 1,
         "units": [3]},
    ]


def test_switches_per_dissection_counts_against_the_previous_dissection():
    layers = [random_layer(seed) for seed in range(4)]
    history = [(step, Dissection({"conv4": item})) for step, item in zip([0, 1, 3, 9], layers)]
    rows = analysis.switches_per_dissection(history, "conv4")
    assert [row["step"] for row in rows] == [1, 3, 9]
    assert [row["previous_step"] for row in rows] == [0, 1, 3]
    for row, before, after in zip(rows, layers, layers[1:]):
        was, now = before.scores > 0.04, after.scores > 0.04
        assert row["switches"] == sum(len(units) for units in slow_transitions(before, after).values())
        assert row["switch_in"] == sum(1 for u in range(40) if now[u] and not was[u])
        assert row["switch_out"] == sum(1 for u in range(40) if was[u] and not now[u])
        assert row["detectors"] == int(now.sum())


def test_emergence_curve_reads_each_dissections_counts_in_order():
    history = [(0, Dissection({"a": layer([1, 4], [0.0, 0.0]), "b": layer([1, 1], [0.05, 0.5])})),
               (5, Dissection({"a": layer([1, 4], [0.05, 0.5]), "b": layer([1, 2], [0.05, 0.5])}))]
    rows = analysis.emergence_curve(history, "a")
    assert [row["step"] for row in rows] == [0, 5]
    assert [row["unique_concepts"] for row in rows] == [0, 2]
    assert [(row["unique_concepts/object"], row["unique_concepts/scene"]) for row in rows] == [(0, 0), (1, 1)]
    assert [row["detectors"] for row in rows] == [0, 2]
    assert [row["unique_concepts"] for row in analysis.emergence_curve(history)] == [1, 2]  # last layer: b
    assert analysis.categories_of(rows) == CATEGORIES


def test_rotation_curve_is_mean_min_max_over_seeds():
    results = {(0.0, 0): random_layer(0), (1.0, 0): random_layer(1), (1.0, 1): random_layer(2),
               (0.5, 3): random_layer(3)}
    rows = analysis.rotation_curve(results)
    assert [row["alpha"] for row in rows] == [0.0, 0.5, 1.0]
    assert [row["seeds"] for row in rows] == [1, 1, 2]
    detectors = [float((results[1.0, seed].scores > 0.04).sum()) for seed in (0, 1)]
    assert rows[2]["detectors_mean"] == statistics.fmean(detectors)
    assert (rows[2]["detectors_min"], rows[2]["detectors_max"]) == (min(detectors), max(detectors))
    unique = [results[1.0, seed].summary()["unique_concepts"] for seed in (0, 1)]
    assert rows[2]["unique_concepts_mean"] == statistics.fmean(unique)


def test_concept_counts_and_their_text_table():
    counts = analysis.concept_counts({"conv3": layer([1, 2, 4], [0.05, 0.01, 0.5]),
                                      "conv4": layer([1, 2, 4, 5], [0.05, 0.05, 0.5, 0.5])})
    assert counts == {"conv3": {"object": 1, "scene": 1}, "conv4": {"object": 2, "scene": 2}}
    assert analysis.format_counts(counts, "layer").splitlines() == [
        "layer  object  scene  total",
        "conv3       1      1      2",
        "conv4       2      2      4",
    ]
    with pytest.raises(ValueError, match="key='iou'"):
        analysis.concept_counts({"conv3": layer([1], [0.1])}, key="iou")


def assert_image(path: Path, min_size: tuple[int, int] = (200, 150)) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        assert len(image.convert("L").getcolors(maxcolors=2**16) or ()) > 2  # something is drawn, not a blank canvas


def test_every_figure_is_written_as_a_png(tmp_path):
    history = [(step, Dissection({"conv4": random_layer(step)})) for step in (0, 1, 2, 4, 9)]
    assert_image(analysis.plot_emergence(analysis.emergence_curve(history), tmp_path / "emergence.png"))
    assert_image(analysis.plot_switches(analysis.switches_per_dissection(history), tmp_path / "switches.png"))
    table = analysis.transition_table(history[0][1]["conv4"], history[-1][1]["conv4"])
    assert_image(analysis.plot_transition_table(table, tmp_path / "transitions.png"), (200, 50))
    assert_image(analysis.plot_transition_table([], tmp_path / "none.png"), (200, 50))
    curve = analysis.rotation_curve({(alpha, 0): random_layer(int(alpha * 4)) for alpha in (0, 0.25, 0.5, 1)})
    assert_image(analysis.plot_rotation(curve, tmp_path / "rotation.png"))
    counts = analysis.concept_counts({"a": random_layer(0), "b": random_layer(1)})
    assert_image(analysis.plot_comparison(counts, tmp_path / "nested" / "compare.png"))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "compare.png", "emergence.png", "none.png", "rotation.png", "switches.png", "transitions.png"]


def test_empty_tables_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="plot_emergence: rows is empty"):
        analysis.plot_emergence([], tmp_path / "e.png")
    with pytest.raises(ValueError, match="two dissections"):
        analysis.plot_switches([], tmp_path / "s.png")
    assert not list(tmp_path.iterdir())


def test_read_run_returns_saved_dissections_in_step_order(tmp_path):
    for step in (10, 0, 2):
        Dissection({"conv4": random_layer(step)}, {"step": step}).to_json(
            tmp_path / "run" / "dissections" / f"step={step}" / "dissection.json")
    history = analysis.read_run(tmp_path / "run")
    assert [step for step, _ in history] == [0, 2, 10]
    assert torch.equal(history[2][1]["conv4"].labels, random_layer(10).labels)
    assert [step for step, _ in analysis.read_run(tmp_path / "run" / "dissections")] == [0, 2, 10]
    single = analysis.read_run(tmp_path / "run" / "dissections" / "step=2" / "dissection.json")
    assert [step for step, _ in single] == [2]


def test_read_run_names_the_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        analysis.read_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no dissections found"):
        analysis.read_run(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        analysis.read_run(tmp_path / "bad.json")


def gaussian_classes(seed: int, n: int, k: int = 12, classes: int = 4, spread: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, k, generator=generator) * 2
    labels = torch.randint(0, classes, (n,), generator=generator)
    return torch.relu(centres[labels] + spread * torch.randn(n, k, generator=generator)), labels


def test_linear_probe_separates_separable_classes_and_is_at_chance_on_noise():
    features, labels = gaussian_classes(0, 400, spread=0.05)
    assert analysis.linear_probe_accuracy(features[:300], labels[:300], features[300:], labels[300:]) == 1.0
    generator = torch.Generator().manual_seed(1)
    noise, coin = torch.randn(2000, 8, generator=generator), torch.randint(0, 2, (2000,), generator=generator)
    assert abs(analysis.linear_probe_accuracy(noise[:1000], coin[:1000], noise[1000:], coin[1000:]) - 0.5) < 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_probe_accuracy_is_the_same_in_a_rotated_basis(seed):
    from lightning_dissect.engine.rotation import fractional_power, random_rotation

    features, labels = gaussian_classes(seed, 600, spread=1.5)
    accuracy = analysis.linear_probe_accuracy(features[:400], labels[:400], features[400:], labels[400:])
    assert 0.5 < accuracy < 1.0  # an informative, imperfect probe: a change would show
    for alpha in (0.5, 1.0):
        rotation = fractional_power(random_rotation(12, seed), alpha).float()
        rotated = features @ rotation.T
        assert analysis.linear_probe_accuracy(rotated[:400], labels[:400], rotated[400:], labels[400:]) == accuracy


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small float64 products: threads only add waiting on a busy machine
    yield
    torch.set_num_threads(threads)


def test_linear_probe_matches_logistic_regression_by_lbfgs(one_thread):
    features, labels = gaussian_classes(2, 600, spread=1.5)
    train, test = slice(0, 400), slice(400, None)
    # The slow reference: the same penalised logistic regression on the raw features, by L-BFGS.
    x = features.double()
    weight = torch.zeros(12, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[train] @ weight + bias, labels[train])
        loss.backward()
        return loss

    optimizer.step(closure)
    reference = float(((x[test] @ weight + bias).argmax(1) == labels[test]).double().mean())
    found = analysis.linear_probe_accuracy(features[train], labels[train], features[test], labels[test])
    assert abs(found - reference) <= 0.02
