"""The one-command path: `streamrec up` on its own embedded broker, queried by `streamrec
recommend`, stopped by SIGTERM with nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stream_app.kafka import ensure_topics
from stream_app.processes import free_port

pytestmark = pytest.mark.integration


def descendants(pid: int) -> set[int]:
    """All live processes below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cli(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream_app", *args], env=env, timeout=timeout,
                          capture_output=True, text=True)


@pytest.fixture
def embedded_env(tmp_path) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("STREAMREC_")}
    env.update(STREAMREC_EMBEDDED_PORT=str(free_port()), STREAMREC_METRICS_PORT=str(free_port()),
               STREAMREC_DATA_DIR=str(tmp_path / "state"), STREAMREC_SESSION_TIMEOUT_S="6")
    return env


def wait_for_line(process: subprocess.Popen, text: str, timeout_s: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} not printed; got:\n{''.join(lines)}")


def wait_stopped(process: subprocess.Popen, env: dict, timeout_s: float = 60) -> int:
    """``process.wait``, except that a stop that overruns fails with what the supervisor
    printed (with every thread's stack: ``dump_stacks_on_request``) and the ends of the
    worker's and the broker's logs, which say who held it up."""
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        process.kill()  # its children die with it (they are started with a death signal)
        printed, _ = process.communicate(timeout=10)
        logs = Path(env["STREAMREC_DATA_DIR"]) / "logs"
        tails = "".join(f"\n--- {path.name}:\n" + "".join(path.read_text().splitlines(True)[-40:])
                        for path in sorted(logs.glob("*.log")))
        raise AssertionError(f"not stopped in {timeout_s:.0f} s; printed:\n{printed}{tails}")


