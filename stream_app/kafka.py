"""Kafka client configuration from settings (TLS/SASL pass through) and topic administration."""

from __future__ import annotations

import functools
import logging
import ssl
import time
from collections.abc import Mapping
from typing import NamedTuple

from aiokafka.partitioner import murmur2

from .compat import exact_end_offsets
from .settings import Settings

log = logging.getLogger(__name__)


def key_partition(key: bytes, partitions: int) -> int:
    """The partition that Kafka's default partitioner puts a message keyed ``key`` on, among
    ``partitions``: murmur2 of the key, as the Java client, kafka-python, aiokafka and Faust
    choose it. librdkafka's clients (confluent-kafka, and many Go, .NET and Node clients) hash
    with CRC32 unless configured with ``partitioner=murmur2_random``, so the same user could
    land elsewhere; the worker moves such messages here (``stream_app/app.py``)."""
    return _positive_murmur2(key) % partitions


@functools.lru_cache(maxsize=1 << 16)
def _positive_murmur2(key: bytes) -> int:
    """Kept for the most recent keys: the pure-Python hash is most of what checking an
    event's partition costs, and active users come back (1 % of a worker's event loop)."""
    return murmur2(key) & 0x7FFFFFFF


async def topic_partitions(consumer, topic: str) -> frozenset[int]:
    """The partitions of ``topic`` as the cluster reports them now (none: no such topic), on
    an aiokafka consumer.

    Not ``await consumer.topics()``, then ``consumer.partitions_for_topic``: ``topics()``
    fills a metadata copy of its own, and the consumer's metadata holds what its bootstrap
    asked for, an empty list of topics, which Apache Kafka answers with no topics (Metadata
    v1 and later; the embedded broker answers with all of them), so on Kafka the partitions
    came back as None. Nor asking for the topic by name: a broker that creates topics on
    demand would create a missing one with its default partitions. This asks for every topic
    (a null list), as ``topics()`` does, and reads that answer."""
    cluster = await consumer._client.fetch_all_metadata()
    return frozenset(cluster.partitions_for_topic(topic) or ())


async def assign_whole_topic(consumer, topic: str, next_offsets: Mapping[int, int],
                             settings: Settings, *, ends: bool = True) -> dict:
    """Assign an aiokafka ``consumer`` every partition of ``topic``, each from
    ``next_offsets[partition]`` (where the last reader of this process left it) or from its
    beginning; returns each partition's end offset now (none without ``ends``: with the
    embedded broker's fixes, asking takes a consumer of its own, up to seconds, which a
    reader that has caught up once does not need). For the readers that follow a whole
    topic outside any group (the item rows, the withdrawn items). Raises LookupError while
    the cluster reports no partition of the topic, so that the reader's retry starts again
    instead of taking an empty topic for one read to its end."""
    from aiokafka import TopicPartition

    partitions = await topic_partitions(consumer, topic)
    if not partitions:
        raise LookupError(f"the topic {topic} has no partitions on the cluster")
    assigned = [TopicPartition(topic, partition) for partition in sorted(partitions)]
    consumer.assign(assigned)
    found = {}
    if ends:
        found = (await exact_end_offsets(consumer, assigned) if settings.compat_fixes
                 else await consumer.end_offsets(assigned))
    for tp in assigned:
        if tp.partition in next_offsets:
            consumer.seek(tp, next_offsets[tp.partition])
        else:
            await consumer.seek_to_beginning(tp)
    return found


def client_config(settings: Settings) -> dict:
    """Keyword arguments shared by kafka-python producers, consumers and admin clients."""
    config: dict = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol.startswith("SASL"):
        config["sasl_mechanism"] = settings.sasl_mechanism
        config["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            config["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(settings, name) is not None:
            config[name] = str(getattr(settings, name))
    return config


def aiokafka_config(settings: Settings) -> dict:
    """The same settings as :func:`client_config`, spelled for aiokafka clients (TLS as an
    ``ssl_context``)."""
    config = {key: value for key, value in client_config(settings).items()
              if not key.startswith("ssl_")}
    context = ssl_context(settings)
    if context is not None:
        config["ssl_context"] = context
    return config


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.security_protocol.endswith("SSL"):
        return None
    context = ssl.create_default_context(
        cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None)
    if settings.ssl_certfile:
        context.load_cert_chain(str(settings.ssl_certfile),
                                str(settings.ssl_keyfile) if settings.ssl_keyfile else None)
    return context


def faust_credentials(settings: Settings):
    """The Faust ``broker_credentials`` value for the configured security protocol."""
    import faust

    context = ssl_context(settings)
    if settings.security_protocol.startswith("SASL"):
        password = settings.sasl_password.get_secret_value() if settings.sasl_password else None
        return faust.SASLCredentials(username=settings.sasl_username, password=password,
                                     mechanism=settings.sasl_mechanism, ssl_context=context)
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def service_topics(settings: Settings) -> list[str]:
    shared = [settings.items_topic] if settings.share_items else []
    return [settings.topic_events, settings.topic_dead_letters, settings.topic_requests,
            settings.topic_responses, settings.train_topic, settings.withdrawn_topic, *shared]


class Topics(NamedTuple):
    """What :func:`ensure_topics` found: the broker's id of each topic where it gives one
    (Kafka 2.8 and later make one at each topic's creation), and the topics it made."""

    ids: dict[str, str]
    created: list[str]


#: the id a broker gives where it has none
_NO_ID = "00000000-0000-0000-0000-000000000000"


def ensure_topics(settings: Settings, names: list[str] | None = None,
                  timeout_s: float = 30.0) -> Topics:
    """Create the topics (all with ``settings.partitions`` but the withdrawn items', with one)
    unless they exist; retries until the broker answers or ``timeout_s`` passes. Returns
    their ids and those it created."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    names = names or service_topics(settings)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(client_id=f"{settings.app_id}-admin", **client_config(settings))
            break
        except KafkaError as error:
            if time.monotonic() > deadline:
                raise
            log.debug("broker not ready yet: %s", error)
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        missing = [name for name in names if name not in existing]
        for name in missing:
            # the item rows and the withdrawals keep each item's last record only (a
            # reader starts from the beginning)
            compacted = name in (settings.items_topic, settings.withdrawn_topic)
            configs = {"cleanup.policy": "compact"} if compacted else {}
            # the withdrawals in one partition: every worker reads all of them, and an
            # item's records stay in order whatever partitioner their producer hashes with
            partitions = 1 if name == settings.withdrawn_topic else settings.partitions
            try:
                admin.create_topics([NewTopic(name, partitions,
                                              settings.replication_factor,
                                              topic_configs=configs)])
            except TopicAlreadyExistsError:
                pass
        if missing:
            log.info("created topics %s with %d partitions", missing, settings.partitions)
        return Topics(_topic_ids(admin, names), missing)
    finally:
        admin.close()


def _topic_ids(admin, names: list[str]) -> dict[str, str]:
    """The broker's id of each topic of ``names`` it describes with one; none where it cannot
    say (logged: a start goes on without them)."""
    from kafka.errors import KafkaError

    try:
        described = admin.describe_topics(names)
    except KafkaError as error:
        log.warning("could not read the ids of topics %s: %s", names, error)
        return {}
    ids = {topic["name"]: str(topic.get("topic_id") or _NO_ID) for topic in described
           if topic.get("error_code") == 0}
    return {name: topic_id for name, topic_id in ids.items() if topic_id != _NO_ID}
