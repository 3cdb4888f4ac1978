"""A loopback web for bench/web.py: many image hosts on distinct 127.x addresses, and a GPU stand-in.

    python bench/web_hosts.py <plan.json>     (bench/web.py starts it and reads one JSON line of ports)

Each host is a small asyncio HTTP/1.1 server (keep-alive, Content-Length bodies) bound to its own
127.0.x.y address and port 0; a *dead* host is an address whose port was bound and closed again, so
connecting is refused. A host's ``kind`` says how it answers an image request:

    ok        the image after a lognormal latency (median ``median_s``, sigma ``sigma``)
    slow      the image after ``slow_s`` seconds
    hang      reads the request and never answers
    trickle   headers at once, then the body at ``trickle_bytes_per_s``
    reset     reads the request and resets the connection (RST)
    limited   429 with Retry-After ``retry_after_s`` for a share ``limited_share`` of requests, else ok
    dead      nothing listens

Paths ending in ``/missing/…`` answer 404 on any answering host, and ``/robots.txt`` disallows
``/private/`` for every user agent. The GPU stand-in speaks the GPU server's ``/health`` and
``/v1/analyze`` contract and answers at once, so only the host side is measured. Runs in its own
process so the pipeline's CPU figures do not include it.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import socket
import struct
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgpipe_dagster.gpu_server import wire  # noqa: E402
from imgpipe_dagster.paths import resource_path  # noqa: E402

ROBOTS = b"User-agent: *\nDisallow: /private/\n"


def sample_jpegs(longest_side: int = 640) -> list[bytes]:
    """The shipped sample photos as JPEGs of a typical web size."""
    images = []
    for path in sorted(resource_path("sample_images").glob("*.[jp][pn]g")):
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((longest_side, longest_side))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85)
            images.append(buffer.getvalue())
    return images


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = b""
    length = int(headers.get("content-length", "0") or 0)
    if length:
        body = await reader.readexactly(length)
    return method, path, headers, body


def response(status: int, body: bytes = b"", content_type: str = "text/plain", extra: str = "") -> bytes:
    reason = {200: "OK", 404: "Not Found", 429: "Too Many Requests"}.get(status, "Status")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body  # fmt: skip


class Host:
    def __init__(self, spec: dict, images: list[bytes], seed: int) -> None:
        self.spec = spec
        self.kind = spec["kind"]
        self.images = images
        self.rng = random.Random(seed)

    def image_for(self, path: str) -> bytes:
        return self.images[hash(path) % len(self.images)]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await keep_alive(reader, writer, lambda method, path, body: self.answer(path, writer))

    async def answer(self, path: str, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False closes the connection."""
        spec = self.spec
        if path == "/robots.txt":
            writer.write(response(200, ROBOTS))
            await writer.drain()
            return True
        if self.kind == "hang":
            await reader_closed(writer)
            return False
        if self.kind == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if self.kind == "limited" and self.rng.random() < spec["limited_share"]:
            writer.write(response(429, b"slow down", extra=f"Retry-After: {spec['retry_after_s']}\r\n"))
            await writer.drain()
            return True
        if self.kind == "slow":
            await asyncio.sleep(spec["slow_s"])
        elif self.kind in ("ok", "limited"):
            await asyncio.sleep(self.rng.lognormvariate(spec["mu"], spec["sigma"]) if spec["median_s"] else 0)
        if "/missing/" in path:
            writer.write(response(404, b"not found"))
            await writer.drain()
            return True
        body = self.image_for(path)
        if self.kind == "trickle":
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            step = max(1, spec["trickle_bytes_per_s"] // 10)
            for start in range(0, len(body), step):
                writer.write(body[start : start + step])
                await writer.drain()
                await asyncio.sleep(0.1)
            return True
        writer.write(response(200, body, "image/jpeg"))
        await writer.drain()
        return True


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer) -> None:
    """Answer requests on one connection until the peer leaves or ``answer`` returns False."""
    try:
        while True:
            request = await read_request(reader)
            if request is None:
                return
            method, path, _, body = request
            if not await answer(method, path, body):
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def gpu_standin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The GPU server's contract, answered at once: one result per image."""

    async def answer(method: str, path: str, body: bytes) -> bool:
        if path == "/health":
            payload = {"status": "ready", "workers": 1, "queue_size": 0, "queue_capacity": 100_000,
                       "in_flight": 0, "model": "gpu-stand-in", "max_request_images": 4096}  # fmt: skip
        elif path == "/v1/analyze" and method == "POST":
            images = wire.decode_request(body).images
            payload = {"model": "gpu-stand-in", "prompt_version": "stand-in", "request_ms": 0.0, "results": [
                {"index": i, "text": "{}", "analysis": {}, "parse_ok": True, "prompt_tokens": 1,
                 "generated_tokens": 1, "error": None, "batch_size": len(images), "timings": {"inference_ms": 0.0}}
                for i in range(len(images))]}  # fmt: skip
        else:
            writer.write(response(404, b"no route"))
            await writer.drain()
            return True
        writer.write(response(200, json.dumps(payload).encode(), "application/json"))
        await writer.drain()
        return True

    await keep_alive(reader, writer, answer)


async def reader_closed(writer: asyncio.StreamWriter) -> None:
    """Hold the connection without answering until the peer gives up (or the bench ends)."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        writer.transport.abort()


def closed_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


async def serve(plan: dict) -> None:
    images = sample_jpegs()
    ports = {}
    servers = []
    for index, spec in enumerate(plan["hosts"]):
        if spec["kind"] == "dead":
            ports[spec["address"]] = closed_port(spec["address"])
            continue
        host = Host(spec, images, plan["seed"] * 1000 + index)
        server = await asyncio.start_server(host.serve, spec["address"], 0, backlog=1024)
        servers.append(server)
        ports[spec["address"]] = server.sockets[0].getsockname()[1]
    gpu = await asyncio.start_server(gpu_standin, "127.0.0.1", 0, backlog=1024)
    print(json.dumps({"hosts": ports, "gpu": f"http://127.0.0.1:{gpu.sockets[0].getsockname()[1]}"}), flush=True)
    # serve until the bench closes our stdin
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(serve(json.loads(Path(sys.argv[1]).read_text())))
