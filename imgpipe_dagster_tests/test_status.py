"""`imgpipe status` against a seeded database and a live tiny-model GPU server process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from psycopg.types.json import Jsonb

from imgpipe_dagster.cli.status import SCREEN_WIDTH, render
from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
from imgpipe_dagster.paths import gpu_server_records_dir
from imgpipe_dagster.router_snapshots import write_router_snapshot
from imgpipe_dagster.settings_map import medium_server_settings
from imgpipe_dagster.status import collect
from imgpipe_dagster.store import database as db
from imgpipe_dagster_tests.support import refused_port, seed_corpus

SHARDS = {
    "s000001": [f"http://127.0.0.1:9/img/{i}.jpg" for i in range(6)],
    "s000002": [f"http://127.0.0.1:9/img/{i}.png" for i in range(6, 10)],
    "s000003": [f"http://127.0.0.1:9/img/{i}.gif" for i in range(10, 13)],
}
# the console script's entry point (``python -m imgpipe_dagster.cli`` would load cli twice)
IMGPIPE = [sys.executable, "-c", "import sys; from imgpipe_dagster.cli import main; sys.exit(main())"]
THROTTLE_REASON = "p95 inference 51234 ms over the slow threshold 45000 ms for 3 ticks: stepping down"


def finish(conn, url: str, status: str, minutes_ago: int, gpu: str = "gpu0", error_class: str | None = None):
    """Put one URL in its final state with a result row written ``minutes_ago``."""
    state = "done" if status == "ok" else "failed_permanent"
    conn.execute("UPDATE corpus_urls SET state = %s WHERE url = %s", (state, url))
    conn.execute(
        "INSERT INTO url_analysis_results (url_hash, url, shard_id, status, created_at, gpu, error_class)"
        " SELECT url_hash, url, shard_id, %s, now() - make_interval(mins => %s), %s, %s"
        " FROM corpus_urls WHERE url = %s",
        (status, minutes_ago, gpu, error_class, url),
    )


@pytest.fixture
def seeded(conn):
    """13 URLs in 3 shards: shard 1 finished (5 ok, 1 failed), shard 2 half done, shard 3 untouched."""
    seed_corpus(conn, SHARDS)
    s1, s2 = SHARDS["s000001"], SHARDS["s000002"]
    for i, url in enumerate(s1[:5]):
        finish(conn, url, "ok", minutes_ago=i, gpu=f"gpu{i % 2}")
    finish(conn, s1[5], "failed", minutes_ago=2, error_class="http_404")
    finish(conn, s2[0], "ok", minutes_ago=1)
    finish(conn, s2[1], "failed", minutes_ago=3, error_class="timeout")
    conn.execute("UPDATE corpus_urls SET state = 'leased' WHERE url = %s", (s2[2],))
    conn.execute("UPDATE corpus_urls SET state = 'failed_retryable' WHERE url = %s", (s2[3],))
    conn.commit()
    return conn


def add_throttle_decision(conn, action="step_down", profile="conservative", reason=THROTTLE_REASON):
    conn.execute(
        "INSERT INTO throttle_decisions (decision_id, source, action, profile, previous_profile, paused, reason,"
        " submitted, inputs, state) VALUES (7, 'throttle', %s, %s, 'medium', false, %s, %s, %s, %s)",
        (action, profile, reason, ["s000003"], Jsonb({}), Jsonb({})),
    )
    conn.commit()


@pytest.fixture(scope="module")
def gpu_server(tiny_model_dir, tmp_path_factory):
    """One live tiny-model server on the CPU, started the way `imgpipe gpu-server start` does, shared by
    the module's tests (a server start costs seconds); IMGPIPE_HOME points at its launcher records."""
    home = tmp_path_factory.mktemp("status_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMGPIPE_HOME", str(home))
        launcher = GpuServerLauncher(
            gpu_server_records_dir(home), medium_server_settings(str(tiny_model_dir)), startup_timeout_s=300
        )
        (endpoint,) = launcher.ensure(["cpu"], base_port=0)
        try:
            yield endpoint.url
        finally:
            launcher.stop()