def test_up_answers_recommend_and_stops_cleanly(embedded_env):
    up = subprocess.Popen([sys.executable, "-m", "stream_app", "up"], env=embedded_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        printed = "".join(wait_for_line(up, "Ctrl-C stops everything", 120))
        assert f"127.0.0.1:{embedded_env['STREAMREC_EMBEDDED_PORT']}" in printed
        assert f"http://127.0.0.1:{embedded_env['STREAMREC_METRICS_PORT']}/metrics" in printed
        children = descendants(up.pid)
        assert len(children) >= 2  # broker and worker

        answer = cli("recommend", "--user", "alice", "--history", "x,y", "--k", "3", "--json",
                     env=embedded_env)
        assert answer.returncode == 0, answer.stderr
        response = json.loads(answer.stdout)
        assert response["error"] is None and response["user_id"] == "alice"
        table = cli("recommend", "--user", "alice", env=embedded_env)
        assert table.returncode == 0 and "user alice" in table.stdout
    finally:
        up.send_signal(signal.SIGTERM)
        code = wait_stopped(up, embedded_env)
    assert code == 0
    time.sleep(0.5)
    assert not [pid for pid in children if alive(pid)], "processes left behind"


def test_recommend_times_out_with_a_clear_error(broker, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("STREAMREC_")}
    env.update(STREAMREC_BROKER=broker.bootstrap, STREAMREC_TOPIC_REQUESTS="lonely-requests",
               STREAMREC_TOPIC_RESPONSES="lonely-responses")
    from stream_app.settings import Settings

    ensure_topics(Settings(broker=broker.bootstrap, topic_requests="lonely-requests",
                           topic_responses="lonely-responses"),
                  ["lonely-requests", "lonely-responses"])
    result = cli("recommend", "--user", "u", "--timeout", "1", env=env)
    assert result.returncode == 1
    assert "no response" in result.stderr


def test_demo_replays_a_dataset_and_prints_recommendations(embedded_env, shared_data):
    embedded_env["STREAMREC_DATASETS_DIR"] = str(shared_data)
    result = cli("demo", "--limit", "3000", "--users", "2", "--exit", env=embedded_env,
                 timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("source") == 2  # two users' tables
    assert " ann " in result.stdout  # ranked by the learned model
    assert "(19" in result.stdout  # MovieLens titles with years


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_in_a_terminal_stops_everything(embedded_env, presses):
    """A terminal sends SIGINT to the whole foreground process group; once or twice (an
    impatient user), nothing may be left behind."""
    up = subprocess.Popen([sys.executable, "-m", "stream_app", "up"], env=embedded_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)  # its own group, as a shell job would be
    try:
        wait_for_line(up, "Ctrl-C stops everything", 120)
        children = descendants(up.pid)
        assert len(children) >= 2
        for _ in range(presses):
            os.killpg(up.pid, signal.SIGINT)
            time.sleep(1.0)
        wait_stopped(up, embedded_env)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
    time.sleep(0.5)
    assert not [pid for pid in children if alive(pid)], "processes left behind"


STUBBORN_PARENT = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("interrupted", [False, True])
def test_a_killed_child_takes_its_own_children_with_it(tmp_path, interrupted):
    """A worker's learner process outlives a worker killed alone; a kill (stop's deadline, or
    a second Ctrl-C while stopping) takes the child's whole group, and returns once it is
    empty."""
    from stream_app.processes import Child

    log_path = tmp_path / "stubborn.log"
    child = Child("stubborn", [sys.executable, "-c", STUBBORN_PARENT], log_path=log_path).start()
    deadline = time.monotonic() + 30
    while not log_path.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(log_path.read_text().split()[0])
    assert alive(grandchild)
    if interrupted:  # KeyboardInterrupt while waiting, as a second Ctrl-C raises it
        def interrupt(*_):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        try:
            with pytest.raises(KeyboardInterrupt):
                child.stop(30)
        finally:
            signal.signal(signal.SIGALRM, previous)
    else:
        assert child.stop(0.3) == -signal.SIGKILL
    assert not alive(child.pid) and not alive(grandchild)


def test_a_worker_whose_broker_is_gone_still_stops(tmp_path):
    """Faust's graceful stop retries a dead broker forever; the worker exits at its deadline."""
    from stream_app.settings import Settings
    from stream_app.supervisor import System
    from stream_app.worker import EXIT_DEADLINE

    settings = Settings(embedded_port=free_port(), metrics_port=free_port(),
                        data_dir=tmp_path / "state", session_timeout_s=6.0,
                        shutdown_timeout_s=3.0)
    system = System(settings)
    system.start()
    try:
        system.broker.process.kill()  # the broker vanishes first
        system.broker.process.wait()
        started = time.monotonic()
        system.worker.process.send_signal(signal.SIGTERM)
        code = system.worker.process.wait(30)
        took = time.monotonic() - started
    finally:
        system.stop()
    assert code in (0, EXIT_DEADLINE)
    assert took < settings.shutdown_timeout_s + 5.0


def test_up_again_on_an_earlier_runs_state_learns_what_it_is_sent(tmp_path):
    """The embedded broker keeps no topics, and a second `up` on the same data dir finds the
    state of the first: Faust's tables ahead of their empty changelog (Faust stopped the
    worker on that) and the model's places in topics that start again below them (their
    first messages would be skipped). Both are dropped, the model kept: the second run
    starts, learns every event it is sent, and the checkpoint counts both runs' events."""
    from models.learner import ItemLearner
    from stream_app.client import replay
    from stream_app.settings import Settings
    from stream_app.supervisor import System, scrape

    settings = Settings(data_dir=tmp_path / "state", embedded_port=free_port(),
                        metrics_port=free_port(), session_timeout_s=6.0)
    count = 3000
    for run in range(2):
        with System(settings) as system:
            assert system.forgotten == ([] if run == 0 else
                                        ["users' histories", "the model's places in the topics"])
            replay(settings, ({"user_id": f"r{run}u{n % 200}", "item_id": f"i{n % 300}",
                               "kind": "view", "ts": 1.7e9 + n, "event_id": f"r{run}e{n}"}
                              for n in range(count)))
            deadline = time.monotonic() + 90
            while scrape(settings).get("streamrec_learned_events_total", 0) < count:
                assert time.monotonic() < deadline, scrape(settings)
                time.sleep(0.5)
    saved = ItemLearner(settings.learner_config())
    assert saved.load(settings.data_dir / "checkpoints" / "model.npz")
    assert saved.events == 2 * count


def test_a_data_dir_holds_one_worker_at_a_time(tmp_path):
    from stream_app.processes import DataDirInUse, lock_data_dir

    held = lock_data_dir(tmp_path / "state")
    with pytest.raises(DataDirInUse, match="in use by another streamrec worker"):
        lock_data_dir(tmp_path / "state")
    held.close()
    lock_data_dir(tmp_path / "state").close()

    learner = lock_data_dir(tmp_path / "state", "learner.lock")  # a learner left behind
    started = time.monotonic()
    with pytest.raises(DataDirInUse):
        lock_data_dir(tmp_path / "state", "learner.lock", wait_s=0.3)
    assert time.monotonic() - started >= 0.3  # waited for it
    threading.Timer(0.3, learner.close).start()  # it ends once its checkpoint is written
    lock_data_dir(tmp_path / "state", "learner.lock", wait_s=10.0).close()


@pytest.mark.parametrize("case", ["another broker's", "in use"])
def test_up_leaves_alone_a_data_dir_it_must_not_void(tmp_path, case):
    """An embedded `up` drops an earlier run's state only in a data dir an embedded run made,
    and only while no worker holds it: a data dir with state and no mark (STREAMREC_BROKER
    left unset by mistake) or one a worker holds is refused, its state untouched."""
    from stream_app.processes import lock_data_dir
    from stream_app.settings import Settings
    from stream_app.supervisor import EMBEDDED_MARK, System

    data = tmp_path / "state"
    history = data / "faust" / "tables" / "000001.sst"
    history.parent.mkdir(parents=True)
    history.write_bytes(b"a history")
    held = None
    if case == "in use":
        (data / EMBEDDED_MARK).touch()
        held = lock_data_dir(data)
    system = System(Settings(data_dir=data, embedded_port=free_port(), metrics_port=free_port()))
    try:
        with pytest.raises(RuntimeError, match="another broker" if held is None else "in use"):
            system.start()
    finally:
        system.stop()
        if held is not None:
            held.close()
    assert history.read_bytes() == b"a history" and system.worker is None


def test_an_embedded_broker_that_does_not_listen_in_time_is_stopped_not_left_running(tmp_path):
    """A start that times out stops the broker's process: the caller gets the error and no
    process it holds no handle on keeps the port."""
    from stream_app.processes import EmbeddedBroker, free_port

    broker = EmbeddedBroker("127.0.0.1", free_port(), log_path=tmp_path / "broker.log")
    with pytest.raises(TimeoutError):
        broker.start(timeout_s=0.0)
    assert broker.process.poll() is not None


def test_an_embedded_start_voids_the_places_of_a_popularity_saved_without_a_model(tmp_path):
    """A worker killed before its first model checkpoint leaves the popularity's counts or
    journal alone: the embedded broker's new topics void their places too, or the new
    topic's first events would pass for ones counted."""
    from stream_app.settings import Settings
    from stream_app.supervisor import EMBEDDED_MARK, forget_broker_state

    data = tmp_path / "state"
    (data / "checkpoints").mkdir(parents=True)
    (data / EMBEDDED_MARK).touch()
    (data / "checkpoints" / "popularity.npz.journal.000001").write_bytes(b"")
    dropped = forget_broker_state(Settings(data_dir=data))
    assert (data / "checkpoints" / "topics-renewed").exists()
    assert dropped == ["the model's places in the topics"]
