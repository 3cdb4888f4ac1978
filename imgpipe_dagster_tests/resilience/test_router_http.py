"""The router against two real HTTP servers on loopback: a failing server is taken out, work goes on."""

from __future__ import annotations

import asyncio
import socket

import httpx
import uvicorn

from imgpipe_dagster.resilience import BreakerState, Router
from imgpipe_dagster_tests.resilience.medium import medium_breaker, medium_limiter

STARTUP_TIMEOUT_S = 30


def answering(status: int):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    return app


async def start(app) -> tuple[uvicorn.Server, asyncio.Task, str]:
    """Serve ``app`` on a socket bound to port 0 here, so the port is ours before uvicorn starts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
    while not server.started:
        assert not task.done(), f"uvicorn stopped before it started: {task.exception() if not task.cancelled() else 'cancelled'}"
        assert asyncio.get_running_loop().time() < deadline, f"uvicorn not started within {STARTUP_TIMEOUT_S}s"
        await asyncio.sleep(0.01)
    return server, task, f"http://127.0.0.1:{port}"


def test_a_server_answering_500_is_taken_out_and_the_healthy_one_takes_the_work():
    async def scenario():
        healthy = await start(answering(200))
        broken = await start(answering(500))
        breakers = medium_breaker(
            circuit_failure_threshold=5, circuit_window_size=10, circuit_minimum_calls=5,
            circuit_timeout_seconds=3600,
        )
        router = Router([broken[2], healthy[2]], medium_limiter(max_concurrent_requests=0), breakers)
        served_by: list[str] = []
        try:
            async with httpx.AsyncClient() as client:

                async def one_request() -> None:
                    async with router.route() as lease:
                        response = await client.get(lease.endpoint)
                        if response.status_code >= 500:
                            lease.loss("error")
                        else:
                            lease.success()
                            served_by.append(lease.name)

                for _ in range(5):  # rounds of 14 at once: more than one server's limit of 8
                    await asyncio.gather(*(one_request() for _ in range(14)))
        finally:
            for server, task, _ in (healthy, broken):
                server.should_exit = True
                await task
        assert router.endpoints[0].breaker.state is BreakerState.OPEN
        failed_calls = 70 - len(served_by)
        # Only calls already in flight when it opened (at most its first limit of 8) reached the broken server.
        assert 5 <= failed_calls <= 8
        assert set(served_by) == {"gpu1"}
        snapshot = router.snapshot()
        counters = snapshot["endpoints"][0]["breaker"]["counters"]
        assert counters["failures_error"] == 5 and counters["stale_outcomes"] == failed_calls - 5

    asyncio.run(scenario())
