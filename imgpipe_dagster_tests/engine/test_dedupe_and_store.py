"""Duplicates analysed once and the image store, on real runs: a real image host, a tiny-model GPU
server on the CPU (its own counter of analysed images is the witness), a real PostgreSQL."""

from __future__ import annotations

import json
import re
import tarfile

import httpx

from imgpipe_dagster.engine.runner import ShardRunner
from imgpipe_dagster.engine.settings import EngineSettings
from imgpipe_dagster.engine.versions import analysis_version
from imgpipe_dagster.profiles import resolve
from imgpipe_dagster.settings_map import engine_settings, medium_fetch_settings
from imgpipe_dagster.store import versions
from imgpipe_dagster.store.verify import verify
from imgpipe_dagster_tests.engine.conftest import LoggedHost
from imgpipe_dagster_tests.support import seed_corpus

VERSION = analysis_version("caption_short_v1", "tiny-random-qwen2-vl").label


def settings(prompt: str = "caption_short_v1") -> EngineSettings:
    worker, _ = resolve("medium", {
        "images_per_request": 4, "max_concurrent_batches": 2, "chunk_size": 4, "max_concurrent_chunks": 2,
        "prefetch_concurrent_downloads": 4, "prefetch_queue_size": 4, "lease_seconds": 30, "image_resize_threads": 1,
    })  # fmt: skip
    fetch = medium_fetch_settings(allowed_networks=["127.0.0.0/8"], prefetch_concurrent_downloads=4, prefetch_queue_size=4,
                          image_resize_threads=1, target_pixels=56 * 56, patch_multiple=28)  # fmt: skip
    return engine_settings(worker, fetch, prompt_name=prompt)


def gpu_images(endpoint: str) -> float:
    """Images the GPU server analysed so far, from its Prometheus counter."""
    text = httpx.get(f"{endpoint}/metrics", timeout=10).text
    match = re.search(r"^imgpipe_gpu_server_images_processed_total (\S+)$", text, re.MULTILINE)
    assert match, "the GPU server's metrics have no images_processed counter"
    return float(match.group(1))


def run(database_url, owner, shards, endpoint, **options) -> ShardRunner:
    options.setdefault("analysis_version", VERSION)
    runner = ShardRunner(database_url, owner, shards, options.pop("settings", settings()), [endpoint],
                         progress=lambda line, summary: None, **options)  # fmt: skip
    runner.run()
    return runner


def test_identical_bytes_cost_one_gpu_image_and_both_urls_are_done(conn, database_url, gpu_endpoint, imgpipe_home):
    with LoggedHost() as host:  # every /ok/ path serves the same JPEG
        seed_corpus(conn, {"s000001": [host.url("/ok/a.jpg"), host.url("/ok/b.jpg")],
                           "s000002": [host.url("/ok/c.jpg")]})  # fmt: skip
        before = gpu_images(gpu_endpoint)
        first = run(database_url, "run-1", ["s000001"], gpu_endpoint)
        after_first = gpu_images(gpu_endpoint)
        # a later run meets the same bytes again: the stored analysis is reused, no GPU image at all
        second = run(database_url, "run-2", ["s000002"], gpu_endpoint)
        after_second = gpu_images(gpu_endpoint)

    assert after_first - before == 1
    assert after_second == after_first
    assert (first.duplicates.reused, second.duplicates.reused) == (1, 1)
    rows = conn.execute(
        "SELECT url, status, reused_from, model_text, gpu FROM url_analysis_results ORDER BY url").fetchall()  # fmt: skip
    assert [status for _, status, *_ in rows] == ["ok", "ok", "ok"]
    sources = [r for r in rows if r[2] is None]
    assert len(sources) == 1 and sources[0][4] is not None
    source_hash = conn.execute("SELECT url_hash FROM corpus_urls WHERE url = %s", (sources[0][0],)).fetchone()[0]
    for url, _, reused_from, text, gpu in rows:
        assert text == sources[0][3]
        if url != sources[0][0]:
            assert bytes(reused_from) == bytes(source_hash) and gpu is None
    for shard in ("s000001", "s000002"):
        assert verify(conn, [shard], analysis_version=VERSION).complete
    assert versions.duplicate_counts(conn, "s000001", VERSION) == versions.DuplicateCounts(reused=1, near_duplicates=0)


def test_without_reuse_every_image_goes_to_the_gpu(conn, database_url, gpu_endpoint, imgpipe_home):
    with LoggedHost() as host:
        seed_corpus(conn, {"s000001": [host.url(f"/ok/{n}.jpg") for n in range(3)]})
        before = gpu_images(gpu_endpoint)
        run(database_url, "run-1", ["s000001"], gpu_endpoint, reuse_duplicates=False)
        assert gpu_images(gpu_endpoint) - before == 3
    assert conn.execute("SELECT count(*) FROM url_analysis_results WHERE reused_from IS NULL").fetchone()[0] == 3


def test_a_stored_shard_is_reanalysed_from_the_store_without_downloads(conn, database_url, gpu_endpoint, tmp_path,
                                                                     imgpipe_home):  # fmt: skip
    store = tmp_path / "image-store"
    other = analysis_version("analysis_v1", "tiny-random-qwen2-vl").label
    with LoggedHost() as host:
        urls = [host.url(f"/ok/{n}.jpg") for n in range(5)]
        seed_corpus(conn, {"s000001": urls})
        first = run(database_url, "run-1", ["s000001"], gpu_endpoint, image_store=str(store), reuse_duplicates=False)
        fetched_once = list(host.requests)
        second = run(database_url, "run-2", ["s000001"], gpu_endpoint, image_store=str(store), reuse_duplicates=False,
                     analysis_version=other, settings=settings("analysis_v1"))  # fmt: skip
        assert host.requests == fetched_once  # nothing downloaded again

    assert (first.image_store.written, second.image_store.read, second.image_store.written) == (5, 5, 0)
    (tar_path,) = (store / "s000001").glob("*.tar")
    index = json.loads(tar_path.with_name(tar_path.name.removesuffix(".tar") + ".index.json").read_text())
    with tarfile.open(tar_path) as tar:
        names = sorted(tar.getnames())
        sample = json.loads(tar.extractfile(names[1]).read())  # <key>.json follows <key>.jpg in sorted order
    keys = {h.hex() for (h,) in conn.execute("SELECT url_hash FROM corpus_urls")}
    assert names == sorted([f"{k}.jpg" for k in keys] + [f"{k}.json" for k in keys])
    assert set(index) == keys and sample["url"] in urls and sample["sha256"]
    for version in (VERSION, other):
        report = verify(conn, ["s000001"], analysis_version=version)
        assert report.complete and report.final == 5, report.lines()
    sha = dict(conn.execute("SELECT analysis_version, count(DISTINCT sha256) FROM url_analysis_results GROUP BY 1"))
    assert sha == {VERSION: 1, other: 1}  # the stored sample kept the download's digest


def test_image_store_is_off_unless_asked(conn, database_url, gpu_endpoint, imgpipe_home):
    with LoggedHost() as host:
        seed_corpus(conn, {"s000001": [host.url("/ok/a.jpg")]})
        runner = run(database_url, "run-1", ["s000001"], gpu_endpoint)
    assert runner.image_store is None
    assert not list(imgpipe_home.rglob("*.tar"))

