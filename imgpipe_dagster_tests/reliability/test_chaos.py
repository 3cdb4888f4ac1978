"""Chaos run: nothing lost, nothing duplicated, retries bounded, while the world breaks around the run.

5,000 URLs (about 30 % faulty, every fault of the test image server), two tiny-model GPU server
processes on the CPU (each on a free port), the engine run in a subprocess. Mid-run, driven by progress:
GPU server 0 is SIGKILLed twice and nobody but the run restarts it (its watchdog, as a Dagster run in
managed mode does), the run's database connections are terminated
(pg_terminate_backend), and the run itself is SIGKILLed and resumed by a new run. A real Dagster
materialize of image_analysis finishes, so the completeness asset check runs too. Then every URL
must be in exactly one final state matching what its URL is, with no duplicate result rows,
retryable faults tried exactly 1 + RETRY_ATTEMPTS times, permanent faults once, and no URL failed by
a GPU outage. The figures are printed (run with -s to see them).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster import materialize

from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.assets.checks import CHECK_COMPLETE
from imgpipe_dagster.fetch.errors import ErrorClass
from imgpipe_dagster.gpu_server.launcher import Endpoint, GpuServerLauncher
from imgpipe_dagster.partitions import URL_SHARDS
from imgpipe_dagster.resources import FetcherResource, GpuModelResource, PostgresResource
from imgpipe_dagster.settings_map import medium_server_settings
from imgpipe_dagster.store import work
from imgpipe_dagster.store.verify import verify
from imgpipe_dagster_tests.reliability.chaos_worker import WORKER_OVERRIDES, chaos_engine_settings
from imgpipe_dagster_tests.support import seed_corpus
from imgpipe_dagster_tests.web.image_server import ImageServer

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]

TOTAL_URLS = int(os.environ.get("IMGPIPE_CHAOS_URLS", "5000"))
FAULTY_SHARE = 0.30
SHARDS = 10
# Faults that hold a download for seconds (timeouts, deadlines, multi-MB bodies): a handful each.
SLOW_FAULTS = {
    "slow-headers", "trickle", "trickle-headers", "connect-timeout", "huge-100mp", "endless", "gzip-bomb",
    "brotli-bomb", "png-bomb", "png-bomb-64mp", "dns-failure",
}  # fmt: skip
SLOW_FAULT_URLS = 4
HEAVY_PERMANENT_FAULTS = {
    "huge-100mp", "endless", "gzip-bomb", "brotli-bomb", "png-bomb", "png-bomb-64mp", "declared-huge",
    "redirect-chain-6", "redirect-loop",
}  # fmt: skip
# Short-delay variants of the server's faults: the classes stay the same, the waits shrink.
SHORT_DELAYS = {
    "slow-headers": "/fault/slow-headers?delay=6",
    "trickle": "/fault/trickle?interval=0.2",
    "trickle-headers": "/fault/trickle-headers?interval=0.2",
    "status-429": "/fault/status/429?retry_after=1",
    "status-503": "/fault/status/503?retry_after=1",
}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "flower", "china")
FORMATS = ("jpg", "png", "webp")
# Few distinct sizes, so the image server's render cache (256 entries) holds every good payload.
WIDTHS = (64, 96, 128, 160, 192, 256)
# Progress shares (of all URLs in a final state) at which each blow lands, in order.
SCHEDULE = (
    (0.08, "kill_gpu"),
    (0.18, "terminate_db"),
    (0.30, "kill_run"),
    (0.45, "kill_gpu"),
)
# The engine part must end within this; CI (2 idle cores) needs a fraction of it. A machine shared
# with other heavy work can raise it (and pytest's --timeout) through the environment.
RUN_DEADLINE_S = int(os.environ.get("IMGPIPE_CHAOS_DEADLINE_S", "480"))
# Dagster runs after the chaos at most (each finishes what is due), and the longest wait for a due time
FINAL_RUNS = 4
DUE_WAIT_S = 900


@dataclass(frozen=True)
class CorpusUrl:
    url: str
    kind: str  # "good" or the fault's kind
    expected: ErrorClass | None  # None: must end done


def build_corpus(server: ImageServer, total: int) -> list[CorpusUrl]:
    """``total`` distinct URLs: about FAULTY_SHARE of them faults, every fault kind present."""
    faults = server.fault_cases()
    faulty = round(total * FAULTY_SHARE)
    slow = [case for case in faults if case.kind in SLOW_FAULTS]
    fast = [case for case in faults if case.kind not in SLOW_FAULTS]
    per_fast = max(1, (faulty - SLOW_FAULT_URLS * len(slow)) // len(fast))
    urls: list[CorpusUrl] = []
    for case in faults:
        url = server.url(SHORT_DELAYS[case.kind]) if case.kind in SHORT_DELAYS else case.url
        for n in range(SLOW_FAULT_URLS if case.kind in SLOW_FAULTS else per_fast):
            separator = "&" if "?" in url else "?"
            urls.append(CorpusUrl(f"{url}{separator}n={n}", case.kind, case.expected))
    for n in range(total - len(urls)):
        name, ext = PHOTOS[n % len(PHOTOS)], FORMATS[(n // len(PHOTOS)) % len(FORMATS)]
        width = WIDTHS[(n // (len(PHOTOS) * len(FORMATS))) % len(WIDTHS)]
        urls.append(CorpusUrl(server.image_url(name, ext, width=width, n=n), "good", None))
    # Interleave so every shard sees every kind, as a real corpus would.
    return [urls[i] for i in sorted(range(len(urls)), key=lambda i: (i * 7919) % len(urls))]


class Chaos:
    """The run under test and the blows dealt to it, with what was dealt."""

    def __init__(self, database_url: str, shards: list[str], launcher: GpuServerLauncher, endpoints: list[Endpoint]):
        self.database_url = database_url
        self.shards = shards
        self.launcher = launcher
        self.victim = endpoints[0]
        self.endpoints = [endpoint.url for endpoint in endpoints]
        self.killed_pids: list[int] = []
        self.runs: list[subprocess.Popen] = []
        self.events: list[dict] = []
        self.counts = collections.Counter()

    def start_run(self) -> subprocess.Popen:
        owner = f"chaos-run-{len(self.runs) + 1}"
        command = [sys.executable, "-m", "imgpipe_dagster_tests.reliability.chaos_worker", self.database_url,
                   owner, ",".join(self.shards), ",".join(self.endpoints), str(self.launcher.state_dir)]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=os.environ.copy())
        self.runs.append(process)
        return process

    def serving_victim(self, deadline_s: float = 300.0) -> dict:
        """The victim's record once a live, ready server holds it again (the run restarts a killed one)."""
        deadline = time.monotonic() + deadline_s
        while True:
            record = next((s for s in self.launcher.status() if s["slot"] == self.victim.slot), None)
            if record and record["alive"] and (record["health"] or {}).get("status") == "ready":
                return record
            assert time.monotonic() < deadline, f"GPU server {self.victim.url} not back within {deadline_s:.0f}s"
            time.sleep(0.2)

    def kill_gpu(self, conn, finished: int) -> None:
        record = self.serving_victim()
        assert record["pid"] not in self.killed_pids and record["port"] == self.victim.port
        os.kill(record["pid"], signal.SIGKILL)
        self.killed_pids.append(record["pid"])
        self.counts["gpu_kills"] += 1
        self.events.append({"event": "gpu_server_sigkill", "port": record["port"], "at_finished": finished})

    def terminate_db(self, conn, finished: int) -> None:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        ).fetchall()
        conn.commit()
        terminated = sum(1 for (ok,) in rows if ok)
        assert terminated >= 1, "the run had no database connection to terminate"
        self.counts["db_terminations"] += 1
        self.events.append({"event": "pg_terminate_backend", "connections": terminated, "at_finished": finished})

    def kill_run(self, conn, finished: int) -> None:
        victim = self.runs[-1]
        assert victim.poll() is None, "the run ended before it could be killed"
        (leased,) = conn.execute("SELECT count(*) FROM corpus_urls WHERE state = 'leased'").fetchone()
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.counts["run_kills"] += 1
        self.events.append({"event": "run_sigkill_and_resume", "leased_when_killed": leased, "at_finished": finished})
        self.start_run()


