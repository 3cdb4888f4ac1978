"""What a hostile client costs a GPU server, guarded (this project's defaults) against a baseline server
that has the guards switched off (no pixel cap, no header/body deadline, no connection cap): the
server as it was before. Both run the tiny model on the CPU, started by the launcher, in this run.

One JSON line per figure and server:

- ``rss_pixel_bomb``: the server's RSS (and its peak, VmHWM) before and after it is sent one
  12000x12000 (144 MP) black RGB PNG of about 420 KB, and the per-image answer;
- ``slowloris``: connections the server holds for ``--slow-clients`` clients that send a request head
  a byte at a time, seen halfway to the header timeout and again after it (plus two seconds);
- ``idle_flood``: connections held for ``--flood-clients`` connections that never send a byte, and
  the latency of one ``/health`` probe meanwhile;
- ``health_latency``: the latency p50/p95 of a ``/health`` probe (one at a time with the token, a
  fresh connection each, as the launcher asks) idle and while another process keeps ``--concurrency``
  requests in flight (each connection asking again as soon as answered): ``/health`` requests, then
  analyses of one small JPEG (most of them answered 429 once the queue is full);
  ``load_answers_per_s`` is what the server answered that load meanwhile.

    python bench/server_defense.py                     # about a minute; needs ~2 GB for the baseline's decode
    python bench/server_defense.py --slow-clients 300 --concurrency 400 --header-timeout 10

The machine is shared: latencies move with the load of the moment; compare the two servers of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from imgpipe_dagster.gpu_server import wire  # noqa: E402
from imgpipe_dagster.gpu_server.launcher import Endpoint, GpuServerLauncher  # noqa: E402
from imgpipe_dagster.gpu_server.tiny_model import build_tiny_model  # noqa: E402
from imgpipe_dagster.settings_map import medium_server_settings  # noqa: E402
from imgpipe_dagster_tests.web.image_server import rgb_png_bomb  # noqa: E402

TOKEN = "bench-server-defense"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MB = 1024 * 1024


def start_server(name: str, model_dir: Path, state_dir: Path, guarded: bool, header_timeout_s: float) -> Endpoint:
    settings = medium_server_settings(str(model_dir), device="cpu", max_new_tokens=4, bearer_token=TOKEN,
                                      header_timeout_s=header_timeout_s)  # fmt: skip
    if not guarded:  # the server as it was: decode anything, wait for anyone, accept everyone
        settings = settings.replace(header_timeout_s=1e9, body_timeout_s=1e9, max_connections=10**6)
        settings = settings.replace_model(max_source_pixels=10**12)
    launcher = GpuServerLauncher(state_dir / name, settings, startup_timeout_s=300)
    (endpoint,) = launcher.ensure(["cpu"], base_port=0)
    return endpoint


def emit(figure: str, server: str, **values) -> None:
    print(json.dumps({"bench": "server_defense", "figure": figure, "server": server, **values}), flush=True)


def rss_pixel_bomb(server: str, endpoint: Endpoint) -> None:
    process = psutil.Process(endpoint.pid)
    before, peak_before = process.memory_info().rss, peak_rss(endpoint.pid)
    bomb = rgb_png_bomb(12_000, 12_000)
    started = time.perf_counter()
    response = httpx.post(f"{endpoint.url}/v1/analyze", content=wire.encode_request([bomb], "analysis_v1"),
                          headers={"Content-Type": wire.CONTENT_TYPE, **AUTH}, timeout=600)  # fmt: skip
    elapsed = time.perf_counter() - started
    after, peak_after = process.memory_info().rss, peak_rss(endpoint.pid)
    answer = response.json()["results"][0]["error"] if response.status_code == 200 else response.text
    emit("rss_pixel_bomb", server, png_bytes=len(bomb), rss_before_mb=round(before / MB), rss_after_mb=round(after / MB),
         peak_rss_before_mb=round(peak_before / MB), peak_rss_after_mb=round(peak_after / MB),
         request_s=round(elapsed, 2), answer=(answer or "analysed")[:120])  # fmt: skip


def peak_rss(pid: int) -> int:
    """The process's highest RSS so far (VmHWM): a decode's peak even after its memory was freed."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def held_connections(pid: int) -> int:
    return sum(1 for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED)


def slowloris(server: str, endpoint: Endpoint, clients: int, header_timeout_s: float) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: bench\r\nX-Slow: "
    sockets: list[socket.socket] = []
    try:
        for _ in range(clients):
            sock = socket.create_connection(("127.0.0.1", endpoint.port), timeout=10)
            sock.setblocking(False)
            sockets.append(sock)
        started = time.monotonic()
        sent = 0
        seen: dict[str, int] = {}
        checkpoints = {"before_timeout": header_timeout_s / 2, "after_timeout": header_timeout_s + 2.0}
        while len(seen) < len(checkpoints):
            # one more byte of the head from every client each 0.5 s: never the blank line that ends it
            for sock in sockets:
                try:
                    sock.send(head[sent : sent + 1] if sent < len(head) else b"x")
                except OSError:
                    pass  # closed by the server: what the guard is for
            sent += 1
            elapsed = time.monotonic() - started
            for name, at in checkpoints.items():
                if name not in seen and elapsed >= at:
                    seen[name] = held_connections(endpoint.pid)
            time.sleep(0.5)
        emit("slowloris", server, clients=clients, header_timeout_s=header_timeout_s,
             held_before_timeout=seen["before_timeout"], held_after_timeout=seen["after_timeout"])  # fmt: skip
    finally:
        for sock in sockets:
            sock.close()


