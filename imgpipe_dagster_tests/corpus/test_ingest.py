"""ingest_files against a real PostgreSQL: formats, dedupe, shards, bad input, atomicity."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imgpipe_dagster.corpus import CorpusInputError, IngestSettings, ingest_files, shard_id
from imgpipe_dagster_tests.corpus.conftest import compress

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


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
@pytest.mark.parametrize("fmt", ["txt", "csv", "tsv", "jsonl", "parquet"])
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


# ---------------------------------------------------------------- dedupe, re-ingest, append


def test_duplicates_keep_the_first_occurrence_and_where_it_came_from(conn, urls_file):
    path = urls_file("d.txt", [URLS[0], URLS[1], URLS[0].upper().replace("PHOTOS", "photos").replace(".JPG", ".jpg"),
                               URLS[1] + "#frag", URLS[2]])
    report = ingest_files(conn, [path])
    assert (report.valid, report.added, report.duplicates) == (5, 3, 2)
    assert [(row[1], row[2]) for row in corpus(conn)] == [(URLS[0], 1), (URLS[1], 2), (URLS[2], 5)]
    file_id = conn.execute("SELECT file_id FROM corpus_files").fetchone()[0]
    assert conn.execute("SELECT count(*) FROM corpus_urls WHERE source_file_id = %s", (file_id,)).fetchone()[0] == 3
    conn.rollback()


def test_duplicates_across_batches_of_one_file(conn, tmp_path):
    # A tiny read block forces many batches: a URL repeated in a later batch must still count as duplicate.
    path = tmp_path / "many.txt"
    path.write_text("".join(u + "\n" for u in URLS * 3))
    settings = IngestSettings(shard_size=10, read_block_bytes=64)
    report = ingest_files(conn, [path], settings=settings)
    assert (report.rows_read, report.added, report.duplicates) == (75, 25, 50)
    assert [row[1] for row in corpus(conn)] == URLS


def test_reingest_adds_nothing_and_a_new_file_adds_only_new_urls(conn, urls_file, tmp_path):
    first = urls_file("first.txt", URLS[:15])
    ingest_files(conn, [first], shard_size=10)
    before = (corpus(conn), shards(conn))

    again = ingest_files(conn, [first], shard_size=10)
    assert again.files[0]["skipped"] and again.shards_added == [] and again.added == 0
    copy = tmp_path / "copy.txt"  # same URLs, different bytes
    copy.write_text("\n".join(reversed(URLS[:15])) + "\n\n")
    same_urls = ingest_files(conn, [copy], shard_size=10)
    assert (same_urls.added, same_urls.duplicates, same_urls.shards_added) == (0, 15, [])
    assert (corpus(conn), shards(conn)) == before

    second = urls_file("second.txt", URLS[10:])  # 5 old, 10 new
    report = ingest_files(conn, [second], shard_size=10)
    assert (report.added, report.duplicates, report.shards_added) == (10, 5, ["s000003"])
    # Earlier shards are untouched (s000002 stays at 5 URLs); the new shard holds only new URLs.
    assert shards(conn) == [("s000001", 1, 10), ("s000002", 2, 5), ("s000003", 3, 10)]
    assert [row[1] for row in corpus(conn) if row[0] == "s000003"] == URLS[15:]


def test_shard_ids_are_partition_keys_in_order():
    assert [shard_id(n) for n in (1, 42, 999_999, 1_000_000)] == ["s000001", "s000042", "s999999", "s1000000"]


# ---------------------------------------------------------------- bad input: clear errors


def test_missing_file(conn, tmp_path):
    with pytest.raises(CorpusInputError, match="file not found"):
        ingest_files(conn, [tmp_path / "nope.txt"])
    assert nothing_written(conn)


def test_a_missing_file_among_good_ones_stops_before_any_is_loaded(conn, urls_file, tmp_path):
    good = urls_file("good.txt", URLS)
    with pytest.raises(CorpusInputError, match="nope.csv: file not found"):
        ingest_files(conn, [good, tmp_path / "nope.csv"])
    assert nothing_written(conn)


def test_glob_matching_nothing(conn, tmp_path):
    with pytest.raises(CorpusInputError, match="no file matches"):
        ingest_files(conn, [str(tmp_path / "*.parquet")])


@pytest.mark.parametrize("name, data", [
    ("empty.txt", b""), ("empty.csv", b""), ("blank.txt", b"\n\n\r\n"), ("header_only.csv", b"url,caption\n"),
    ("empty.txt.gz", gzip.compress(b"")),
])
def test_empty_file(conn, tmp_path, name, data):
    path = compress(tmp_path / name, data) if not name.endswith(".gz") else tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(data)
    with pytest.raises(CorpusInputError, match="empty|no rows"):
        ingest_files(conn, [path])
    assert nothing_written(conn)


@pytest.mark.parametrize("name", ["no_url.csv", "no_url.tsv", "no_url.parquet"])
def test_missing_column_lists_the_columns_present(conn, urls_file, name):
    path = urls_file(name, [{"link": URLS[0], "caption": "x", "id": 1}])
    with pytest.raises(CorpusInputError) as error:
        ingest_files(conn, [path])
    message = str(error.value)
    assert "no column named 'url'" in message and all(c in message for c in ("'link'", "'caption'", "'id'"))
    assert "\n" not in message
    assert nothing_written(conn)


def test_other_url_column_by_name(conn, urls_file):
    path = urls_file("link.csv", [{"link": u} for u in URLS])
    assert ingest_files(conn, [path], url_column="link").added == 25


@pytest.mark.parametrize("name", ["garbage.txt", "garbage.csv", "garbage.jsonl", "garbage.parquet", "garbage.txt.gz",
                                  "garbage.txt.zst"])
def test_binary_garbage(conn, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(os.urandom(200_000))
    with pytest.raises(CorpusInputError) as error:
        ingest_files(conn, [path])
    assert any(word in str(error.value) for word in ("binary data", "Parquet", "damaged"))
    assert nothing_written(conn)


@pytest.mark.parametrize("name", ["cut.txt.gz", "cut.csv.gz", "cut.txt.zst", "cut.parquet.gz"])
def test_compressed_file_cut_short(conn, urls_file, tmp_path, name):
    whole = urls_file(name, [{"url": f"https://example.com/{i}.jpg"} for i in range(20_000)])
    data = whole.read_bytes()
    whole.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusInputError, match="damaged or cut short"):
        ingest_files(conn, [whole])
    assert nothing_written(conn)


def test_unterminated_quote_in_the_middle(conn, tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text('url,caption\nhttps://a.com/1.jpg,fine\n"https://a.com/2.jpg,oops\nhttps://a.com/3.jpg,x\n')
    with pytest.raises(CorpusInputError, match="unterminated quote"):
        ingest_files(conn, [path])
    assert nothing_written(conn)


def test_unterminated_quote_at_the_end(conn, tmp_path):
    path = tmp_path / "quote_end.csv"
    path.write_text('url,caption\nhttps://a.com/1.jpg,"never closed\nhttps://a.com/2.jpg,lost\n')
    with pytest.raises(CorpusInputError, match="unterminated quote"):
        ingest_files(conn, [path])
    assert nothing_written(conn)


# ---------------------------------------------------------------- bad input: counted rejections


def test_bad_lines_are_counted_by_reason_and_sampled_with_line_numbers(conn, tmp_path):
    lines = [
        b"https://ok.example.com/1.jpg",
        b"ftp://example.com/a.jpg",
        b"javascript:alert(1)",
        b"https://user:pw@example.com/a.jpg",
        b"https://example.com/\xff\xfe.jpg",  # invalid UTF-8
        b"https://example.com/a\x00b.jpg",  # NUL
        b"https://example.com/" + b"x" * (1 << 20),  # a 1 MB line
        b"http:///nohost.jpg",
        b"https://ok.example.com/2.jpg",
    ]
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = ingest_files(conn, [path])
    assert (report.rows_read, report.added) == (9, 2)
    assert report.rejected_by_reason == {
        "unsupported_scheme": 2, "credentials": 1, "invalid_utf8": 1, "control_characters": 1, "too_long": 1,
        "missing_host": 1,
    }
    samples = {(s["line"], s["reason"]) for s in report.rejected_samples}
    assert samples == {(2, "unsupported_scheme"), (3, "unsupported_scheme"), (4, "credentials"), (5, "invalid_utf8"),
                       (6, "control_characters"), (7, "too_long"), (8, "missing_host")}
    stored = conn.execute("SELECT line, reason, value FROM corpus_rejects ORDER BY line").fetchall()
    assert [(line, reason) for line, reason, _ in stored] == sorted(samples)
    assert stored[3][2] == "https://example.com/\\xff\\xfe.jpg" and stored[4][2] == "https://example.com/a\\x00b.jpg"
    assert len(stored[5][2]) < 400  # the 1 MB line is kept short
    row = conn.execute("SELECT rejected, rejected_by_reason FROM corpus_files").fetchone()
    assert row == (7, report.rejected_by_reason)
    conn.rollback()


def test_csv_rows_with_the_wrong_number_of_fields_are_counted(conn, tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("url,caption\nhttps://a.com/1.jpg,x,extra\nhttps://a.com/2.jpg,y\nhttps://a.com/3.jpg\n")
    report = ingest_files(conn, [path])
    assert report.added == 1 and report.rejected_by_reason == {"malformed_row": 2}
    assert sorted(s["line"] for s in report.rejected_samples) == [2, 4]


def test_jsonl_lines_that_are_not_objects_with_a_url(conn, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"url": "https://a.com/1.jpg", "id": 1}\nnot json\n{"id": 3}\n[1, 2]\n'
                     b'{"url": 5}\n{"url": "https://a.com/6.jpg"}\n')
    report = ingest_files(conn, [path])
    assert report.added == 2
    assert report.rejected_by_reason == {"invalid_json": 2, "missing_url": 2}
    assert conn.execute("SELECT metadata FROM corpus_urls ORDER BY source_line").fetchall() == [({"id": 1},), ({},)]
    conn.rollback()


def test_a_file_with_only_rejected_lines_adds_no_shard(conn, tmp_path):
    path = tmp_path / "all_bad.txt"
    path.write_text("ftp://a/b\nmailto:x@y.z\n")
    report = ingest_files(conn, [path])
    assert report.shards_added == [] and report.rejected == 2
    assert shards(conn) == []


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


# ---------------------------------------------------------------- atomicity


def test_an_ingest_that_fails_midway_leaves_no_shard_and_can_be_rerun(conn, tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("".join(f"https://example.com/{i}.jpg\n" for i in range(5000)))
    settings = IngestSettings(shard_size=100, read_block_bytes=4096)
    calls = []

    def interrupt(state: dict) -> None:
        calls.append(state)
        if len(calls) == 3:  # several batches (and shards) are already loaded
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest_files(conn, [path], settings=settings, progress=interrupt)
    assert calls[-1]["file_added"] > 100
    assert nothing_written(conn)
    report = ingest_files(conn, [path], settings=settings)
    assert (report.added, len(report.shards_added)) == (5000, 50)


def test_a_bad_second_file_keeps_the_first_and_writes_nothing_of_its_own(conn, urls_file, tmp_path):
    good = urls_file("good.txt", URLS)
    bad = tmp_path / "bad.csv"
    bad.write_text('url\nhttps://a.com/x.jpg\n"https://a.com/y.jpg\nhttps://a.com/z.jpg\n')
    with pytest.raises(CorpusInputError):
        ingest_files(conn, [good, bad], shard_size=10)
    assert [row[1] for row in corpus(conn)] == URLS
    assert conn.execute("SELECT count(*) FROM corpus_files").fetchone()[0] == 1
    conn.rollback()


def test_a_killed_ingest_process_leaves_no_half_shard(conn, database_url, tmp_path):
    path = tmp_path / "killed.txt"
    path.write_text("".join(f"https://example.com/{i}.jpg\n" for i in range(20_000)))
    marker = tmp_path / "loaded-some"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from imgpipe_dagster.corpus import IngestSettings, ingest_files
        from imgpipe_dagster.store import database as db
        def progress(state):
            if state["file_added"] >= 2000:
                open({str(marker)!r}, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        with db.connect({database_url!r}) as conn:
            ingest_files(conn, [{str(path)!r}], settings=IngestSettings(shard_size=500, read_block_bytes=8192),
                         progress=progress)
    """)
    result = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert result.returncode == -9 and marker.exists()
    assert nothing_written(conn)
    assert ingest_files(conn, [path], shard_size=500).added == 20_000
