"""Export benchmark: one shard to Parquet streamed in batches (the product path) against the same
export holding the whole shard in memory at once (one batch), for shards of growing size.

    python bench/export.py [--rows 10000,50000] [--batch-rows 2048]

Each export runs in a fresh process that reports its peak RSS above what it held before the export,
so the two are measured the same way. Prints one JSON line per figure. Uses IMGPIPE_DATABASE_URL (or
the embedded PostgreSQL) with a scratch database dropped at the end; rows are about 600 bytes, like
real analyses (bench/pipeline.py's rows).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_db import fresh_database  # noqa: E402

from imgpipe_dagster.store import database as db  # noqa: E402


def emit(**figure) -> None:
    print(json.dumps(figure), flush=True)


def fill(url: str, shard: str, rows: int) -> None:
    from pipeline import result_row, seed

    from imgpipe_dagster.store.work import UrlOutcome, claim, write_outcomes

    with db.connect(url) as conn:
        seed(conn, shard, [f"http://bench.test/{shard}/{i}.jpg" for i in range(rows)])
        claimed = claim(conn, "bench", [shard], rows, 600)
        outcomes = [UrlOutcome(c.url_hash, c.url, c.shard_id, "done", 1, result=result_row(i))
                    for i, c in enumerate(claimed)]  # fmt: skip
        for start in range(0, len(outcomes), 1000):
            write_outcomes(conn, "bench", outcomes[start : start + 1000])


def child(url: str, shard: str, out: str, batch_rows: int) -> None:
    """One export in this process: seconds, rows and peak RSS added by the export (MB)."""
    from imgpipe_dagster.store.export import export_shard

    with db.connect(url) as conn:
        conn.execute("SELECT 1").fetchone()
        conn.commit()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        exported = export_shard(conn, shard, out, batch_rows=batch_rows)
        elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": elapsed, "rows": exported.rows, "row_groups": exported.batches,
                      "bytes": exported.bytes, "rss_added_mb": (peak - before) / 1024}))  # fmt: skip


def measure(url: str, shard: str, out: str, batch_rows: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", url, shard, out, str(batch_rows)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,50000", help="shard sizes, comma separated")
    parser.add_argument("--batch-rows", type=int, default=2048)
    parser.add_argument("--child", nargs=4, metavar=("URL", "SHARD", "OUT", "BATCH_ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return
    with fresh_database() as url, tempfile.TemporaryDirectory(prefix="imgpipe-export-bench-") as out:
        for rows in (int(n) for n in args.rows.split(",")):
            shard = f"b{rows}"
            fill(url, shard, rows)
            streamed = measure(url, shard, out, args.batch_rows)
            whole = measure(url, shard, out, rows + 1)
            for name, figures in (("streamed", streamed), ("whole_shard", whole)):
                emit(figure=f"export_{name}_rows_per_s", value=round(figures["rows"] / figures["seconds"]),
                     rows=figures["rows"], row_groups=figures["row_groups"],
                     file_mb=round(figures["bytes"] / 2**20, 2))  # fmt: skip
                emit(figure=f"export_{name}_rss_added_mb", value=round(figures["rss_added_mb"], 1), rows=rows)
            emit(figure="export_rss_whole_over_streamed", rows=rows, unit="x",
                 value=round(whole["rss_added_mb"] / max(streamed["rss_added_mb"], 0.1), 2))  # fmt: skip


if __name__ == "__main__":
    main()
