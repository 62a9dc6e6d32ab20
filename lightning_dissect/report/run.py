"""Reports from files: a training run's dissection directory, or one dissection JSON.

The callback (`Dissector` with `dirpath`, by default `<log_dir>/dissections`) writes

    dissections/step=<step>/dissection.json           every number of that dissection
    dissections/step=<step>/<layer>.csv               NetDissect's per-unit table
    dissections/step=<step>/strips/<layer>/unit_<u>.jpg   strips of the top and switched units
    dissections/history.jsonl                         one line per dissection and layer

`report_run` turns that into the HTML report of one dissection (the last by
default): each unit's card shows the newest strip saved at or before that step,
and its concept over every dissection up to it (from `history.jsonl`).
`lightning-dissect report RUN_DIR` runs it from the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_dissect.report.html import LayerHistory, write_report
from lightning_dissect.report.media import saved_strips
from lightning_dissect.result import Dissection

HISTORY_FILE = "history.jsonl"
DISSECTION_FILE = "dissection.json"
_STEP_FOLDER = re.compile(r"^step=(\d+)$")


@dataclass
class Run:
    """The files of one training run's dissections.

    Attributes:
        directory: the dissections folder (holding `step=<step>/` and `history.jsonl`).
        steps: step -> its folder, in increasing step order.
    """

    directory: Path
    steps: dict[int, Path]

    @classmethod
    def find(cls, path: str | os.PathLike) -> Run:
        """The run at `path`: the dissections folder itself, or a log directory holding `dissections/`.

        Raises:
            FileNotFoundError: neither, with what was looked for.
        """
        path = Path(path)
        for directory in (path, path / "dissections"):
            steps = _step_folders(directory)
            if steps or (directory / HISTORY_FILE).is_file():
                return cls(directory, steps)
        raise FileNotFoundError(
            f"{path}: no dissections found (looked for step=<step>/ folders and {HISTORY_FILE} in it and in "
            f"{path / 'dissections'}). Pass the callback's log directory, its dissections/ folder, or a "
            f"{DISSECTION_FILE} file."
        )

    def dissection(self, step: int) -> Dissection:
        """The dissection saved at `step`.

        Raises:
            FileNotFoundError: no such step, or a step saved without its JSON.
        """
        if step not in self.steps:
            raise FileNotFoundError(f"{self.directory}: no dissection at step {step}; steps: {list(self.steps)}")
        path = self.steps[step] / DISSECTION_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the run was dissected with save_json=False, so the report "
                                    "has no numbers to show. Run with save_json=True (the default).")
        return Dissection.from_json(path)

    def history(self, up_to: int | None = None) -> dict[str, LayerHistory]:
        """layer -> its units over the run, from `history.jsonl` (steps up to `up_to`)."""
        path = self.directory / HISTORY_FILE
        if not path.is_file():
            return {}
        by_layer: dict[str, dict[int, dict[str, Any]]] = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                step, layer = int(entry["step"]), str(entry["layer"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path} line {number}: not a history entry ({error})") from error
            if up_to is None or step <= up_to:
                by_layer.setdefault(layer, {})[step] = entry  # a later line for a step (resumed run) wins
        histories = {}
        for layer, entries in by_layer.items():
            history = LayerHistory()
            for step in sorted(entries):
                entry = entries[step]
                history.steps.append(step)
                history.labels.append(list(entry.get("label", [])))
                history.categories.append(list(entry.get("category", [])))
                history.scores.append([float(s) for s in entry.get("score", [])])
                history.summaries.append(dict(entry.get("summary", {}), switches=entry.get("switches")))
            histories[layer] = history
        return histories

    def strips(self, layers: list[str], up_to: int) -> tuple[dict[str, dict[int, Path]], dict[str, dict[int, str]]]:
        """The newest saved strip of every unit at or before step `up_to`, and a note for the older ones."""
        strips: dict[str, dict[int, Path]] = {layer: {} for layer in layers}
        notes: dict[str, dict[int, str]] = {layer: {} for layer in layers}
        for step in sorted((s for s in self.steps if s <= up_to), reverse=True):
            for layer in layers:
                for unit, path in saved_strips(self.steps[step], layer).items():
                    if unit not in strips[layer]:
                        strips[layer][unit] = path
                        if step != up_to:
                            notes[layer][unit] = f"strip from step {step}"
        return strips, notes


def _step_folders(directory: Path) -> dict[int, Path]:
    if not directory.is_dir():
        return {}
    found = {}
    for child in directory.iterdir():
        match = _STEP_FOLDER.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def report_run(path: str | os.PathLike, output: str | os.PathLike | None = None, step: int | None = None,
               title: str | None = None) -> Path:
    """Write the HTML report of a run's dissection, or of one dissection JSON file.

    Args:
        path: the callback's log directory, its `dissections/` folder, or a `dissection.json`.
        output: the report folder; default `report/` beside the dissections (or the JSON file).
        step: which dissection of a run (default: the last).
        title: the report title.

    Returns:
        The path of `index.html`.

    Raises:
        FileNotFoundError: nothing to report at `path` or no such step (the message lists the steps).
        ValueError: a file that is not a dissection.
    """
    path = Path(path)
    if path.is_file():
        dissection = Dissection.from_json(path)
        output = Path(output) if output is not None else path.parent / "report"
        return write_report(dissection, output, title=title or f"Network Dissection report: {path.name}")
    run = Run.find(path)
    if not run.steps:
        raise FileNotFoundError(f"{run.directory}: {HISTORY_FILE} but no step=<step>/ folders with the dissections")
    step = max(run.steps) if step is None else int(step)
    dissection = run.dissection(step)
    strips, notes = run.strips(list(dissection), step)
    output = Path(output) if output is not None else run.directory / "report"
    return write_report(dissection, output, strips=strips, strip_notes=notes, history=run.history(up_to=step),
                        step=step, title=title)


def add_report_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `report` on an `argparse` subparsers object; `run_report` runs it."""
    parser = subparsers.add_parser(
        "report", help="write the HTML report of a run's dissections (or of one dissection JSON)",
        description="Write a static HTML report (opens offline): per layer the summary counts, the bar graph of "
                    "detectors per concept, and one card per unit with its strip, concept, IoU and its concept "
                    "over the run.")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="the callback's log directory, its dissections/ folder, or a dissection.json file")
    parser.add_argument("-o", "--output", default=None,
                        help="report folder (default: report/ beside the dissections)")
    parser.add_argument("--step", type=int, default=None, help="the dissection to show (default: the last)")
    parser.add_argument("--title", default=None, help="the report title")
    parser.set_defaults(handler=run_report)
    return parser


def run_report(args: argparse.Namespace) -> int:
    """Run the `report` command; prints the path of `index.html`. Returns the exit status (2: bad input)."""
    try:
        index = report_run(args.run_dir, args.output, args.step, args.title)
    except (FileNotFoundError, ValueError) as error:
        print(f"lightning-dissect report: error: {error}", file=sys.stderr)
        return 2
    print(index)
    return 0
