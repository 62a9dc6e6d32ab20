"""Network Dissection (Bau, Zhou et al., CVPR 2017) in the training loop.

The engine (`dissect`, `dissect_activations`) is plain PyTorch and works on any
`nn.Module`; `DissectionCallback` runs it on a schedule inside a Lightning
`Trainer`. Every number follows `SEMANTICS.md`.
"""

from typing import TYPE_CHECKING

from lightning_dissect import datasets
from lightning_dissect.broden import Broden, BrodenError, BrodenRow, download_broden
from lightning_dissect.broden_writer import write_broden
from lightning_dissect.concept_source import ConceptDataset, DatasetError
from lightning_dissect.dissector import Dissector, RunContext
from lightning_dissect.engine.errors import DissectionError
from lightning_dissect.engine.rotation import Rotation, fractional_power, random_rotation, rotate_units
from lightning_dissect.history import HistoryEntry, concept_changes
from lightning_dissect.probe import ImageTransform, ProbeSet
from lightning_dissect.result import Dissection, LayerDissection, dissect, dissect_activations
from lightning_dissect.schedule import at_steps, every_n_epochs, every_n_steps, log_spaced
from lightning_dissect.synthetic import make_synthetic_broden

if TYPE_CHECKING:  # imported on first use below: the callbacks need Lightning, the rest of the package does not
    from lightning_dissect.callback import DissectionCallback, PLDissectionCallback

__version__ = "0.1.0"

__all__ = [
    "Broden",
    "BrodenError",
    "BrodenRow",
    "ConceptDataset",
    "DatasetError",
    "Dissection",
    "DissectionCallback",
    "DissectionError",
    "Dissector",
    "HistoryEntry",
    "ImageTransform",
    "LayerDissection",
    "PLDissectionCallback",
    "ProbeSet",
    "Rotation",
    "RunContext",
    "at_steps",
    "concept_changes",
    "datasets",
    "dissect",
    "dissect_activations",
    "download_broden",
    "every_n_epochs",
    "every_n_steps",
    "fractional_power",
    "log_spaced",
    "make_synthetic_broden",
    "random_rotation",
    "rotate_units",
    "write_broden",
]


def __getattr__(name: str) -> type:
    if name in ("DissectionCallback", "PLDissectionCallback"):
        from lightning_dissect import callback

        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
