"""The GPU tier of real Dagster runs: a server found in the registry (started outside the run), and the
project's own server spoken to through its OpenAI-compatible endpoint, end to end on the CPU."""

from __future__ import annotations

import pytest
from dagster import materialize

from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
from imgpipe_dagster.partitions import URL_SHARDS
from imgpipe_dagster.paths import gpu_server_records_dir
from imgpipe_dagster.resources import GpuModelResource
from imgpipe_dagster.settings_map import medium_server_settings
from imgpipe_dagster.store.verify import verify
from imgpipe_dagster_tests.assets.test_analysis import resources, run_config
from imgpipe_dagster_tests.support import seed_corpus

IMAGES = [("astronaut", "png", 640), ("chelsea", "jpg", 300), ("coffee", "webp", 900), ("rocket", "jpg", 1200),
          ("flower", "gif", 500)]  # fmt: skip


@pytest.fixture
def elsewhere_server(tiny_model_dir, tmp_path, database_url):
    """A GPU server no run started (its own records folder, as on another machine), registered in the
    test's database; stopped afterwards."""
    settings = medium_server_settings(str(tiny_model_dir), max_new_tokens=4, batch_wait_timeout=0.05).replace(
        registry_url=database_url, registry_heartbeat_s=0.5
    )
    launcher = GpuServerLauncher(tmp_path / "elsewhere", settings, startup_timeout_s=300)
    try:
        yield launcher.ensure(["cpu"], base_port=0)[0]
    finally:
        launcher.stop(timeout_s=10)


def seed_shards(conn, dagster_instance, image_server, *shards: str) -> list[list[str]]:
    """Per shard: the sample photographs (distinct URLs per shard) and a URL that answers 404, last."""
    corpus = {}
    for number, shard in enumerate(shards):
        urls = [image_server.image_url(name, ext, width=w, n=100 * number + i)
                for i, (name, ext, w) in enumerate(IMAGES)]  # fmt: skip
        corpus[shard] = [*urls, image_server.url(f"/fault/status/404?n={number}")]
    seed_corpus(conn, corpus)
    dagster_instance.add_dynamic_partitions(URL_SHARDS, list(shards))
    return list(corpus.values())


def analyse(dagster_instance, database_url, gpu_model, shard: str):
    config = run_config()
    # both shards serve the same photos: without this the second run would reuse the first's analyses
    # (engine/dedupe.py) and send nothing to the tier under test
    config["ops"]["image_analysis"]["config"]["reuse_duplicates"] = False
    result = materialize([image_analysis], instance=dagster_instance, resources=resources(database_url, gpu_model),
                         run_config=config, partition_key=shard)  # fmt: skip
    assert result.success
    (event,) = result.get_asset_materialization_events()
    return event.materialization.metadata


def results_of(conn, shard: str) -> dict[str, tuple]:
    return {url: tuple(rest) for url, *rest in conn.execute(
        "SELECT c.url, c.state::text, coalesce(r.error_class, r.status), r.gpu, r.model_text IS NOT NULL,"
        " r.prompt_version, r.generated_tokens FROM corpus_urls c JOIN url_analysis_results r USING (url_hash)"
        " WHERE c.shard_id = %s", (shard,)).fetchall()}  # fmt: skip


def test_a_run_finds_a_registered_server_it_did_not_start(
    dagster_instance, database_url, conn, image_server, imgpipe_home, tiny_model_dir, elsewhere_server
):
    (urls,) = seed_shards(conn, dagster_instance, image_server, "s000001")
    # nothing listed: the run has only the registry to find its GPU tier
    gpu_model = GpuModelResource(mode="external", endpoints=[], model_path=str(tiny_model_dir))

    metadata = analyse(dagster_instance, database_url, gpu_model, "s000001")

    assert verify(conn, ["s000001"]).complete
    rows = results_of(conn, "s000001")
    assert {rows[url][:2] for url in urls[:-1]} == {("done", "ok")}
    assert rows[urls[-1]][:2] == ("failed_permanent", "http_404")
    (endpoint,) = metadata["gpu_tier"].value["endpoints"].values()
    assert endpoint["url"] == elsewhere_server.url
    assert not GpuServerLauncher(gpu_server_records_dir(imgpipe_home)).live_records()  # the run started none


def test_the_openai_endpoint_of_the_projects_server_analyses_a_shard_like_the_native_api(
    dagster_instance, database_url, conn, image_server, tiny_model_dir, elsewhere_server
):
    native_urls, openai_urls = seed_shards(conn, dagster_instance, image_server, "s000001", "s000002")
    listed = {"mode": "external", "endpoints": [elsewhere_server.url], "model_path": str(tiny_model_dir)}

    native = analyse(dagster_instance, database_url, GpuModelResource(**listed), "s000001")
    openai = analyse(dagster_instance, database_url, GpuModelResource(**listed, api="openai"), "s000002")

    assert verify(conn, ["s000001", "s000002"]).complete
    native_rows, openai_rows = results_of(conn, "s000001"), results_of(conn, "s000002")
    assert {openai_rows[url][:2] for url in openai_urls[:-1]} == {("done", "ok")}
    assert openai_rows[openai_urls[-1]][:2] == ("failed_permanent", "http_404")
    # same result row: text stored, same prompt version, tokens counted
    assert all(openai_rows[url][3] and openai_rows[url][5] > 0 for url in openai_urls[:-1])
    assert {openai_rows[url][4] for url in openai_urls[:-1]} == {native_rows[url][4] for url in native_urls[:-1]}
    # the OpenAI tier was used (listed server + the same server in the registry count once)
    assert (native["gpu_api"].value, openai["gpu_api"].value) == ("native", "openai")
    (openai_endpoint,) = openai["gpu_tier"].value["endpoints"].values()
    assert openai_endpoint["url"] == elsewhere_server.url + "/v1"
    # the same limiter and breaker figures as for the native client
    (native_endpoint,) = native["gpu_tier"].value["endpoints"].values()
    assert set(openai_endpoint["limiter"]) == set(native_endpoint["limiter"])
    assert set(openai_endpoint["breaker"]) == set(native_endpoint["breaker"])
    assert openai_endpoint["limiter"]["counters"] and openai_endpoint["breaker"]["state"] == "closed"
    assert openai["gpu_tier"].value["counters"]["routed"] > 0
    assert openai["urls_done"].value == len(openai_urls) - 1
