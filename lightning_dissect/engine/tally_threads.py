"""The tally's image groups on several CPU threads, the intra-op threads shared out among them.

On a CPU, pass two is the tally alone: per group of `MASK_IMAGES` images a few dozen small
operations, several of which ATen runs on one thread (`bincount`, parts of `nonzero`) or
splits across threads for little gain. Giving each of several worker threads whole groups and
a share of the intra-op threads (`torch.get_num_threads()` of the calling thread: two workers
of one thread each on a 2-core machine) keeps the cores busy; see docs/performance.md for what
it measured. The groups' sums are integers, so the order in which they are added does not
change them: the tally is the same bit for bit.

A worker's thread count is set with `threadpoolctl` on the OpenMP runtime ATen runs on, which
sets it for that thread only; the calling thread's settings, and so the training run's, are
never touched. Where a worker's count cannot be set so (an ATen built without OpenMP), the
tally runs on the calling thread as before. On other devices the kernels are asynchronous and
the tally runs on the calling thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor

import torch
from threadpoolctl import threadpool_limits


@contextlib.contextmanager
def tally_threads(device: torch.device, groups: int) -> Iterator[Executor | None]:
    """Worker threads for a tally of `groups` image groups per batch on `device`, or None (the
    calling thread): on a CPU with two or more intra-op threads, `min(threads, groups)` workers
    of `threads // workers` intra-op threads each, shut down when the block ends."""
    threads = torch.get_num_threads()
    workers = min(threads, groups)
    if device.type != "cpu" or workers < 2:
        yield None
        return
    share = threads // workers
    with ThreadPoolExecutor(workers, thread_name_prefix="lightning-dissect-tally", initializer=_limit,
                            initargs=(share,)) as pool:
        yield pool if pool.submit(torch.get_num_threads).result() == share else None


def _limit(threads: int) -> None:
    """A worker's intra-op threads: ATen sets a new thread's count from the process's on first use, so
    that comes first, then the limit, for this thread alone."""
    torch.get_num_threads()
    threadpool_limits(threads, user_api="openmp")
