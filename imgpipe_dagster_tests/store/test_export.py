"""Exporting results to files: typed columns, versions in the files, streaming in batches, the
manifest, and the text formats. The rows are written through the store's own outcome writer."""

from __future__ import annotations

import json

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgpipe_dagster.store.export import (
    MANIFEST_NAME,
    ExportError,
    analysis_fields,
    default_base_uri,
    export_shard,
    export_shards,
    read_manifest,
)
from imgpipe_dagster.store.results import count_results, stream_results
from imgpipe_dagster.store.work import UrlOutcome, claim, write_outcomes
from imgpipe_dagster_tests.support import seed_corpus

ANALYSIS = {"caption": "a cat on a sofa", "tags": ["cat", "sofa"], "objects": "cat, cushion", "text": "",
            "safety": {"nsfw": False, "violence": "false", "rating": "safe"}}  # fmt: skip


def finish(conn, shards: dict[str, list[str]], failed_every: int = 0) -> None:
    """Seed the shards and write a final outcome for every URL, as a run would."""
    seed_corpus(conn, shards)
    total = sum(len(urls) for urls in shards.values())
    claimed = claim(conn, "writer-run", list(shards), total, 60)
    outcomes = []
    for i, url in enumerate(claimed):
        if failed_every and i % failed_every == 0:
            outcomes.append(UrlOutcome(url.url_hash, url.url, url.shard_id, "failed_permanent", 1, "http_404",
                                       "HTTP 404", result={"http_status": 404}))  # fmt: skip
        else:
            outcomes.append(UrlOutcome(url.url_hash, url.url, url.shard_id, "done", 1, result={
                "http_status": 200, "bytes": 1000 + i, "width": 64, "height": 48, "format": "JPEG",
                "sha256": f"{i:064x}", "phash": -(2**62) + i, "model_text": json.dumps(ANALYSIS),
                "analysis": ANALYSIS, "parse_ok": True, "model": "qwen-test", "prompt_version": "analysis_v1@abc",
                "inference_ms": 12.5, "download_ms": 3.0, "gpu": "gpu0"}))  # fmt: skip
    write_outcomes(conn, "writer-run", outcomes)


def test_parquet_has_typed_columns_and_versions_and_reads_back(conn, tmp_path):
    finish(conn, {"s1": [f"http://h.test/{i}.jpg" for i in range(30)]}, failed_every=10)
    exported = export_shard(conn, "s1", str(tmp_path))

    path = tmp_path / "s1.parquet"
    assert exported.rows == 30 == count_results(conn, ["s1"])["s1"]
    frame = pd.read_parquet(path)
    assert len(frame) == 30
    ok = frame[frame.status == "ok"].iloc[0]
    assert ok.caption == "a cat on a sofa" and list(ok.tags) == ["cat", "sofa"]
    assert list(ok.objects) == ["cat", "cushion"]  # a comma list from the model becomes a list
    assert ok.safety_nsfw is not None and not ok.safety_nsfw
    assert ok.safety_violence is not None and not ok.safety_violence and ok.safety_rating == "safe"
    assert ok.width == 64 and ok.phash < 0 and ok.model == "qwen-test"
    failed = frame[frame.status == "failed"]
    assert len(failed) == 3 and set(failed.error_class) == {"http_404"} and failed.caption.isna().all()
    schema = pq.read_schema(path)
    assert str(schema.field("created_at").type) == "timestamp[us, tz=UTC]"
    assert pa.types.is_list(schema.field("tags").type) and schema.field("tags").type.value_type == pa.string()
    meta = pq.read_metadata(path).metadata
    assert meta[b"imgpipe.export_schema_version"] == b"2"
    # rows written without a version are the shard's until a versioned run adopts them
    assert meta[b"imgpipe.analysis_version"] == b"unversioned" and set(frame.analysis_version) == {"unversioned"}
    assert not frame.reused.any()
    assert json.loads(meta[b"imgpipe.models"]) == ["qwen-test"]
    assert json.loads(meta[b"imgpipe.prompt_versions"]) == ["analysis_v1@abc"]
    with duckdb.connect() as duck:
        rows, captions = duck.execute("SELECT count(*), count(caption) FROM read_parquet(?)", [str(path)]).fetchone()
    assert (rows, captions) == (30, 27)


def test_a_shard_streams_in_batches_each_a_row_group(conn, tmp_path):
    finish(conn, {"s1": [f"http://h.test/{i}.jpg" for i in range(230)]})
    exported = export_shard(conn, "s1", str(tmp_path), batch_rows=50)
    parquet = pq.ParquetFile(tmp_path / "s1.parquet")
    assert exported.batches == 5 and parquet.num_row_groups == 5
    assert [parquet.metadata.row_group(i).num_rows for i in range(5)] == [50, 50, 50, 50, 30]
    assert parquet.metadata.num_rows == 230
    urls = pd.read_parquet(tmp_path / "s1.parquet").url.tolist()
    assert urls == sorted(urls) and len(set(urls)) == 230


def test_rows_stay_on_the_server_until_fetched(conn):
    finish(conn, {"s1": [f"http://h.test/{i}.jpg" for i in range(120)]})
    batches = stream_results(conn, ["s1"], batch_rows=40)
    first = next(batches)
    # between two batches the rest waits in a server-side cursor, not in this process
    assert len(first) == 40
    assert conn.execute("SELECT name FROM pg_cursors").fetchall() == [("imgpipe_results_stream",)]
    assert [len(batch) for batch in batches] == [40, 40]
    assert conn.execute("SELECT count(*) FROM pg_cursors").fetchone() == (0,)


