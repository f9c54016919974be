"""`streamrec up` and `demo` stop in order on SIGTERM or SIGHUP that come while they start.

Each case runs in a Python of its own: a signal that a fault lets through kills that process,
not the test run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: `main(argv)` with a system whose start signals its own process, then would run on for
#: seconds, and whose stop signals it again; prints whether the stop went through and
#: whether the signals got their handlers back
SIGNALLED_WHILE_STARTING = """
import os, signal, sys, time
import stream_app.datasets
from stream_app import supervisor
from stream_app.cli import main

signum, argv = getattr(signal, sys.argv[1]), sys.argv[2:]
for sig in (signal.SIGTERM, signal.SIGHUP):  # as a terminal's session has them (under nohup,
    signal.signal(sig, signal.SIG_DFL)  # SIGHUP comes ignored, and stays so)


class StartingSystem:
    def __init__(self, settings) -> None:
        self.logs = settings.data_dir / "logs"

    def start(self) -> None:
        os.kill(os.getpid(), signum)
        time.sleep(5)
        print("started", flush=True)

    def stop(self) -> None:
        os.kill(os.getpid(), signum)  # again: the stop must go on
        time.sleep(0.1)
        print("stopped", flush=True)


class OneEvent:
    users = ["u1"]

    def __len__(self) -> int:
        return 1


supervisor.System = StartingSystem
stream_app.datasets.load = lambda path, fmt: OneEvent()
before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
try:
    main(argv)
finally:
    restored = all(signal.getsignal(sig) is handler for sig, handler in before.items())
    print("restored" if restored else "not restored", flush=True)
"""


def python_c(code: str, *args: str, data_dir: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("STREAMREC_")}
    env["STREAMREC_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize("signame, status", [("SIGTERM", 143), ("SIGHUP", 129)])
@pytest.mark.parametrize("argv", [["up"], ["demo", "--exit"]])
def test_a_stop_signal_while_starting_runs_the_ordered_stop(tmp_path, signame, status, argv):
    """A service manager's stop or a closed terminal during a start of minutes killed the
    supervisor with the signal's default action: its ``finally`` never stopped the worker
    before the broker. Now the stop runs, and a second signal does not cut it short; the
    status says which signal (128 + N), and the signals get their handlers back."""
    result = python_c(SIGNALLED_WHILE_STARTING, signame, *argv, data_dir=tmp_path)
    assert result.returncode == status, result.stderr
    assert result.stdout.split() == ["stopped", "restored"]


IGNORED_HANGUP = """
import os, signal
from stream_app.supervisor import stop_signals_exit

signal.signal(signal.SIGHUP, signal.SIG_IGN)
with stop_signals_exit():
    os.kill(os.getpid(), signal.SIGHUP)
    print("went on", signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)
"""


def test_an_ignored_hangup_stays_ignored(tmp_path):
    """Under ``nohup`` the terminal's close must not stop the system."""
    result = python_c(IGNORED_HANGUP, data_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["went", "on", "True"]


def test_the_demo_waits_for_its_events_while_the_worker_takes_them_in(monkeypatch):
    """The demo's wait for the worker's intake gives up only when nothing was taken in for
    its timeout, not at a bound from the start (a large log takes longer than any)."""
    from stream_app import supervisor
    from stream_app.settings import Settings

    clock = [0.0]
    counts = iter([0.0, 100.0, 200.0, 300.0, 400.0, 500.0])
    monkeypatch.setattr(supervisor.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(supervisor.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + 4))
    monkeypatch.setattr(supervisor, "scrape",
                        lambda settings: {"streamrec_events_total": next(counts)})
    assert supervisor.wait_ingested(Settings(), 500, timeout_s=5.0) == 500.0  # 20 s in all
    stalled = iter([0.0, 100.0] + [100.0] * 10)
    monkeypatch.setattr(supervisor, "scrape",
                        lambda settings: {"streamrec_events_total": next(stalled)})
    with pytest.raises(TimeoutError, match="took 100 of 500 events, and none in the last 5 s"):
        supervisor.wait_ingested(Settings(), 500, timeout_s=5.0)


#: `up` with a system that starts at once; SIGTERM comes while it waits (taken by its wait),
#: and a SIGHUP during the stop
SIGNALLED_WHILE_UP = """
import os, signal, threading, time
from stream_app import supervisor
from stream_app.cli import main


class UpSystem:
    def __init__(self, settings) -> None:
        self.logs = settings.data_dir / "logs"

    def start(self) -> None:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()

    def describe(self) -> str:
        return "up"

    def stop(self) -> None:
        os.kill(os.getpid(), signal.SIGHUP)  # a closed terminal while it stops
        time.sleep(0.1)
        print("stopped", flush=True)


signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as a terminal's session has it
supervisor.System = UpSystem
supervisor.dead_child = lambda system: None
print("status", main(["up"]), flush=True)
"""


def test_a_signal_during_the_stop_that_a_first_one_began_does_not_cut_it_short(tmp_path):
    """The first SIGTERM is taken by the wait (a clean stop), which gives the handler that
    raises back for the stop: a SIGHUP then raised out of the stop, and the worker was
    neither waited for nor killed while the broker stopped under it."""
    result = python_c(SIGNALLED_WHILE_UP, data_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-3:] == ["stopped", "status", "0"]


def test_a_child_stopped_by_an_impatient_signal_is_killed_not_left(tmp_path, monkeypatch):
    """A stop signal turned into SystemExit while a child stops kills the child's group, as a
    second Ctrl-C does: raised past the wait, it left the worker running."""
    from stream_app.processes import Child

    slow_to_stop = ("import signal, time; signal.signal(signal.SIGTERM, lambda *a: None); "
                    "print('ready', flush=True); time.sleep(60)")
    child = Child("worker", [sys.executable, "-c", slow_to_stop],
                  log_path=tmp_path / "worker.log").start()
    while "ready" not in (tmp_path / "worker.log").read_text():  # its SIGTERM handler is set
        time.sleep(0.05)

    def interrupted(timeout=None):
        raise SystemExit(143)

    monkeypatch.setattr(child.process, "wait", interrupted)
    with pytest.raises(SystemExit):
        child.stop(5.0)
    monkeypatch.undo()
    assert child.process.wait(10) is not None and not child.alive()
