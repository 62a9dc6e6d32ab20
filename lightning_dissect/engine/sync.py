"""Dissection across the ranks of a distributed run: shard the probe set, combine exactly.

Each rank dissects the probe positions `range(rank, N, world_size)` (strided,
never padded, so no image counts twice). The engine's per-layer statistics are
`torchmetrics.Metric`s; after each pass the engine syncs them on every rank in
the same order, with :meth:`Synchronizer.gather` as torchmetrics'
`dist_sync_fn`, and each state is combined by its own reduction:

- the running top-k behind the thresholds (`ActivationThresholds.top`): every
  rank's per-unit top values are gathered and the global top `k` kept. The
  threshold only reads the top `floor(q * (n - 1)) + 2` order statistics
  (SEMANTICS §2), and the top `k` of a union is the top `k` of the ranks' top
  `k`, so the threshold equals the single-process one bit for bit;
- the top images (`TopImages.top`): the same for the per-image maxima, with the
  engine's tie rule (equal values: lower probe position first), values and
  positions packed together so that they merge jointly;
- the tally (`IoUTally`): intersections and unit areas (int64) are summed over
  ranks; so are the counts of values and images seen. Label areas come from the
  probe set itself, not from the shards.

So the scores, labels and counts are the same tensors on every rank.

What torchmetrics does not do lives here: the strided shards, and failures that
do not stall the other ranks. Every gather is preceded by a small all-reduce of
a per-rank failure flag. Inside :func:`guard` a rank that raises joins the next
flag all-reduce with its flag set, and every other rank raises
:class:`RankFailedError` there, before any further collective. The guard ends
with one more flag all-reduce, so a failure after the last data collective is
caught too.

:class:`DistributedSynchronizer` holds this logic on top of two primitives
(gather and sum); :class:`TorchDistributedSynchronizer` implements them with an
initialised `torch.distributed` process group (used by `dissect`
automatically), and the Lightning callback with its strategy's collectives
(`lightning_dissect.distributed.StrategySynchronizer`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torchmetrics import Metric

from lightning_dissect.engine.errors import DissectionError


class RankFailedError(RuntimeError):
    """Raised on the ranks that did not fail when another rank's dissection failed.

    Attributes:
        ranks: the global ranks that failed; their own exceptions carry the cause.
    """

    def __init__(self, ranks: list[int]) -> None:
        self.ranks = ranks
        super().__init__(
            f"dissection failed on rank(s) {ranks}; this rank stopped before its next collective so that no rank "
            f"waits forever. See the traceback of rank(s) {ranks} for the cause."
        )


@runtime_checkable
class Synchronizer(Protocol):
    """How one process takes part in a dissection over several (see the module docstring).

    Attributes:
        rank: this process's rank.
        world_size: the number of processes; 1 means nothing to combine.
    """

    rank: int
    world_size: int

    def shard(self, num_images: int) -> list[int]:
        """This process's probe positions."""
        ...

    def gather(self, tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        """Every process's `tensor` (the same shape on each), in rank order, after the failure check:
        torchmetrics' `dist_sync_fn`. `group` is ignored: the synchronizer knows its processes."""
        ...

    def check(self) -> None:
        """A collective on every process: raise `RankFailedError` when another one reported a failure."""
        ...

    def report_failure(self) -> None:
        """The failing process's side of `check`: take part in the exchange with this process's flag set."""
        ...


class SingleProcessSynchronizer:
    """The synchronizer of a dissection in one process: the whole probe set, nothing to combine."""

    rank = 0
    world_size = 1

    def shard(self, num_images: int) -> list[int]:
        return list(range(num_images))

    def gather(self, tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        return [tensor]

    def check(self) -> None:
        pass

    def report_failure(self) -> None:
        pass


class DistributedSynchronizer:
    """Shards the probe set and combines per-rank dissection state exactly (see the module docstring).

    Subclasses provide the two collectives `_all_gather` and `_all_reduce_sum`.

    Args:
        rank: this process's global rank.
        world_size: the number of ranks.
        device: where the collectives run (a CUDA device for NCCL); tensors are
            moved there and back.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device | str = "cpu") -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """`(world_size, *tensor.shape)`: every rank's tensor, in rank order. Shapes must agree."""
        raise NotImplementedError

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks."""
        raise NotImplementedError

    def shard(self, num_images: int) -> list[int]:
        """This rank's probe positions, `range(rank, num_images, world_size)`.

        Raises:
            DissectionError: on every rank alike when there are fewer probe
                images than ranks (a rank with no image cannot learn the layer
                shapes it must take part in combining).
        """
        if num_images < self.world_size:
            raise DissectionError(
                f"the probe set has {num_images} images, fewer than the {self.world_size} ranks; every rank needs at "
                "least one probe image. Use a larger probe set (ProbeSet(size=...))."
            )
        return list(range(self.rank, num_images, self.world_size))

    def gather(self, tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        self.check()
        # NCCL needs the tensors on the synchronizer's device; the results go back where they came from.
        gathered = self._all_gather(tensor.to(self.device)).to(tensor.device)
        return list(gathered.unbind(0))

    def check(self) -> None:
        failed = self._exchange_flags(failed=False)
        if failed:
            raise RankFailedError(failed)

    def report_failure(self) -> None:
        self._exchange_flags(failed=True)

    def _exchange_flags(self, failed: bool) -> list[int]:
        flags = torch.zeros(self.world_size, dtype=torch.long, device=self.device)
        flags[self.rank] = int(failed)
        flags = self._all_reduce_sum(flags)
        return [rank for rank, flag in enumerate(flags.tolist()) if flag]


class TorchDistributedSynchronizer(DistributedSynchronizer):
    """Combines dissection state over an initialised `torch.distributed` process group.

    `dissect` and `dissect_activations` use one automatically when a process
    group of more than one rank is initialised and no `synchronizer` is given.

    Args:
        group: the process group; default the world.
        device: where the collectives run; default the current CUDA device for
            NCCL, otherwise the CPU.

    Example:
        >>> # torchrun --nproc-per-node 8 script.py; in script.py:
        >>> torch.distributed.init_process_group("nccl")          # doctest: +SKIP
        >>> result = ld.dissect(model, probe, ["layer4"])          # doctest: +SKIP
    """

    def __init__(self, group: Any = None, device: torch.device | str | None = None) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchDistributedSynchronizer needs an initialised process group: call "
                               "torch.distributed.init_process_group(...) first (torchrun sets up its environment)")
        if device is None:
            nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.group = group
        super().__init__(dist.get_rank(group), dist.get_world_size(group), device)

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.stack(parts)

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


def default_synchronizer() -> Synchronizer:
    """`TorchDistributedSynchronizer` inside an initialised process group of several ranks,
    else a `SingleProcessSynchronizer`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributedSynchronizer()
    return SingleProcessSynchronizer()


def sync_states(metric: Metric, synchronizer: Synchronizer) -> None:
    """Combine `metric`'s states over every process (a collective when there are several).

    The states are gathered with `synchronizer.gather` (which checks the failure flags
    first) and combined by their own `dist_reduce_fx`; the metric holds the combined states
    afterwards, on every process.
    """
    metric.sync(dist_sync_fn=synchronizer.gather, distributed_available=lambda: synchronizer.world_size > 1)


@contextlib.contextmanager
def guard(synchronizer: Synchronizer) -> Iterator[None]:
    """Run one dissection so that a failure on any rank stops every rank.

    A rank that raises inside the block reports it in the next flag
    all-reduce (which every other rank reaches before its next collective)
    and re-raises; the others raise `RankFailedError`. On success the block
    ends with one flag all-reduce, matched on every rank. In a single process
    it does nothing.
    """
    try:
        yield
    except RankFailedError:
        raise  # learnt from the flags: the failed rank already took part in this exchange
    except Exception:
        with contextlib.suppress(Exception):  # a broken process group must not hide the cause
            synchronizer.report_failure()
        raise
    synchronizer.check()


def slowest(synchronizer: Synchronizer, seconds: float) -> float:
    """The wall time of a dissection: the slowest rank's `seconds`, the same on every rank (a collective).

    Histories (and the `max_seconds` budget) use it, so they agree across ranks.
    """
    return float(torch.cat(synchronizer.gather(torch.tensor([seconds], dtype=torch.float64))).max())
