"""The dissection engine: plain PyTorch, one file per number of SEMANTICS.md.

It knows tensors, a probe set and the contract, and nothing of Lightning, loggers,
files or the command line (it imports nothing of the package outside `engine/`).
`dissect.py` runs the passes; `thresholds.py`, `top_images.py` and `tally.py` hold
the streaming statistics as `torchmetrics.Metric`s, exported here for loops of
your own; `masks.py`, `scores.py`, `labels.py` and `rotation.py` are the math;
`capture.py` gets layer outputs out of a model; `sync.py` combines processes;
`reference.py` switches the engine to the straightforward definitions.
See docs/internals.md for the picture.
"""

from lightning_dissect.engine.tally import IoUTally
from lightning_dissect.engine.thresholds import ActivationThresholds
from lightning_dissect.engine.top_images import TopImages

__all__ = ["ActivationThresholds", "IoUTally", "TopImages"]
