"""The async bridge: nats-py is asyncio; the bus calls the engine from its own thread.

A :class:`Bridge` runs an asyncio loop in a daemon thread; :meth:`Bridge.run`
hands it a coroutine and waits for the result, with a deadline, turning a
timeout or a nats-py error into a StoreError (nothing else of the engine
waits on NATS any other way).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from ..engine import StoreError
from .client import NatsError

T = TypeVar("T")


class Bridge:
    """An asyncio loop in a thread of its own (see the module docstring)."""

    def __init__(self, what: str, deadline: float) -> None:
        self.what = what  # names the store in errors: "NATS stream EDA"
        self.deadline = deadline  # the default timeout of run()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="nats")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """The result of *coro*, run on the loop; StoreError after *timeout* (default:
        the deadline) or when nats-py fails (not reachable, refused, timed out)."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout if timeout is not None else self.deadline)
        except TimeoutError:
            fut.cancel()
            raise StoreError(f"{self.what}: no answer in time") from None
        except NatsError as exc:
            raise StoreError(f"{self.what}: {exc or type(exc).__name__}") from None

    def call_soon(self, func: Callable[[], None]) -> None:
        """Run *func* on the loop's thread, without waiting."""
        self.loop.call_soon_threadsafe(func)

    def stop(self) -> None:
        """Cancel every task (the client's reader, flusher, pingers, reconnects), stop
        the loop and its thread."""

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
