"""Helpers to write URL files in every supported shape."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

# Shared by the corpus test files.
URLS = [f"https://img{i % 7}.example.com/photos/{i}.jpg" for i in range(25)]


def corpus(conn) -> list[tuple]:
    return conn.execute("SELECT shard_id, url, source_line FROM corpus_urls ORDER BY shard_id, source_line").fetchall()


def shards(conn) -> list[tuple]:
    return conn.execute("SELECT shard_id, shard_no, url_count FROM shards ORDER BY shard_no").fetchall()


def nothing_written(conn) -> bool:
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM corpus_files), (SELECT count(*) FROM shards), (SELECT count(*) FROM corpus_urls)"
    ).fetchone()
    conn.rollback()
    return counts == (0, 0, 0)


def compress(path: Path, data: bytes) -> Path:
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    elif path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(data)
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    """rows (dicts with a "url" key and metadata) in the format the file name asks for."""
    name = path.name.removesuffix(".gz").removesuffix(".zst")
    if name.endswith(".txt"):
        data = "".join(row["url"] + "\n" for row in rows).encode()
    elif name.endswith(".jsonl"):
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    elif name.endswith(".csv") or name.endswith(".tsv"):
        import csv
        import io

        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter="\t" if name.endswith(".tsv") else ",",
                                lineterminator="\n", **({"quoting": csv.QUOTE_NONE, "escapechar": None}
                                                        if name.endswith(".tsv") else {}))
        writer.writeheader()
        writer.writerows(rows)
        data = out.getvalue().encode()
    elif name.endswith(".parquet"):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        data = sink.getvalue().to_pybytes()
    else:
        raise ValueError(name)
    return compress(path, data)


@pytest.fixture
def urls_file(tmp_path: Path):
    def make(name: str, rows: list[dict] | list[str]) -> Path:
        rows = [row if isinstance(row, dict) else {"url": row} for row in rows]
        return write_rows(tmp_path / name, rows)

    return make
