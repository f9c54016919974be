"""A streamrec worker whose producer has its first deliveries to some topics refused, as by a
broker that refuses a record: the records are not sent and their deliveries fail; or one that
dies, as if killed, when it is about to send a record; or one whose consumer drops records
unseen before its first seek to the committed offsets. For the broker tests of
``stream_app/confirmed_acks.py`` and of what a crash or a rebalance loses; nothing else in the
worker changes.

    REFUSE_DELIVERIES="-changelog:1,train-:6s" python tests/refusing_worker.py
    DIE_AT_SEND="train-:3" python tests/refusing_worker.py
    DROP_BEFORE_SEEK="events-:20" python tests/refusing_worker.py

Each entry of the comma-separated list of ``REFUSE_DELIVERIES``: a part of a topic's name and
how many deliveries to such a topic fail, in the order they are sent, or (``6s``) for how many
seconds from the first delivery to it every delivery to it fails. ``DIE_AT_SEND``: a part of
a topic's name and which send to such a topic the process exits at (status 9), before it.
"""

from __future__ import annotations

import asyncio
import os
import runpy
import sys
import time

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError
from faust.transport.consumer import Consumer


def refuse(spec: str) -> None:
    """Patch this process's aiokafka producer to refuse the deliveries ``spec`` names."""
    left, lasting, until = {}, {}, {}
    for entry in filter(None, spec.split(",")):
        part, amount = entry.rsplit(":", 1)
        if amount.endswith("s"):
            lasting[part] = float(amount[:-1])
        else:
            left[part] = int(amount)

    def refused(topic: str) -> bool:
        for part, seconds in lasting.items():
            if part in topic:
                if until.setdefault(part, time.monotonic() + seconds) > time.monotonic():
                    print(f"refusing a delivery to {topic}", file=sys.stderr, flush=True)
                    return True
        for part, count in left.items():
            if part in topic and count > 0:
                left[part] = count - 1
                print(f"refusing a delivery to {topic}", file=sys.stderr, flush=True)
                return True
        return False

    def failed() -> asyncio.Future:
        delivery = asyncio.get_running_loop().create_future()
        delivery.set_exception(KafkaTimeoutError("refused by the test"))
        return delivery

    intercept_sends(lambda topic: failed() if refused(topic) else None)


def die_at(spec: str) -> None:
    """Patch this process's aiokafka producer to exit at once at the send ``spec`` names:
    nothing is flushed, as when the process is killed."""
    part, count = spec.rsplit(":", 1)
    left = int(count)

    def dying(topic: str) -> None:
        nonlocal left
        if part in topic:
            left -= 1
            if left == 0:
                print(f"dying at a send to {topic}", file=sys.stderr, flush=True)
                os._exit(9)

    intercept_sends(dying)


def intercept_sends(intercept) -> None:
    """Patch this process's aiokafka producer: ``intercept(topic)`` runs before each send (a
    record or a record batch); a delivery it returns stands for the send's, unsent."""
    send, send_batch = AIOKafkaProducer.send, AIOKafkaProducer.send_batch

    async def send_intercepted(self, topic, *args, **kwargs):
        delivery = intercept(topic)
        return delivery if delivery is not None else await send(self, topic, *args, **kwargs)

    async def send_batch_intercepted(self, batch, topic, *, partition):
        delivery = intercept(topic)
        return delivery if delivery is not None else await send_batch(
            self, batch, topic, partition=partition)

    AIOKafkaProducer.send = send_intercepted
    AIOKafkaProducer.send_batch = send_batch_intercepted


def drop_before_seek(spec: str) -> None:
    """Patch Faust's consumer in this process: before its first seek to the committed offsets
    that finds partitions of the topics ``spec`` names without a committed offset, each of
    them moves that many records on, as if a poll had taken them and Faust dropped them."""
    part, count = spec.rsplit(":", 1)
    perform_seek = Consumer.perform_seek
    dropped = False

    async def perform_seek_after_a_drop(self) -> None:
        nonlocal dropped
        if not dropped:
            kafka_consumer = self._thread._ensure_consumer()

            async def drop() -> list:
                moved = []
                for tp in kafka_consumer.assignment():
                    if part in tp.topic and await kafka_consumer.committed(tp) is None:
                        kafka_consumer.seek(tp, await kafka_consumer.position(tp) + int(count))
                        moved.append(tp)
                return moved

            moved = await self._thread.call_thread(drop)
            if moved:
                dropped = True
                print(f"dropped {count} records of {moved}", file=sys.stderr, flush=True)
        await perform_seek(self)

    Consumer.perform_seek = perform_seek_after_a_drop


if __name__ == "__main__":  # not in the learner process, which imports this file to start
    refuse(os.environ.get("REFUSE_DELIVERIES", ""))
    if "DIE_AT_SEND" in os.environ:
        die_at(os.environ["DIE_AT_SEND"])
    if "DROP_BEFORE_SEEK" in os.environ:
        drop_before_seek(os.environ["DROP_BEFORE_SEEK"])
    sys.argv = ["stream_app", "worker"]
    runpy.run_module("stream_app", run_name="__main__")
