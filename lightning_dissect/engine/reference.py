"""The reference switch: run the whole engine on the straightforward definitions of SEMANTICS §2.

The engine's two hot spots have fast paths that are exact but not obvious:
the masks (`engine/_fast_masks.py`: tiles near the threshold, rounding bands,
kernel probes) and the running top-k behind the thresholds (a sampled first
bound and packed candidates, `engine/thresholds.py`). With the switch on, both
take the definition instead: every mask is `F.interpolate` of the layer tensor
compared with the float64 threshold, and the top-k is a plain `topk` of the
state and the batch. Everything else (tally, scores, synchronisation) is shared.

Whoever changes SEMANTICS §2 changes the reference path first and runs the
whole test suite on both paths::

    LIGHTNING_DISSECT_REFERENCE=1 python -m pytest tests

The environment variable is read each time the engine decides (so it can be
set after import); tests use the context manager :func:`reference_path`. The
switch lives in its own module because both `masks.py` and `thresholds.py` read
it and neither should import the other for it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

REFERENCE_ENV = "LIGHTNING_DISSECT_REFERENCE"

# None: follow the environment variable; True or False: set by `reference_path` for the current context.
_forced: contextvars.ContextVar[bool | None] = contextvars.ContextVar("lightning_dissect_reference", default=None)


def use_reference() -> bool:
    """Whether the engine runs on the reference path: as :func:`reference_path` says inside one,
    else when `LIGHTNING_DISSECT_REFERENCE` is set to anything but empty or `0`."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return os.environ.get(REFERENCE_ENV, "0") not in ("", "0")


@contextlib.contextmanager
def reference_path(enabled: bool = True) -> Iterator[None]:
    """Run the engine on the straightforward definitions inside the block (see the module docstring);
    `enabled=False` runs it on the fast paths whatever the environment says.

    Example:
        >>> with reference_path():
        ...     use_reference()
        True
    """
    token = _forced.set(enabled)
    try:
        yield
    finally:
        _forced.reset(token)
