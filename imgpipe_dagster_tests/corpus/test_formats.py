"""Every input format and compression loads the same URLs, in file order, values exactly as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgpipe_dagster.corpus import ingest_files
from imgpipe_dagster_tests.corpus.conftest import URLS, corpus, shards

# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(("fmt", "suffix"), [
    ("txt", ""), ("csv", ""), ("tsv", ""), ("jsonl", ""), ("parquet", ""),
    ("txt", ".zst"), ("csv", ".gz"), ("jsonl", ".zst"), ("parquet", ".gz"), ("tsv", ".gz"),
])
def test_every_format_and_compression_loads_the_same_urls(conn, urls_file, fmt, suffix):
    path = urls_file(f"urls.{fmt}{suffix}", [{"url": u, "caption": f"c{i}"} for i, u in enumerate(URLS)])
    report = ingest_files(conn, [path], shard_size=10)
    assert (report.rows_read, report.valid, report.added, report.rejected) == (25, 25, 25, 0)
    assert report.shards_added == ["s000001", "s000002", "s000003"]
    assert [row[1] for row in corpus(conn)] == URLS  # file order, shard by shard
    assert shards(conn) == [("s000001", 1, 10), ("s000002", 2, 10), ("s000003", 3, 5)]
    first_line = 2 if fmt in ("csv", "tsv") else 1  # after the header
    assert [row[2] for row in corpus(conn)] == list(range(first_line, first_line + 25))


def test_many_files_and_globs_in_order(conn, urls_file, tmp_path):
    urls_file("b.txt", URLS[10:20])
    urls_file("a.txt", URLS[:10])
    urls_file("c.csv", URLS[20:])
    report = ingest_files(conn, [str(tmp_path / "*.txt"), tmp_path / "c.csv"], shard_size=10)
    assert [Path(f["path"]).name for f in report.files] == ["a.txt", "b.txt", "c.csv"]
    assert [row[1] for row in corpus(conn)] == URLS
    assert report.corpus_totals == {"files": 3, "shards": 3, "urls": 25}


def test_metadata_columns_are_kept_with_their_types(conn, urls_file):
    rows = [{"url": URLS[0], "id": 7, "score": 0.5, "ok": True, "caption": "a cat"}]
    ingest_files(conn, [urls_file("m.parquet", rows)])
    assert conn.execute("SELECT metadata FROM corpus_urls").fetchone()[0] == {
        "id": 7, "score": 0.5, "ok": True, "caption": "a cat"}
    conn.rollback()


# ---------------------------------------------------------------- exact round trip

TRICKY = [
    'quote " and "" doubled',
    "back\\slash \\N \\\\ and \\t literal",
    "tab\there",
    "new\nline and \r carriage",
    "emoji 😀🖼️👩‍👩‍👧",
    "right-to-left שלום עולם مرحبا",
    "comma, semicolon; pipe |",
    "",
]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_values_round_trip_exactly(conn, urls_file, fmt):
    rows = [{"url": f"https://example.com/{i}/😀/שלום.jpg?q=\"x\"&b=\\", "caption": text}
            for i, text in enumerate(TRICKY)]
    ingest_files(conn, [urls_file(f"tricky.{fmt}", rows)])
    stored = conn.execute("SELECT url, metadata->>'caption' FROM corpus_urls ORDER BY source_line").fetchall()
    conn.rollback()
    assert stored == [(row["url"], row["caption"]) for row in rows]



@pytest.mark.parametrize(("name", "data"), [
    ("bom.txt", "\ufeffhttps://a.com/1.jpg\nhttps://a.com/2.jpg\n"),
    ("bom.csv", "\ufeffurl,caption\nhttps://a.com/1.jpg,x\nhttps://a.com/2.jpg,y\n"),
    ("bom.jsonl", '\ufeff{"url": "https://a.com/1.jpg"}\n{"url": "https://a.com/2.jpg"}\n'),
])
def test_a_byte_order_mark_is_not_part_of_the_first_value(conn, tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data, encoding="utf-8")
    report = ingest_files(conn, [path])
    assert (report.added, report.rejected) == (2, 0)
