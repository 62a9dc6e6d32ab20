"""Models for the command line's tests, named as MODEL (`tests.cli_models:...`) or saved whole with torch.save."""

from __future__ import annotations

import torch
from torch import nn


class TwoStage(nn.Module):
    """A stem at the input's size and a strided stage: two layers to dissect in one pass."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(width, width + 2, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(width + 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(self.stem(x)).mean(dim=(2, 3)))


def two_stage() -> TwoStage:
    """The factory a MODEL names: seeded, so that every call builds the same weights."""
    torch.manual_seed(0)
    return TwoStage()


def needs_arguments(width: int) -> TwoStage:
    return TwoStage(width)


BUILT = two_stage()  # a module-level model: MODEL may name it (tests.cli_models:BUILT)
NOT_A_MODEL = 3
