"""Settings from the environment and command-line argument errors."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from stream_app.cli import build_parser, main
from stream_app.settings import Settings

from .conftest import readme_table_names


def test_settings_come_from_prefixed_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMREC_BROKER", "kafka://a:9092;b:9093")
    monkeypatch.setenv("STREAMREC_KIND_WEIGHTS", '{"view": 1, "buy": 20}')
    monkeypatch.setenv("STREAMREC_PARTITIONS", "8")
    monkeypatch.setenv("STREAMREC_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAMREC_SASL_USERNAME", "svc")
    monkeypatch.setenv("STREAMREC_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("STREAMREC_DR_TRACK_EVERY", "7")
    monkeypatch.setenv("STREAMREC_INPUT_LR", "0.25")
    settings = Settings()
    assert settings.dr_config().track_every == 7
    assert settings.learner_config().input_lr == 0.25
    assert settings.replace(encoder="ials").learner_config().input_lr == 0  # mean only
    assert settings.bootstrap_servers == ["a:9092", "b:9093"]
    assert settings.faust_broker_url == "kafka://a:9092;kafka://b:9093"
    assert settings.event_kinds == {"view", "buy"} and settings.partitions == 8
    assert not settings.embedded and not settings.compat_fixes
    assert settings.worker_fetch_max_wait_ms == 1500
    assert "hunter2" not in repr(settings)
    with pytest.raises(ValidationError):
        settings.partitions = 3  # frozen


@pytest.mark.parametrize("name", ["encoder_half_life_events", "positives_half_life"])
def test_a_decay_with_a_default_is_turned_off_by_none_and_stays_off_in_a_child(monkeypatch,
                                                                              name):
    from stream_app.supervisor import settings_env

    assert getattr(Settings(), name) is not None
    monkeypatch.setenv(f"STREAMREC_{name.upper()}", "none")
    assert getattr(Settings(), name) is None
    monkeypatch.delenv(f"STREAMREC_{name.upper()}")
    child = settings_env(Settings(**{name: None}))
    assert child[f"STREAMREC_{name.upper()}"] == "none"
    for key, value in child.items():
        if key.startswith("STREAMREC_"):
            monkeypatch.setenv(key, value)
    assert getattr(Settings(), name) is None


def test_defaults_mean_the_embedded_broker_on_loopback():
    settings = Settings()
    assert settings.embedded and settings.compat_fixes
    assert settings.bootstrap_servers == ["127.0.0.1:9092"]
    assert settings.metrics_host == "127.0.0.1"
    assert settings.worker_fetch_max_wait_ms == 10


def test_a_blank_variable_is_unset(monkeypatch):
    """``STREAMREC_BROKER=`` in an env file meant no servers at all (every client then failed
    to pick one), a blank file setting the current directory, a blank number an error."""
    for name in ("BROKER", "SSL_CAFILE", "EMBEDDED_COMPAT", "FETCH_MAX_WAIT_MS", "PARTITIONS"):
        monkeypatch.setenv(f"STREAMREC_{name}", "")
    settings = Settings()
    assert settings.embedded and settings.bootstrap_servers == ["127.0.0.1:9092"]
    assert settings.ssl_cafile is None and settings.compat_fixes
    assert settings.partitions == Settings.model_fields["partitions"].default
    with pytest.raises(ValidationError):  # a child would read it as unset: 127.0.0.1
        Settings(metrics_host="")


def test_broker_servers_are_read_with_spaces_around_them(monkeypatch):
    monkeypatch.setenv("STREAMREC_BROKER", " a:9092, b:9093 ;kafka://c:9094 ")
    assert Settings().bootstrap_servers == ["a:9092", "b:9093", "c:9094"]
    assert Settings().faust_broker_url == "kafka://a:9092;kafka://b:9093;kafka://c:9094"
    monkeypatch.setenv("STREAMREC_BROKER", " ; kafka:// ,")
    with pytest.raises(ValidationError, match="names no server"):
        Settings()


def test_a_setting_that_is_not_json_is_an_invalid_configuration(monkeypatch, capsys):
    """A list setting typed with commas failed inside pydantic-settings, before validation:
    a traceback, where every other bad setting gets the message and exit code 2."""
    monkeypatch.setenv("STREAMREC_DEFAULT_SOURCES", "ann,popular")
    assert main(["recommend", "--user", "u"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and "default_sources" in err


def test_bad_settings_are_refused(monkeypatch):
    for weights in ('{"view": 0}', '{"view": 1e400}', '{"view": NaN}'):
        monkeypatch.setenv("STREAMREC_KIND_WEIGHTS", weights)
        with pytest.raises(ValidationError, match="kind.weights"):
            Settings()
    monkeypatch.setenv("STREAMREC_KIND_WEIGHTS", '{"view": 1}')
    monkeypatch.setenv("STREAMREC_PARTITIONS", "0")
    with pytest.raises(ValidationError):
        Settings()
    assert main(["recommend", "--user", "u"]) == 2  # invalid configuration, exit code 2
    monkeypatch.setenv("STREAMREC_PARTITIONS", "2")
    monkeypatch.setenv("STREAMREC_DEFAULT_SOURCES", '["ann", "dr"]')
    monkeypatch.setenv("STREAMREC_DR_ENABLED", "false")
    with pytest.raises(ValidationError, match="names dr"):
        Settings()
    monkeypatch.delenv("STREAMREC_DEFAULT_SOURCES")
    monkeypatch.delenv("STREAMREC_DR_ENABLED")
    monkeypatch.setenv("STREAMREC_DR_TOP_S", "2")  # fewer tracked paths than an item's 3
    with pytest.raises(ValidationError, match="dr_top_s"):
        Settings()
    monkeypatch.setenv("STREAMREC_DR_ENABLED", "false")
    monkeypatch.setenv("STREAMREC_DEFAULT_SOURCES", '["ann", "popular"]')
    assert Settings().dr_top_s == 2  # no Deep Retrieval: nothing to check
    monkeypatch.setenv("STREAMREC_ENCODER", "ials")
    monkeypatch.setenv("STREAMREC_L2", "0")  # a singular fold-in while items < model_dim
    with pytest.raises(ValidationError, match="ials needs l2 > 0"):
        Settings()
    monkeypatch.setenv("STREAMREC_ENCODER", "mean")
    assert Settings().l2 == 0  # the mean encoder solves nothing


@pytest.mark.parametrize("name, value", [
    ("STREAMREC_SERVE_TUNING_HALF_LIVES", "[]"),
    ("STREAMREC_SERVE_TUNING_HALF_LIVES", "[1, 0]"),
    ("STREAMREC_SERVE_TUNING_BIAS_WEIGHTS", "[1, -0.5]"),
    ("STREAMREC_SERVE_BIAS_WEIGHT", "-1"),
    ("STREAMREC_SERVE_HALF_LIFE_EVENTS", "0"),
    ("STREAMREC_DR_TRACK_EVERY", "0"),
    ("STREAMREC_INPUT_LR", "-0.1"),
    ("STREAMREC_SERVE_TUNING_MARGIN_Z", "-1"),
    ("STREAMREC_SERVE_TUNING_K", "0"),
])
def test_out_of_range_settings_are_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_a_serving_grid_reads_from_the_environment(monkeypatch):
    monkeypatch.setenv("STREAMREC_SERVE_TUNING_HALF_LIVES", "[2, null]")
    monkeypatch.setenv("STREAMREC_SERVE_HALF_LIFE_EVENTS", "none")
    settings = Settings()
    assert settings.serve_tuning_half_lives == [2.0, None]
    assert settings.serve_half_life_events is None
    assert settings.serving_choice().candidates[0].half_life_events is None
    monkeypatch.setenv("STREAMREC_SERVE_TUNING_MARGIN_Z", "1.5")
    monkeypatch.setenv("STREAMREC_SERVE_TUNING_K", "20")
    choice = Settings().serving_choice()
    assert (choice.margin_z, choice.k) == (1.5, 20)


#: every number that may be None: the README's tables say 'none' turns each off
OPTIONAL_NUMBERS = [f"STREAMREC_{name.upper()}" for name, field in Settings.model_fields.items()
                    if field.annotation in (float | None, int | None)]


@pytest.mark.parametrize("name", OPTIONAL_NUMBERS)
def test_every_optional_number_is_turned_off_by_the_word_none(monkeypatch, name):
    monkeypatch.setenv(name, "none")
    assert getattr(Settings(), name.removeprefix("STREAMREC_").lower()) is None
    monkeypatch.setenv(name, "30")
    assert getattr(Settings(), name.removeprefix("STREAMREC_").lower()) == 30.0


#: settings that are numbers, or may be ('none' turns each of those off)
FLOAT_SETTINGS = [name for name, field in Settings.model_fields.items()
                  if field.annotation in (float, float | None)]


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_no_number_setting_takes_infinity_or_nan(name):
    """``inf`` seconds passed, then overflowed where they became a wait (the learner's start,
    a worker's stop); no setting means anything at inf or nan."""
    for value in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValidationError, match="finite number"):
            Settings(**{name: value})


