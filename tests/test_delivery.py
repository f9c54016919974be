"""Direct delivery: the drain loop's per-message ``wait_first`` gives what Faust's gives (the
same result, the same error, the same interruption by a suspended flow), without making tasks
when the delivery never waits. Run on a real mode Service, the class Faust's consumer is; the
real consumer is covered by tests/test_broker_integration.py, whose workers deliver this way."""

from __future__ import annotations

import asyncio

import pytest
from mode import Service

from stream_app.delivery import deliver_directly


class Host(Service):
    """What the drain loop needs of Faust's consumer: ``wait_first`` and ``suspend_flow``."""

    def __init__(self) -> None:
        super().__init__()
        self.suspend_flow = asyncio.Event()


def run(scenario, direct: bool):
    """``scenario(host, trace)`` on a fresh loop; returns the trace and the tasks made."""
    async def main():
        host = Host()
        if direct:
            deliver_directly(host)
        made = []
        loop = asyncio.get_running_loop()

        def factory(loop, coro, **kwargs):
            made.append(getattr(coro, "__qualname__", repr(coro)))
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(factory)
        trace: list = []
        try:
            await scenario(host, trace)
        finally:
            loop.set_task_factory(None)
        return trace, made

    return asyncio.run(main())


async def drain_once(host, delivery):
    """The drain loop's call, as ``Consumer._drain_messages`` makes it."""
    return await host.wait_first(delivery, host.suspend_flow.wait())


def both(scenario):
    stock, stock_tasks = run(scenario, direct=False)
    direct, direct_tasks = run(scenario, direct=True)
    return stock, direct, stock_tasks, direct_tasks


def test_a_delivery_that_never_waits_runs_in_place_without_tasks():
    async def scenario(host, trace):
        async def deliver():
            trace.append("delivered")
            return 7

        results = await drain_once(host, deliver())
        trace.append(("results", list(results.results), results.stopped))

    stock, direct, stock_tasks, direct_tasks = both(scenario)
    assert direct == stock == ["delivered", ("results", [7], False)]
    assert len(stock_tasks) >= 4  # Faust's path: delivery, flow, stopped, crashed
    assert direct_tasks == []


def test_the_streams_get_a_turn_after_each_direct_delivery():
    async def scenario(host, trace):
        queue: asyncio.Queue = asyncio.Queue()

        async def stream():
            while True:
                trace.append(("took", await queue.get()))

        reader = asyncio.ensure_future(stream())
        await asyncio.sleep(0)
        for n in range(3):
            async def deliver(n=n):
                queue.put_nowait(n)
            await drain_once(host, deliver())
            trace.append(("delivered", n))
        reader.cancel()

    stock, direct, _, _ = both(scenario)
    assert direct == stock
    assert direct == [("took", 0), ("delivered", 0), ("took", 1), ("delivered", 1),
                      ("took", 2), ("delivered", 2)]


def test_a_delivery_that_waits_is_finished_with_its_result():
    async def scenario(host, trace):
        room = asyncio.get_running_loop().create_future()

        async def deliver():
            trace.append("waiting for room")
            await asyncio.sleep(0)  # a bare yield
            trace.append(("room", await room))
            await asyncio.sleep(0)
            return "put"

        asyncio.get_running_loop().call_later(0.01, room.set_result, 3)
        results = await drain_once(host, deliver())
        trace.append(("results", list(results.results)))

    stock, direct, _, _ = both(scenario)
    assert direct == stock == ["waiting for room", ("room", 3), ("results", ["put"])]


def test_a_suspended_flow_interrupts_a_waiting_delivery_as_faust_does():
    async def scenario(host, trace):
        never = asyncio.get_running_loop().create_future()

        async def deliver():
            try:
                await never
            except asyncio.CancelledError:
                trace.append("delivery cancelled")
                raise
            trace.append("delivered")

        asyncio.get_running_loop().call_later(0.01, host.suspend_flow.set)
        results = await drain_once(host, deliver())
        await asyncio.sleep(0.01)  # the cancellation runs
        trace.append(("flow won", results.results == [True], never.cancelled()))

    stock, direct, _, _ = both(scenario)
    assert direct == stock == ["delivery cancelled", ("flow won", True, True)]


def test_a_delivery_yielding_bare_is_interrupted_where_it_yields():
    async def scenario(host, trace):
        async def deliver():
            try:
                for _ in range(100_000):
                    await asyncio.sleep(0)
            except asyncio.CancelledError:
                trace.append("delivery cancelled")
                raise
            trace.append("ran to the end")

        asyncio.get_running_loop().call_soon(host.suspend_flow.set)
        await drain_once(host, deliver())
        await asyncio.sleep(0.01)

    stock, direct, _, _ = both(scenario)
    assert direct == stock == ["delivery cancelled"]


def test_while_the_flow_is_suspended_faust_path_is_taken():
    async def scenario(host, trace):
        host.suspend_flow.set()

        async def deliver():
            trace.append("delivered")

        results = await drain_once(host, deliver())
        await asyncio.sleep(0.01)
        trace.append(len(results.results))

    stock, direct, _, direct_tasks = both(scenario)
    assert direct == stock
    assert direct_tasks  # not taken in place


@pytest.mark.parametrize("waits", [False, True])
def test_a_failing_delivery_raises_what_faust_raises(waits):
    async def scenario(host, trace):
        async def deliver():
            if waits:
                await asyncio.sleep(0.001)
            raise ValueError("bad message")

        with pytest.raises(ValueError, match="bad message"):
            await drain_once(host, deliver())
        trace.append("raised")

    stock, direct, _, _ = both(scenario)
    assert direct == stock == ["raised"]


def test_a_failed_future_is_raised_inside_the_delivery():
    async def scenario(host, trace):
        broken = asyncio.get_running_loop().create_future()

        async def deliver():
            try:
                await broken
            except KeyError as error:
                trace.append(("caught", str(error)))
            return "recovered"

        asyncio.get_running_loop().call_later(0.005, broken.set_exception, KeyError("gone"))
        results = await drain_once(host, deliver())
        trace.append(list(results.results))

    stock, direct, _, _ = both(scenario)
    assert direct == stock == [("caught", "'gone'"), ["recovered"]]


def test_other_calls_of_wait_first_are_faust_own():
    async def scenario(host, trace):
        event = asyncio.Event()
        results = await host.wait_first(event, timeout=0.01)  # times out: nothing won
        trace.append(list(results.results))

    stock, direct, _, direct_tasks = both(scenario)
    assert direct == stock == [[]]
    assert direct_tasks
