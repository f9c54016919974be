"""Deliver each consumed message to its streams without four asyncio tasks.

Faust's consumer hands every message to the conductor through ``Service.wait_first``:

    await self.wait_first(callback(message), self.suspend_flow.wait())

so that a rebalance (``suspend_flow``) interrupts a delivery that is stuck on a full stream
buffer. ``wait_first`` wraps the delivery, the flow event and the service's stopped and crashed
events in four tasks, waits for the first, and cancels the other three: for every message.
That is about half of a bare Faust agent's CPU per event (measured with
``benchmarks/stream_roundtrip.py``: 88–101 µs per event with it, 32–53 µs without).

Almost every delivery finishes without ever waiting: the conductor's flow-control lock is free,
the producer buffer is below its limit and the stream's queue has room. :func:`deliver_directly`
runs the delivery coroutine in place up to its first suspension. If it finishes there, that was
the whole delivery, and no task was made; the loop is then given one turn (``sleep(0)``), as
the tasks gave it, so the streams take the message before the next one comes (without that
turn, or with one turn every 8 messages, a bare agent took in 4,500–5,700 events/s instead of
about 20,000, its loop idle most of the time). If the delivery suspends, its remaining steps go
to Faust's ``wait_first`` unchanged, so a rebalance still interrupts it. While the flow is
suspended, or the consumer stops or crashes, every message takes Faust's own path.

An optimization of Faust's internals (``Consumer._drain_messages`` calls ``self.wait_first``
on each message): installed on the consumer instance of an app by
:func:`install_direct_delivery`, nowhere else; ``STREAMREC_DIRECT_DELIVERY=false`` turns it off.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import faust
from mode.services import WaitResults
from mode.utils.locks import Event as ModeEvent

log = logging.getLogger(__name__)

#: the code of ``suspend_flow.wait()``: how the drain loop's call is told from other callers
_FLOW_WAITS = frozenset({asyncio.Event.wait.__code__, ModeEvent.wait.__code__})


def install_direct_delivery(app: faust.App) -> None:
    """Make the consumer this app creates deliver messages with :func:`deliver_directly`."""
    patch_consumer(app, deliver_directly)


def patch_consumer(app: faust.App, patch: Callable[[Any], None]) -> None:
    """Apply ``patch`` to the consumer this app creates, when it creates it: a change to one
    app's consumer instance, never to Faust's classes."""
    new_consumer = app._new_consumer

    def _new_consumer():
        consumer = new_consumer()
        patch(consumer)
        return consumer

    app._new_consumer = _new_consumer


def deliver_directly(consumer: Any) -> None:
    """Replace the consumer's ``wait_first`` for the drain loop's per-message call only."""
    stock = consumer.wait_first
    flow_suspended = consumer.suspend_flow.is_set
    stopped = consumer._stopped.is_set
    crashed = consumer._crashed.is_set

    async def wait_first(*coros, timeout=None) -> WaitResults:
        if (len(coros) != 2 or timeout is not None or not inspect.iscoroutine(coros[0])
                or getattr(coros[1], "cr_code", None) not in _FLOW_WAITS
                or flow_suspended() or stopped() or crashed()):
            return await stock(*coros, timeout=timeout)
        delivery, flow_wait = coros
        try:
            waiting_on = delivery.send(None)
        except StopIteration as finished:
            flow_wait.close()
            await asyncio.sleep(0)  # the streams' turn, as the tasks gave it
            return WaitResults([delivery], [finished.value], False)
        except BaseException:
            flow_wait.close()
            raise
        return await stock(_finish(delivery, waiting_on), flow_wait)

    consumer.wait_first = wait_first
    log.info("direct delivery of consumed messages installed")


async def _finish(coro, waiting_on):
    """Drive a coroutine that was started by hand and suspended on ``waiting_on`` (a future,
    or None for a bare yield) to its end, as the task running it would have: resumed when
    the future is done, and what the wait raised (the future's error, or this task's
    cancellation, which also cancels that future) raised inside the coroutine."""
    while True:
        try:
            if waiting_on is None:
                await asyncio.sleep(0)
            else:
                waiting_on._asyncio_future_blocking = False  # as a task does before waiting
                await waiting_on
        except BaseException as error:  # noqa: BLE001 - raised where the coroutine waited
            resume = functools.partial(coro.throw, error)
        else:
            resume = functools.partial(coro.send, None)
        try:
            waiting_on = resume()
        except StopIteration as finished:
            return finished.value
