"""AcksAfterDelivery: an event batch is acknowledged once every record it wrote is delivered,
a failed record is sent again until it is, and one that must not be sent again is given up
and counted. The changelog's own resend (the values stored now) is tested in
tests/test_changelog.py; the whole path on a real broker in tests/test_broker_integration.py
(a stopped worker's group is committed to the end of every events partition)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from stream_app.confirmed_acks import AcksAfterDelivery, Sent, failed, sent, until_delivered
from stream_app.metrics import Metrics


class Deliveries:
    """Sends whose deliveries the test ends by hand; counts the sends."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future] = []

    async def send(self) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future


def acks(**kwargs) -> tuple[AcksAfterDelivery, list, Metrics]:
    acked: list = []
    metrics = Metrics(CollectorRegistry())
    return AcksAfterDelivery(acked.append, metrics, **kwargs), acked, metrics


def resends(metrics: Metrics, record: str, outcome: str) -> float:
    return metrics.registry.get_sample_value("streamrec_record_resends_total",
                                             {"record": record, "outcome": outcome}) or 0.0


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_batch_whose_records_are_delivered_is_acknowledged_at_once():
    async def run():
        confirmed, acked, _ = acks()
        done = asyncio.get_running_loop().create_future()
        done.set_result("metadata")
        confirmed.hold(["m1"], [Sent("train", done, None)])
        confirmed.hold(["m2"], [])  # wrote nothing (all duplicates)
        assert acked == [["m1"], ["m2"]] and confirmed.waiting == 0

    asyncio.run(run())


def test_a_batch_is_acknowledged_once_its_last_record_is_delivered_and_in_order():
    """Batches are acknowledged in the order they were held: a later batch whose records
    arrive first waits for the earlier one (Faust could commit over a gap otherwise)."""
    async def run():
        confirmed, acked, _ = acks()
        deliveries = Deliveries()
        first = [await sent("changelog", deliveries.send), await sent("train", deliveries.send)]
        confirmed.hold(["a"], first)
        confirmed.hold(["b"], [await sent("train", deliveries.send)])
        confirmed.hold(["c"], [])  # wrote nothing, after two held batches
        assert acked == [] and confirmed.waiting == 3
        deliveries.futures[2].set_result("ok")  # the second batch's only record
        await settle()
        assert acked == [] and confirmed.waiting == 3
        deliveries.futures[0].set_result("ok")
        await settle()
        assert acked == []
        deliveries.futures[1].set_result("ok")
        await settle()
        assert acked == [["a"], ["b"], ["c"]] and confirmed.waiting == 0
        assert await confirmed.settled(0.01)
        confirmed.hold(["d"], [])
        assert acked[-1] == ["d"]

    asyncio.run(run())


def test_a_failed_delivery_is_sent_again_and_holds_the_batch_until_delivered():
    async def run():
        confirmed, acked, metrics = acks(first_pause_s=0.01)
        deliveries = Deliveries()
        record = await sent("dead_letter", deliveries.send)
        confirmed.hold(["a"], [record])
        deliveries.futures[0].set_exception(TimeoutError("no broker"))
        await asyncio.sleep(0.05)
        assert len(deliveries.futures) == 2  # sent again after the pause
        assert acked == [] and confirmed.waiting == 1
        assert not await confirmed.settled(0.01)
        deliveries.futures[1].set_exception(TimeoutError("still none"))
        await asyncio.sleep(0.05)
        assert len(deliveries.futures) == 3 and acked == []
        deliveries.futures[2].set_result("ok")
        await settle()
        assert acked == [["a"]] and confirmed.waiting == 0
        assert resends(metrics, "dead_letter", "retried") == 2

    asyncio.run(run())


def test_the_pause_between_resends_doubles_up_to_its_limit():
    async def run():
        confirmed, acked, _ = acks(first_pause_s=0.01, max_pause_s=0.03)
        times: list[float] = []
        loop = asyncio.get_running_loop()

        async def refused() -> asyncio.Future:
            times.append(loop.time())
            return failed(ConnectionError("refused"))

        confirmed.hold(["a"], [await sent("train", refused)])
        await asyncio.sleep(0.25)
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        assert len(gaps) >= 3 and acked == []
        # lower bounds only: a loaded machine stretches every pause
        assert gaps[0] >= 0.009 and gaps[1] >= 0.019 and all(gap >= 0.029 for gap in gaps[2:])
        assert len(gaps) < 12  # 0.25 s holds at most ~8 pauses of at least 0.03 s

    asyncio.run(run())


def test_a_send_that_raises_is_a_failed_delivery_sent_again():
    async def run():
        confirmed, acked, metrics = acks(first_pause_s=0.01)
        calls = []

        async def send() -> asyncio.Future:
            calls.append(1)
            if len(calls) < 3:
                raise BufferError("the producer's buffer is full")
            done = asyncio.get_running_loop().create_future()
            done.set_result("ok")
            return done

        record = await sent("reroute", send)
        assert record.delivery.done() and isinstance(record.delivery.exception(), BufferError)
        confirmed.hold(["a"], [record])
        await asyncio.sleep(0.1)
        assert len(calls) == 3 and acked == [["a"]]
        assert resends(metrics, "reroute", "retried") == 2

    asyncio.run(run())


def test_a_record_that_must_not_be_sent_again_is_given_up_and_the_batch_let_go():
    async def run():
        confirmed, acked, metrics = acks(first_pause_s=0.01)

        async def moved_away() -> None:
            return None

        record = Sent("changelog", failed(TimeoutError("expired")), moved_away)
        confirmed.hold(["a"], [record])
        await asyncio.sleep(0.05)
        assert acked == [["a"]] and confirmed.waiting == 0
        assert resends(metrics, "changelog", "given_up") == 1
        assert resends(metrics, "changelog", "retried") == 1

    asyncio.run(run())


