"""`prefetched`: a function over a sequence of items, computed by a background thread a few items ahead.

A dissection reads from disk while it computes: the probe's next batches (`ProbeSet.stream`) and,
in pass two, the next batch of unit maps spilled to disk (`ActivationSpill.read_ahead`). File reads
and torch operations release the GIL, so one thread reading ahead overlaps the disk with the work.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def prefetched(produce: Callable[[T], Any], items: Iterable[T], depth: int = 2, name: str = "prefetch"
               ) -> Generator[Any, None, None]:
    """`produce(item)` for each item, computed by a background thread (named `name`) up to `depth` items ahead.

    An exception of `produce` is raised by the iterator, at the item that raised it. When the consumer
    stops early (break, an exception, the iterator closed or garbage-collected) the thread stops after
    the item it is producing.
    """
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if stop.is_set() or not put(produce(item)):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            put(_Failure(error))
            return
        put(_DONE)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            result = results.get()
            if result is _DONE:
                return
            if isinstance(result, _Failure):
                raise result.error
            yield result
    finally:
        stop.set()
        thread.join()
