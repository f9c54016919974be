"""TLS/SASL settings pass through to every client."""

from __future__ import annotations

from types import SimpleNamespace

import faust
import pytest

from kafka.partitioner import DefaultPartitioner

from stream_app.kafka import aiokafka_config, client_config, faust_credentials, key_partition
from stream_app.settings import Settings


def test_plaintext_by_default():
    settings = Settings(broker="k:9092")
    assert client_config(settings) == {"bootstrap_servers": ["k:9092"],
                                       "security_protocol": "PLAINTEXT"}
    assert faust_credentials(settings) is None


def test_sasl_ssl_passes_through(tmp_path):
    settings = Settings(broker="k:9093", security_protocol="SASL_SSL",
                        sasl_mechanism="SCRAM-SHA-512", sasl_username="svc",
                        sasl_password="s3cret")
    config = client_config(settings)
    assert config["security_protocol"] == "SASL_SSL"
    assert (config["sasl_mechanism"], config["sasl_plain_username"],
            config["sasl_plain_password"]) == ("SCRAM-SHA-512", "svc", "s3cret")
    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.username == "svc" and credentials.password == "s3cret"
    assert credentials.ssl_context is not None


def test_ssl_files_pass_through(tmp_path):
    settings = Settings(broker="k:9093", security_protocol="SSL",
                        ssl_cafile=tmp_path / "ca.pem", ssl_certfile=tmp_path / "c.pem",
                        ssl_keyfile=tmp_path / "k.pem")
    config = client_config(settings)
    assert config["ssl_cafile"].endswith("ca.pem") and config["ssl_keyfile"].endswith("k.pem")
    assert "sasl_mechanism" not in config


def test_aiokafka_clients_get_the_same_settings(tmp_path):
    """The request reader's consumer (aiokafka): SASL as given, TLS as a context."""
    import asyncio

    from aiokafka import AIOKafkaConsumer

    settings = Settings(broker="k:9093", security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                        sasl_username="svc", sasl_password="s3cret")
    config = aiokafka_config(settings)
    assert config["ssl_context"] is not None and not any(k.startswith("ssl_") and k !=
                                                         "ssl_context" for k in config)
    assert (config["security_protocol"], config["sasl_mechanism"], config["sasl_plain_username"],
            config["sasl_plain_password"]) == ("SASL_SSL", "PLAIN", "svc", "s3cret")

    async def build() -> None:  # every key is one aiokafka takes
        AIOKafkaConsumer(**config)

    asyncio.run(build())
    assert "ssl_context" not in aiokafka_config(Settings(broker="k:9092"))


def test_a_key_goes_to_the_partition_kafkas_default_partitioner_picks():
    """Oracle: kafka-python's default partitioner (murmur2, as the Java client's)."""
    keys = [f"u{n}".encode() for n in range(500)] + [b"", "é-ü".encode(), b"\xff" * 9]
    for partitions in (1, 2, 3, 8, 12):
        every = set(range(partitions))
        cluster = SimpleNamespace(topics=lambda: {"t"}, partitions_for_topic=lambda _: every,
                                  available_partitions_for_topic=lambda _: every)
        assert [key_partition(key, partitions) for key in keys] == [
            DefaultPartitioner().partition("t", key, key, None, None, cluster) for key in keys]


def test_a_refused_configuration_does_not_print_the_password():
    """pydantic printed the values it was given with the error, shortened to their ends:
    the password's tail where it was the last one set."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as refused:
        Settings(broker="k:9093", security_protocol="SASL_SSL",
                 sasl_password="S3cr3t-tail-of-the-password")
    assert "needs sasl_username" in str(refused.value)
    assert "S3cr3t" not in str(refused.value) and "password'" not in str(refused.value)


@pytest.mark.parametrize("settings, refusal", [
    ({"security_protocol": "SASL_SSL"}, "needs sasl_username"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_username": "svc"}, "needs sasl_username"),
    ({"security_protocol": "SASL_SSL", "sasl_username": "svc", "sasl_password": ""},
     "needs sasl_username"),  # a child process would read the blank password as unset
    ({"ssl_cafile": "ca.pem"}, "ssl_cafile are read only with"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_username": "svc", "sasl_password": "pw",
      "ssl_certfile": "c.pem", "ssl_keyfile": "k.pem"}, "read only with"),
    ({"security_protocol": "SSL", "ssl_keyfile": "k.pem"}, "needs ssl_certfile"),
    ({"sasl_username": "svc", "sasl_password": "pw"}, "sent only with"),  # were dropped
    ({"security_protocol": "SSL", "sasl_password": "pw"}, "sent only with"),
])
def test_security_settings_a_client_would_drop_are_refused(settings, refusal):
    """Before, a TLS file with a plain protocol was ignored by every client, a key without its
    certificate dropped, and SASL without credentials failed at each client's handshake."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=refusal):
        Settings(broker="k:9093", **settings)
