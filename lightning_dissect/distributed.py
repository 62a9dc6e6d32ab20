"""Dissection across the ranks of a distributed run: shard the probe set, combine exactly.

Each rank dissects the probe positions `range(rank, N, world_size)` (strided,
never padded, so no image counts twice). The engine then calls the
synchronizer at three points, on every rank in the same order:

- `merge_top`: the per-unit top activation values of every rank are gathered
  and the global top `k` kept. The threshold only reads the top
  `floor(q * (n - 1)) + 2` order statistics (SEMANTICS §2), and the top `k`
  of a union is the top `k` of the ranks' top `k`, so the threshold equals the
  single-process one bit for bit.
- `merge_top_images`: the same for the per-image maxima, with the engine's
  tie rule (equal values: lower probe position first).
- `sum`: intersections and unit areas (int64) are summed over ranks. Label
  areas come from the probe set itself, not from the shards.

So the scores, labels and counts are the same tensors on every rank.

Failures do not stall the other ranks: every collective is preceded by a
small all-reduce of a per-rank failure flag. Inside :meth:`DistributedSynchronizer.guard`
a rank that raises joins the next flag all-reduce with its flag set, and every
other rank raises :class:`RankFailedError` there, before any further
collective. The guard ends with one more flag all-reduce, so a failure after
the last data collective is caught too.

Two implementations share this logic and differ only in the two primitives:
:class:`TorchDistributedSynchronizer` (an initialised `torch.distributed`
process group, used by `dissect` automatically) and
:class:`StrategySynchronizer` (a Lightning `trainer.strategy`, used by the
callback).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from lightning_dissect.engine.dissect import _Synchronizer, _top_images_update
from lightning_dissect.engine.errors import DissectionError

__all__ = [
    "DistributedSynchronizer",
    "RankFailedError",
    "StrategySynchronizer",
    "TorchDistributedSynchronizer",
    "check_strategy",
    "default_synchronizer",
    "guard",
    "local_zero_first",
    "slowest",
]

T = TypeVar("T")
_NO_INDEX = torch.iinfo(torch.long).max  # pads top images; sorts after every probe position


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


class DistributedSynchronizer(_Synchronizer):
    """Shards the probe set and combines per-rank dissection state exactly (see the module docstring).

    Subclasses provide `_all_gather` and `_all_reduce_sum`.

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

    # ------------------------------------------------------------ primitives

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """`(world_size, *tensor.shape)`: every rank's tensor, in rank order. Shapes must agree."""
        raise NotImplementedError

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks."""
        raise NotImplementedError

    # ------------------------------------------------------------ the engine's hooks

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

    def merge_top(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """The global top `k` values of each unit from every rank's local top `(K, k_local)`, descending."""
        self.check()
        gathered, total = self._gather_padded(values, k, -torch.inf)
        return gathered.topk(min(k, total), dim=1, largest=True, sorted=True).values

    def merge_top_images(
        self, values: torch.Tensor, indices: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The global top `k` (value, probe position) pairs of each unit; ties go to the lower position."""
        self.check()
        all_values, total = self._gather_padded(values, k, -torch.inf)
        all_indices, _ = self._gather_padded(indices, k, _NO_INDEX)
        empty_values, empty_indices = all_values[:, :0], all_indices[:, :0]
        merged_values, merged_indices = _top_images_update(empty_values, empty_indices, all_values, all_indices, k)
        width = min(k, total)
        return merged_values[:, :width], merged_indices[:, :width]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of `tensor` over ranks (a new tensor)."""
        self.check()
        return self._on_device(self._all_reduce_sum, tensor.clone())

    # ------------------------------------------------------------ failures

    def check(self) -> None:
        """A collective on every rank: raise `RankFailedError` when another rank reported a failure."""
        failed = self._exchange_flags(failed=False)
        if failed:
            raise RankFailedError(failed)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Run one dissection so that a failure on any rank stops every rank.

        A rank that raises inside the block reports it in the next flag
        all-reduce (which every other rank reaches before its next collective)
        and re-raises; the others raise `RankFailedError`. On success the block
        ends with one flag all-reduce, matched on every rank.
        """
        try:
            yield
        except RankFailedError:
            raise  # learnt from the flags: the failed rank already took part in this exchange
        except Exception:
            with contextlib.suppress(Exception):  # a broken process group must not hide the cause
                self._exchange_flags(failed=True)
            raise
        self.check()

    def maximum(self, value: float) -> float:
        """The largest of every rank's `value` (a collective), the same number on every rank."""
        self.check()
        values = self._on_device(self._all_gather, torch.tensor([value], dtype=torch.float64))
        return float(values.max())

    def _exchange_flags(self, failed: bool) -> list[int]:
        flags = torch.zeros(self.world_size, dtype=torch.long, device=self.device)
        flags[self.rank] = int(failed)
        flags = self._all_reduce_sum(flags)
        return [rank for rank, flag in enumerate(flags.tolist()) if flag]

    # ------------------------------------------------------------ helpers

    def _gather_padded(self, tensor: torch.Tensor, width: int, fill: float | int) -> tuple[torch.Tensor, int]:
        """Gather `(K, w_rank)` tensors padded with `fill` to `(K, width)`.

        Returns:
            `(K, world_size * width)` with rank `r`'s columns at `[r * width, (r + 1) * width)`,
            and the number of real (unpadded) columns over all ranks.
        """
        units, local = tensor.shape
        if local > width:
            raise ValueError(f"a rank holds {local} values per unit, more than k={width}")
        padded = torch.full((units, width), fill, dtype=tensor.dtype, device=tensor.device)
        padded[:, :local] = tensor
        widths = torch.tensor([local], dtype=torch.long, device=tensor.device)
        total = int(self._on_device(self._all_gather, widths).sum())
        gathered = self._on_device(self._all_gather, padded)  # (world, K, width)
        return gathered.permute(1, 0, 2).reshape(units, self.world_size * width), total

    def _on_device(self, collective: Any, tensor: torch.Tensor) -> torch.Tensor:
        return collective(tensor.to(self.device)).to(tensor.device)


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


def guard(synchronizer: _Synchronizer | None) -> contextlib.AbstractContextManager:
    """`synchronizer.guard()` for a distributed synchronizer; a no-op context otherwise."""
    if isinstance(synchronizer, DistributedSynchronizer):
        return synchronizer.guard()
    return contextlib.nullcontext()


def slowest(synchronizer: _Synchronizer | None, seconds: float) -> float:
    """The wall time of a dissection: the slowest rank's `seconds`, the same on every rank.

    Histories (and the `max_seconds` budget) use it, so they agree across ranks.
    """
    if isinstance(synchronizer, DistributedSynchronizer):
        return synchronizer.maximum(seconds)
    return seconds


def local_zero_first(synchronizer: _Synchronizer | None, local_rank: int, prepare: Callable[[], T]) -> T:
    """Run `prepare()` on each node's local rank 0 first, then on its other ranks.

    For work that fills a cache (downloading Broden, generating the synthetic
    dataset, decoding the probe): the other ranks then find it done. A failure
    on any rank raises on every rank (`guard`), so none waits forever.
    """
    result: T | None = None
    for first in (True, False):
        with guard(synchronizer):
            if (local_rank == 0) == first:
                result = prepare()
    return result  # type: ignore[return-value]


def default_synchronizer() -> _Synchronizer:
    """`TorchDistributedSynchronizer` inside an initialised process group of several ranks, else a no-op one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributedSynchronizer()
    return _Synchronizer()
