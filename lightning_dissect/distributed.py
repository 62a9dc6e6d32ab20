"""The Lightning edge of distributed dissection: the strategy's collectives as a synchronizer.

How a distributed dissection stays exact, and how a failure on one rank stops
the others, is `lightning_dissect.engine.sync`'s business. This module adapts a
Lightning `trainer.strategy` to it (:class:`StrategySynchronizer`), refuses the
strategies whose ranks cannot each run the whole model (:func:`check_strategy`),
and runs cache-filling work on each node's local rank 0 first
(:func:`local_zero_first`). The engine never imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from lightning_dissect.engine.errors import DissectionError
from lightning_dissect.engine.sync import DistributedSynchronizer, SingleProcessSynchronizer, Synchronizer, guard

__all__ = ["StrategySynchronizer", "check_strategy", "local_zero_first"]

T = TypeVar("T")


class StrategySynchronizer(DistributedSynchronizer):
    """Combines dissection state through a Lightning strategy's collectives (`trainer.strategy`).

    Args:
        strategy: the trainer's strategy (`trainer.strategy`), for example DDP.
    """

    def __init__(self, strategy: Any) -> None:
        check_strategy(strategy)
        self.strategy = strategy
        super().__init__(strategy.global_rank, strategy.world_size, strategy.root_device)

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        gathered = self.strategy.all_gather(tensor)
        # Outside a process group (a single device) the strategy returns the tensor itself.
        return gathered if gathered.ndim == tensor.ndim + 1 else gathered.unsqueeze(0)

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.strategy.reduce(tensor, reduce_op="sum")


_SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def check_strategy(strategy: Any) -> None:
    """Refuse strategies whose parameters are sharded across ranks.

    A rank of such a strategy cannot run the whole model over its own share of
    the probe set (its forward needs the other ranks at every layer).

    Raises:
        DissectionError: for FSDP, model parallelism and DeepSpeed ZeRO stage 3, naming what is supported.
    """
    names = [cls.__name__ for cls in type(strategy).__mro__]
    sharded = next((name for name in names if name in _SHARDED_STRATEGIES), None)
    if sharded is None and "DeepSpeedStrategy" in names and getattr(strategy, "zero_stage_3", False):
        sharded = "DeepSpeedStrategy with ZeRO stage 3"
    if sharded is not None:
        raise DissectionError(
            f"dissection does not support {sharded} ({type(strategy).__name__}): its parameters are sharded "
            "across ranks, so no rank can run the whole model over its share of the probe set. Supported: a single "
            "device, DDP ('ddp', 'ddp_spawn', 'ddp_find_unused_parameters_true', multi-node) and DeepSpeed stages "
            "1 and 2. To dissect a sharded model, save a checkpoint and run ld.dissect on the gathered model."
        )


def local_zero_first(synchronizer: Synchronizer | None, local_rank: int, prepare: Callable[[], T]) -> T:
    """Run `prepare()` on each node's local rank 0 first, then on its other ranks.

    For work that fills a cache (downloading Broden, generating the synthetic
    dataset, decoding the probe): the other ranks then find it done. A failure
    on any rank raises on every rank (`guard`), so none waits forever.
    """
    synchronizer = synchronizer or SingleProcessSynchronizer()
    result: T | None = None
    for first in (True, False):
        with guard(synchronizer):
            if (local_rank == 0) == first:
                result = prepare()
    return result  # type: ignore[return-value]
