"""`imgpipe gpu-server start | stop | status` and `imgpipe make-tiny-model`: the inference servers and
the tiny test model."""

from __future__ import annotations

import argparse

from imgpipe_dagster.paths import gpu_server_records_dir


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu-server", help="start | stop | status of the per-GPU inference servers",
                       add_help=False)
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="launcher options (--devices, --base-port) and server options (--model, …)")
    p.set_defaults(handler=cmd_gpu_server)

    p = sub.add_parser("make-tiny-model", help="write a tiny random Qwen2-VL checkpoint (tests, demos)")
    p.add_argument("dir")
    p.add_argument("--arch", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_make_tiny_model)


def cmd_gpu_server(args: argparse.Namespace) -> int:
    from imgpipe_dagster.environment import read_environment
    from imgpipe_dagster.gpu_server.launcher import launcher_main

    passthrough = list(args.rest)
    if not any(a.startswith("--state-dir") for a in passthrough):
        passthrough = ["--state-dir", str(gpu_server_records_dir()), *passthrough]
    return launcher_main([args.action, *passthrough], bearer_token=read_environment().gpu_token)


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from imgpipe_dagster.gpu_server.tiny_model import build_tiny_model

    path = build_tiny_model(args.dir, arch=args.arch, seed=args.seed)
    print(f"tiny random {args.arch} checkpoint written to {path} (for tests: its text is noise)")
    return 0
