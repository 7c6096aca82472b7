"""Batches assembled ahead, on a thread of their own (``trainer.prefetch_batches``).

``prefetch(batches, depth)`` yields what ``batches`` yields, in the same order, while
a background thread keeps up to ``depth`` of the next ones ready: reading a row group
(streamed splits), gathering its rows and building the KJT then overlap the training
step, whose kernels release the GIL. One producer, one queue: the batches and their
order are those of the plain loop, so a seeded run gives the same model.

An error in the producer is raised in the consumer at the batch where it happened; a
consumer that stops early (early stopping, an interruption) stops the producer too.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(batches: Iterator[T], depth: int) -> Iterator[T]:
    """``batches`` with up to ``depth`` of them made ahead on a thread (0: none)."""
    if depth <= 0:
        yield from batches
        return
    ready: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failed(e))

    worker = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()
