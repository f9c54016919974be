"""The ``streamrec`` command line. Configuration comes from ``STREAMREC_*`` variables (see the
README); flags here are only what a command itself needs."""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import sys
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from evaluation.cli import add_eval_parser, cmd_eval

from .datasets import FORMATS
from .settings import Settings, unknown_settings

DEMO_DATASET = "ml-latest-small"
EPILOG = """\
configuration: every setting is an environment variable STREAMREC_<NAME>, e.g.
  STREAMREC_BROKER=kafka:9092   use this Kafka instead of starting the embedded broker
  STREAMREC_DATA_DIR=.streamrec  where tables, checkpoints and logs live
  STREAMREC_METRICS_PORT=9464    Prometheus endpoint (127.0.0.1 unless STREAMREC_METRICS_HOST)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamrec", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Streaming online-learning recommender: timeline events in through Kafka, "
                    "recommendations out through Kafka, learned on every event.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("up", help="start broker (embedded unless STREAMREC_BROKER), topics and "
                                   "a worker; Ctrl-C stops everything")
    commands.add_parser("worker", help="run one worker against the configured broker")

    demo = commands.add_parser("demo", help="`up`, replay a dataset, print live recommendations")
    demo.add_argument("path", nargs="?", type=Path, default=None,
                      help=f"dataset file or folder (default: {DEMO_DATASET} in "
                           "STREAMREC_DATASETS_DIR, ../shared/data)")
    demo.add_argument("--format", choices=FORMATS, help="file format (default: guessed)")
    demo.add_argument("--limit", type=positive_int, help="replay at most N events")
    demo.add_argument("--users", type=positive_int, default=3, help="users to show (default 3)")
    demo.add_argument("--exit", action="store_true",
                      help="stop after printing instead of staying up until Ctrl-C")

    produce = commands.add_parser("produce", help="replay a dataset as timeline events")
    produce.add_argument("path", type=Path, help="dataset file or folder")
    produce.add_argument("--format", choices=FORMATS, help="file format (default: guessed)")
    produce.add_argument("--rate", type=positive_float, help="events per second (default: max)")
    produce.add_argument("--limit", type=positive_int, help="send at most N events")
    produce.add_argument("--seed", type=int, default=0,
                         help="seed of the user interleaving for files without timestamps")

    bootstrap = commands.add_parser(
        "bootstrap", help="start the model from an event log: item vectors from the RSVD of "
                          "its PMI matrix (LED), popularity from its counts")
    bootstrap.add_argument("path", type=Path, help="dataset file or folder")
    bootstrap.add_argument("--format", choices=FORMATS, help="file format (default: guessed)")
    bootstrap.add_argument("--window", type=positive_int, default=None,
                           help="co-occurrence within N events of a user's timeline "
                                "(default: anywhere in it)")
    bootstrap.add_argument("--force", action="store_true",
                           help="replace the model checkpoint in STREAMREC_DATA_DIR")
    bootstrap.add_argument("--seed", type=int, default=0,
                           help="seed of the user interleaving for files without timestamps")

    recommend = commands.add_parser("recommend", help="ask for recommendations and print them")
    recommend.add_argument("--user", help="user id (its stored history is used)")
    recommend.add_argument("--history", type=item_list, default=None,
                           help="comma-separated item ids to use as (extra) history")
    recommend.add_argument("--k", type=k_value, default=10, help="how many items (1..1000)")
    recommend.add_argument("--include-seen", action="store_true",
                           help="do not exclude items the user has seen")
    recommend.add_argument("--exclude", type=item_list, default=None,
                           help="comma-separated item ids never to answer with")
    recommend.add_argument("--timeout", type=positive_float, default=10.0,
                           help="seconds to wait for the answer (default 10)")
    recommend.add_argument("--json", action="store_true", help="print the raw JSON response")
    forget = commands.add_parser(
        "forget", help="erase users' histories (the item model keeps what it learned, as an "
                       "aggregate over every user)")
    forget.add_argument("users", nargs="+", metavar="USER", help="user ids")
    withdraw = commands.add_parser(
        "withdraw", help="withdraw items from the catalogue: no worker answers with them until "
                         "they are restored")
    withdraw.add_argument("items", nargs="+", metavar="ITEM", help="item ids")
    withdraw.add_argument("--restore", action="store_true",
                          help="restore the items instead")
    add_eval_parser(commands)
    return parser



def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number of seconds or a rate: ``inf`` passed and overflowed where it became a wait."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def k_value(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"k must be in 1..1000, got {value}")
    return value


def item_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected comma-separated item ids")
    return items


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in unknown_settings(os.environ):  # first: a typo may be why a value is refused
        print(f"streamrec: {name} is not a setting; it is ignored (see the README's settings "
              "table)", file=sys.stderr)
    try:
        settings = Settings()
    except (ValidationError, SettingsError) as error:  # SettingsError: a value not JSON
        print(f"streamrec: invalid configuration:\n{error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "aiokafka"):  # client chatter, not ours
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))
    if args.command != "worker":
        logging.getLogger("stream_app").setLevel(max(logging.WARNING, logging.root.level))
    handler = {"up": cmd_up, "worker": cmd_worker, "demo": cmd_demo, "produce": cmd_produce,
               "bootstrap": cmd_bootstrap, "recommend": cmd_recommend,
               "forget": cmd_forget, "withdraw": cmd_withdraw, "eval": cmd_eval}[args.command]
    from kafka.errors import KafkaError  # not a RuntimeError in kafka-python 3

    try:
        return handler(settings, args)
    except (OSError, ValueError, TimeoutError, RuntimeError, KafkaError) as error:
        print(f"streamrec {args.command}: {error}", file=sys.stderr)
        return 1


def cmd_worker(settings: Settings, args) -> int:
    from .worker import run_worker

    return run_worker(settings)


def cmd_up(settings: Settings, args) -> int:
    from .supervisor import System, dump_stacks_on_request, stop_signals_exit, wait_for_signal

    dump_stacks_on_request()
    with stop_signals_exit() as stopping:
        system = System(settings)
        try:
            system.start()
            print(system.describe(), "\nCtrl-C stops everything.", flush=True)
            status = wait_for_signal(system)
        finally:
            stopping()
            system.stop()
    print("streamrec stopped" if status == 0 else "streamrec stopped: the worker or the broker "
          f"exited; their logs are in {system.logs}", flush=True)
    return status


def cmd_produce(settings: Settings, args) -> int:
    from tqdm import tqdm

    from .client import replay
    from .datasets import load

    log = load(args.path, args.format, seed=args.seed)
    total = min(len(log), args.limit or len(log))
    with tqdm(total=total, unit="ev", desc="producing", file=sys.stderr) as bar:
        sent = replay(settings, itertools.islice(log.events(), total), rate=args.rate,
                      progress=bar)
    print(f"sent {sent} events to {settings.topic_events}")
    return 0


def cmd_bootstrap(settings: Settings, args) -> int:
    from .bootstrap import write_bootstrap
    from .datasets import load

    events = load(args.path, args.format, seed=args.seed)
    written = write_bootstrap(settings, events, window=args.window, force=args.force)
    left_out = (f" ({written.left_out} left out: a kind not configured, or a time too far "
                "ahead)" if written.left_out else "")
    print(f"model checkpoint of {written.items} items from {written.events} events"
          f"{left_out} written to {written.model}; start the worker on this data dir")
    return 0


def cmd_recommend(settings: Settings, args) -> int:
    from .client import RecClient

    if args.user is None and args.history is None:
        print("streamrec recommend: give --user and/or --history", file=sys.stderr)
        return 2
    with RecClient(settings, connect_timeout_s=args.timeout) as client:
        response = client.recommend(args.user, history=args.history, k=args.k,
                                    exclude_seen=not args.include_seen, exclude=args.exclude,
                                    timeout_s=args.timeout)
    if args.json:
        print(response.model_dump_json(indent=2))
    else:
        print_response(response)
    return 1 if response.error else 0


def cmd_forget(settings: Settings, args) -> int:
    from .client import forget_users

    sent = forget_users(settings, args.users)
    print(f"sent {sent} erasures to {settings.topic_events}: each history is deleted when "
          "the worker reaches it, after the user's events sent before it")
    return 0


def cmd_withdraw(settings: Settings, args) -> int:
    from .client import withdraw_items

    sent = withdraw_items(settings, args.items, withdrawn=not args.restore)
    done = "restored" if args.restore else "withdrawn"
    print(f"{sent} items {done} on {settings.withdrawn_topic}: every worker follows it")
    return 0


def print_response(response, titles: dict[str, str] | None = None) -> None:
    if response.error:
        print(f"error: {response.error}")
        return
    print(f"user {response.user_id}  model v{response.model_version}  "
          f"{response.took_ms:.2f} ms in the worker")
    print(f"  {'#':>3}  {'item':<12} {'score':>10}  source")
    for rank, item in enumerate(response.items, 1):
        title = f"  {titles.get(item.item_id, '')}" if titles else ""
        print(f"  {rank:>3}  {item.item_id:<12} {item.score:>10.4g}  {item.source}{title}")


def cmd_demo(settings: Settings, args) -> int:
    from tqdm import tqdm

    from .client import RecClient, replay
    from .datasets import load
    from .supervisor import (System, dump_stacks_on_request, stop_signals_exit, wait_for_signal,
                             wait_ingested, wait_learned)

    if settings.metrics_port == 0:  # said now, not after the whole replay
        raise ValueError("the demo follows the ingest on the worker's metrics, which "
                         "STREAMREC_METRICS_PORT=0 turns off; set a port")
    path = args.path or settings.datasets_dir / DEMO_DATASET
    log = load(path, args.format)
    total = min(len(log), args.limit or len(log))
    dump_stacks_on_request()
    with stop_signals_exit() as stopping:
        system = System(settings)
        try:
            system.start()
            print(system.describe(), flush=True)
            with tqdm(total=total, unit="ev", desc="producing", file=sys.stderr) as bar:
                replay(settings, itertools.islice(log.events(), total), progress=bar)
            with tqdm(total=total, unit="ev", desc="ingested ", file=sys.stderr) as bar:
                wait_ingested(settings, total, progress=bar)
            wait_learned(settings)
            show_users(settings, log, total, args.users, titles_near(path), RecClient)
            if not args.exit:
                print("\nstreamrec is up; try `streamrec recommend --user "
                      f"{log.users[0]}`. Ctrl-C stops everything.", flush=True)
                return wait_for_signal(system)
        finally:
            stopping()
            system.stop()
    return 0


def show_users(settings, log, total, count, titles, client_cls) -> None:
    users = list(dict.fromkeys(str(u) for u in log.users[:total]))[:count]
    with client_cls(settings) as client:
        for user in users:
            seen = [str(i) for u, i in zip(log.users[:total], log.items[:total]) if u == user]
            print(f"\nuser {user}: {len(seen)} events, latest: "
                  + ", ".join(titles.get(i, i) for i in seen[-3:]))
            print_response(client.recommend(user, k=5), titles)


def titles_near(path: Path) -> dict[str, str]:
    """MovieLens titles by movie id, when a movies.csv lies beside the ratings."""
    import csv

    folder = path if path.is_dir() else path.parent
    movies = folder / "movies.csv"
    if not movies.exists():
        return {}
    with open(movies, newline="") as handle:
        return {row["movieId"]: row["title"] for row in csv.DictReader(handle)}


if __name__ == "__main__":
    sys.exit(main())
