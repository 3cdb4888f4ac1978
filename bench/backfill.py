"""A backfill over every shard of a 2,000-shard corpus, launched like the UI does, against a real webserver.

Registers ``--shards`` dynamic partitions of url_shards, starts ``dagster-webserver`` on 127.0.0.1
(Postgres-backed instance, no daemon: the backfill is accepted and stays requested, so nothing
runs and the bench is bounded), then times over GraphQL:
  * the asset's partitions page query (partition keys + partition statuses of image_analysis),
    before and after the backfill;
  * ``launchPartitionBackfill`` with ``allPartitions: true`` (the UI's "Materialize all" backfill),
    with the conservative profile's run config as the UI sends it;
  * the backfill page query (partitionBackfillOrError with its partition status counts).
Baseline in the same run: the same partitions page query with 20 partitions. One JSON line per figure.

    .venv/bin/python bench/backfill.py                   # 2,000 shards, embedded Postgres under .imgpipe/bench
    .venv/bin/python bench/backfill.py -m imgpipe_dagster_tests.sensors.daemon_defs   # another code location
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from imgpipe_dagster.store import database as db
from imgpipe_dagster.store.embedded import EmbeddedPostgres

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = REPO_ROOT / ".imgpipe" / "bench"

PARTITIONS_PAGE = """
query PartitionsPage($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode {
      partitionKeysByDimension { name partitionKeys }
      assetPartitionStatuses {
        ... on DefaultPartitionStatuses { materializedPartitions failedPartitions materializingPartitions }
      }
      partitionStats { numMaterialized numPartitions numFailed numMaterializing }
    }
  }
}"""

LAUNCH = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { stepKey }
    ... on UnauthorizedError { message }
  }
}"""

BACKFILL_PAGE = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    ... on PartitionBackfill {
      id status numPartitions numCancelable
      partitionStatusCounts { runStatus count }
    }
    ... on PythonError { message }
  }
}"""


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def start_webserver(module: str, env: dict[str, str], attempts: int = 3) -> tuple[subprocess.Popen, httpx.Client]:
    """dagster-webserver on a port the system just had free; dagster-webserver cannot bind port 0
    (it treats 0 as "the default"), so a port taken in between is met by starting again on another."""
    for _attempt in range(attempts):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        webserver = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
             "-m", module, "--working-directory", str(REPO_ROOT)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        deadline = time.monotonic() + 180
        while webserver.poll() is None and time.monotonic() < deadline:
            try:
                if client.get("/server_info").status_code == 200:
                    return webserver, client
            except httpx.HTTPError:
                pass
            time.sleep(1)
        if webserver.poll() is None:
            webserver.kill()
        webserver.wait()
        client.close()
        error = webserver.stderr.read().decode()[-2000:]
        if "address already in use" not in error.lower():
            raise RuntimeError(f"webserver did not come up on port {port}: {error}")
    raise RuntimeError(f"webserver: the port was taken before it bound, {attempts} times in a row")


def gql(client: httpx.Client, query: str, variables: dict) -> tuple[dict, float]:
    started = time.perf_counter()
    response = client.post("/graphql", json={"query": query, "variables": variables})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    body = response.json()
    if body.get("errors"):
        raise RuntimeError(json.dumps(body["errors"])[:2000])
    return body["data"], elapsed


def timed_page(client: httpx.Client, repeats: int = 5) -> tuple[dict, float]:
    times, data = [], {}
    for _ in range(repeats):
        data, elapsed = gql(client, PARTITIONS_PAGE, {"key": {"path": ["image_analysis"]}})
        times.append(elapsed)
    return data, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("-m", "--module", default="imgpipe_dagster.definitions")
    parser.add_argument(
        "--database-url", help="a server to use (default: an embedded one under .imgpipe/bench)"
    )
    args = parser.parse_args()

    server = None
    server_url = args.database_url
    if not server_url:
        server = EmbeddedPostgres(STATE_DIR / "pg")
        server_url = server.start()
    dagster_url = db.with_database(server_url, "imgpipe_bench_backfill_dagster")
    project_url = db.with_database(server_url, "imgpipe_bench_backfill")
    webserver = None
    try:
        for url in (dagster_url, project_url):
            db.drop_database(url)
            db.ensure_database(url)
        home = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
        (home / "dagster.yaml").write_text(yaml.safe_dump({
            "storage": {"postgres": {"postgres_url": db.sqlalchemy_url(dagster_url)}},
            "concurrency": {"runs": {"max_concurrent_runs": 16}},
            "telemetry": {"enabled": False}, "nux": {"enabled": False},
        }))  # fmt: skip
        env = {**os.environ, "DAGSTER_HOME": str(home), db.DATABASE_URL_ENV: project_url}
        os.environ["DAGSTER_HOME"] = str(home)
        from dagster import DagsterInstance

        from imgpipe_dagster.profiles import profile_run_config

        instance = DagsterInstance.get()
        webserver, client = start_webserver(args.module, env)
        # the code location loads in the background; the first query waits for it
        gql(client, PARTITIONS_PAGE, {"key": {"path": ["image_analysis"]}})

        keys = [f"s{n:06d}" for n in range(1, args.shards + 1)]
        instance.add_dynamic_partitions("url_shards", keys[:20])
        _, small = timed_page(client)
        started = time.perf_counter()
        instance.add_dynamic_partitions("url_shards", keys[20:])
        emit(
            figure="register_partitions_s",
            shards=args.shards,
            seconds=round(time.perf_counter() - started, 3),
        )
        data, page = timed_page(client)
        listed = len(data["assetNodeOrError"]["partitionKeysByDimension"][0]["partitionKeys"])
        emit(figure="partitions_page_s", shards=listed, median=round(page, 3), baseline_20_shards=round(small, 3),
             ratio=round(page / small, 2))  # fmt: skip

        params = {
            "assetSelection": [{"path": ["image_analysis"]}],
            "allPartitions": True,
            "runConfigData": profile_run_config("conservative"),
            "tags": [{"key": "imgpipe/launched_by", "value": "bench/backfill.py"}],
        }
        result, launch = gql(client, LAUNCH, {"params": params})
        outcome = result["launchPartitionBackfill"]
        emit(figure="launch_backfill_s", shards=args.shards, seconds=round(launch, 3), result=outcome["__typename"],
             detail={k: v for k, v in outcome.items() if k != "__typename"})  # fmt: skip
        if outcome["__typename"] == "LaunchBackfillSuccess":
            backfill, elapsed = gql(client, BACKFILL_PAGE, {"id": outcome["backfillId"]})
            info = backfill["partitionBackfillOrError"]
            emit(figure="backfill_page_s", seconds=round(elapsed, 3), status=info.get("status"),
                 partitions=info.get("numPartitions"))  # fmt: skip
        _, after = timed_page(client)
        emit(figure="partitions_page_after_backfill_s", median=round(after, 3))
        emit(figure="runs_created_without_daemon", value=len(instance.get_runs()))
    finally:
        if webserver is not None:
            webserver.terminate()
            try:
                webserver.wait(timeout=30)
            except subprocess.TimeoutExpired:
                webserver.kill()
                webserver.wait()
        for url in (dagster_url, project_url):
            db.drop_database(url)
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
