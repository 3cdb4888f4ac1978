"""The small photo server behind ``imgpipe demo``: the bundled sample photographs on 127.0.0.1.

Not a test tool (the fault server lives in ``imgpipe_dagster_tests/web/``); it serves only what the
demo corpus asks for::

    python -m imgpipe_dagster._demo_photos --port 8765

- ``/img/<name>.<ext>[?w=<width>]``: a sample photo (``name`` from ``resources/sample_images/``)
  as ``jpg``, ``png``, ``webp`` or ``gif``, ``w`` pixels wide (height keeps the aspect);
- three URLs that must fail, so the demo summary shows failure handling:
  ``/fault/status/404`` (404), ``/fault/html-as-jpeg`` (an HTML page labelled image/jpeg) and
  ``/fault/truncated-jpeg`` (a JPEG cut at 60 %);
- ``/robots.txt`` answers 404 (everything allowed), like most image hosts.
"""

from __future__ import annotations

import argparse
import functools
import io
import signal
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

from imgpipe_dagster.paths import resource_path

_FORMATS = {"jpg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp"),
            "gif": ("GIF", "image/gif")}  # fmt: skip
_MAX_WIDTH = 4096
_HTML_PAGE = b"<!DOCTYPE html><html><head><title>Not found</title></head><body>Sorry.</body></html>" * 20


def _photo_files() -> dict[str, Path]:
    folder = resource_path("sample_images")
    return {p.stem: p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png")}


def photo_names() -> list[str]:
    """Stems of the bundled sample photographs, sorted."""
    return sorted(_photo_files())


@functools.lru_cache(maxsize=128)
def photo_bytes(name: str, ext: str, width: int | None) -> bytes:
    """The photo ``name`` encoded as ``ext``, ``width`` pixels wide (None: as stored)."""
    fmt, _content_type = _FORMATS[ext]
    with Image.open(_photo_files()[name]) as opened:
        image = opened.convert("RGB")
    if width is not None and width != image.width:
        height = max(1, round(image.height * width / image.width))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def render_all(widths: list[int], formats: list[str]) -> int:
    """Render every photo in every format and width ahead (a real web serves files already made):
    rendered on demand, eight at once on a loaded 2-core machine, the first bytes of a large PNG or
    WEBP came after the fetcher's 3 s time-to-first-byte limit, and three in a row opened the demo
    host's breaker. Returns the number of variants."""
    variants = [(name, ext, width) for name in photo_names() for ext in formats for width in widths]
    for variant in variants:
        photo_bytes(*variant)
    return len(variants)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "imgpipe-demo-photos/1"
    timeout = 30

    def log_message(self, format: str, *args) -> None:  # quiet: the demo prints its own summary
        return

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parts.query).items()}
        try:
            if parts.path.startswith("/img/"):
                self._photo(parts.path[len("/img/") :], query)
            elif parts.path == "/fault/html-as-jpeg":
                self._send(200, _HTML_PAGE, "image/jpeg")
            elif parts.path == "/fault/truncated-jpeg":
                body = photo_bytes("coffee", "jpg", None)
                self._send(200, body[: int(len(body) * 0.6)], "image/jpeg")
            else:  # /fault/status/404, /robots.txt and anything else
                self._send(404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _photo(self, filename: str, query: dict[str, str]) -> None:
        name, _, ext = filename.rpartition(".")
        if ext not in _FORMATS or name not in _photo_files():
            self._send(404, b"no such photo", "text/plain")
            return
        width = int(query["w"]) if query.get("w", "").isdigit() else None
        if width is not None and not 1 <= width <= _MAX_WIDTH:
            self._send(400, b"w out of range", "text/plain")
            return
        self._send(200, photo_bytes(name, ext, width), _FORMATS[ext][1])

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:  # a client hanging up is routine
        return


def serve_in_thread(host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """The photo server answering from a daemon thread; ``server_address`` holds the bound port.
    Stop it with ``shutdown()`` and ``server_close()``."""
    server = _Server((host, port), _Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the bundled sample photos for `imgpipe demo`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--render-widths", default="", help="comma-separated widths rendered in every format before serving")
    args = parser.parse_args(argv)
    if args.render_widths:
        render_all([int(w) for w in args.render_widths.split(",")], list(_FORMATS))
    # SIGTERM stops the server like Ctrl-C, even where the parent left it ignored or blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = serve_in_thread(args.host, args.port)
    print(f"demo photos on http://{args.host}:{server.server_address[1]} ({', '.join(photo_names())})", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
