"""The background writer keeps submission order and never swallows a failed write."""

from __future__ import annotations

import time

import pytest

from recsys.data.background import BackgroundWriter


def test_writes_run_in_order_and_all_finish():
    done: list[int] = []
    with BackgroundWriter(max_pending=2) as writer:
        for k in range(6):
            writer.submit(lambda k=k: (time.sleep(0.01 * (k % 2)), done.append(k)))
    assert done == list(range(6))


def test_a_failed_write_is_raised():
    def boom() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter() as writer:
            writer.submit(boom)
            writer.submit(lambda: None)


def test_an_error_in_the_caller_wins():
    with pytest.raises(KeyError):
        with BackgroundWriter() as writer:
            writer.submit(lambda: None)
            raise KeyError("caller")
