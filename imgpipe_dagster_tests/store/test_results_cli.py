"""`imgpipe export` and `imgpipe requeue` on a real database: what they write and print, and one clear
line for bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from imgpipe_dagster.cli import main
from imgpipe_dagster.store.export import MANIFEST_NAME
from imgpipe_dagster_tests.store.test_export import finish


@pytest.fixture
def project(conn, database_url, monkeypatch):
    monkeypatch.setenv("IMGPIPE_DATABASE_URL", database_url)
    finish(conn, {"s1": [f"http://a.test/{i}.jpg" for i in range(9)], "s2": [f"http://b.test/{i}.jpg" for i in range(3)]},
           failed_every=3)  # fmt: skip
    return conn


def test_export_writes_every_shard_or_the_chosen_one(project, tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path / "all")]) == 0
    assert "exported 12 rows of 2 shard(s) as parquet" in capsys.readouterr().out
    assert len(pd.read_parquet(tmp_path / "all" / "s1.parquet")) == 9
    assert main(["export", "--out", str(tmp_path / "one"), "--shard", "s2", "--format", "csv"]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir() if not p.name.startswith(".")) == [MANIFEST_NAME,
                                                                                                  "s2.csv"]  # fmt: skip
    assert len(pd.read_csv(tmp_path / "one" / "s2.csv")) == 3
    assert main(["export", "--out", str(tmp_path / "jl"), "--format", "jsonl", "--batch-rows", "2"]) == 0
    assert len((tmp_path / "jl" / "s1.jsonl").read_text().splitlines()) == 9


def test_export_of_an_unknown_shard_is_one_clear_line(project, tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path), "--shard", "s9"]) == 2
    assert capsys.readouterr().err.strip() == "imgpipe: unknown shard(s) s9; `imgpipe status` lists the corpus"
    assert not list(tmp_path.iterdir())


def test_requeue_prints_per_class_and_dry_run_changes_nothing(project, capsys):
    assert main(["requeue", "--error-class", "http_404", "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] and dry["urls_by_class"] == {"http_404": 4} and dry["requeue_id"] is None
    assert project.execute("SELECT count(*) FROM corpus_urls WHERE state = 'failed_permanent'").fetchone() == (4,)
    assert main(["requeue", "--error-class", "http_404", "--shard", "s1", "--since", "1h"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["requeued 3 URL(s) in 1 shard(s)", "  http_404: 3"]
    project.commit()
    assert project.execute("SELECT count(*) FROM corpus_urls WHERE state = 'pending'").fetchone() == (3,)


def test_requeue_with_a_bad_since_is_one_clear_line(project, capsys):
    assert main(["requeue", "--error-class", "http_5xx", "--since", "yesterday"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imgpipe: --since 'yesterday': give an ISO time") and "\n" not in err


def test_requeue_of_a_misspelt_class_is_one_clear_line(project, capsys):
    assert main(["requeue", "--error-class", "http5xx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imgpipe: unknown error class 'http5xx': no failed URL has it; known classes: ")
    assert "http_5xx" in err and "\n" not in err
