"""When progress bars are drawn: only where a person watches a terminal.

A bar redrawn in place helps someone watching a terminal and is noise in a log: sent to a file
or a pipe (a CI log, `make demo > log.txt 2>&1`), every redraw lands in it. The rule is tqdm's
own for `disable=None`: a requested bar is drawn only when its stream is a terminal. tqdm draws
on stderr and Lightning's progress bar on stdout, so each is checked on its own stream.
"""

from __future__ import annotations

import sys
from typing import TextIO


def on_terminal(stream: TextIO | None) -> bool:
    """Whether `stream` is an interactive terminal (False for a file, a pipe, or no stream at all).

    Example:
        >>> import io
        >>> on_terminal(io.StringIO())
        False
    """
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def show_progress(requested: bool = True, stream: TextIO | None = None) -> bool:
    """Whether to draw a requested progress bar: `requested` and `stream` (default `sys.stderr`,
    where tqdm draws) is a terminal, as tqdm decides for `disable=None`."""
    return bool(requested) and on_terminal(sys.stderr if stream is None else stream)
