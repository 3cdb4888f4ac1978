"""analysis_export after a real pipeline run (real image server, a tiny-model GPU server process,
real Dagster runs): one Parquet file per shard that pandas and DuckDB read as they are, row counts
equal to the database's, versions in the files and the manifest."""

from __future__ import annotations

import json

import duckdb
import pandas as pd
import pyarrow.parquet as pq
from dagster import materialize

from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.assets.export import analysis_export
from imgpipe_dagster.partitions import URL_SHARDS
from imgpipe_dagster.resources import FetcherResource, PostgresResource
from imgpipe_dagster.store.export import read_manifest
from imgpipe_dagster.store.results import count_results
from imgpipe_dagster_tests.support import seed_corpus

SMALL_RUN = {"images_per_request": 4, "chunk_size": 5, "max_concurrent_batches": 2, "lease_seconds": 10,
             "retry_delay": 0.05, "retry_attempts": 0, "prefetch_concurrent_downloads": 8}  # fmt: skip
SHARD_RANGE = {"dagster/asset_partition_range_start": "s000001", "dagster/asset_partition_range_end": "s000003"}


def test_export_after_a_real_run_reads_back_with_pandas_and_duckdb(
    dagster_instance, database_url, conn, image_server, one_gpu_server, tmp_path
):
    photo = [("astronaut", "png"), ("chelsea", "jpg"), ("coffee", "webp"), ("rocket", "jpg")]
    shards = {
        "s000001": [image_server.image_url(n, e, width=320, n=i) for i, (n, e) in enumerate(photo)]
        + [image_server.url("/fault/status/404")],
        "s000002": [image_server.image_url("china", "png", width=300, n=9), image_server.url("/fault/html-as-jpeg")],
        "s000003": [image_server.image_url("flower", "jpg", width=280, n=7)],
    }
    seed_corpus(conn, shards)
    dagster_instance.add_dynamic_partitions(URL_SHARDS, list(shards))
    resources = {"postgres": PostgresResource(database_url=database_url), "gpu_model": one_gpu_server,
                 "fetcher": FetcherResource(allowed_networks=["127.0.0.0/8"])}  # fmt: skip
    analysed = materialize([image_analysis], instance=dagster_instance, resources=resources, tags=SHARD_RANGE,
                           run_config={"ops": {"image_analysis": {"config": {"worker": SMALL_RUN}}}})  # fmt: skip
    assert analysed.success

    base = tmp_path / "export"
    exported = materialize(
        [analysis_export], instance=dagster_instance, tags=SHARD_RANGE,
        resources={"postgres": PostgresResource(database_url=database_url)},
        run_config={"ops": {"analysis_export": {"config": {"base_uri": str(base), "batch_rows": 2}}}},
    )  # fmt: skip
    assert exported.success

    in_database = count_results(conn, list(shards))
    assert in_database == {"s000001": 5, "s000002": 2, "s000003": 1}
    (model, prompt_version) = conn.execute(
        "SELECT DISTINCT model, prompt_version FROM url_analysis_results WHERE status = 'ok'").fetchone()  # fmt: skip
    with duckdb.connect() as duck:
        for shard, rows in in_database.items():
            path = base / f"{shard}.parquet"
            frame = pd.read_parquet(path)
            assert len(frame) == rows
            assert set(frame.url) == set(shards[shard])
            ok = frame[frame.status == "ok"]
            assert (ok.width > 0).all() and ok.sha256.str.len().eq(64).all() and ok.model_text.notna().all()
            assert ok.created_at.dt.tz is not None and (ok.inference_ms > 0).all()
            assert duck.execute("SELECT count(*) FROM read_parquet(?)", [str(path)]).fetchone() == (rows,)
            meta = pq.read_metadata(path).metadata
            assert json.loads(meta[b"imgpipe.models"]) == [model]
            assert json.loads(meta[b"imgpipe.prompt_versions"]) == [prompt_version]
            assert meta[b"imgpipe.export_schema_version"] == b"2"
            # the run bound the shard to its analysis version; every row and the file say which
            (version,) = set(frame.analysis_version)
            assert version.startswith("analysis_v1:") and meta[b"imgpipe.analysis_version"] == version.encode()
        everything = duck.execute(
            "SELECT shard_id, count(*), count(*) FILTER (WHERE status = 'failed') FROM read_parquet(?)"
            " GROUP BY 1 ORDER BY 1", [str(base / "*.parquet")]).fetchall()  # fmt: skip
    assert everything == [("s000001", 5, 1), ("s000002", 2, 1), ("s000003", 1, 0)]
    assert pq.ParquetFile(base / "s000001.parquet").num_row_groups == 3  # 5 rows in batches of 2

    assert len(pd.read_parquet(base)) == 8  # the whole directory: the manifest is skipped
    manifest = read_manifest(str(base))
    assert {f["file"]: f["rows"] for f in manifest["files"]} == {f"{s}.parquet": n for s, n in in_database.items()}
    assert manifest["models"] == [model] and manifest["prompt_versions"] == [prompt_version]
    materialization = exported.get_asset_materialization_events()[0].materialization
    assert materialization.metadata["rows"].value == 8 and materialization.metadata["urls_not_final"].value == 0
    assert set(materialization.metadata["files"].value) == {f"{s}.parquet" for s in shards}
