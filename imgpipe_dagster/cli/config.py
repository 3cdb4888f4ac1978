"""`imgpipe check-config FILE...`: a run config checked before `dagster job launch -c FILE...` meets it."""

from __future__ import annotations

import argparse
import sys


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-config", help="check run config files (keys, types, profile, ranges) before a launch")
    p.add_argument("files", nargs="+", help="run config YAML files, merged in order as repeated -c files are")
    p.add_argument("--job", default=None, help="job to check against (default: analyze_<the file's profile>)")
    p.set_defaults(handler=cmd_check_config)


def cmd_check_config(args: argparse.Namespace) -> int:
    from imgpipe_dagster.run_config_check import problems_in

    problems = problems_in(args.files, args.job)
    for problem in problems:
        print(f"imgpipe: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(f"run config {' + '.join(args.files)}: fine")
    return 0
