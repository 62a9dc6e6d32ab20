"""The files of one training run's dissections: where each one lives, written and read here alone.

    <folder>/step=<step>/<layer>.csv                    NetDissect's per-unit table (`LayerDissection.to_csv`)
    <folder>/step=<step>/dissection.json                every number (`Dissection.to_json`)
    <folder>/step=<step>/strips/<layer>/unit_<u>.jpg    strips of the top and switched units
    <folder>/step=<step>/complete.json                  written last: the step is whole (and its run's id)
    <folder>/history.jsonl                              one `HistoryEntry` per dissection and layer
    <folder>/run.json                                   the id of the run the folder belongs to

One folder holds one run: `claim` refuses a folder that holds another run's dissections, and the
readers list only complete steps and say when a folder mixes runs (folders written before the
markers existed are read as they are).

The `Dissector` writes the folder (by default the callback's `<log_dir>/dissections`); the report,
the analyses and `lightning-dissect compare` read it through `RunFolder.find`. Every file is written
atomically (`lightning_dissect.io`), so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from lightning_dissect.history import HistoryEntry, read_history, write_history
from lightning_dissect.io import atomic_write
from lightning_dissect.report.media import saved_strips
from lightning_dissect.result import Dissection


class RunFolderTaken(ValueError):
    """A folder that holds the dissections of another run."""

HISTORY_FILE = "history.jsonl"
DISSECTION_FILE = "dissection.json"
RUN_FILE = "run.json"
COMPLETE_FILE = "complete.json"
_STEP_FOLDER = re.compile(r"^step=(\d+)$")


class RunFolder:
    """The dissections folder of one training run.

    Args:
        directory: the folder holding `step=<step>/` folders and `history.jsonl`.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.directory)!r})"

    # ------------------------------------------------------------------ writing

    def step_folder(self, step: int) -> Path:
        """`<directory>/step=<step>`: the files of the dissection at `step`."""
        return self.directory / f"step={step}"

    def claim(self, run_id: str) -> None:
        """Make the folder this run's: write `run.json` unless it names `run_id` already.

        Raises:
            RunFolderTaken: the folder holds another run's dissections (another `run.json`, or step
                folders written without one).
        """
        owner = self.owner()
        if owner == run_id:
            return
        if owner is not None or self.steps:
            other = f"run {owner}" if owner is not None else "a run of an earlier version"
            raise RunFolderTaken(f"{self.directory} holds the dissections of {other} (steps {list(self.steps)})")
        with atomic_write(self.directory / RUN_FILE) as handle:
            handle.write(json.dumps({"run_id": run_id}) + "\n")

    def owner(self) -> str | None:
        """The id of the run the folder belongs to (`run.json`); None for none (or an unreadable one)."""
        try:
            return str(json.loads((self.directory / RUN_FILE).read_text())["run_id"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write_dissection(self, step: int, dissection: Dissection, save_json: bool = True,
                         run_id: str | None = None) -> None:
        """One CSV per layer, with `save_json` the JSON of every number, and last the step's `complete.json`."""
        folder = self.step_folder(step)
        for layer, result in dissection.items():
            result.to_csv(folder / f"{layer}.csv")
        if save_json:
            dissection.to_json(folder / DISSECTION_FILE)
        with atomic_write(folder / COMPLETE_FILE) as handle:
            handle.write(json.dumps({"step": step, "run_id": run_id}) + "\n")

    def write_history(self, entries: Iterable[HistoryEntry]) -> None:
        """Rewrite `history.jsonl` from `entries`."""
        write_history(self.directory / HISTORY_FILE, entries)

    # ------------------------------------------------------------------ reading

    @classmethod
    def find(cls, path: str | os.PathLike[str]) -> RunFolder:
        """The run at `path`: the dissections folder itself, or a log directory holding `dissections/`.

        Raises:
            FileNotFoundError: neither, with what was looked for.
        """
        path = Path(path)
        for directory in (path, path / "dissections"):
            found = cls(directory)
            if found.steps or (directory / HISTORY_FILE).is_file():
                return found
        raise FileNotFoundError(
            f"{path}: no dissections found (looked for step=<step>/ folders and {HISTORY_FILE} in it and in "
            f"{path / 'dissections'}). Pass the callback's log directory, its dissections/ folder, or a "
            f"{DISSECTION_FILE} file."
        )

    @property
    def steps(self) -> dict[int, Path]:
        """step -> its folder, in increasing step order: the complete steps (a dissection interrupted while
        its files were written is left out), or every step folder of a folder written without markers."""
        if not self.directory.is_dir():
            return {}
        found = {}
        for child in self.directory.iterdir():
            match = _STEP_FOLDER.match(child.name)
            if match and child.is_dir():
                found[int(match.group(1))] = child
        complete = {step: folder for step, folder in found.items() if (folder / COMPLETE_FILE).is_file()}
        if complete or (self.directory / RUN_FILE).is_file():
            found = complete
        return dict(sorted(found.items()))

    def run_ids(self) -> set[str]:
        """The ids of the runs whose dissections the folder holds (empty for a folder without markers)."""
        ids = {owner} if (owner := self.owner()) is not None else set()
        for folder in self.steps.values():
            try:
                run_id = json.loads((folder / COMPLETE_FILE).read_text()).get("run_id")
            except (OSError, ValueError, AttributeError):
                continue
            if run_id is not None:
                ids.add(str(run_id))
        return ids

    def check_one_run(self) -> None:
        """Raise `RunFolderTaken` when the folder mixes the dissections of several runs (naming them)."""
        ids = self.run_ids()
        if len(ids) > 1:
            raise RunFolderTaken(f"{self.directory} mixes the dissections of {len(ids)} runs ({sorted(ids)}); "
                                 "a report or comparison reads one run: pass the folder of one run")

    def dissection(self, step: int) -> Dissection:
        """The dissection saved at `step`.

        Raises:
            FileNotFoundError: no such step, or a step saved without its JSON.
        """
        steps = self.steps
        if step not in steps:
            raise FileNotFoundError(f"{self.directory}: no dissection at step {step}; steps: {list(steps)}")
        path = steps[step] / DISSECTION_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the run was dissected with save_json=False, so the report "
                                    "has no numbers to show. Run with save_json=True (the default).")
        return Dissection.from_json(path)

    def history(self, up_to: int | None = None) -> dict[str, list[HistoryEntry]]:
        """layer -> its entries in step order, from `history.jsonl` (steps up to `up_to`).

        A step recorded twice (a resumed run that dissected it again) keeps its last line.

        Raises:
            ValueError: a line that is not a history entry (names the file and line).
        """
        path = self.directory / HISTORY_FILE
        if not path.is_file():
            return {}
        by_layer: dict[str, dict[int, HistoryEntry]] = {}
        for entry in read_history(path):
            if up_to is None or entry.step <= up_to:
                by_layer.setdefault(entry.layer, {})[entry.step] = entry
        return {layer: [entries[step] for step in sorted(entries)] for layer, entries in by_layer.items()}

    def strips(self, layers: Sequence[str], up_to: int) -> tuple[dict[str, dict[int, Path]], dict[str, dict[int, str]]]:
        """The newest saved strip of every unit at or before step `up_to`, and a note for the older ones."""
        strips: dict[str, dict[int, Path]] = {layer: {} for layer in layers}
        notes: dict[str, dict[int, str]] = {layer: {} for layer in layers}
        steps = self.steps
        for step in sorted((s for s in steps if s <= up_to), reverse=True):
            for layer in layers:
                for unit, path in saved_strips(steps[step], layer).items():
                    if unit not in strips[layer]:
                        strips[layer][unit] = path
                        if step != up_to:
                            notes[layer][unit] = f"strip from step {step}"
        return strips, notes