def idle_flood(server: str, endpoint: Endpoint, clients: int) -> None:
    """``clients`` connections that never send a byte; then one /health probe while they are open."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(clients):
            sockets.append(socket.create_connection(("127.0.0.1", endpoint.port), timeout=10))
        time.sleep(1.0)  # let the server accept (and evict) what it will
        held = held_connections(endpoint.pid)
        probe = probe_latencies(endpoint.url, 1, {})[0]
        emit("idle_flood", server, clients=clients, held=held, health_probe_ms=ms(probe))
    finally:
        for sock in sockets:
            sock.close()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def load_request(kind: str) -> bytes:
    """One raw HTTP request of the load: a /health probe, or an analysis of one small JPEG."""
    if kind == "health":
        return b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n"
    picture = io.BytesIO()
    Image.new("RGB", (112, 112), "teal").save(picture, "JPEG")
    body = wire.encode_request([picture.getvalue()], "analysis_v1")
    head = (f"POST /v1/analyze HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {wire.CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def _load(port: int, request: bytes, concurrency: int, stop_at: float, counter) -> None:
    """``concurrency`` keep-alive connections, each sending ``request`` again as soon as answered."""

    async def one_client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop_at:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                with counter.get_lock():
                    counter.value += 1
        finally:
            writer.close()

    await asyncio.gather(*(one_client() for _ in range(concurrency)), return_exceptions=True)


def _run_load(port: int, request: bytes, concurrency: int, stop_at: float, counter) -> None:
    asyncio.run(_load(port, request, concurrency, stop_at, counter))


def probe_latencies(url: str, count: int, headers: dict) -> list[float]:
    """/health answered one at a time on a fresh connection each, as the launcher asks (seconds)."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        httpx.get(f"{url}/health", headers=headers, timeout=120).raise_for_status()
        latencies.append(time.perf_counter() - started)
    return latencies


def health_latency(server: str, endpoint: Endpoint, concurrency: int, probes: int) -> None:
    """The probe's latency (with the token, as the launcher asks) idle, then while a separate process
    keeps ``concurrency`` requests in flight: /health ones, then analyses of one image each."""
    headers = AUTH
    for kind in ("health", "analyze"):
        idle = probe_latencies(endpoint.url, probes, headers)
        counter = multiprocessing.Value("l", 0)
        stop_at = time.monotonic() + 3600
        load = multiprocessing.get_context("fork").Process(
            target=_run_load, args=(endpoint.port, load_request(kind), concurrency, stop_at, counter), daemon=True
        )
        load.start()
        try:
            deadline = time.monotonic() + 60
            while counter.value < concurrency and time.monotonic() < deadline:
                time.sleep(0.1)  # every load connection has had an answer: the load is on
            served_before, started = counter.value, time.monotonic()
            loaded = probe_latencies(endpoint.url, probes, headers)
            load_rate = (counter.value - served_before) / (time.monotonic() - started)
        finally:
            load.kill()
            load.join()
        emit("health_latency", server, load=kind, probes=probes, idle_p50_ms=ms(statistics.median(idle)),
             idle_p95_ms=ms(percentile(idle, 0.95)), concurrency=concurrency,
             loaded_p50_ms=ms(statistics.median(loaded)), loaded_p95_ms=ms(percentile(loaded, 0.95)),
             load_answers_per_s=round(load_rate))  # fmt: skip


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow-clients", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=400)
    parser.add_argument("--flood-clients", type=int, default=3000, help="idle connections (above the 1,000 cap)")
    parser.add_argument("--probes", type=int, default=40, help="/health probes idle and under load")
    parser.add_argument("--header-timeout", type=float, default=10.0, help="the guarded server's header_timeout_s")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unguarded server (saves ~2 GB)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="server-defense-") as scratch:
        work = Path(scratch)
        model_dir = build_tiny_model(work / "tiny")
        servers = [("guarded", True)] + ([] if options.no_baseline else [("baseline", False)])
        launchers = []
        try:
            for name, guarded in servers:
                endpoint = start_server(name, model_dir, work, guarded, options.header_timeout)
                launchers.append(GpuServerLauncher(work / name))
                rss_pixel_bomb(name, endpoint)
                slowloris(name, endpoint, options.slow_clients, options.header_timeout)
                idle_flood(name, endpoint, options.flood_clients)
                health_latency(name, endpoint, options.concurrency, options.probes)
        finally:
            for launcher in launchers:
                launcher.stop(timeout_s=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
