"""Progress bars are drawn on a terminal only, so logs sent to files stay readable."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from lightning_dissect.progress import on_terminal, show_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_requested_bar_is_shown_on_a_terminal_only():
    assert show_progress(True, Terminal())
    assert not show_progress(False, Terminal())
    assert not show_progress(True, io.StringIO())
    closed = io.StringIO()
    closed.close()  # its isatty raises ValueError
    assert not on_terminal(closed) and not on_terminal(None) and not on_terminal(object())  # type: ignore[arg-type]


def test_the_default_stream_is_stderr_where_tqdm_draws(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert show_progress()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not show_progress()


@pytest.mark.parametrize("stdout,bar", [(Terminal(), True), (io.StringIO(), False)])
def test_the_demo_trainer_shows_lightnings_bar_only_when_stdout_is_a_terminal(monkeypatch, stdout, bar):
    pytest.importorskip("lightning")
    from lightning_dissect.demo import make_trainer

    monkeypatch.setattr(sys, "stdout", stdout)
    assert (make_trainer(3, progress=True).progress_bar_callback is not None) == bar
    assert make_trainer(3, progress=False).progress_bar_callback is None


def test_the_dissect_command_writes_no_progress_bar_into_a_redirected_log(tmp_path, random_dataset):
    done = subprocess.run(
        [sys.executable, "-m", "lightning_dissect.cli", "dissect", "tests.test_cli:tiny_net", "--layers", "conv",
         "--broden", str(random_dataset), "--quantile", "0.1", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout + done.stderr
    assert "decode probe" not in done.stderr and "dissect:" not in done.stderr
    lines = done.stdout.splitlines()  # what it wrote, and nothing after it
    assert lines[-2].startswith("written: ") and lines[-1].startswith("HTML report: ")
