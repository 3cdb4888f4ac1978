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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def supervise(
    command: list[str],
    grace_s: float = 30.0,
    interrupt: signal.Signals = signal.SIGINT,
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Run ``command`` as the leader of a new process group until it exits or this process gets SIGINT,
    SIGTERM or SIGHUP; then stop the whole group: ``interrupt`` to the leader first (its graceful
    path), SIGTERM then SIGKILL to the group after ``grace_s``. Returns the leader's exit code, or
    128 + the signal received.

    Our handlers are installed before the child starts, so it gets default dispositions (a handled
    signal resets at exec) even when this process was started with SIGINT or SIGTERM ignored, which
    a child would otherwise inherit and never stop on."""
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        child = subprocess.Popen(command, start_new_session=True, cwd=cwd, env=env)
        try:
            while not received and child.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=POLL_S * 2)
        finally:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(interrupt)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=grace_s)
            # what the leader left behind (or all of it, when the leader did not stop in time)
            stop_process_group(child, grace_s=min(grace_s, 10.0))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else child.returncode
