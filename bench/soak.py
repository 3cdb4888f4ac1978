"""Soak: the pipeline for a bounded time against a steady mix of good and faulty URLs; RSS, open file
descriptors and rate every minute, for the run process and each GPU server. They must stay flat.

Everything is local: a fresh database on the embedded PostgreSQL (or $IMGPIPE_DATABASE_URL's
server), the test image server on 127.0.0.1, two tiny-model GPU server processes on the CPU, and
one long-lived run process that takes the unfinished shards (up to 4 at a time, as a backfill run
does) and runs the engine over them, again and again. The corpus grows: a new shard of URLs is added
whenever less than two shards of work are left.

    python bench/soak.py                 # 15 minutes
    python bench/soak.py --minutes 3     # a short check
    python bench/soak.py --trace         # + the run process' Python heap (tracemalloc) per minute and
                                         #   the allocation sites that grew after the warm-up

Prints one JSON line per minute ({"minute": m, "rate_per_s", "run": {"rss_mb", "fds"}, "gpu0": ...})
and a final line with the growth of each figure between the end of the warm-up (minute 3) and the
last minute, and its least-squares trend per minute after the warm-up: flat means near zero.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from imgpipe_dagster.store import database as db  # noqa: E402

SHARD_SIZE = 200
WARMUP_MINUTES = 3  # pools, caches and allocators fill in these; trends are measured after them
SHARDS_PER_RUN = 4  # as image_analysis's backfill policy
FAULTY_SHARE = 0.25
# Faults in the steady mix (short-delay variants): cheap ones mostly, a few that hold a connection
# or a few MB of memory for a while, so leaks of sockets or buffers would show.
FAULT_PATHS = [
    "/fault/status/404", "/fault/status/410", "/fault/status/403", "/fault/status/500",
    "/fault/status/503?retry_after=1", "/fault/status/429?retry_after=1", "/fault/reset", "/fault/close-early",
    "/fault/truncated-jpeg", "/fault/corrupt-jpeg", "/fault/html-as-jpeg", "/fault/empty", "/fault/noai",
    "/fault/redirect-loop", "/fault/redirect-to?url=http://10.0.0.1/", "/fault/declared-huge",
    "/fault/gzip-bomb", "/fault/png-bomb", "/fault/trickle?interval=0.2", "/fault/slow-headers?delay=4",
]  # fmt: skip
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "flower", "china")
FORMATS = ("jpg", "png", "webp")
WIDTHS = (64, 96, 128, 160, 192, 256)


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


# ----------------------------------------------------------------------------- the run process


def start_heap_trace(interval_s: float = 60.0, frames: int = 8):
    """tracemalloc in the run process: the Python heap's size every interval (on stdout), so RSS growth
    can be told apart from allocator fragmentation; returns a function that prints the allocation sites
    that grew most since the warm-up snapshot."""
    import threading
    import tracemalloc

    tracemalloc.start(frames)
    started = time.monotonic()
    marks: dict[str, tracemalloc.Snapshot] = {}

    def sample() -> None:
        minute = 0
        while True:
            time.sleep(interval_s)
            minute += 1
            current, peak = tracemalloc.get_traced_memory()
            emit(event="heap", minute=minute, traced_mb=round(current / 2**20, 2), peak_mb=round(peak / 2**20, 2),
                 rss_mb=round(psutil.Process().memory_info().rss / 2**20, 1))  # fmt: skip
            if minute == WARMUP_MINUTES:
                marks["warm"] = tracemalloc.take_snapshot()

    threading.Thread(target=sample, daemon=True, name="heap-trace").start()

    def report(top: int = 12) -> None:
        if "warm" not in marks:
            return
        diff = tracemalloc.take_snapshot().compare_to(marks["warm"], "traceback")
        for stat in diff[:top]:
            emit(event="heap_growth", kib=round(stat.size_diff / 1024, 1), blocks=stat.count_diff,
                 minutes_after_warmup=round((time.monotonic() - started) / 60 - WARMUP_MINUTES, 1),
                 where=[f"{frame.filename.replace(str(REPO) + '/', '')}:{frame.lineno}" for frame in stat.traceback])

    return report


def worker_main(database_url: str, endpoints: str, stop_file: str, trace: bool = False) -> int:
    """Run the engine over unfinished shards until the stop file appears."""
    import logging

    from imgpipe_dagster.engine.runner import ShardRunner
    from imgpipe_dagster_tests.reliability.chaos_worker import chaos_engine_settings

    logging.basicConfig(level=logging.WARNING, format="[soak-run] %(levelname)s %(name)s: %(message)s")
    settings = chaos_engine_settings()
    report = start_heap_trace() if trace else None
    runs = 0
    while not os.path.exists(stop_file):
        with db.connect(database_url) as conn:
            shards = [s for (s,) in conn.execute(
                "SELECT shard_id FROM shards s WHERE EXISTS (SELECT 1 FROM corpus_urls c WHERE c.shard_id = s.shard_id"
                " AND c.state IN ('pending', 'leased', 'failed_retryable')) ORDER BY shard_no LIMIT %s",
                (SHARDS_PER_RUN,)).fetchall()]  # fmt: skip
        if not shards:
            time.sleep(1.0)
            continue
        runs += 1
        ShardRunner(database_url, f"soak-run-{runs}", shards, settings, endpoints.split(","),
                    progress=lambda line, summary: None).run()  # fmt: skip
    if report is not None:
        report()
    return 0


# ----------------------------------------------------------------------------- the driver


def shard_urls(server, shard_no: int, rng: random.Random) -> list[str]:
    urls = []
    for i in range(SHARD_SIZE):
        n = shard_no * SHARD_SIZE + i
        if rng.random() < FAULTY_SHARE:
            path = rng.choice(FAULT_PATHS)
            urls.append(server.url(path) + ("&" if "?" in path else "?") + f"n={n}")
        else:
            name, ext, width = rng.choice(PHOTOS), rng.choice(FORMATS), rng.choice(WIDTHS)
            urls.append(server.image_url(name, ext, width=width, n=n))
    return urls


def add_shard(conn, server, shard_no: int, rng: random.Random) -> None:
    shard_id = f"s{shard_no:06d}"
    urls = shard_urls(server, shard_no, rng)
    conn.execute("INSERT INTO shards (shard_id, shard_no, url_count) VALUES (%s, %s, %s)",
                 (shard_id, shard_no, len(urls)))  # fmt: skip
    with conn.cursor().copy("COPY corpus_urls (url_hash, url, shard_id, source_line) FROM STDIN") as copy:
        for line, url in enumerate(urls, start=1):
            copy.write_row((hashlib.md5(url.encode()).digest(), url, shard_id, line))
    conn.commit()


def process_figures(pid: int) -> dict:
    try:
        process = psutil.Process(pid)
        return {"pid": pid, "rss_mb": round(process.memory_info().rss / 2**20, 1), "fds": process.num_fds(),
                "threads": process.num_threads()}  # fmt: skip
    except psutil.NoSuchProcess:
        return {"pid": pid, "rss_mb": None, "fds": None, "threads": None}


def growth(first: dict, last: dict) -> dict:
    out = {}
    for key in ("rss_mb", "fds", "threads"):
        a, b = first.get(key), last.get(key)
        if a is None or b is None:
            continue
        out[key] = {"baseline": a, "last": b, "change": round(b - a, 1), "ratio": round(b / a, 3) if a else None}
    return out


def slope_per_minute(values: list[float]) -> float | None:
    """Least-squares change per minute: a leak shows as a steady positive slope, noise does not."""
    points = [(i, v) for i, v in enumerate(values) if v is not None]
    if len(points) < 3:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return round(sum((x - mean_x) * (y - mean_y) for x, y in points) / spread, 3)


def driver_main(args: argparse.Namespace) -> int:
    from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
    from imgpipe_dagster.gpu_server.settings import ServerSettings
    from imgpipe_dagster.gpu_server.tiny_model import build_tiny_model
    from imgpipe_dagster.store.embedded import EmbeddedPostgres
    from imgpipe_dagster.store.migrations import migrate
    from imgpipe_dagster_tests.support import free_port_pair
    from imgpipe_dagster_tests.web.image_server import ImageServer

    state = Path(tempfile.mkdtemp(prefix="soak-", dir=REPO / ".imgpipe" if (REPO / ".imgpipe").is_dir() else None))
    server_pg = None
    if os.environ.get(db.DATABASE_URL_ENV):
        server_url = os.environ[db.DATABASE_URL_ENV]
    else:
        server_pg = EmbeddedPostgres(state / "pg")
        server_url = server_pg.start()
    database_url = db.with_database(server_url, f"imgpipe_soak_{uuid.uuid4().hex[:8]}")
    db.ensure_database(database_url)
    stop_file = state / "stop"
    worker = None
    launcher = None
    rng = random.Random(1)
    try:
        with db.connect(database_url) as conn, ImageServer() as images:
            migrate(conn)
            launcher = GpuServerLauncher(
                state / "gpu-servers",
                ServerSettings(model_path=str(build_tiny_model(state / "tiny-model")), max_new_tokens=8,
                               max_inference_batch_size=32, max_concurrent_generations=2, batch_wait_timeout=0.05,
                               engine_options={"max_pixels": 112 * 112}),
                startup_timeout_s=600, extra_env={"OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            base_port = free_port_pair()
            endpoints = launcher.ensure(["cpu", "cpu"], base_port=base_port)
            shard_no = 0
            for _ in range(3):
                shard_no += 1
                add_shard(conn, images, shard_no, rng)
            env = os.environ.copy()
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
            worker = subprocess.Popen(
                [sys.executable, __file__, "--worker", database_url, ",".join(e.url for e in endpoints),
                 str(stop_file), *(["--trace"] if args.trace else [])], env=env, cwd=REPO,
            )  # fmt: skip
            started = time.monotonic()
            emit(event="started", minutes=args.minutes, shard_size=SHARD_SIZE, faulty_share=FAULTY_SHARE,
                 run_pid=worker.pid, gpu_pids=[e.pid for e in endpoints], cpu_count=os.cpu_count(),
                 load_avg_1m=round(os.getloadavg()[0], 2))  # fmt: skip
            minutes: list[dict] = []
            last_final, last_t = 0, started
            next_sample = started + 60 * args.minutes / max(1, round(args.minutes))
            samples = max(1, round(args.minutes))
            while len(minutes) < samples:
                if worker.poll() is not None:
                    raise RuntimeError(f"the run process exited with {worker.returncode}")
                (unfinished,) = conn.execute(
                    "SELECT count(*) FROM corpus_urls WHERE state IN ('pending', 'leased', 'failed_retryable')"
                ).fetchone()
                if unfinished < 2 * SHARD_SIZE:
                    shard_no += 1
                    add_shard(conn, images, shard_no, rng)
                conn.commit()
                if time.monotonic() >= next_sample:
                    now = time.monotonic()
                    (final,) = conn.execute(
                        "SELECT count(*) FROM corpus_urls WHERE state IN ('done', 'failed_permanent')"
                    ).fetchone()
                    conn.commit()
                    gpu = {f"gpu{i}": process_figures(s["pid"]) for i, s in enumerate(
                        sorted(launcher.status(), key=lambda s: s["port"]))}  # fmt: skip
                    figures = {
                        "minute": len(minutes) + 1, "elapsed_s": round(now - started, 1),
                        "rate_per_s": round((final - last_final) / (now - last_t), 2), "urls_final": final,
                        "offered": shard_no * SHARD_SIZE,
                        "backlog": unfinished, "shards": shard_no, "run": process_figures(worker.pid), **gpu,
                        "driver": process_figures(os.getpid()), "load_avg_1m": round(os.getloadavg()[0], 2),
                    }  # fmt: skip
                    emit(**figures)
                    minutes.append(figures)
                    last_final, last_t = final, now
                    next_sample += 60 * args.minutes / samples
                time.sleep(1.0)
            stop_file.touch()
            baseline = minutes[min(WARMUP_MINUTES, len(minutes)) - 1] if minutes else None
            if baseline is not None:
                last = minutes[-1]
                rates = [m["rate_per_s"] for m in minutes[1:]] or [minutes[0]["rate_per_s"]]
                emit(event="summary", minutes=len(minutes), duration_s=round(time.monotonic() - started, 1),
                     urls_final=last["urls_final"], rate_per_s_mean=round(sum(rates) / len(rates), 2),
                     rate_per_s_min=min(rates), rate_per_s_max=max(rates), baseline_minute=baseline["minute"],
                     **{name: growth(baseline[name], last[name]) for name in ("run", "gpu0", "gpu1", "driver")},
                     # after the warm-up minutes: the trend per minute of each figure
                     slope_per_minute={
                         name: {key: slope_per_minute([m[name][key] for m in minutes[WARMUP_MINUTES:]])
                                for key in ("rss_mb", "fds", "threads")}
                         for name in ("run", "gpu0", "gpu1", "driver")
                     })  # fmt: skip
    finally:
        stop_file.touch()
        if worker is not None:
            try:
                worker.wait(timeout=180)  # it finishes the shard run in progress (and its heap report)
            except subprocess.TimeoutExpired:
                worker.send_signal(signal.SIGKILL)
                worker.wait()
        if launcher is not None:
            launcher.stop()
        if server_pg is not None:
            server_pg.stop()
        else:
            db.drop_database(database_url)
        shutil.rmtree(state, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="how long to run (default 15)")
    parser.add_argument("--trace", action="store_true",
                        help="tracemalloc in the run process: Python heap size per minute and the sites that grew")
    parser.add_argument("--worker", nargs=3, metavar=("DATABASE_URL", "ENDPOINTS", "STOP_FILE"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(*args.worker, trace=args.trace)
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
