"""Stopping a process together with what it started: SIGTERM to its process group, SIGKILL after a grace.

Our long-lived children (GPU servers, `imgpipe dev`, the Dagster daemon) start in their own session, so
their pid is also their process group's id and one signal reaches their workers too. No Dagster, no CLI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import psutil

POLL_S = 0.1


def stop_process_group(process: subprocess.Popen | int, grace_s: float, kill_wait_s: float = 30.0) -> bool:
    """SIGTERM the group led by ``process`` (a Popen of ours, or the pid of a process that may not be our
    child), SIGKILL it if the leader outlives ``grace_s``; stragglers of the group get SIGKILL either way.

    Returns True when the leader ended within the grace (or was gone already), False when it was killed.
    """
    pid = process if isinstance(process, int) else process.pid
    if not _signal_group(pid, signal.SIGTERM):
        return True
    graceful = _wait(process, grace_s)
    if not graceful:
        _signal_group(pid, signal.SIGKILL)
        _wait(process, kill_wait_s)
    _signal_group(pid, signal.SIGKILL)  # what the leader started and left behind, if anything
    return graceful


def _signal_group(pid: int, sig: signal.Signals) -> bool:
    """Signal the group ``pid`` leads, or the process alone when it leads none; False when it is gone."""
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        pass
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _wait(process: subprocess.Popen | int, timeout_s: float) -> bool:
    if not isinstance(process, int):
        try:
            process.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(process, os.WNOHANG)  # reap it when it is our child, or it stays a zombie
        try:
            if psutil.Process(process).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