@pytest.mark.parametrize("name, value", [
    ("STREAMREC_LEARNER_START_TIMEOUT_S", "inf"),
    ("STREAMREC_SHUTDOWN_TIMEOUT_S", "Infinity"),
    ("STREAMREC_HISTORY_TTL_S", "inf"),  # 'none' is its word for no limit
    ("STREAMREC_POPULARITY_REFRESH_S", "nan"),
    ("STREAMREC_SERVE_TUNING_HALF_LIVES", "[1, Infinity]"),
    ("STREAMREC_SERVE_TUNING_BIAS_WEIGHTS", "[1, NaN]"),
])
def test_a_number_that_is_not_finite_is_an_invalid_configuration(monkeypatch, capsys,
                                                                  tmp_path, name, value):
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STREAMREC_BROKER", "127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv(name, value)
    assert main(["recommend", "--user", "u", "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and "finite number" in err
    assert name.removeprefix("STREAMREC_").lower() in err


@pytest.mark.parametrize("name", ["STREAMREC_SHUTDOWN_TIMEOUT_S",
                                  "STREAMREC_LEARNER_START_TIMEOUT_S",
                                  "STREAMREC_CHECKPOINT_INTERVAL_S"])
def test_a_wait_longer_than_a_timer_takes_is_an_invalid_configuration(monkeypatch, capsys,
                                                                     tmp_path, name):
    """Finite but past what the system's waits take (a pipe's poll counts milliseconds in a
    C int): refused where it is set, not an overflow where it is used."""
    from stream_app.settings import MAX_WAIT_S, WAIT_SETTINGS, Settings

    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv(name, "1e300")
    assert main(["recommend", "--user", "u", "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and name.removeprefix("STREAMREC_").lower() in err
    assert all(name in Settings.model_fields for name in WAIT_SETTINGS)
    monkeypatch.setenv(name, str(MAX_WAIT_S))
    assert getattr(Settings(), name.removeprefix("STREAMREC_").lower()) == MAX_WAIT_S


@pytest.mark.parametrize("name, value, message", [
    ("STREAMREC_TOPIC_DEAD_LETTERS", "timeline-events",
     "topic_events and topic_dead_letters are both 'timeline-events'"),
    ("STREAMREC_TOPIC_RESPONSES", "rec-requests",
     "topic_requests and topic_responses are both 'rec-requests'"),
    ("STREAMREC_TOPIC_TRAIN", "timeline-events",
     "topic_events and topic_train are both 'timeline-events'"),
    ("STREAMREC_TOPIC_ITEMS", "rec-responses",
     "topic_responses and topic_items are both 'rec-responses'"),
    ("STREAMREC_TOPIC_WITHDRAWN", "timeline-events-dlq",
     "topic_dead_letters and topic_withdrawn are both 'timeline-events-dlq'"),
    ("STREAMREC_TOPIC_EVENTS", "streamrec-withdrawn-items",
     "topic_events and topic_withdrawn (its default) are both 'streamrec-withdrawn-items'"),
])
def test_one_topic_for_two_roles_is_an_invalid_configuration(monkeypatch, capsys, tmp_path,
                                                             name, value, message):
    """A dead letter written to the events topic was read back, refused and written again
    for ever: every command refuses such settings, naming the two."""
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STREAMREC_BROKER", "127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv(name, value)
    assert main(["recommend", "--user", "u", "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and message in err


@pytest.mark.parametrize("argv", [
    [],
    ["launch"],
    ["recommend", "--user", "u", "--k", "0"],
    ["recommend", "--user", "u", "--k", "1001"],
    ["recommend", "--user", "u", "--k", "ten"],
    ["recommend", "--history", ""],
    ["recommend", "--user", "u", "--timeout", "-1"],
    ["recommend", "--user", "u", "--timeout", "inf"],
    ["recommend", "--user", "u", "--timeout", "nan"],
    ["produce"],
    ["produce", "x.txt", "--format", "parquet"],
    ["produce", "x.txt", "--rate", "0"],
    ["produce", "x.txt", "--rate", "Infinity"],
    ["produce", "x.txt", "--limit", "-5"],
])
def test_argument_errors_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_an_infinite_timeout_is_an_argument_error_not_an_overflow(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["recommend", "--user", "u", "--timeout", "inf"])
    assert "--timeout: must be a finite number > 0, got inf" in capsys.readouterr().err


def test_recommend_needs_a_user_or_a_history(capsys):
    assert main(["recommend"]) == 2
    assert "--user" in capsys.readouterr().err


def test_produce_reports_a_missing_file(capsys, tmp_path):
    assert main(["produce", str(tmp_path / "nope.txt")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_forget_refuses_an_id_no_event_could_carry_before_it_sends_anything(capsys,
                                                                             monkeypatch):
    monkeypatch.setenv("STREAMREC_BROKER", "127.0.0.1:1")  # nothing listens: nothing is sent
    assert main(["forget", "u1", "bad\x00id"]) == 1
    assert "user_id" in capsys.readouterr().err


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for command in ("up", "demo", "produce", "recommend", "STREAMREC_BROKER"):
        assert command in text


def test_the_train_topic_belongs_to_the_app_unless_named(monkeypatch):
    """Two apps on one cluster share the events topic, never their training examples."""
    monkeypatch.delenv("STREAMREC_TOPIC_TRAIN", raising=False)
    assert Settings().train_topic == "streamrec-train-examples"
    assert Settings(app_id="shop-a").train_topic == "shop-a-train-examples"
    assert Settings().replace(app_id="shop-b").train_topic == "shop-b-train-examples"
    monkeypatch.setenv("STREAMREC_TOPIC_TRAIN", "learn")
    assert Settings(app_id="shop-a").replace(app_id="shop-c").train_topic == "learn"


@pytest.mark.parametrize("level", ["warning", "error", "info"])
def test_worker_logs_at_the_configured_level_only(level):
    """Faust's worker, left alone, sets the root logger to DEBUG at WARNING and above for its
    terminal spinner: every library's debug call would build a record and drop it."""
    import logging

    import faust

    from stream_app.worker import Worker

    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        worker = Worker(faust.App("logging-level-test", broker="memory://"), loglevel=level,
                        quiet=True, redirect_stdouts=False, shutdown_timeout_s=1.0)
        worker._setup_logging()
        assert root.level == getattr(logging, level.upper())
        assert not logging.getLogger("faust.topics").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_the_readme_documents_every_setting():
    """Each Settings field has a row of the README's configuration table, by its full name
    or as a suffix beside another of its row (`STREAMREC_DR_BEAM` / `_TOP_S` names
    STREAMREC_DR_TOP_S; the suffix may replace any tail of the first name), and every name
    the README gives is a setting."""
    fields = {f"STREAMREC_{name.upper()}" for name in Settings.model_fields}
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert set(re.findall(r"`(STREAMREC_[A-Z0-9_]+)`", readme)) <= fields  # none stale
    documented = readme_table_names(r"STREAMREC_[A-Z0-9_]+", r"_[A-Z0-9_]+")
    assert fields - documented == set()


@pytest.mark.parametrize("worker_status, expected", [(76, 76), (0, 1), ("kill", 137)])
def test_up_exits_with_the_workers_status_when_the_worker_dies(tmp_path, monkeypatch, capsys,
                                                                worker_status, expected):
    """`streamrec up` stops when its worker dies, and says so in its exit status (the
    worker's own; 1 for a worker that exited 0 unasked), so that a service manager restarts
    it and a script sees the failure."""
    import sys

    from stream_app import supervisor
    from stream_app.processes import Child

    class DyingSystem:
        def __init__(self, settings) -> None:
            self.logs = tmp_path / "logs"
            self.worker = None
            self.stopped = False

        def start(self) -> None:
            code = ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
                    if worker_status == "kill" else f"import sys; sys.exit({worker_status})")
            self.worker = Child("worker", [sys.executable, "-c", code],
                                log_path=self.logs / "worker.log").start()

        def describe(self) -> str:
            return "a worker about to die"

        def stop(self) -> None:
            self.stopped = True

    monkeypatch.setattr(supervisor, "System", DyingSystem)
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    assert main(["up"]) == expected
    assert "streamrec stopped: the worker or the broker exited" in capsys.readouterr().out


def test_a_broker_error_is_a_message_and_status_1_not_a_traceback(monkeypatch, capsys,
                                                                   tmp_path):
    """kafka-python 3's errors are not RuntimeErrors: a broker that cannot be reached must
    still end a command with its one-line error."""
    from kafka.errors import KafkaTimeoutError

    from stream_app import cli

    def unreachable(settings, args):
        raise KafkaTimeoutError("Unable to bootstrap from ['127.0.0.1:1']")

    monkeypatch.setattr(cli, "cmd_recommend", unreachable)
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    assert main(["recommend", "--user", "u1"]) == 1
    assert "streamrec recommend: " in capsys.readouterr().err


def test_the_demo_refuses_metrics_turned_off_before_it_starts_anything(monkeypatch, capsys,
                                                                       tmp_path):
    """The demo follows the ingest on the worker's metrics: with them off it would replay
    the whole dataset, then fail; it says so at once, having started nothing."""
    from stream_app import supervisor

    monkeypatch.setattr(supervisor, "System", None)  # anything started would fail here
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STREAMREC_METRICS_PORT", "0")
    assert main(["demo", "--exit"]) == 1
    assert "STREAMREC_METRICS_PORT=0" in capsys.readouterr().err


def test_the_demo_waits_for_the_learner_to_catch_up_before_it_answers(monkeypatch, caplog):
    """Events are taken in before they are learned: the demo waits until the worker has
    learned an example for every event it accepted, so its answers come from the model, not
    popularity alone; a learner that does not catch up in time is said, not waited on."""
    from types import SimpleNamespace

    from stream_app import supervisor

    def page(learned: float, accepted: float = 900.0) -> list:
        return [SimpleNamespace(name="streamrec_learned_events_total", labels={},
                                value=learned),
                SimpleNamespace(name="streamrec_events_total", labels={"outcome": "accepted"},
                                value=accepted),
                SimpleNamespace(name="streamrec_events_total", labels={"outcome": "duplicate"},
                                value=50.0)]

    pages = iter([page(0.0), page(120.0), page(120.0), page(120.0), page(899.0)])
    monkeypatch.setattr(supervisor, "scrape_samples",
                        lambda settings: next(pages, page(900.0)))
    assert supervisor.wait_learned(Settings(), timeout_s=10.0) == 900.0
    monkeypatch.setattr(supervisor, "scrape_samples", lambda settings: page(10.0))
    with caplog.at_level("WARNING"):
        assert supervisor.wait_learned(Settings(), timeout_s=0.3) == 10.0
    assert "learned 10 of 900 events" in caplog.text


def test_recommend_without_a_broker_fails_within_its_timeout(tmp_path):
    """`--timeout` bounds the client's first connection too (kafka-python waits 30 s by
    itself): a broker that is not there is an error in seconds, with status 1."""
    import subprocess
    import sys
    import time

    env = {key: value for key, value in os.environ.items() if not key.startswith("STREAMREC_")}
    env.update(STREAMREC_BROKER="127.0.0.1:1", STREAMREC_DATA_DIR=str(tmp_path))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "stream_app", "recommend", "--user", "u1",
                             "--timeout", "1"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1, result.stderr
    assert "streamrec recommend: " in result.stderr
    assert time.monotonic() - started < 15


def test_a_streamrec_variable_that_names_no_setting_is_reported(monkeypatch, capsys, tmp_path):
    """A typo (STREAMREC_FETCH_POLL_RECORDS for STREAMREC_POLL_RECORDS) would otherwise be
    ignored without a word: the command says which names it ignores, and runs on."""
    from stream_app.settings import unknown_settings

    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STREAMREC_FETCH_POLL_RECORDS", "5")
    assert unknown_settings({"STREAMREC_POLL_RECORDS": "5", "streamrec_k": "1",
                             "OTHER": "x"}) == ["streamrec_k"]
    main(["eval", "--dataset", "nowhere", "--k", "10"])  # any command reads the settings
    err = capsys.readouterr().err
    assert "STREAMREC_FETCH_POLL_RECORDS is not a setting" in err
    assert "STREAMREC_DATA_DIR" not in err
    monkeypatch.setenv("STREAMREC_BORKER", "kafka:9092")  # beside a value that is refused
    monkeypatch.setenv("STREAMREC_LEARN_BATCH", "many")
    assert main(["eval", "--dataset", "nowhere", "--k", "10"]) == 2
    err = capsys.readouterr().err
    assert "STREAMREC_BORKER is not a setting" in err and "invalid configuration" in err


def python_c(code: str):
    """``code`` run by a Python of its own in the project's folder: signals sent to it reach
    no test."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parents[1])


def test_the_supervisor_prints_every_threads_stack_on_sigusr1():
    """`kill -USR1` of `streamrec up` prints where each of its threads is, even with the main
    thread stuck: a stop that hangs says why."""
    code = ("import os, signal, time\n"
            "from stream_app.supervisor import dump_stacks_on_request\n"
            "dump_stacks_on_request()\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "time.sleep(0.5)\n")
    result = python_c(code)
    assert result.returncode == 0, result.stderr
    assert "Current thread" in result.stderr and 'File "<string>", line 4' in result.stderr


WAITS_FOR_SIGNALS = """
import os, signal, threading, time
from types import SimpleNamespace
from stream_app.supervisor import wait_for_signal

worker = SimpleNamespace(alive=lambda: True)
before = signal.getsignal(signal.SIGINT)  # ignored where a shell started this in the background
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
started = time.monotonic()
print(wait_for_signal(SimpleNamespace(worker=worker)), round(time.monotonic() - started, 1))
print(signal.getsignal(signal.SIGINT) is before)
dead = SimpleNamespace(alive=lambda: False, process=SimpleNamespace(poll=lambda: -9))
print(wait_for_signal(SimpleNamespace(worker=dead, logs=__import__("pathlib").Path("."))))
gone = SimpleNamespace(alive=lambda: False, process=SimpleNamespace(poll=lambda: 0))
print(wait_for_signal(SimpleNamespace(worker=worker, broker=gone,
                                      logs=__import__("pathlib").Path("."))))
"""


def test_the_supervisor_returns_on_ctrl_c_or_its_workers_death():
    """`streamrec up` waits for SIGINT/SIGTERM (then 0) or the worker's death (then 128 + the
    signal that killed it) or the embedded broker's (1 for an exit it was not asked for: the
    worker would only retry it), and gives the signals their handlers back."""
    result = python_c(WAITS_FOR_SIGNALS)
    assert result.returncode == 0, result.stderr
    first, restored, died, broker_gone = result.stdout.split("\n")[:4]
    assert broker_gone == "1"
    status, seconds = first.split()
    assert status == "0" and float(seconds) < 5.0
    assert restored == "True" and died == "137"


def test_a_start_whose_broker_dies_says_so(tmp_path, monkeypatch):
    """The wait for a first answer watches the embedded broker too: gone, it is named with
    its log, not left for the 120 s of the wait to end in the worker's name."""
    from types import SimpleNamespace

    from stream_app import supervisor
    from stream_app.client import ResponseTimeout

    class Unanswered:
        def __init__(self, settings) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def recommend(self, **kwargs):
            raise ResponseTimeout("no answer")

    monkeypatch.setattr(supervisor, "RecClient", Unanswered)
    system = supervisor.System(Settings(data_dir=tmp_path))
    system.worker = SimpleNamespace(alive=lambda: True)
    system.broker = SimpleNamespace(alive=lambda: False)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "broker.log").write_text("out of memory\n")
    with pytest.raises(RuntimeError, match="the broker exited(.|\n)*out of memory"):
        system.wait_ready(5.0)


def test_a_reply_topic_is_a_response_topic_and_never_one_of_the_apps_own():
    """Only names under the responses prefix, and of those none of the app's own topics: a
    responses prefix that is a prefix of them (``stream``, ``timeline``) let a request make
    the worker write its answers into its changelogs, training examples or events."""
    default = Settings()
    assert default.reply_topic_refusal("rec-responses.client-7") is None
    assert "must start with" in default.reply_topic_refusal("timeline-events")
    short = Settings(topic_responses="stream")
    assert short.reply_topic_refusal("stream-answers") is None
    for internal in ("streamrec-train-examples", "streamrec-histories-changelog",
                     "streamrec-item-rows"):
        assert "own topics" in short.reply_topic_refusal(internal)
    timeline = Settings(topic_responses="timeline")
    assert "own topics" in timeline.reply_topic_refusal("timeline-events")
    assert "own topics" in timeline.reply_topic_refusal("timeline-events-dlq")
    assert timeline.reply_topic_refusal("timeline-answers") is None
    own_prefix = Settings(topic_responses="streamrec-responses")  # under the app's own prefix
    assert own_prefix.reply_topic_refusal("streamrec-responses.c1") is None


def test_streamrec_up_waits_for_its_worker_as_long_as_the_learner_may_take_to_start():
    """A fixed 120 s fell short of a learner allowed ten minutes to load a large model."""
    from stream_app.supervisor import READY_AFTER_LEARNER_S, ready_timeout

    assert ready_timeout(Settings(learner_start_timeout_s=900)) == 900 + READY_AFTER_LEARNER_S
    assert ready_timeout(Settings(learner_process=False)) == READY_AFTER_LEARNER_S
