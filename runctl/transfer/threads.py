"""Thread pools whose threads never hold up the end of the process.

``concurrent.futures.ThreadPoolExecutor`` joins its threads when the interpreter exits. A
thread blocked in an S3 request to an endpoint that accepts and never answers stays blocked
for botocore's read timeout on each of its attempts (60 s, 5 times): after a training error
or Ctrl-C, the process would sit there for minutes after it was done. These threads are
daemons, and a pool can be let go of without waiting for a request under way.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class DaemonPool:
    """A small executor (``submit``, ``map``, ``shutdown``) on daemon threads.

    It is also what s3transfer asks for as its ``executor_cls``. ``shutdown(wait=False)``
    returns at once: queued work is cancelled, and a thread in the middle of a request ends
    when the request does, or with the process.

    Example:
        >>> with DaemonPool(2) as pool:
        ...     list(pool.map(len, ["a", "bb"]))
        [1, 2]
    """

    def __init__(self, max_workers: int | None = None, name: str = "runctl-io") -> None:
        self._max = max_workers or 8
        self._name = name
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple, dict] | None]
        self._work = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> DaemonPool:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.shutdown(wait=exc_type is None)

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        """Run ``fn(*args, **kwargs)`` on one of the pool's threads."""
        future: Future[R] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._work.put((future, fn, args, kwargs))
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        return future

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``fn`` of each item, in order (all submitted before the first result is awaited)."""
        futures = [self.submit(fn, item) for item in items]
        return (future.result() for future in futures)

    def shutdown(self, wait: bool = True) -> None:
        """No more work; wait for what was submitted, or (``wait=False``) drop what has not begun."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if not wait:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._work.put(None)
        if wait:
            for thread in threads:
                thread.join()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the threads to end (after ``shutdown``); True if they did."""
        import time

        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller via the future
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn, args, kwargs
            with self._lock:
                self._idle += 1