def _finished(conn) -> int:
    (n,) = conn.execute("SELECT count(*) FROM corpus_urls WHERE state IN ('done', 'failed_permanent')").fetchone()
    conn.commit()
    return n


def _summary(lines: list[str]) -> dict | None:
    """The figures a run printed as it ended (None for the run that was killed)."""
    try:
        summary = json.loads(lines[-1])
    except (IndexError, ValueError):
        return None
    keep = ("urls_done", "urls_failed_permanent", "urls_retry_later", "urls_returned_to_pending", "elapsed_s",
            "images_per_s", "per_gpu", "gpu_request_retries", "inference_ms_p50", "stage_seconds")
    return {k: summary.get(k) for k in keep}


def _drain(process: subprocess.Popen, into: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: into.extend(process.stdout), daemon=True)
    thread.start()
    return thread


def test_chaos_run_loses_nothing(dagster_instance, database_url, conn, image_server, tiny_model_dir, tmp_path: Path):
    started = time.monotonic()
    corpus = build_corpus(image_server.warm(), TOTAL_URLS)
    by_url = {c.url: c for c in corpus}
    assert len(by_url) == len(corpus) >= 5000 or TOTAL_URLS < 5000
    assert {c.kind for c in corpus} >= {case.kind for case in image_server.fault_cases()}
    shard_ids = [f"s{n:06d}" for n in range(1, SHARDS + 1)]
    seed_corpus(conn, {shard: [c.url for c in corpus[i::SHARDS]] for i, shard in enumerate(shard_ids)})
    dagster_instance.add_dynamic_partitions(URL_SHARDS, shard_ids)

    launcher = GpuServerLauncher(
        tmp_path / "gpu-servers",
        medium_server_settings(str(tiny_model_dir), max_new_tokens=8, max_inference_batch_size=32,
                               max_concurrent_generations=2, batch_wait_timeout=0.05, idle_timeout_s=900,
                               max_pixels=112 * 112),
        startup_timeout_s=300,
        # one torch thread per CPU server: two servers spinning two OpenMP threads each on 2 cores
        # run ten times slower than with one
        extra_env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    outputs: list[list[str]] = []
    chaos = None
    try:
        chaos = Chaos(database_url, shard_ids, launcher, launcher.ensure(["cpu", "cpu"], base_port=0))
        schedule = list(SCHEDULE)
        last_blow_at = 0
        chaos.start_run()
        deadline = time.monotonic() + RUN_DEADLINE_S
        while True:
            current = chaos.runs[-1]
            if len(outputs) < len(chaos.runs):
                outputs.append([])
                _drain(current, outputs[-1])
            finished = _finished(conn)
            # A blow lands at its share of progress, and never right on the heels of the previous one
            # (a GPU restart takes a while): each must hit a run that then has to live with it.
            if schedule and finished >= max(schedule[0][0] * len(corpus), last_blow_at + len(corpus) // 20):
                _share, blow = schedule.pop(0)
                getattr(chaos, blow)(conn, finished)
                last_blow_at = _finished(conn)
                continue
            if current.poll() is not None:
                break
            assert time.monotonic() < deadline, f"the run did not end within {RUN_DEADLINE_S}s ({finished} final)"
            time.sleep(0.2)
        assert chaos.runs[-1].returncode == 0, f"the last run failed (exit {chaos.runs[-1].returncode})"
        assert not schedule, f"the run ended before these blows landed: {schedule}"
        # every kill was healed by the runs alone, on the same port with the same settings
        revived = chaos.serving_victim()
        assert revived["pid"] not in chaos.killed_pids and revived["port"] == chaos.victim.port
        assert revived["settings_hash"] == chaos.victim.settings_hash
        engine_s = time.monotonic() - started

        # Real Dagster runs over every shard: they finish anything left and run the asset checks. A run
        # leaves retries and deferred hosts that are not due yet to a later run, as the throttle would
        # start one once they are due.
        for _ in range(FINAL_RUNS):
            result = materialize(
                [image_analysis], instance=dagster_instance,
                resources={
                    "postgres": PostgresResource(database_url=database_url),
                    "gpu_model": GpuModelResource(mode="external", endpoints=chaos.endpoints),
                    "fetcher": FetcherResource(allowed_networks=["127.0.0.0/8"]),
                },
                run_config={"ops": {"image_analysis": {"config": {"profile": "medium", "worker": WORKER_OVERRIDES,
                                                                  "reuse_duplicates": False}}}},  # fmt: skip
                tags={"dagster/asset_partition_range_start": shard_ids[0],
                      "dagster/asset_partition_range_end": shard_ids[-1]},
            )  # fmt: skip
            left = work.leftover(conn, shard_ids)
            conn.rollback()
            if not left.unfinished or not result.success:
                break
            while work.leftover(conn, shard_ids).claimable == 0:  # until the first is due
                conn.rollback()  # now() is the transaction's start: each look needs a new one
                assert time.monotonic() < deadline + DUE_WAIT_S, f"nothing came due: {left}"
                time.sleep(0.5)
            conn.rollback()
    finally:
        for process in chaos.runs if chaos else []:
            if process.poll() is None:
                process.kill()
                process.wait()
        launcher.stop()

    assert result.success
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks[CHECK_COMPLETE].passed is True

    retry_attempts = chaos_engine_settings().fetch_retry.retry_attempts
    rows = conn.execute(
        "SELECT c.url, c.state::text, c.attempts, r.status, r.error_class, r.gpu FROM corpus_urls c"
        " LEFT JOIN url_analysis_results r USING (url_hash)"
    ).fetchall()
    total_results, distinct_hashes, distinct_urls = conn.execute(
        "SELECT count(*), count(DISTINCT url_hash), count(DISTINCT url) FROM url_analysis_results"
    ).fetchone()
    report = verify(conn)

    final_states = collections.Counter(state for _, state, *_ in rows)
    lost = [url for url, state, _, status, *_ in rows if state not in ("done", "failed_permanent") or status is None]
    duplicates = total_results - distinct_hashes + (distinct_hashes - distinct_urls)
    wrong, over_retried, retried_permanent, gpu_failures = [], [], [], []
    permanent_after_transient = heavy_ended_transient = 0
    faults_by_class, retries_by_class, per_gpu = collections.Counter(), collections.Counter(), collections.Counter()
    for url, state, attempts, status, error_class, gpu in rows:
        expected = by_url[url]
        if status == "ok":
            per_gpu[gpu] += 1
        if error_class in ("inference_error", "gpu_unavailable"):
            gpu_failures.append((url, error_class))
        if expected.expected is None:
            if (state, status) != ("done", "ok"):
                wrong.append((expected.kind, url, state, error_class))
            continue
        faults_by_class[error_class] += 1
        retries_by_class[error_class] += attempts - 1
        if state != "failed_permanent" or status != "failed":
            wrong.append((expected.kind, url, state, error_class))
        elif expected.expected.retryable:
            # A fault that always fails is tried exactly 1 + RETRY_ATTEMPTS times, whatever was killed.
            if not ErrorClass(error_class).retryable or attempts != 1 + retry_attempts:
                over_retried.append((expected.kind, url, error_class, attempts))
        elif error_class != expected.expected.value:
            # A heavy fault that ran past its deadline on every try (a loaded machine) ends in that
            # retryable class after its full retry budget; any other permanent fault ends in its own class.
            if expected.kind in HEAVY_PERMANENT_FAULTS and ErrorClass(error_class).retryable:
                heavy_ended_transient += 1
                if attempts != 1 + retry_attempts:
                    over_retried.append((expected.kind, url, error_class, attempts))
            else:
                wrong.append((expected.kind, url, state, error_class))
        elif attempts > 1:
            # A heavy fault (multi-MB body, bomb, redirect chain) can first end in a retryable
            # deadline on a loaded machine and be classified on a later try; any other permanent
            # fault is tried once.
            if expected.kind not in HEAVY_PERMANENT_FAULTS or attempts > 1 + retry_attempts:
                retried_permanent.append((expected.kind, url, error_class, attempts))
            permanent_after_transient += 1

    figures = {
        "urls": len(corpus),
        "faulty_urls": sum(1 for c in corpus if c.expected is not None),
        "fault_kinds": len({c.kind for c in corpus if c.expected is not None}),
        "faults_by_class": dict(sorted(faults_by_class.items())),
        "retries_by_class": {k: v for k, v in sorted(retries_by_class.items()) if v},
        "retries_total": sum(attempts - 1 for _, _, attempts, *_ in rows),
        "retry_attempts_setting": retry_attempts,
        "permanent_faults_classified_after_a_transient_failure": permanent_after_transient,
        "heavy_faults_past_their_deadline_every_try": heavy_ended_transient,
        "kills_survived": dict(chaos.counts),
        "events": chaos.events,
        "runs": len(chaos.runs),
        "final_states": dict(final_states),
        "images_by_gpu": dict(per_gpu),
        "duplicates": duplicates,
        "lost": len(lost),
        "wrong_final_state": len(wrong),
        "gpu_caused_failures": len(gpu_failures),
        "engine_s": round(engine_s, 1),
        "run_summaries": [_summary(lines) for lines in outputs],
        "total_s": round(time.monotonic() - started, 1),
        "asset_check_every_url_final": checks[CHECK_COMPLETE].passed,
        "verify": report.lines()[-1],
    }
    print("\nCHAOS " + json.dumps(figures, indent=1))

    assert report.complete and report.urls == len(corpus), report.lines()
    assert lost == [] and duplicates == 0 and total_results == len(corpus)
    assert wrong == [], wrong[:10]
    assert gpu_failures == [], gpu_failures[:10]
    assert over_retried == [], over_retried[:10]
    assert retried_permanent == [], retried_permanent[:10]
    assert chaos.counts == {"gpu_kills": 2, "db_terminations": 1, "run_kills": 1}
    assert per_gpu.keys() == {"gpu0", "gpu1"}


def test_every_fault_kind_is_in_the_corpus(image_server):
    corpus = build_corpus(image_server, 5000)
    kinds = collections.Counter(c.kind for c in corpus)
    assert len(corpus) == 5000 and len({c.url for c in corpus}) == 5000
    assert set(kinds) - {"good"} == {case.kind for case in image_server.fault_cases()}
    assert 0.28 <= (5000 - kinds["good"]) / 5000 <= 0.32
    assert all(kinds[kind] == SLOW_FAULT_URLS for kind in SLOW_FAULTS)
