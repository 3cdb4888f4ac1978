"""Bad input: a clear one-line error or a counted, sampled rejection, and never a partial shard."""

from __future__ import annotations

import gzip
import os

import pytest

from imgpipe_dagster.corpus import CorpusInputError, ingest_files
from imgpipe_dagster_tests.corpus.conftest import URLS, compress, nothing_written, shards

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

