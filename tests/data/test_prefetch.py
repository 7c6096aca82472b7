"""``prefetch``: the same batches in the same order, errors where they happened, and a
producer that stops with its consumer (through the trainer: tests/training/test_trainer.py)."""

import threading
import time

import pytest

from recsys.data.prefetch import prefetch


def _threads() -> int:
    return sum(t.name == "batch-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_items_same_order(depth):
    assert list(prefetch(iter(range(100)), depth)) == list(range(100))
    assert list(prefetch(iter([]), depth)) == []


def test_made_ahead_on_another_thread():
    made = []

    def slow():
        for i in range(5):
            made.append((i, threading.current_thread().name))
            yield i

    it = prefetch(slow(), 2)
    assert next(it) == 0
    deadline = time.time() + 5
    while len(made) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert len(made) == 3  # the one handed out and two ahead, no more
    assert {name for _, name in made} == {"batch-prefetch"}
    assert list(it) == [1, 2, 3, 4]


def test_an_error_is_raised_at_its_batch():
    def failing():
        yield 1
        yield 2
        raise ValueError("row group 3 of train.parquet is damaged")

    it = prefetch(failing(), 2)
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(ValueError, match="row group 3"):
        next(it)
    assert _threads() == 0


def test_stopping_early_stops_the_producer():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = prefetch(endless(), 2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert _threads() == 0
    n = len(produced)
    time.sleep(0.05)
    assert len(produced) == n <= 3 + 2 + 1
