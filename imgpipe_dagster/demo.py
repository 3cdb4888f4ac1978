"""The demo (`imgpipe demo`, README command one, `make run`): the main job end to end on embedded defaults.

Starts the embedded PostgreSQL, serves the bundled sample photographs (plus a few broken URLs) on
127.0.0.1, ingests that corpus, runs the analyze_medium job over every pending shard through the
project's Dagster instance (so the runs show in the UI afterwards), and prints a summary.
Without IMGPIPE_MODEL_PATH the model is the tiny random test model, and the output says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from imgpipe_dagster.paths import gpu_server_records_dir, imgpipe_home

DEMO_WIDTHS = (320, 640, 1024)
DEMO_FORMATS = ("jpg", "png", "webp", "gif")  # every format the photo server renders
# URLs that must fail, to show failure handling in the summary.
DEMO_FAULTS = ("/fault/status/404", "/fault/html-as-jpeg", "/fault/truncated-jpeg")


def write_sample_corpus(path: Path, base_url: str) -> int:
    from imgpipe_dagster._demo_photos import photo_names

    urls = [
        f"{base_url}/img/{name}.{ext}?w={width}"
        for name in photo_names()
        for ext in DEMO_FORMATS
        for width in DEMO_WIDTHS
    ]
    urls += [base_url + fault for fault in DEMO_FAULTS]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("url\n" + "\n".join(urls) + "\n")
    return len(urls)


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the sample image server exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the sample image server did not answer {url} within {timeout_s:.0f}s")


def run_demo(image_port: int, shard_size: int, keep_servers: bool) -> int:
    """Prints its steps and a summary; returns the exit status (1 when the Dagster run failed)."""
    from dagster import DagsterInstance

    from imgpipe_dagster.assets.corpus import record_ingest_outside_a_run
    from imgpipe_dagster.corpus import ingest_files, sync_shard_partitions
    from imgpipe_dagster.environment import ALLOWED_NETWORKS_ENV, MODEL_PATH_ENV, read_environment
    from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
    from imgpipe_dagster.local_instance import dagster_home, prepare_environment
    from imgpipe_dagster.resources.gpu_model import ensure_tiny_model
    from imgpipe_dagster.store import database as db

    started = time.monotonic()
    url = prepare_environment()
    dagster_home()
    print(f"1/5 database ready: {db.redact(url)}", flush=True)

    real_model = read_environment().model_path
    if real_model:
        print(f"2/5 model: {real_model}", flush=True)
    else:
        print(f"2/5 model: tiny random Qwen2-VL at {ensure_tiny_model()} "
              f"-- ITS TEXT IS NOISE; set {MODEL_PATH_ENV} to a real checkpoint for real analyses", flush=True)
    # The sample corpus lives on 127.0.0.1, which the fetcher blocks unless told otherwise; definitions.py
    # reads the environment when the demo imports it below.
    os.environ[ALLOWED_NETWORKS_ENV] = "127.0.0.0/8"

    # Its own process: resizing photos on demand must not compete with the run for one GIL.
    image_server = subprocess.Popen(
        [sys.executable, "-m", "imgpipe_dagster._demo_photos", "--port", str(image_port),
         "--render-widths", ",".join(map(str, DEMO_WIDTHS))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{image_port}"
    try:
        # the server renders every sample photo before it listens (seconds, more on a busy machine)
        wait_for_http(base_url + "/img/rocket.jpg?w=64", image_server, timeout_s=300.0)
        corpus_file = imgpipe_home() / "demo" / "sample_corpus.csv"
        n_urls = write_sample_corpus(corpus_file, base_url)
        instance = DagsterInstance.get()
        with db.connect(url) as conn:
            report = ingest_files(conn, [corpus_file], shard_size=shard_size)
            added = sync_shard_partitions(instance, conn)
            record_ingest_outside_a_run(instance, conn, report, len(added), source="demo")
            pending = [row[0] for row in conn.execute(
                "SELECT DISTINCT shard_id FROM corpus_urls WHERE state IN ('pending', 'failed_retryable', 'leased')"
                " ORDER BY 1").fetchall()]  # fmt: skip
        print(f"3/5 corpus: {n_urls} URLs served on {base_url}, {report.added} new, "
              f"{len(report.shards_added)} new shards; {len(pending)} shard(s) to analyse", flush=True)

        if pending:
            from imgpipe_dagster.definitions import defs

            job = defs.resolve_job_def("analyze_medium")
            print(f"4/5 running analyze_medium over {pending[0]}..{pending[-1]} (profile medium)", flush=True)
            result = job.execute_in_process(
                instance=instance,
                tags={"dagster/asset_partition_range_start": pending[0],
                      "dagster/asset_partition_range_end": pending[-1], "imgpipe/launched_by": "imgpipe demo"},
                raise_on_error=False,
            )  # fmt: skip
            print(f"    run {result.run_id}: {'success' if result.success else 'FAILED'}", flush=True)
        else:
            print("4/5 nothing left to analyse (every sample URL already has its result)", flush=True)
            result = None
    finally:
        image_server.terminate()
        image_server.wait(timeout=30)

    if not keep_servers:
        GpuServerLauncher(gpu_server_records_dir()).stop()
    print_summary(url, real_model is None, result.run_id if result is not None else None)
    servers = ("`imgpipe gpu-server stop` stops the GPU servers left warm, " if keep_servers
               else "the GPU servers are stopped (`imgpipe gpu-server stop` stops any a UI run started), ")
    print(f"5/5 done in {time.monotonic() - started:.0f}s. Browse runs, lineage and partitions: "
          f"`make dev` (or `imgpipe dev`) then open http://127.0.0.1:3000 ; {servers}"
          "`imgpipe db down` stops the database.")  # fmt: skip
    return 0 if result is None or result.success else 1


def print_summary(url: str, tiny: bool, run_id: str | None) -> None:
    from imgpipe_dagster.store import database as db
    from imgpipe_dagster.store.stats import progress

    with db.connect(url) as conn:
        p = progress(conn)
        rows = conn.execute(
            "SELECT url, status, coalesce(error_class, ''), width, height, round(inference_ms::numeric),"
            " left(coalesce(analysis->>'caption', model_text, ''), 60) FROM url_analysis_results"
            " ORDER BY status DESC, created_at DESC LIMIT 8"
        ).fetchall()
        rate = conn.execute(
            "SELECT count(*) / greatest(extract(epoch FROM max(created_at) - min(created_at)), 1)"
            " FROM url_analysis_results WHERE run_id = %s",
            (run_id,),
        ).fetchone()[0]
    s = p.urls_by_state
    print(f"\nSummary: {p.urls_total} URLs in {p.shards_total} shards: {s['done']} done, "
          f"{s['failed_permanent']} failed, {p.urls_unfinished} unfinished; "
          f"{float(rate or 0):.1f} URLs/s in this run" if run_id else "")
    print("top errors: " + (", ".join(f"{c}={n}" for c, n in p.top_errors_24h) or "none"))
    print(f"{'status':7} {'size':>10} {'ms':>6}  url / analysis")
    for row_url, status, error, w, h, ms, text in rows:
        size = f"{w}x{h}" if w else "-"
        print(f"{status:7} {size:>10} {ms or '-':>6}  {row_url[-60:]}")
        print(f"{'':26}{error or text!r}")
    if tiny:
        print("NOTE: the tiny random test model produced these texts: they are noise, not analyses.")
