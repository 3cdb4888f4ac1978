"""A prompt change in real Dagster runs: the analysed shards show as out of date through Dagster's own
staleness resolver, a re-analysis of them keeps the old analyses, and every URL is in exactly one
final state under each version (real Postgres, real image server, a real tiny-model GPU server)."""

from __future__ import annotations

import pytest
from dagster import materialize

from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
from imgpipe_dagster.partitions import URL_SHARDS
from imgpipe_dagster.paths import gpu_server_records_dir
from imgpipe_dagster.resources import FetcherResource, GpuModelResource, PostgresResource
from imgpipe_dagster.store.verify import verify
from imgpipe_dagster.store.versions import bind_shards, versions_of_shards
from imgpipe_dagster.store.work import claim
from imgpipe_dagster_tests.assets.versions_support import (
    PROMPT_CHANGE,
    image_analysis_as_configured,
    stale_partitions,
)
from imgpipe_dagster_tests.support import seed_corpus

SHARDS = ["s000001", "s000002"]
RUN_CONFIG = {"ops": {"image_analysis": {"config": {"profile": "medium", "worker": {
    "images_per_request": 4, "chunk_size": 5, "max_concurrent_batches": 2, "lease_seconds": 10,
    "prefetch_concurrent_downloads": 4}}}}}  # fmt: skip
BOTH = {"dagster/asset_partition_range_start": SHARDS[0], "dagster/asset_partition_range_end": SHARDS[1]}


@pytest.fixture
def gpu_server(tiny_model_dir, imgpipe_home):
    yield GpuModelResource(devices=["cpu"], base_port=0, model_path=str(tiny_model_dir), idle_timeout_s=300,
                           startup_timeout_s=300)  # fmt: skip
    GpuServerLauncher(gpu_server_records_dir(imgpipe_home)).stop()


def test_prompt_change_marks_shards_stale_and_reanalysis_keeps_old_analyses(
    dagster_instance, database_url, conn, image_server, gpu_server, monkeypatch
):
    photos = [("astronaut", "png"), ("chelsea", "jpg"), ("coffee", "png"), ("rocket", "jpg")]
    seed_corpus(conn, {
        SHARDS[0]: [image_server.image_url(n, e, width=300) for n, e in photos[:2]] + [image_server.url("/fault/status/404")],
        SHARDS[1]: [image_server.image_url(n, e, width=300) for n, e in photos[2:]],
    })  # fmt: skip
    dagster_instance.add_dynamic_partitions(URL_SHARDS, SHARDS)
    resources = {"postgres": PostgresResource(database_url=database_url), "gpu_model": gpu_server,
                 "fetcher": FetcherResource(allowed_networks=["127.0.0.0/8"])}  # fmt: skip
    monkeypatch.delenv(next(iter(PROMPT_CHANGE)), raising=False)

    first = image_analysis_as_configured()
    assert materialize([first], instance=dagster_instance, resources=resources, run_config=RUN_CONFIG, tags=BOTH).success
    assert stale_partitions(dagster_instance, first, SHARDS) == {}
    old_version = first.code_versions_by_key[first.key]

    for name, value in PROMPT_CHANGE.items():
        monkeypatch.setenv(name, value)
    changed = image_analysis_as_configured()
    new_version = changed.code_versions_by_key[changed.key]
    assert new_version != old_version
    stale = stale_partitions(dagster_instance, changed, SHARDS)
    assert set(stale) == set(SHARDS)
    assert all(any("code version" in reason for reason in reasons) for reasons in stale.values()), stale

    result = materialize([changed], instance=dagster_instance, resources=resources, run_config=RUN_CONFIG, tags=BOTH)
    assert result.success
    assert stale_partitions(dagster_instance, changed, SHARDS) == {}
    materialization = result.asset_materializations_for_node("image_analysis")[0]
    assert materialization.metadata["analysis_version"].value == new_version
    assert materialization.metadata["previous_versions"].value == dict.fromkeys(SHARDS, old_version)

    held = versions_of_shards(conn, SHARDS)
    assert held == {old_version: {"ok": 4, "failed": 1}, new_version: {"ok": 4, "failed": 1}}
    prompts = dict(conn.execute("SELECT analysis_version, min(prompt_version) FROM url_analysis_results"
                                " WHERE status = 'ok' GROUP BY 1").fetchall())  # fmt: skip
    assert prompts[old_version].startswith("analysis_v1@") and prompts[new_version].startswith("caption_short_v1@")
    for version in (old_version, new_version):
        report = verify(conn, SHARDS, analysis_version=version)
        assert report.complete and report.final == 5, report.lines()


def test_a_shard_held_by_another_versions_live_run_fails_the_run_with_one_line(
    dagster_instance, database_url, conn, tiny_model_dir, imgpipe_home
):
    seed_corpus(conn, {SHARDS[0]: ["https://example.org/a.jpg", "https://example.org/b.jpg"]})
    dagster_instance.add_dynamic_partitions(URL_SHARDS, SHARDS[:1])
    bind_shards(conn, SHARDS[:1], "caption_short_v1:000000000000", "other-run")
    claim(conn, "other-run", SHARDS[:1], 1, 600, "caption_short_v1:000000000000")
    resources = {"postgres": PostgresResource(database_url=database_url),
                 "gpu_model": GpuModelResource(mode="external", endpoints=["http://127.0.0.1:9"],
                                               model_path=str(tiny_model_dir)),
                 "fetcher": FetcherResource(allowed_networks=["127.0.0.0/8"])}  # fmt: skip

    result = materialize([image_analysis_as_configured()], instance=dagster_instance, resources=resources,
                         run_config=RUN_CONFIG, partition_key=SHARDS[0], raise_on_error=False)  # fmt: skip

    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert f"shard {SHARDS[0]} is being analysed under version caption_short_v1:000000000000 by run other-run" in message
    assert len(message.strip().splitlines()) == 1
    states = dict(conn.execute("SELECT state::text, count(*) FROM corpus_urls GROUP BY 1").fetchall())
    assert states == {"leased": 1, "pending": 1}  # the other run's work is untouched
