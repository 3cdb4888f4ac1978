"""`imgpipe dev`: the Dagster UI and daemon on 127.0.0.1 with the project's database."""

from __future__ import annotations

import argparse
import sys

from imgpipe_dagster.cli.ports import ensure_port_free
from imgpipe_dagster.local_instance import dagster_home, prepare_environment
from imgpipe_dagster.processes import supervise

# `dagster dev` stops its webserver, daemon and code servers on SIGINT; this long for them to finish
# before the rest of its process group is terminated.
DEV_STOP_GRACE_S = 30.0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dev", help="run the Dagster UI and daemon on the project's database")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(handler=cmd_dev)


def cmd_dev(args: argparse.Namespace) -> int:
    ensure_port_free(args.host, args.port)
    prepare_environment()
    home = dagster_home()
    cmd = [sys.executable, "-m", "dagster", "dev", "-h", args.host, "-p", str(args.port),
           "-m", "imgpipe_dagster.definitions"]
    print(f"Dagster UI: http://{args.host}:{args.port}  (DAGSTER_HOME={home})", flush=True)
    # SIGTERM, SIGHUP or Ctrl-C: the whole tree stops (webserver, daemon, code servers, run workers).
    return supervise(cmd, grace_s=DEV_STOP_GRACE_S)
