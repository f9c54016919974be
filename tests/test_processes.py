"""Children that never outlive their parent (``stream_app/processes.py``)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

from stream_app.processes import _die_with_parent


def test_a_child_whose_parent_died_before_it_asked_for_the_signal_exits_at_once():
    """The parent-death signal is asked for between fork and exec; a parent that died before
    that would never send it, and the child (the embedded broker) would run on: it checks
    that its parent is still the one that started it."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    orphan = subprocess.Popen(sleeper, preexec_fn=functools.partial(_die_with_parent,
                                                                    os.getpid() + 10**7))
    assert orphan.wait(10) == 1
    child = subprocess.Popen([sys.executable, "-c", "pass"],
                             preexec_fn=functools.partial(_die_with_parent, os.getpid()))
    assert child.wait(10) == 0
