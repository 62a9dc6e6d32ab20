"""Reports from files: a training run's dissection directory, or one dissection JSON.

The callback writes a run's dissections folder (`run_folder.py` says what lives where);
`report_run` turns that into the HTML report of one dissection (the last by
default): each unit's card shows the newest strip saved at or before that step,
and its concept over every dissection up to it (from `history.jsonl`).
`lightning-dissect report RUN_DIR` runs it from the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from lightning_dissect.report.html import write_report
from lightning_dissect.result import Dissection
from lightning_dissect.run_folder import HISTORY_FILE, RunFolder


def report_run(path: str | os.PathLike, output: str | os.PathLike | None = None, step: int | None = None,
               title: str | None = None) -> Path:
    """Write the HTML report of a run's dissection, or of one dissection JSON file.

    Args:
        path: the callback's log directory, its `dissections/` folder, or a `dissection.json`.
        output: the report folder, or its index file (a name ending in `.html`, `write_report`); default
            `report/` beside the dissections (or the JSON file).
        step: which dissection of a run (default: the last).
        title: the report title.

    Returns:
        The path of the index page.

    Raises:
        FileNotFoundError: nothing to report at `path` or no such step (the message lists the steps).
        ValueError: a file that is not a dissection, or a folder that mixes the dissections of several runs.
    """
    path = Path(path)
    if path.is_file():
        dissection = Dissection.from_json(path)
        output = Path(output) if output is not None else path.parent / "report"
        return write_report(dissection, output, title=title or f"Network Dissection report: {path.name}")
    run = RunFolder.find(path)
    run.check_one_run()
    steps = run.steps
    if not steps:
        raise FileNotFoundError(f"{run.directory}: {HISTORY_FILE} but no step=<step>/ folders with the dissections")
    step = max(steps) if step is None else int(step)
    dissection = run.dissection(step)
    strips, notes = run.strips(list(dissection), step)
    output = Path(output) if output is not None else run.directory / "report"
    return write_report(dissection, output, strips=strips, strip_notes=notes, history=run.history(up_to=step),
                        step=step, title=title)


def add_report_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `report` on an `argparse` subparsers object; `run_report` runs it."""
    parser = subparsers.add_parser(
        "report", help="write the HTML report of a run's dissections (or of one dissection JSON) (default: the last "
                       "dissection, into report/ beside the dissections)",
        description="Write a static HTML report (opens offline): per layer the summary counts, the bar graph of "
                    "detectors per concept, and one card per unit with its strip, concept, IoU and its concept "
                    "over the run.")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="the callback's log directory, its dissections/ folder, or a dissection.json file")
    parser.add_argument("-o", "--output", default=None,
                        help="report folder, or an .html file (its pages and images then go in <name>_files/ "
                             "beside it) (default: report/ beside the dissections)")
    parser.add_argument("--step", type=int, default=None, help="the dissection to show (default: the last)")
    parser.add_argument("--title", default=None, help="the report title")
    parser.set_defaults(handler=run_report)
    return parser


def run_report(args: argparse.Namespace) -> int:
    """Run the `report` command; prints the path of the index page. Returns the exit status (2: bad input)."""
    if not Path(args.run_dir).exists():
        print(f"lightning-dissect report: error: RUN_DIR {args.run_dir} does not exist", file=sys.stderr)
        return 2
    try:
        index = report_run(args.run_dir, args.output, args.step, args.title)
    except (FileNotFoundError, ValueError) as error:
        print(f"lightning-dissect report: error: {error}", file=sys.stderr)
        return 2
    print(index)
    return 0
