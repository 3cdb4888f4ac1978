"""ingest_files against a real PostgreSQL: dedupe, re-ingest, append, shard order, atomicity."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from imgpipe_dagster.corpus import CorpusInputError, IngestSettings, ingest_files, shard_id
from imgpipe_dagster_tests.corpus.conftest import URLS, corpus, nothing_written, shards

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


def test_the_seen_filter_never_forgets_a_url():
    import hashlib

    from imgpipe_dagster.corpus.ingest import _SeenFilter

    seen = _SeenFilter()
    first = b"".join(hashlib.md5(f"u{i}".encode()).digest() for i in range(50_000))
    assert seen.check_and_add(first).sum() < 50  # a fresh filter says "maybe" almost never
    again = b"".join(hashlib.md5(f"u{i}".encode()).digest() for i in range(0, 100_000, 2))
    maybe = seen.check_and_add(again)
    assert maybe[:25_000].all()  # every URL added before is "maybe seen": no false "new"
