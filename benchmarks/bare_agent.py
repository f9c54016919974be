"""A bare Faust agent that only consumes a topic and counts: the yardstick for worker throughput.

Run as ``python benchmarks/bare_agent.py`` with the same ``STREAMREC_*`` settings as a worker;
it exports ``bare_events_total`` on the metrics port. Same broker, same consumer settings, same
embedded-broker fixes as a streamrec worker, so the ratio between the two isolates streamrec's
own cost per event. Faust's own message delivery by default; ``--direct-delivery`` takes the
worker's (``stream_app/delivery.py``), for the ratio with that cost removed from both;
``--batch-intake`` also takes the worker's batches (``stream_app/batch_intake.py``): a task
that acknowledges each batch as it gets it, the floor of what a worker that takes its events
this way can cost.
"""

from __future__ import annotations

import argparse

import faust
from prometheus_client import CollectorRegistry, Counter, start_http_server

from stream_app.batch_intake import BatchIntake
from stream_app.compat import install_embedded_broker_fixes
from stream_app.delivery import install_direct_delivery
from stream_app.kafka import faust_credentials
from stream_app.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--direct-delivery", action="store_true",
                        help="deliver messages as a streamrec worker does")
    parser.add_argument("--batch-intake", action="store_true",
                        help="take the events in batches as a streamrec worker does "
                        "(with --direct-delivery)")
    args = parser.parse_args(argv)
    settings = Settings()
    if settings.compat_fixes:
        install_embedded_broker_fixes(settings.worker_fetch_max_wait_ms)
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    registry = CollectorRegistry()
    consumed = Counter("bare_events_total", "Messages consumed.", registry=registry)
    start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    app = faust.App(settings.app_id, broker=settings.faust_broker_url,
                    broker_credentials=faust_credentials(settings),
                    broker_session_timeout=settings.session_timeout_s,
                    consumer_auto_offset_reset="earliest", web_enabled=False,
                    autodiscover=False, datadir=str(settings.data_dir / "faust"),
                    consumer_max_fetch_size=settings.fetch_partition_bytes,
                    broker_max_poll_records=settings.poll_records)
    if args.direct_delivery or args.batch_intake:
        install_direct_delivery(app)
    topic = app.topic(settings.topic_events, key_serializer="raw", value_serializer="raw")
    if args.batch_intake:
        intake = BatchIntake(app, topic, settings.ingest_batch, settings.ingest_batch_wait_s)
        intake.install()

        @app.task
        async def count_batches() -> None:
            while True:
                batch = await intake.take()
                intake.ack(batch)
                consumed.inc(len(batch))
    else:
        @app.agent(topic)
        async def count(stream):
            async for _ in stream:
                consumed.inc()

    worker = faust.Worker(app, loglevel="warning", quiet=True)
    worker.spinner = None  # as the streamrec worker: no root logger at DEBUG for a spinner
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
