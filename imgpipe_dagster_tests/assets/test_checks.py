"""The asset checks of image_analysis from typed figures: the run summary, parse statistics, the verify report."""

from __future__ import annotations

from dagster import AssetCheckSeverity

from imgpipe_dagster.assets import checks
from imgpipe_dagster.assets.analysis import summary_metadata
from imgpipe_dagster.engine.stats import GpuThroughput, RunStats, RunSummary
from imgpipe_dagster.store.shard_report import ShardFigures
from imgpipe_dagster.store.stats import ParseStats, parse_stats
from imgpipe_dagster.store.verify import VerifyReport
from imgpipe_dagster_tests.support import seed_corpus


def finished_run(done: int, failed: int, unfinished: int = 0) -> RunSummary:
    stats = RunStats(total_urls=done + failed + unfinished)
    stats.outcomes.update({"done": done, "failed_permanent": failed})
    stats.failures_by_class["http_404"] = failed
    stats.images_by_gpu["gpu0"] = done
    stats.sample(stats.inference_ms, 120.0)
    counts = {"done": done, "failed_permanent": failed, "pending": unfinished, "leased": 0, "failed_retryable": 0}
    return stats.summary(final_state_counts=counts, router={"endpoints": []})


def test_run_summary_is_typed_and_reads_the_final_states():
    summary = finished_run(done=8, failed=2, unfinished=5)
    assert summary.final_count("done") == 8 and summary.urls_unfinished == 5
    assert summary.failure_ratio == 0.2
    assert summary.per_gpu["gpu0"].images == 8 and isinstance(summary.per_gpu["gpu0"], GpuThroughput)
    assert summary.inference_ms_p50 == 120.0 and summary.download_ms_p50 is None
    assert summary.as_dict()["per_gpu"] == {"gpu0": {"images": 8, "images_per_s": summary.per_gpu["gpu0"].images_per_s}}


def test_a_summary_while_running_has_no_final_states():
    stats = RunStats(total_urls=3)
    stats.outcomes["done"] = 1
    summary = stats.summary()
    assert summary.final_state_counts is None and summary.failure_ratio == 0.0 and summary.urls_done == 1


def test_run_wide_metadata_comes_from_the_summary_under_run_names():
    metadata = summary_metadata(finished_run(done=6, failed=3))
    assert metadata["run_urls_done"] == 6 and metadata["run_urls_failed"] == 3
    assert metadata["run_urls_unfinished"] == 0 and metadata["run_failure_ratio"] == round(3 / 9, 4)
    # the plain names are each shard's own (shard_results), never the run's sum
    assert not {"urls_total", "urls_done", "per_gpu", "failures_by_class"} & set(metadata)


def shard(done: int, failed: int) -> ShardFigures:
    return ShardFigures("s000001", {"done": done, "failed_permanent": failed}, done + failed, failed,
                        {"http_404": failed})  # fmt: skip


def test_failure_ratio_check_warns_then_errors():
    healthy = checks.failure_ratio(shard(done=95, failed=5))
    assert healthy.passed and healthy.metadata["finished"].value == 100
    warned = checks.failure_ratio(shard(done=70, failed=30))
    assert not warned.passed and warned.severity == AssetCheckSeverity.WARN
    broken = checks.failure_ratio(shard(done=20, failed=80))
    assert not broken.passed and broken.severity == AssetCheckSeverity.ERROR


def test_parse_check_holds_only_a_real_model_to_json():
    mostly_text = ParseStats(analyses=10, parsed_json=2, empty=0)
    assert not checks.analyses_parse(mostly_text, tiny_model=False).passed
    assert checks.analyses_parse(mostly_text, tiny_model=True).passed
    assert checks.analyses_parse(ParseStats(analyses=10, parsed_json=9, empty=0), tiny_model=False).passed
    assert not checks.analyses_parse(ParseStats(analyses=10, parsed_json=10, empty=1), tiny_model=False).passed
    assert checks.analyses_parse(ParseStats(analyses=0, parsed_json=0, empty=0), tiny_model=False).passed


def test_completeness_check_follows_the_verify_report():
    assert checks.every_url_final(VerifyReport(urls=3, final=3)).passed
    # URLs still waiting in the pool warn; only a lost or inconsistent URL is an error (and blocks)
    unfinished = checks.every_url_final(VerifyReport(urls=3, final=2, unfinished={"pending": 1}))
    assert not unfinished.passed and unfinished.severity == AssetCheckSeverity.WARN
    inconsistent = checks.every_url_final(VerifyReport(urls=3, final=3, inconsistent={"done_without_result": 1}))
    assert not inconsistent.passed and inconsistent.severity == AssetCheckSeverity.ERROR


def test_parse_stats_counts_successful_results_of_the_shards(conn):
    seed_corpus(conn, {"s000001": [f"http://127.0.0.1:9/{i}.jpg" for i in range(4)],
                       "s000002": ["http://127.0.0.1:9/other.jpg"]})  # fmt: skip
    rows = [  # (url, status, parse_ok, model_text)
        ("http://127.0.0.1:9/0.jpg", "ok", True, '{"caption": "a cat"}'),
        ("http://127.0.0.1:9/1.jpg", "ok", False, "a cat, as prose"),
        ("http://127.0.0.1:9/2.jpg", "ok", False, ""),
        ("http://127.0.0.1:9/3.jpg", "failed", False, None),
        ("http://127.0.0.1:9/other.jpg", "ok", True, "{}"),
    ]
    for url, status, parse_ok, text in rows:
        conn.execute(
            "INSERT INTO url_analysis_results (url_hash, url, shard_id, status, parse_ok, model_text)"
            " SELECT url_hash, url, shard_id, %s, %s, %s FROM corpus_urls WHERE url = %s",
            (status, parse_ok, text, url),
        )
    assert parse_stats(conn, ["s000001"]) == ParseStats(analyses=3, parsed_json=1, empty=1)
    assert parse_stats(conn, ["s000001", "s000002"]).parsed_json == 2
