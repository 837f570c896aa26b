"""Run file writes on background threads, so the next chunk is computed meanwhile.

polars and pyarrow release the GIL while encoding and compressing Parquet, so on a 2-core machine writing
bucket k overlaps with sessionising/splitting bucket k+1. At most ``max_pending`` writes wait at once,
which bounds the memory held by frames not yet written. With one worker (the default) writes run in
submission order; with several, a caller that needs an order must restore it itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class BackgroundWriter:
    """Executor for writes (one thread: in order); errors surface on the next submit or on close."""

    def __init__(self, max_pending: int = 2, workers: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recsys-writer")
        self._pending: deque[Future[Any]] = deque()
        self._max_pending = max_pending

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """Queue ``fn(*args, **kwargs)``; its future holds the result once the writer is closed."""
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        future = self._pool.submit(fn, *args, **kwargs)
        self._pending.append(future)
        return future

    def close(self) -> None:
        """Wait for every write; re-raise the first failure."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: wait for the thread, keep the original error
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()
