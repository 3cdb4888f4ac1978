"""Adaptive limiter against a simulated batching GPU server on loopback, versus a fixed-rate limiter.

The server (a subprocess, real HTTP on 127.0.0.1) models one batching GPU server: ``--knee``
requests are processed together in ``--base-latency-s`` (+-10%), so latency is flat up to the
knee and then grows with queue depth (FIFO behind the batch); past ``--knee + --queue-bound``
requests in the server it answers 429. ``POST /<scenario>/stall`` freezes it for a while.

Four scenarios run at once, each with its own simulated server and 48 busy callers (an endless
backlog, as in the real pipeline): the adaptive limiter with each legacy profile's settings, and
a fixed-rate limiter at the legacy MEDIUM settings (RESILIENCE_INITIAL_RATE req/s, at most
RESILIENCE_MAX_CONCURRENT in flight). Time is scaled by ``--time-scale`` (durations x scale,
rates / scale, concurrency unchanged); every figure is reported in real-equivalent seconds.

Phases: converge, steady, stall (the server freezes for --stall-s), recovery. One JSON line per
figure, then ratios of the adaptive MEDIUM run against the fixed-rate run.

    .venv/bin/python bench/limiter.py            # about 130 s of wall time at --time-scale 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from imgpipe_dagster.resilience import AdaptiveLimiter, LimiterSettings  # noqa: E402
from imgpipe_dagster.settings_map import profile_engine_settings  # noqa: E402

SCENARIOS = ["conservative", "medium", "aggressive", "fixed_medium"]


# ---------------------------------------------------------------- server


class SimulatedServer:
    """One batching server: knee slots, FIFO queue behind them, 429 past the queue bound."""

    def __init__(self, knee: int, queue_bound: int, base_latency_s: float, seed: int) -> None:
        self.knee = knee
        self.capacity = knee + queue_bound
        self.base_latency_s = base_latency_s
        self.in_system = 0
        self.slots = asyncio.Semaphore(knee)
        self.running = asyncio.Event()
        self.running.set()
        self.rng = random.Random(seed)

    async def infer(self) -> int:
        if self.in_system >= self.capacity:
            return 429
        self.in_system += 1
        try:
            async with self.slots:
                await self.running.wait()
                await asyncio.sleep(self.base_latency_s * self.rng.uniform(0.9, 1.1))
                await self.running.wait()  # a stall also holds the batch in progress
            return 200
        finally:
            self.in_system -= 1

    def stall(self, seconds: float) -> None:
        self.running.clear()
        asyncio.get_running_loop().call_later(seconds, self.running.set)


def make_app(args: argparse.Namespace):
    servers: dict[str, SimulatedServer] = {}

    def server_for(name: str) -> SimulatedServer:
        if name not in servers:
            servers[name] = SimulatedServer(
                args.knee, args.queue_bound, args.base_latency_s * args.time_scale, args.seed + len(servers)
            )
        return servers[name]

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while True:  # drain the request body
            message = await receive()
            if not message.get("more_body"):
                break
        _, name, action = scope["path"].split("/", 2)
        server = server_for(name)
        if action == "stall":
            seconds = float(parse_qs(scope["query_string"].decode())["seconds"][0])
            server.stall(seconds)
            status = 200
        else:
            status = await server.infer()
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    return app


def serve(args: argparse.Namespace) -> None:
    """The simulated server on ``--port`` (0: the system picks); its first line says where it listens."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", args.port))
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(make_app(args), log_level="warning", access_log=False))
    server.run(sockets=[sock])


@asynccontextmanager
async def server_process(args: argparse.Namespace) -> AsyncIterator[str]:
    command = [sys.executable, __file__, "--serve", "--port", "0"] + [
        f"--{key.replace('_', '-')}={getattr(args, key)}"
        for key in ("knee", "queue_bound", "base_latency_s", "time_scale", "seed")
    ]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=60)
    except TimeoutError:
        process.kill()
        process.wait()
        raise RuntimeError("simulated server did not say where it listens within 60 s") from None
    if not line.startswith("listening on http://127.0.0.1:"):
        process.kill()
        process.wait()
        raise RuntimeError(f"simulated server did not start: {line!r}")
    port = int(line.rsplit(":", 1)[1])
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(200):
                try:
                    await client.post(f"{base}/probe/stall?seconds=0")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError("simulated server did not start")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---------------------------------------------------------------- clients


class FixedRateLimiter:
    """The legacy shape: a constant request rate with an in-flight cap, no feedback."""

    def __init__(self, rate: float, max_in_flight: int) -> None:
        self.rate = rate
        self.cap = max_in_flight
        self.slots = asyncio.Semaphore(max_in_flight)
        self.next_start = 0.0
        self.in_flight = 0

    @property
    def effective_limit(self) -> int:
        return self.cap

    @asynccontextmanager
    async def slot(self):
        async with self.slots:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + 1.0 / self.rate
            await asyncio.sleep(start - now)
            self.in_flight += 1
            try:
                yield NoFeedback()
            finally:
                self.in_flight -= 1


