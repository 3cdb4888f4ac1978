"""`imgpipe metrics`: serve the pipeline's rate, backlog and errors as Prometheus /metrics
(the exporter is imgpipe_dagster.metrics)."""

from __future__ import annotations

import argparse
import time

from imgpipe_dagster.cli.ports import ensure_port_free
from imgpipe_dagster.metrics import DEFAULT_PORT, serve
from imgpipe_dagster.store import database as db


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("metrics", help="serve the pipeline's rate, backlog and errors as Prometheus /metrics")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for a remote Prometheus)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--min-interval", type=float, default=15.0, help="seconds a database reading is reused")
    p.set_defaults(handler=cmd_metrics)


def cmd_metrics(args: argparse.Namespace) -> int:
    ensure_port_free(args.host, args.port)
    url = db.resolve_database_url()
    server, _thread = serve(url, args.host, args.port, args.min_interval)
    print(f"imgpipe metrics: http://{args.host}:{server.server_port}/metrics ({db.redact(url)})", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.shutdown()
