"""Partitions of a topic as an aiokafka consumer learns them, on a broker that answers
Metadata as Apache Kafka does: an empty topic list (what aiokafka's bootstrap sends) gets no
topics, so a consumer that only asked ``topics()`` does not know any topic's partitions."""

from __future__ import annotations

import asyncio
import struct
from io import BytesIO

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.protocol.metadata import MetadataResponse_v5
from aiokafka.protocol.types import String

from stream_app.kafka import topic_partitions

API_VERSIONS, METADATA = 18, 3


class MetadataBroker:
    """A broker that answers only ApiVersions and Metadata, by Apache Kafka's rule for a
    Metadata request's topic list: in version 0 an empty list asks for every topic; from
    version 1 on, null asks for every topic and an empty list for none (``lenient``: every
    topic at any version, as the embedded broker answers). Enough for a client to start and
    ask for partitions; ``requests`` records each Metadata request (version, count, names)."""

    def __init__(self, topics: dict[str, int], lenient: bool = False) -> None:
        self.topics = topics  # name -> partitions
        self.lenient = lenient  # an empty list asks for every topic at any version
        self.requests: list[tuple[int, int, list[str]]] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> MetadataBroker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader, writer) -> None:
        try:
            while True:
                (size,) = struct.unpack(">i", await reader.readexactly(4))
                data = await reader.readexactly(size)
                api, version, correlation, client_id_size = struct.unpack(">hhih", data[:10])
                body = BytesIO(data[10 + max(client_id_size, 0):])
                answer = (self._api_versions(version) if api == API_VERSIONS
                          else self._metadata(version, body))
                response = struct.pack(">i", correlation) + answer
                writer.write(struct.pack(">i", len(response)) + response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _api_versions(version: int) -> bytes:
        apis = [(METADATA, 0, 5), (API_VERSIONS, 0, 2)]
        answer = struct.pack(">hi", 0, len(apis)) + b"".join(struct.pack(">hhh", *a)
                                                            for a in apis)
        return answer + (struct.pack(">i", 0) if version >= 1 else b"")

    def _metadata(self, version: int, body: BytesIO) -> bytes:
        (count,) = struct.unpack(">i", body.read(4))
        names = [String("utf-8").decode(body) for _ in range(max(count, 0))]
        self.requests.append((version, count, names))
        every = count == -1 or (count == 0 and (version == 0 or self.lenient))
        wanted = list(self.topics) if every else [name for name in names if name in self.topics]
        topics = [(0, name, False, [(0, p, 0, [0], [0], []) for p in range(self.topics[name])])
                  for name in wanted]
        return MetadataResponse_v5(throttle_time_ms=0, brokers=[(0, "127.0.0.1", self.port, None)],
                                   cluster_id="c", controller_id=0, topics=topics).encode()


async def partitions_seen(lenient: bool) -> tuple[frozenset, frozenset, object, list]:
    async with MetadataBroker({"rows": 4, "events": 2}, lenient=lenient) as broker:
        consumer = AIOKafkaConsumer(bootstrap_servers=f"127.0.0.1:{broker.port}",
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer.topics()
            before = consumer.partitions_for_topic("rows")  # what the readers used to read
            rows = await topic_partitions(consumer, "rows")
            missing = await topic_partitions(consumer, "no-such-topic")
        finally:
            await consumer.stop()
    return rows, missing, before, broker.requests


@pytest.mark.parametrize("lenient", [False, True], ids=["kafka", "embedded"])
def test_topic_partitions_asks_the_broker_for_the_topic_by_name(lenient):
    rows, missing, before, requests = asyncio.run(asyncio.wait_for(partitions_seen(lenient),
                                                                   30))
    assert rows == frozenset(range(4)) and missing == frozenset()
    # no request names a topic: a broker that creates topics on demand would create it
    assert all(names == [] for _, _, names in requests)
    if not lenient:
        assert before is None  # the broker's rule the old lookup missed
