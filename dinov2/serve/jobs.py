"""The queue in front of the one model: at most ``concurrency`` inferences at a time, in worker threads.

A request waits on an asyncio semaphore (the event loop keeps accepting and answering other
requests meanwhile), then its job runs in a thread pool of ``concurrency`` threads. The request's
timeout covers the wait and the job. A thread cannot be stopped: when the timeout strikes while a
job runs, the client gets its 504 at once, but the job's slot is only given back when the thread
ends, so the server never runs more than ``concurrency`` jobs.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from .errors import ServiceError

T = TypeVar("T")


class InferenceQueue:
    """Runs blocking jobs with bounded concurrency, queue length and time.

    Args:
        concurrency: jobs running at once (worker threads).
        max_queue: requests allowed to wait for a slot; one more is answered 503 at once.
        timeout_s: seconds a request may wait plus run before it is answered 504.
    """

    def __init__(self, concurrency: int, max_queue: int, timeout_s: float):
        self.concurrency, self.max_queue, self.timeout_s = concurrency, max_queue, timeout_s
        self.running = self.waiting = 0
        self._slots = asyncio.Semaphore(concurrency)
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="dinov2-serve")

    def state(self) -> dict[str, int]:
        """``{"running", "queued", "concurrency"}`` now (for ``/healthz``)."""
        return {"running": self.running, "queued": self.waiting, "concurrency": self.concurrency}

    async def run(self, job: Callable[[], T], cleanup: Callable[[], None] = lambda: None) -> T:
        """Run ``job()`` in a worker thread once a slot is free; ``cleanup()`` runs after it (or instead of it).

        Raises:
            ServiceError: 503 when the queue is full, 504 past ``timeout_s``; what ``job`` raised otherwise.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            await self._acquire()
        except BaseException:
            cleanup()
            raise
        self.running += 1
        future = loop.run_in_executor(self._executor, _call, job, cleanup)
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise self._timeout("the inference took longer") from None

    async def _acquire(self) -> None:
        """Wait for a slot (503 when too many wait already, 504 after ``timeout_s``)."""
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise ServiceError(503, "server busy", f"{self.running} request(s) run and {self.waiting} wait "
                               f"(--max-queue {self.max_queue}); retry later", {"Retry-After": "2"})
        self.waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
        except TimeoutError:
            raise self._timeout("the request waited in the queue longer") from None
        finally:
            self.waiting -= 1

    def _timeout(self, what: str) -> ServiceError:
        return ServiceError(504, "timeout", f"{what} than this server's limit of {self.timeout_s:g} s (--timeout-s); "
                            "send a smaller volume, retry when the server is less busy, or raise the limit")

    def _release(self, future: asyncio.Future) -> None:
        """The job ended (maybe after its request timed out): free its slot."""
        self.running -= 1
        self._slots.release()
        if not future.cancelled():
            future.exception()  # read here too: after a timeout nobody else reads it (asyncio would log it)

    def shutdown(self) -> None:
        """Let running jobs finish, start no new ones."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _call(job: Callable[[], T], cleanup: Callable[[], None]) -> T:
    try:
        return job()
    finally:
        cleanup()