def test_the_gauge_counts_the_batches_held():
    async def run():
        confirmed, _, metrics = acks()
        confirmed.export(metrics)
        deliveries = Deliveries()
        for name in "abc":
            confirmed.hold([name], [await sent("train", deliveries.send)])
        gauge = metrics.registry.get_sample_value
        assert gauge("streamrec_ingest_unconfirmed_batches") == 3
        deliveries.futures[0].set_result("ok")
        await settle()
        assert gauge("streamrec_ingest_unconfirmed_batches") == 2

    asyncio.run(run())


def test_past_its_limit_of_held_bytes_there_is_no_room_until_they_are_delivered():
    """Few batches of large events fill the memory as many small ones do."""
    async def run():
        confirmed, acked, _ = acks(limit=1000, limit_bytes=100)
        deliveries = Deliveries()
        confirmed.hold(["a"], [await sent("train", deliveries.send)], size=60)
        assert confirmed.room.is_set() and confirmed.held_bytes == 60
        confirmed.hold(["b"], [await sent("train", deliveries.send)], size=40)
        assert not confirmed.room.is_set()
        deliveries.futures[0].set_result("ok")
        await settle()
        assert confirmed.room.is_set() and acked == [["a"]] and confirmed.held_bytes == 40
        deliveries.futures[1].set_result("ok")
        await settle()
        assert acked == [["a"], ["b"]] and confirmed.held_bytes == 0

    asyncio.run(run())


def test_a_record_not_to_be_sent_is_given_up_at_once_not_retried():
    """A changelog record of a passed generation was counted as retried, warned about, and
    given up only after the first pause, every later batch's acknowledgement waiting."""
    from stream_app.confirmed_acks import NotToBeSent

    async def run():
        confirmed, acked, metrics = acks()
        resent = []

        async def resend():
            resent.append(1)

        confirmed.hold(["old"], [Sent("changelog", failed(NotToBeSent("passed")), resend)])
        await settle()
        assert acked == [["old"]] and not resent
        return metrics

    metrics = asyncio.run(run())
    assert resends(metrics, "changelog", "given_up") == 1
    assert resends(metrics, "changelog", "retried") == 0


def test_a_held_batch_counts_the_records_its_resends_keep_with_its_events():
    """A batch of 29 kB of events held 89 kB of training messages (each example carries its
    user's history), and 2.9 MB at 300 events of long ids: counted by its events alone,
    1,000 held batches took gigabytes under the 256 MiB limit."""
    from types import SimpleNamespace

    from stream_app.confirmed_acks import held_size

    async def run():
        confirmed, _, _ = acks(limit=1000, limit_bytes=1000)
        deliveries = Deliveries()
        events = [SimpleNamespace(value=b"x" * 10), SimpleNamespace(value=None)]
        records = [await sent("train", deliveries.send, held_bytes=900),
                   await sent("changelog", deliveries.send)]
        assert held_size(events, records) == 910
        confirmed.hold(events, records, size=held_size(events, records))
        assert confirmed.room.is_set()
        confirmed.hold(events, [await sent("dead_letter", deliveries.send, held_bytes=90)],
                       size=100)
        assert not confirmed.room.is_set()  # 1,010 bytes held: the events alone were 20

    asyncio.run(run())


def test_past_its_limit_of_held_batches_there_is_no_room_until_one_is_delivered():
    async def run():
        confirmed, acked, _ = acks(limit=2)
        deliveries = Deliveries()
        confirmed.hold(["a"], [await sent("train", deliveries.send)])
        assert confirmed.room.is_set()
        confirmed.hold(["b"], [await sent("train", deliveries.send)])
        assert not confirmed.room.is_set()
        deliveries.futures[1].set_result("ok")  # the later batch: still two held
        await settle()
        assert not confirmed.room.is_set() and acked == []
        deliveries.futures[0].set_result("ok")
        await settle()
        assert confirmed.room.is_set() and acked == [["a"], ["b"]]

    asyncio.run(run())


def test_until_delivered_returns_once_every_record_is_delivered_sending_again():
    """What Faust's stream path awaits before it takes the next batch (and so acknowledges
    this one)."""
    async def run():
        deliveries = Deliveries()
        records = [await sent("train", deliveries.send), await sent("changelog", deliveries.send)]
        waiting = asyncio.ensure_future(until_delivered(records))
        deliveries.futures[0].set_exception(TimeoutError("refused"))
        deliveries.futures[1].set_result("ok")
        await asyncio.sleep(0.7)  # the first pause is 0.5 s
        assert not waiting.done() and len(deliveries.futures) == 3
        deliveries.futures[2].set_result("ok")
        await asyncio.wait_for(waiting, 1.0)

    asyncio.run(run())


def test_closing_stops_the_resends():
    async def run():
        confirmed, acked, _ = acks(first_pause_s=0.01)
        deliveries = Deliveries()
        confirmed.hold(["a"], [await sent("train", deliveries.send)])
        deliveries.futures[0].set_exception(TimeoutError("refused"))
        await settle()
        confirmed.close()
        confirmed.hold(["b"], [await sent("train", deliveries.send)])
        deliveries.futures[1].set_exception(TimeoutError("refused after the close"))
        await asyncio.sleep(0.05)
        assert len(deliveries.futures) == 2 and acked == [] and confirmed.waiting == 2

    asyncio.run(run())