def test_manifest_lists_files_rows_and_versions(conn, tmp_path):
    finish(conn, {"s1": [f"http://a.test/{i}" for i in range(4)], "s2": [f"http://b.test/{i}" for i in range(7)],
                  "s3": []})  # fmt: skip
    export_shards(conn, ["s1", "s2"], str(tmp_path))
    export_shards(conn, ["s3"], str(tmp_path))  # a later export adds to the manifest

    manifest = read_manifest(str(tmp_path))
    assert [(f["file"], f["rows"]) for f in manifest["files"]] == [("s1.parquet", 4), ("s2.parquet", 7),
                                                                   ("s3.parquet", 0)]  # fmt: skip
    assert manifest["rows"] == 11 and manifest["models"] == ["qwen-test"]
    assert manifest["export_schema_version"] == "2"
    assert pd.read_parquet(tmp_path / "s3.parquet").empty
    assert sorted(p.name for p in tmp_path.iterdir()) == [".manifest.lock", MANIFEST_NAME, "s1.parquet",
                                                          "s2.parquet", "s3.parquet"]  # fmt: skip


def test_jsonl_and_csv_hold_the_same_rows(conn, tmp_path):
    finish(conn, {"s1": [f"http://h.test/{i}.jpg" for i in range(12)]}, failed_every=4)
    export_shard(conn, "s1", str(tmp_path), "jsonl", batch_rows=5)
    export_shard(conn, "s1", str(tmp_path), "csv", batch_rows=5)

    text = (tmp_path / "s1.jsonl").read_text()
    assert '"url": "http://h.test/' in text  # readable and greppable, no escaped slashes
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 12
    done = [row for row in lines if row["status"] == "ok"]
    assert done[0]["tags"] == ["cat", "sofa"] and done[0]["width"] == 64 and "T" in done[0]["created_at"]
    assert done[0]["inference_ms"] == 12.5 and done[0]["safety_rating"] == "safe"
    csv = pd.read_csv(tmp_path / "s1.csv")
    assert len(csv) == 12 and list(csv.columns) == list(pd.read_parquet(export_parquet(conn, tmp_path)).columns)
    assert json.loads(csv[csv.status == "ok"].tags.iloc[0]) == ["cat", "sofa"]


def export_parquet(conn, tmp_path):
    export_shard(conn, "s1", str(tmp_path / "pq"))
    return tmp_path / "pq" / "s1.parquet"


def test_an_unknown_format_or_base_is_one_clear_error(conn, tmp_path):
    finish(conn, {"s1": ["http://h.test/1.jpg"]})
    with pytest.raises(ExportError, match="unknown export format 'xml'"):
        export_shard(conn, "s1", str(tmp_path), "xml")
    with pytest.raises(ExportError, match="cannot open export base 'nosuchfs://x'"):
        export_shard(conn, "s1", "nosuchfs://x")
    assert list(tmp_path.iterdir()) == []


def test_analysis_fields_keep_what_does_not_fit_readable():
    assert analysis_fields(None)["caption"] is None
    odd = analysis_fields({"caption": {"en": "x"}, "tags": [1, "b", None], "safety": "unsafe"})
    assert odd["caption"] == '{"en": "x"}' and odd["tags"] == ["1", "b"]
    assert odd["safety_rating"] == "unsafe" and odd["safety_nsfw"] is None


def test_a_base_given_as_a_uri_is_opened_through_pyarrow(conn, tmp_path):
    finish(conn, {"s1": ["http://h.test/1.jpg", "http://h.test/2.jpg"]})
    export_shards(conn, ["s1"], f"file://{tmp_path}/nested/prefix")
    assert len(pd.read_parquet(tmp_path / "nested" / "prefix" / "s1.parquet")) == 2
    assert read_manifest(f"file://{tmp_path}/nested/prefix")["rows"] == 2


def test_the_base_defaults_to_the_home_and_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("IMGPIPE_EXPORT_URI", raising=False)
    assert default_base_uri() == str(tmp_path / "home" / "export")
    monkeypatch.setenv("IMGPIPE_EXPORT_URI", "s3://bucket/analyses")
    assert default_base_uri() == "s3://bucket/analyses"


def test_a_hugging_face_dataset_loads_an_exported_shard_as_it_is(conn, tmp_path, monkeypatch):
    """datasets.load_dataset("parquet", …) on an exported file: offline, its cache under tmp_path, and
    every column with the type the file has (no conversion on either side)."""
    finish(conn, {"s1": [f"http://h.test/{i}.jpg" for i in range(30)]}, failed_every=10)
    export_shard(conn, "s1", str(tmp_path / "export"))
    path = tmp_path / "export" / "s1.parquet"
    # read when datasets is imported: set first, so nothing reaches for the Hub or the user's cache
    for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(name, value)
    import datasets  # a dev dependency: missing, the test fails

    assert datasets.config.HF_HUB_OFFLINE  # not imported earlier in this process with other settings

    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))

    assert loaded.num_rows == 30 == count_results(conn, ["s1"])["s1"]
    exported = pq.read_schema(path)
    assert loaded.features.arrow_schema.names == exported.names
    changed = {f.name: (str(f.type), str(loaded.features.arrow_schema.field(f.name).type))
               for f in exported if loaded.features.arrow_schema.field(f.name).type != f.type}  # fmt: skip
    assert changed == {}
    ok = next(row for row in loaded if row["status"] == "ok")
    assert ok["caption"] == "a cat on a sofa" and ok["tags"] == ["cat", "sofa"] and ok["width"] == 64
    assert ok["created_at"].tzinfo is not None
    assert sorted(loaded.unique("status")) == ["failed", "ok"]
