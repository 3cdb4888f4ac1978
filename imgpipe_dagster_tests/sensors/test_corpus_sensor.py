"""The corpus sensor on a real drop directory: a file is taken once, never while it is being written."""

from __future__ import annotations

import gzip
import os
import time

import pytest
from dagster import DagsterInstance, build_sensor_context

from imgpipe_dagster.sensors.corpus import (
    INGEST_OP,
    INGEST_PATHS_FIELD,
    SETTLED_AFTER_S,
    corpus_files,
    corpus_tick,
    is_url_file,
)


@pytest.fixture
def instance():
    with DagsterInstance.ephemeral() as ephemeral:
        yield ephemeral


def tick(instance, folder, cursor=None, now=None):
    return corpus_tick(build_sensor_context(instance=instance, cursor=cursor), str(folder), now=now)


def paths_of(result) -> list[str]:
    (request,) = result.run_requests
    return request.run_config["ops"][INGEST_OP]["config"][INGEST_PATHS_FIELD]


def age(path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_a_file_being_written_is_taken_only_once_it_stops_changing(instance, tmp_path):
    growing = tmp_path / "urls.txt"
    growing.write_text("http://a.test/1.jpg\n")
    first = tick(instance, tmp_path)
    assert first.run_requests == [] and "still being written: urls.txt" in first.skip_reason.skip_message

    with growing.open("a") as f:
        f.write("http://a.test/2.jpg\n")
    second = tick(instance, tmp_path, first.cursor)
    assert second.run_requests == []  # changed since the last tick

    third = tick(instance, tmp_path, second.cursor)  # unchanged across two ticks
    assert paths_of(third) == [str(growing.resolve())]
    assert tick(instance, tmp_path, third.cursor).run_requests == []  # taken once


def test_files_complete_before_the_sensor_looked_are_taken_at_once(instance, tmp_path):
    for name in ("b.csv", "a.jsonl.gz", "c.parquet", "d.tsv.zst"):
        (tmp_path / name).write_bytes(b"x")
        age(tmp_path / name, SETTLED_AFTER_S + 5)
    result = tick(instance, tmp_path)
    assert [os.path.basename(p) for p in paths_of(result)] == [
        "a.jsonl.gz",
        "b.csv",
        "c.parquet",
        "d.tsv.zst",
    ]
    assert result.run_requests[0].job_name is None or result.run_requests[0].job_name == "ingest_corpus"


def test_a_replaced_file_is_taken_again_and_a_new_file_alone(instance, tmp_path):
    first_file = tmp_path / "one.txt"
    first_file.write_text("http://a.test/1.jpg\n")
    age(first_file, SETTLED_AFTER_S + 5)
    taken = tick(instance, tmp_path)
    second_file = tmp_path / "two.txt"
    with gzip.open(tmp_path / "three.txt.gz", "wt") as f:
        f.write("http://a.test/3.jpg\n")
    second_file.write_text("http://a.test/2.jpg\n")
    for path in (second_file, tmp_path / "three.txt.gz"):
        age(path, SETTLED_AFTER_S + 5)
    result = tick(instance, tmp_path, taken.cursor)
    assert [os.path.basename(p) for p in paths_of(result)] == ["three.txt.gz", "two.txt"]

    first_file.write_text("http://a.test/1.jpg\nhttp://a.test/4.jpg\n")
    age(first_file, SETTLED_AFTER_S + 1)
    again = tick(instance, tmp_path, result.cursor)
    assert [os.path.basename(p) for p in paths_of(again)] == ["one.txt"]
    assert again.run_requests[0].run_key != taken.run_requests[0].run_key


def test_ignores_temporary_hidden_and_other_files():
    assert is_url_file("urls.txt") and is_url_file("URLS.CSV.GZ") and is_url_file("x.parquet")
    for name in (
        "urls.txt.part",
        ".urls.txt",
        "urls.txt.tmp",
        "notes.md",
        "image.jpg",
        "urls.gz",
        "x.crdownload",
    ):
        assert not is_url_file(name), name


def test_without_a_drop_directory_it_says_so(instance, tmp_path):
    assert (
        "IMGPIPE_CORPUS_DIR is not set"
        in corpus_tick(build_sensor_context(instance=instance), None).skip_message
    )
    missing = corpus_tick(build_sensor_context(instance=instance), str(tmp_path / "nope"))
    assert "does not exist" in missing.skip_message


def test_sensor_reads_the_environment(instance, tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("http://a.test/1.jpg\n")
    age(tmp_path / "a.txt", SETTLED_AFTER_S + 5)
    monkeypatch.setenv("IMGPIPE_CORPUS_DIR", str(tmp_path))
    result = corpus_files(build_sensor_context(instance=instance))
    assert len(result.run_requests) == 1
