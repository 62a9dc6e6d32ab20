"""Chunks of work done in worker processes, results handed back in order, never many at once.

Decoding a probe set, indexing a dataset and writing one in the Broden layout all do the same
thing: one function over consecutive chunks of items, results consumed in item order by one
parent that writes them somewhere. `ordered_chunks` runs the function in forked worker processes
(threads where fork is missing) with at most `2 * workers` chunks decoded or in flight, so memory
stays bounded by a few chunks whatever the dataset's size. The function and everything it reads
(a `Broden`, a user's dataset) reach the workers by fork, never by pickling.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import warnings
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

R = TypeVar("R")

_worker_task: Callable[[Sequence[int]], Any] | None = None  # set in each worker process by _start_worker


def _start_worker(task: Callable[[Sequence[int]], Any], parent: int) -> None:
    global _worker_task
    _worker_task = task
    torch.set_num_threads(1)  # one process per core already
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which stops the workers
    # A parent killed outright (SIGKILL, the OOM killer) cannot stop its workers, and a worker blocked
    # writing its result would wait forever: Linux ends it with the parent (prctl PR_SET_PDEATHSIG).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _run_in_worker(items: Sequence[int]) -> Any:
    assert _worker_task is not None
    return _worker_task(items)


def can_fork() -> bool:
    """Whether workers are forked processes (Linux); elsewhere (Windows, macOS) they are threads."""
    # fork starts a worker in milliseconds and needs no `if __name__ == "__main__":` guard in the
    # user's script; spawn would re-import it.
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def default_workers() -> int:
    """One worker per core, up to 8."""
    return min(8, os.cpu_count() or 1)


def ordered_chunks(task: Callable[[Sequence[int]], R], chunks: Sequence[Sequence[int]], workers: int,
                   progress: str | None = None, unit: str = "item") -> Generator[R, None, None]:
    """`task(chunk)` for each chunk, in order, with at most `2 * workers` chunks done or in flight at once.

    With `workers <= 1` (or a single chunk) the chunks run in this process. An exception of `task` is
    raised at its chunk; closing the generator (or an exception in the consumer) stops the workers.
    `progress`, when given, is the description of a progress bar counting the chunks' items (`unit`s).
    """
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(map(len, chunks)), desc=progress, unit=unit)
    results = _results(task, chunks, workers)
    try:
        for chunk, result in zip(chunks, results):
            yield result
            if bar is not None:
                bar.update(len(chunk))
    finally:
        results.close()  # stops the workers now, not when a traceback holding this frame is freed
        if bar is not None:
            bar.close()


def _results(task: Callable[[Sequence[int]], R], chunks: Sequence[Sequence[int]], workers: int
             ) -> Generator[R, None, None]:
    if workers <= 1 or len(chunks) <= 1:
        yield from map(task, chunks)
        return
    pool: Executor
    run: Callable[[Sequence[int]], Any]
    if can_fork():
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_start_worker, initargs=(task, os.getpid()))
        run = _run_in_worker
    else:
        pool, run = ThreadPoolExecutor(workers), task
    pending: deque = deque()
    try:
        for number, chunk in enumerate(chunks):
            if number == 0:
                # The pool forks every worker at the first submit. Python 3.12 warns about forking a
                # threaded process; the workers only decode and write files (PIL, NumPy, one torch
                # thread), as DataLoader's forked workers do, and touch no lock another thread may hold.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks",
                                            category=DeprecationWarning)
                    pending.append(pool.submit(run, chunk))
            else:
                pending.append(pool.submit(run, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def chunked(count: int, size: int) -> list[range]:
    """`range(count)` cut into consecutive ranges of `size` (the last may be shorter)."""
    return [range(start, min(start + size, count)) for start in range(0, count, size)]