def run_status(database_url: str, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {db.DATABASE_URL_ENV: database_url, "COLUMNS": "100"}
    return subprocess.run(
        [*IMGPIPE, "status", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_status_screen_shows_backlog_rate_gpu_and_throttle(seeded, database_url, gpu_server):
    add_throttle_decision(seeded)

    result = run_status(database_url)

    assert result.returncode == 0, result.stderr
    screen = result.stdout.rstrip("\n")
    print(screen)
    lines = screen.splitlines()
    assert all(len(line) <= SCREEN_WIDTH for line in lines), max(lines, key=len)
    assert "profile CONSERVATIVE" in lines[0]
    # 13 URLs: 6 done, 2 failed, 5 to do (3 pending in shard 3, 1 leased, 1 waiting for a retry)
    backlog = next(line for line in lines if line.startswith("Backlog"))
    assert backlog.split()[2:] == ["13", "total", "6", "done", "2", "failed", "5", "to", "do"]
    detail = next(line for line in lines if "detail" in line)
    assert detail.split()[1:7] == ["3", "pending", "1", "leased", "1", "waiting"]
    shards = next(line for line in lines if line.strip().startswith("shards"))
    assert shards.split()[1:7] == ["3", "total", "1", "done", "2", "unfinished"]
    # 8 results within the last 10 minutes: 0.8 URLs/min; the ETA divides the 5 left by that rate
    assert "0.8 URLs/min (10 min)" in screen and "ETA 0h 06m" in screen
    minute_rows = [line for line in lines if line.startswith("  ") and "failed)" in line]
    assert len(minute_rows) == 10
    assert sum(int(row.split()[1]) for row in minute_rows) == 8
    server = next(line for line in lines if gpu_server.removeprefix("http://") in line)
    assert server.split()[1] == "ready" and "rss" in server and "no run" in server
    assert "Throttle #7" in screen and "step_down -> conservative" in screen
    assert "submitted 1 shard(s)" in screen
    reason_text = " ".join(line.strip() for line in lines[lines.index(next(x for x in lines if "reason:" in x)):])
    assert THROTTLE_REASON in reason_text
    assert "http_404 1" in screen and "timeout 1" in screen


def test_status_json_carries_the_same_figures(seeded, database_url, gpu_server):
    result = run_status(database_url, "--json", "--gpu", gpu_server)

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["urls"] == {"pending": 3, "leased": 1, "failed_retryable": 1, "failed_permanent": 2, "done": 6,
                            "total": 13, "unfinished": 5}  # fmt: skip
    assert data["shards"] == {"total": 3, "unfinished": 2, "done": 1}
    assert sum(m["ok"] for m in data["per_minute"]) == 6 and sum(m["failed"] for m in data["per_minute"]) == 2
    assert data["profile"] == "medium" and data["profile_source"] == "default" and data["last_decision"] is None
    (server,) = data["gpu_servers"]
    assert server["url"] == gpu_server and server["reachable"] and server["status"] == "ready"
    assert server["queue_capacity"] > 0 and server["max_batch_size"] > 0
    assert server["memory_kind"] == "rss" and server["memory_used_bytes"] > 0


def test_no_throttle_decision_and_an_unreachable_server(conn, database_url, imgpipe_home):
    with refused_port() as port:
        down = f"http://127.0.0.1:{port}"
        status = collect(conn, [down])
    screen = render(status)

    assert "no throttle decision yet" in screen and "profile MEDIUM (default" in screen
    assert status.urls["total"] == 0 and status.eta_s is None and "ETA unknown" in screen
    (server,) = status.gpu_servers
    assert not server.reachable and server.error
    down_line = next(line for line in screen.splitlines() if down.removeprefix("http://") in line)
    assert "DOWN" in down_line and len(down_line) <= SCREEN_WIDTH


def test_breaker_state_comes_from_the_runs_router_snapshots(conn, imgpipe_home):
    with refused_port() as port:
        url = f"http://127.0.0.1:{port}"
        write_router_snapshot("run-a", {"endpoints": [{"name": "gpu0", "url": url, "breaker": {"state": "closed"}}]})
        write_router_snapshot("run-b", {"endpoints": [{"name": "gpu0", "url": url, "breaker": {"state": "open"}}]})

        (server,) = collect(conn, [url]).gpu_servers

    assert server.breaker == "open"  # the worst state any run sees


def test_watch_redraws_until_interrupted(seeded, database_url):
    env = os.environ | {db.DATABASE_URL_ENV: database_url}
    with subprocess.Popen(
        [*IMGPIPE, "status", "--watch", "--interval", "0.2"],
        env=env, stdout=subprocess.PIPE, text=True,
    ) as watcher:  # fmt: skip
        # the deadline: a watcher that stops drawing is killed, its output ends and the count falls short
        deadline = threading.Timer(120, watcher.kill)
        deadline.start()
        frames = 0
        try:
            for line in watcher.stdout:
                frames += line.startswith("\x1b[H\x1b[2Jimgpipe status")
                if frames == 2:
                    break
        finally:
            deadline.cancel()
        watcher.terminate()
        watcher.wait(timeout=30)
    assert frames == 2, "imgpipe status --watch drew fewer than two frames in 120 s"