class NoFeedback:
    def success(self, latency_s=None) -> None:
        pass

    def loss(self, kind, latency_s=None) -> None:
        pass


@dataclass
class Run:
    name: str
    limiter: object
    request_timeout_s: float
    events: list[tuple[float, int, float]] = field(default_factory=list)  # (t, status, latency); 0 = timeout
    limits: list[tuple[float, int, int]] = field(default_factory=list)  # (t, limit, in flight)
    rejected: int = 0


async def worker(run: Run, client: httpx.AsyncClient, url: str, t0: float, stop: asyncio.Event) -> None:
    from imgpipe_dagster.resilience import QueueFull, QueueTimeout

    while not stop.is_set():
        try:
            async with run.limiter.slot() as slot:
                began = time.monotonic()
                try:
                    response = await client.post(url, timeout=run.request_timeout_s)
                except httpx.TimeoutException:
                    latency = time.monotonic() - began
                    slot.loss("timeout", latency)
                    run.events.append((began - t0 + latency, 0, latency))
                    continue
                latency = time.monotonic() - began
                if response.status_code == 429:
                    slot.loss("429", latency)
                else:
                    slot.success(latency)
                run.events.append((began - t0 + latency, response.status_code, latency))
        except (QueueFull, QueueTimeout):
            run.rejected += 1
            await asyncio.sleep(0.01)


async def sample_limits(run: Run, t0: float, stop: asyncio.Event, every_s: float) -> None:
    while not stop.is_set():
        run.limits.append((time.monotonic() - t0, run.limiter.effective_limit, run.limiter.in_flight))
        await asyncio.sleep(every_s)


# ---------------------------------------------------------------- figures


def window(events, start: float, end: float):
    return [e for e in events if start <= e[0] < end]


def throughput(events, start: float, end: float) -> float:
    return sum(1 for e in window(events, start, end) if e[1] == 200) / (end - start)


def share_429(events, start: float, end: float) -> float:
    answered = window(events, start, end)
    return sum(1 for e in answered if e[1] == 429) / len(answered) if answered else 0.0


def first_in_band(limits, band: tuple[float, float]) -> float | None:
    """First time the limit is near the knee."""
    return next((t for t, limit, _ in limits if band[0] <= limit <= band[1]), None)


def share_in_band(limits, band: tuple[float, float], start: float, end: float) -> float:
    inside = [band[0] <= limit <= band[1] for t, limit, _ in limits if start <= t < end]
    return sum(inside) / len(inside) if inside else 0.0


def recovery_time(events, stall_end: float, end: float, target: float, bin_s: float) -> float | None:
    """Time from the end of the stall until a bin's throughput is back to ``target``."""
    t = stall_end
    while t + bin_s <= end:
        if throughput(events, t, t + bin_s) >= target:
            return t + bin_s - stall_end
        t += bin_s / 4
    return None


def figures(run: Run, args: argparse.Namespace, phases: dict[str, float]) -> dict[str, object]:
    scale = args.time_scale
    knee_rate = args.knee / (args.base_latency_s * scale)
    steady_start, steady_end = phases["steady_start"], phases["stall_start"]
    stall_end, end = phases["stall_end"], phases["end"]
    steady_tp = throughput(run.events, steady_start, steady_end)
    steady_latencies = [e[2] for e in window(run.events, steady_start, steady_end) if e[1] == 200]
    steady_limits = [limit for t, limit, _ in run.limits if steady_start <= t < steady_end]
    band = (args.knee * args.band_low, args.knee * args.band_high)
    converged = first_in_band(run.limits, band)
    bound_s = args.bound_intervals * getattr(run.limiter, "settings", LimiterSettings().scaled(scale)).rate_adjustment_interval
    recovered = recovery_time(run.events, stall_end, end, 0.9 * steady_tp, args.recovery_bin_s * scale)
    after_stall_limits = [limit for t, limit, _ in run.limits if phases["stall_start"] <= t < end]
    return {
        "convergence_s": round(converged / scale, 1) if converged is not None else None,
        "convergence_bound_s": round(bound_s / scale, 1),
        "converged_within_bound": converged is not None and converged <= bound_s,
        "steady_share_of_time_near_knee": round(share_in_band(run.limits, band, steady_start, steady_end), 3),
        "steady_limit_median": statistics.median(steady_limits) if steady_limits else None,
        "steady_limit_min": min(steady_limits) if steady_limits else None,
        "steady_limit_max": max(steady_limits) if steady_limits else None,
        "steady_throughput_share_of_knee": round(steady_tp / knee_rate, 3),
        "steady_throughput_rps": round(steady_tp * scale, 3),
        "steady_429_share": round(share_429(run.events, steady_start, steady_end), 4),
        "steady_latency_p50_s": round(statistics.median(steady_latencies) / scale, 2) if steady_latencies else None,
        "steady_latency_p95_s": round(
            statistics.quantiles(steady_latencies, n=20)[-1] / scale, 2
        ) if len(steady_latencies) > 20 else None,
        "stall_limit_min": min(after_stall_limits) if after_stall_limits else None,
        "recovery_s": round(recovered / scale, 1) if recovered is not None else None,
        "recovery_429_share": round(share_429(run.events, stall_end, end), 4),
        "timeouts": sum(1 for e in run.events if e[1] == 0),
        "client_rejections": run.rejected,
    }


