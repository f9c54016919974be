"""A streamrec worker whose producer has its first deliveries to some topics refused, as by a
broker that refuses a record: the records are not sent and their deliveries fail; or one that
dies, as if killed, when it is about to send a record. For the broker tests of
``stream_app/confirmed_acks.py`` and of what a crash loses; nothing else in the worker changes.

    REFUSE_DELIVERIES="-changelog:1,train-:6s" python tests/refusing_worker.py
    DIE_AT_SEND="train-:3" python tests/refusing_worker.py

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


if __name__ == "__main__":  # not in the learner process, which imports this file to start
    refuse(os.environ.get("REFUSE_DELIVERIES", ""))
    if "DIE_AT_SEND" in os.environ:
        die_at(os.environ["DIE_AT_SEND"])
    sys.argv = ["stream_app", "worker"]
    runpy.run_module("stream_app", run_name="__main__")
