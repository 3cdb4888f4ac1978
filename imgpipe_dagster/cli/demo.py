"""`imgpipe demo`: the main job end to end on embedded defaults (the steps are imgpipe_dagster.demo)."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job end to end on embedded defaults (README command one)")
    p.add_argument("--image-port", type=int, default=8765, help="port of the local sample image server")
    p.add_argument("--shard-size", type=int, default=40, help="URLs per shard of the sample corpus")
    p.add_argument("--keep-servers", action="store_true", help="leave the GPU servers warm afterwards")
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from imgpipe_dagster.demo import run_demo  # loads Dagster and the definitions: only when asked

    return run_demo(image_port=args.image_port, shard_size=args.shard_size, keep_servers=args.keep_servers)