# ---------------------------------------------------------------- main


def make_run(name: str, args: argparse.Namespace) -> Run:
    scale = args.time_scale
    if name == "fixed_medium":
        medium = profile_engine_settings("medium")
        limiter = FixedRateLimiter(medium.limiter.resilience_initial_rate / scale, medium.limiter.resilience_max_concurrent)
        return Run(name, limiter, medium.run.request_timeout * scale)
    profile = profile_engine_settings(name)
    limiter = AdaptiveLimiter(f"sim-{name}", profile.limiter.scaled(scale))
    return Run(name, limiter, profile.run.request_timeout * scale)


async def bench(args: argparse.Namespace) -> None:
    scale = args.time_scale
    phases_wall = {
        "steady_start": args.converge_s * scale,
        "stall_start": (args.converge_s + args.steady_s) * scale,
    }
    phases_wall["stall_end"] = phases_wall["stall_start"] + args.stall_s * scale
    phases_wall["end"] = phases_wall["stall_end"] + args.recovery_s * scale
    runs = [make_run(name, args) for name in SCENARIOS]
    async with server_process(args) as base:
        # One connection pool per scenario, as each GPU server gets its own in the product.
        limits = httpx.Limits(max_connections=args.workers, max_keepalive_connections=args.workers)
        clients = [httpx.AsyncClient(limits=limits) for _ in runs]
        try:
            stop = asyncio.Event()
            t0 = time.monotonic()
            tasks = []
            for run, client in zip(runs, clients, strict=True):
                url = f"{base}/{run.name}/infer"
                tasks += [asyncio.create_task(worker(run, client, url, t0, stop)) for _ in range(args.workers)]
                tasks.append(asyncio.create_task(sample_limits(run, t0, stop, 0.05)))
            await asyncio.sleep(phases_wall["stall_start"])
            for run, client in zip(runs, clients, strict=True):
                await client.post(f"{base}/{run.name}/stall?seconds={args.stall_s * scale}")
            await asyncio.sleep(phases_wall["end"] - (time.monotonic() - t0))
            stop.set()
            await asyncio.wait(tasks, timeout=args.workers)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for client in clients:
                await client.aclose()

    common = {
        "bench": "limiter",
        "time_scale": scale,
        "knee": args.knee,
        "server_429_past": args.knee + args.queue_bound,
        "base_latency_s": args.base_latency_s,
        "knee_rps": round(args.knee / args.base_latency_s, 3),
    }
    results = {run.name: figures(run, args, phases_wall) for run in runs}
    for name, values in results.items():
        for figure, value in values.items():
            print(json.dumps({**common, "profile": name, "figure": figure, "value": value}))
    adaptive, fixed = results["medium"], results["fixed_medium"]
    for figure in ("steady_throughput_rps", "steady_latency_p50_s", "steady_latency_p95_s", "steady_429_share"):
        if adaptive[figure] is not None and fixed[figure]:
            print(json.dumps({
                **common, "profile": "medium", "figure": f"{figure}_ratio_vs_fixed_rate",
                "value": round(adaptive[figure] / fixed[figure], 3),
                "adaptive": adaptive[figure], "fixed_rate": fixed[figure],
            }))
    wall = time.monotonic() - t0
    print(json.dumps({**common, "figure": "wall_s", "value": round(wall, 1)}))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-scale", type=float, default=0.2, help="wall seconds per real-equivalent second")
    parser.add_argument("--knee", type=int, default=12, help="requests the server batches at flat latency")
    parser.add_argument("--queue-bound", type=int, default=8, help="queued requests past the knee before 429")
    parser.add_argument("--base-latency-s", type=float, default=3.5, help="batch latency (legacy GEN_TIME_DEFAULT_EST)")
    parser.add_argument("--workers", type=int, default=48, help="busy callers per scenario")
    parser.add_argument("--converge-s", type=float, default=200.0)
    parser.add_argument("--steady-s", type=float, default=200.0)
    parser.add_argument("--stall-s", type=float, default=30.0)
    parser.add_argument("--recovery-s", type=float, default=200.0)
    parser.add_argument("--recovery-bin-s", type=float, default=5.0, help="throughput bin for recovery")
    parser.add_argument("--bound-intervals", type=int, default=10, help="stated convergence bound, in adjustment intervals")
    parser.add_argument("--band-low", type=float, default=0.75, help="near the knee: limit >= knee x this")
    parser.add_argument("--band-high", type=float, default=1.5, help="near the knee: limit <= knee x this")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve:
        serve(arguments)
    else:
        # The limiter's one-line facts go to stderr; stdout carries only the JSON figures.
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(relativeCreated)8.0fms %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)
        asyncio.run(bench(arguments))
