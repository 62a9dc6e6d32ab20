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

What torchmetrics does not do lives here: the strided shards, one model on every rank, and
failures that do not stall the other ranks.

- One model: under DDP without SyncBatchNorm each rank's BatchNorm statistics drift apart
  between DDP's buffer broadcasts, so the ranks would dissect different models.
  :func:`rank_zero_buffers` gives every rank rank zero's buffers (the ones DDP broadcasts) for
  the length of a dissection and restores each rank's own afterwards, bit for bit.
  Parameters are the same on every rank under DDP and are not touched.
- Failures: every gather is preceded by a small exchange of a per-rank failure flag and message.
  Inside :func:`guard` a rank that raises joins the next exchange with its flag set and its
  error's message, and every other rank raises :class:`RankFailedError` there, naming the
  failed ranks and their messages, before any further collective. The guard ends with one more
  exchange, so a failure after the last data collective is caught too.

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

# The bytes of a failure's message that travel with its flag (longer messages are cut).
MESSAGE_BYTES = 400


class RankFailedError(RuntimeError):
    """Raised on the ranks that did not fail when another rank's dissection failed.

    Attributes:
        ranks: the global ranks that failed.
        messages: rank -> its error (type and message, cut to `MESSAGE_BYTES` bytes).
    """

    def __init__(self, ranks: list[int], messages: dict[int, str] | None = None) -> None:
        self.ranks = ranks
        self.messages = dict(messages or {})
        causes = "; ".join(f"rank {rank}: {self.messages[rank]}" for rank in ranks if self.messages.get(rank))
        super().__init__(
            f"dissection failed on rank(s) {ranks}" + (f" ({causes})" if causes else "") + "; this rank stopped "
            "before its next collective so that no rank waits forever"
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

    def report_failure(self, message: str = "") -> None:
        """The failing process's side of `check`: take part in the exchange with this process's flag set
        and the error's `message`, which the others' `RankFailedError` shows."""
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

    def report_failure(self, message: str = "") -> None:
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
        failed = self._exchange_flags(None)
        if failed:
            raise RankFailedError(list(failed), failed)

    def report_failure(self, message: str = "") -> None:
        self._exchange_flags(message)

    def _exchange_flags(self, failure: str | None) -> dict[int, str]:
        """Every rank's flag and message (None: this rank did not fail): failed rank -> its message."""
        encoded = (failure or "").encode("utf-8", "replace")[:MESSAGE_BYTES]
        local = torch.zeros(MESSAGE_BYTES + 3, dtype=torch.uint8)
        local[0] = failure is not None
        local[1], local[2] = len(encoded) // 256, len(encoded) % 256
        local[3 : 3 + len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8) if encoded else 0
        everyone = self._all_gather(local.to(self.device)).cpu()
        return {rank: bytes(row[3 : 3 + int(row[1]) * 256 + int(row[2])].tolist()).decode("utf-8", "replace")
                for rank, row in enumerate(everyone) if row[0]}

    def broadcast_from_zero(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank zero's `tensor` (the same shape and dtype on every rank), on every rank."""
        self.check()
        return self._all_gather(tensor.to(self.device))[0].to(tensor.device)


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
    except Exception as error:
        with contextlib.suppress(Exception):  # a broken process group must not hide the cause
            synchronizer.report_failure(f"{type(error).__name__}: {error}")
        raise
    synchronizer.check()


@contextlib.contextmanager
def rank_zero_buffers(model: torch.nn.Module, synchronizer: Synchronizer) -> Iterator[None]:
    """Give every rank rank zero's buffers for the block, and each rank its own back after it, bit for bit.

    Under DDP the buffers (BatchNorm's running statistics) are rank zero's at every forward, and
    drift apart between forwards; inside this block every rank holds the model DDP defines. All
    buffers travel as one byte tensor, in one collective. In a single process it does nothing.
    """
    buffers = [buffer for buffer in model.buffers() if buffer.numel()]
    if synchronizer.world_size == 1 or not buffers or not isinstance(synchronizer, DistributedSynchronizer):
        yield
        return
    saved = [buffer.detach().clone() for buffer in buffers]
    as_bytes = [buffer.detach().contiguous().reshape(-1).view(torch.uint8) for buffer in buffers]
    zero = synchronizer.broadcast_from_zero(torch.cat([part.to(as_bytes[0].device) for part in as_bytes]))
    try:
        start = 0
        with torch.no_grad():
            for buffer, part in zip(buffers, as_bytes):
                piece = zero[start : start + part.numel()].to(buffer.device)
                buffer.copy_(piece.view(buffer.dtype).reshape(buffer.shape))
                start += part.numel()
        yield
    finally:
        with torch.no_grad():
            for buffer, own in zip(buffers, saved):
                buffer.copy_(own)


def slowest(synchronizer: Synchronizer, seconds: float) -> float:
    """The wall time of a dissection: the slowest rank's `seconds`, the same on every rank (a collective).

    Histories (and the `max_seconds` budget) use it, so they agree across ranks.
    """
    return float(torch.cat(synchronizer.gather(torch.tensor([seconds], dtype=torch.float64))).max())
