"""stop_process_group: a graceful stop reaches the whole group; a process that ignores SIGTERM is killed."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from imgpipe_dagster.processes import stop_process_group

# A leader that starts a child in its group, prints the child's pid, and sleeps (optionally deaf to SIGTERM).
LEADER = """
import signal, subprocess, sys, time
if sys.argv[1] == "deaf":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def start_leader(mode: str) -> tuple[subprocess.Popen, int]:
    leader = subprocess.Popen([sys.executable, "-c", LEADER, mode], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    child_pid = int(leader.stdout.readline())
    return leader, child_pid


def gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_graceful_stop_also_ends_what_the_leader_left_behind():
    leader, child_pid = start_leader("polite")
    assert stop_process_group(leader, grace_s=10) is True
    assert leader.returncode is not None
    assert gone(child_pid), "the child ignoring SIGTERM outlived its group's stop"


def test_deaf_leader_is_killed_after_the_grace():
    leader, child_pid = start_leader("deaf")
    started = time.monotonic()
    assert stop_process_group(leader, grace_s=0.5) is False
    assert time.monotonic() - started < 10
    assert leader.returncode == -9 and gone(child_pid)


def test_by_pid_for_a_process_that_is_not_a_popen_here():
    leader, child_pid = start_leader("deaf")
    assert stop_process_group(leader.pid, grace_s=0.5) is False
    assert gone(leader.pid) and gone(child_pid)
    leader.wait(timeout=10)


def test_a_process_already_gone_is_a_graceful_stop():
    leader, _child = start_leader("polite")
    stop_process_group(leader, grace_s=10)
    assert stop_process_group(leader.pid, grace_s=1) is True
