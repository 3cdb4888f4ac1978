"""`imgpipe dev`: the Dagster UI and daemon on 127.0.0.1 with the project's database."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from imgpipe_dagster.cli.ports import ensure_port_free
from imgpipe_dagster.local_instance import dagster_home, prepare_environment, project_file
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
    # The workspace names the code location `imgpipe_dagster` (a bare -m would name it after the
    # module). Started in DAGSTER_HOME, so Dagster finds no other dagster.yaml in its working folder
    # to warn about.
    workspace = home / "workspace.yaml"
    shutil.copyfile(project_file("workspace.yaml"), workspace)
    cmd = [sys.executable, "-m", "dagster", "dev", "-h", args.host, "-p", str(args.port), "-w", str(workspace)]
    print(f"Dagster UI: http://{args.host}:{args.port}  (DAGSTER_HOME={home})", flush=True)
    # `dagster dev` warns that `dg dev` supersedes it; dg needs a dg project layout we do not use.
    env = {**os.environ, "PYTHONWARNINGS": _add_filter(os.environ.get("PYTHONWARNINGS"), DEV_COMMAND_NOTICE)}
    # SIGTERM, SIGHUP or Ctrl-C: the whole tree stops (webserver, daemon, code servers, run workers).
    return supervise(cmd, grace_s=DEV_STOP_GRACE_S, cwd=home, env=env)


DEV_COMMAND_NOTICE = "ignore:Function `dev_command` is superseded"


def _add_filter(existing: str | None, entry: str) -> str:
    return f"{existing},{entry}" if existing else entry
