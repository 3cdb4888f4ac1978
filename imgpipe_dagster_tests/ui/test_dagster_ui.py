"""The Dagster UI as an operator uses it: `imgpipe dev` in a subprocess, driven by headless Debian
Chromium through Playwright (never a downloaded browser). Screenshots go to .ci/artifacts/ui/.

The corpus comes in through the command line (`imgpipe ingest`, twice: a 3-URL shard s000001 and a
33-URL shard s000002), so the UI must show url_corpus materialized without a UI run. Then, in order:
a launchpad run of one shard, a backfill of both shards with the aggressive profile picked in the
backfill dialog, each shard's own figures, checks and results sample, and a run with a bad config
that the run-failure sensor does not retry. Last, `imgpipe dev` restarts with another prompt: both
shards show as out of date ("Unsynced", a code version change), and a backfill analyses them again
under the new analysis version while the old analyses stay as they were.

Without /usr/bin/chromium the module skips, saying so, except in CI (CI=true), where it fails:
`.ci/run` installs Debian's chromium, so a missing browser there is a broken CI, not a reason to skip.

One `imgpipe dev` serves the whole module (it takes a minute to start); the run launched from the
launchpad reaches two real tiny-model GPU server processes on the CPU and the real image server.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import pytest

from imgpipe_dagster.environment import PROMPT_ENV
from imgpipe_dagster.gpu_server.launcher import GpuServerLauncher
from imgpipe_dagster.paths import gpu_server_records_dir
from imgpipe_dagster.processes import stop_process_group
from imgpipe_dagster.store import database as db
from imgpipe_dagster_tests.assets.versions_support import PROMPT_CHANGE
from imgpipe_dagster_tests.conftest import REPO_ROOT, SESSION_MARK, _create_from_template

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = REPO_ROOT / ".ci" / "artifacts" / "ui"
SHARDS = ("s000001", "s000002")
SHARD_SIZES = {"s000001": 3, "s000002": 33}
SENSOR_TIMEOUT_S = 180  # the run-failure sensor ticks every 30 s
STARTUP_TIMEOUT_S = 240
RUN_TIMEOUT_S = 480  # run worker start + two GPU server starts + 3 URLs, on a loaded 2-core box
UI_TIMEOUT_MS = 90_000  # the asset graph lays itself out in a web worker: slow on a busy 2-core box

DEV_START_ATTEMPTS = 3  # the webserver cannot bind port 0: a port taken before it binds means another try

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def chromium() -> Path:
    """Debian's browser; its absence fails the module in CI and skips it (saying why) elsewhere."""
    if CHROMIUM.exists():
        return CHROMIUM
    missing = f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{missing}: in CI the browser test must run (.ci/run installs it)", pytrace=False)
    pytest.skip(missing)


@dataclass
class DevServer:
    base_url: str
    location: str
    repository: str
    home: Path
    database_url: str
    env: dict[str, str]
    process: subprocess.Popen

    def restart_with(self, changes: dict[str, str]) -> None:
        """Stop `imgpipe dev` and start it again with ``changes`` in its environment, as an operator
        does after changing IMGPIPE_PROMPT: the code location reads it when it loads, and a reload from
        the UI would reuse the old environment. The earlier log is kept next to the new one."""
        _stop(self.process)
        log = self.home / "imgpipe-dev.log"
        log.rename(self.home / f"imgpipe-dev-before-restart-{uuid.uuid4().hex[:6]}.log")
        self.env = self.env | changes
        self.process, self.base_url, self.location, self.repository = _start_dev(self.env, self.home)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        response = httpx.post(f"{self.base_url}/graphql", json={"query": query, "variables": variables or {}},
                              timeout=60)  # fmt: skip
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body["errors"]
        return body["data"]


WORKSPACE = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message }
    ... on RepositoryLocation { repositories { name } } } } } } }"""


def _listener_is_ours(port: int, process: subprocess.Popen) -> bool:
    """Whether the socket listening on ``port`` belongs to ``process`` or one of its descendants."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status != psutil.CONN_LISTEN or connection.laddr.port != port or not connection.pid:
            continue
        try:
            listener = psutil.Process(connection.pid)
            return listener.pid == process.pid or process.pid in {p.pid for p in listener.parents()}
        except psutil.NoSuchProcess:
            return False
    return False


def _port_taken(log_path: Path) -> bool:
    log = log_path.read_text(errors="replace").lower()
    return "address already in use" in log or "is in use" in log


def _wait_for_location(base_url: str, port: int, process: subprocess.Popen, log_path: Path) -> tuple[str, str] | None:
    """(location name, repository name) once the code location has loaded; fails on a load error.

    None when the port went to someone else before our webserver bound it (ours exited saying so, or
    another process answers there): the caller starts again on another port."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if _port_taken(log_path):
                return None
            pytest.fail(f"imgpipe dev exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            body = httpx.post(f"{base_url}/graphql", json={"query": WORKSPACE}, timeout=10).json()
        except (httpx.HTTPError, ValueError):
            time.sleep(1)
            continue
        for entry in (body.get("data") or {}).get("workspaceOrError", {}).get("locationEntries", []):
            loaded = entry["locationOrLoadError"]
            if entry["loadStatus"] != "LOADED" or not loaded:
                continue
            if not _listener_is_ours(port, process):
                return None  # a loaded location, but another process' server
            if loaded["__typename"] == "PythonError":
                pytest.fail(f"code location {entry['name']} failed to load: {loaded['message']}")
            return entry["name"], loaded["repositories"][0]["name"]
        time.sleep(1)
    pytest.fail(f"imgpipe dev did not load its code location in {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")


def _port_free_now() -> int:
    """A port nothing holds at this moment. Only for `dagster dev`, which cannot bind port 0 (it takes
    0 for "the default"); _wait_for_location notices when the port is taken before it binds."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_dev(env: dict[str, str], home: Path) -> tuple[subprocess.Popen, str, str, str]:
    """`imgpipe dev --port <port>`: (process, base URL, location, repository), trying again on another
    port when the chosen one was taken before the webserver bound it."""
    for attempt in range(1, DEV_START_ATTEMPTS + 1):
        port = _port_free_now()
        log_path = home / "imgpipe-dev.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-c", "import sys; from imgpipe_dagster.cli import main; sys.exit(main())",
                 "dev", "--port", str(port)],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT,
            )  # fmt: skip
        base_url = f"http://127.0.0.1:{port}"
        try:
            loaded = _wait_for_location(base_url, port, process, log_path)
        except BaseException:
            _stop(process)
            raise
        if loaded is not None:
            return process, base_url, *loaded
        _stop(process)
        log_path.rename(home / f"imgpipe-dev-port-taken-{attempt}.log")
    pytest.fail(f"imgpipe dev: the chosen port was taken before the webserver bound it, {DEV_START_ATTEMPTS} times")


def _stop(process: subprocess.Popen) -> None:
    """`imgpipe dev` and everything under it (webserver, daemon, code server, run workers)."""
    stop_process_group(process, grace_s=60)


@pytest.fixture(scope="module")
def image_server_module():
    from imgpipe_dagster_tests.web.image_server import ImageServer

    with ImageServer() as server:
        yield server


def _cli_ingest(env: dict[str, str], path: Path) -> str:
    """`imgpipe ingest` as a user types it; its output."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from imgpipe_dagster.cli import main; sys.exit(main())",
         "ingest", str(path), "--shard-size", "33"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def dev(pg_server_url, _templates, tiny_model_dir, image_server_module) -> Iterator[DevServer]:
    """`imgpipe dev` on a fresh project database, its corpus ingested with `imgpipe ingest`."""
    database_url = _create_from_template(pg_server_url, f"imgpipe_test_{_templates['run']}_ui", _templates["project"])
    _templates["created"] += [db.database_name(database_url), db.database_name(db.dagster_database_url(database_url))]
    server = image_server_module
    # under the repo: the embedded tooling dislikes pytest's 0700 temp parents
    home = REPO_ROOT / ".imgpipe" / f"ui-{uuid.uuid4().hex[:8]}"
    home.mkdir(parents=True)
    photos = [("astronaut", "png", 640), ("chelsea", "jpg", 300), ("coffee", "jpg", 500)]
    files = {
        "s000001": [server.image_url(n, e, width=w, n=i) for i, (n, e, w) in enumerate(photos)],
        "s000002": [server.image_url("rocket", "jpg", width=96 + 8 * i, n=i) for i in range(33)],
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "IMGPIPE_"))} | {
        "IMGPIPE_HOME": str(home),
        db.DATABASE_URL_ENV: database_url,
        "IMGPIPE_MODEL_PATH": str(tiny_model_dir),
        "IMGPIPE_GPU_DEVICES": "cpu,cpu",
        "IMGPIPE_GPU_BASE_PORT": "0",  # each server binds a free port and records it
        "IMGPIPE_ALLOWED_NETWORKS": "127.0.0.0/8",
        "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1",
        SESSION_MARK: os.environ.get(SESSION_MARK, ""),  # so the session's end finds what it leaves behind
    }
    served = None
    try:
        for shard, urls in files.items():
            path = home / f"{shard}.csv"
            path.write_text("url\n" + "\n".join(urls) + "\n")
            assert "1 url_shards partitions added" in _cli_ingest(env, path)
        process, base_url, location, repository = _start_dev(env, home)
        served = DevServer(base_url, location, repository, home, database_url, env, process)
        yield served
    finally:
        if served is not None:
            _stop(served.process)  # the latest one: a test may have restarted it
        GpuServerLauncher(gpu_server_records_dir(home)).stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory, chromium):
    """A fresh Chromium profile per module (--user-data-dir), Debian's binary only."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # Playwright passes it as --user-data-dir
            executable_path=str(chromium), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 1000}, timezone_id="UTC",
        )  # fmt: skip
        context.set_default_timeout(UI_TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context):
    page = browser_context.new_page()
    yield page
    page.close()


def shot(page, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def add_partitions(dev: DevServer, keys) -> None:
    for key in keys:
        data = dev.graphql(
            """mutation($repo: RepositorySelector!, $key: String!) {
                 addDynamicPartition(repositorySelector: $repo, partitionsDefName: "url_shards", partitionKey: $key)
                 { __typename ... on PythonError { message } } }""",
            {"repo": {"repositoryName": dev.repository, "repositoryLocationName": dev.location}, "key": key},
        )
        added = data["addDynamicPartition"]["__typename"]
        assert added in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError"), data


# ----------------------------------------------------------------- tests


def test_dev_serves_the_ui_and_graphql_lists_the_repository(dev):
    page_html = httpx.get(dev.base_url + "/", timeout=30)
    assert page_html.status_code == 200 and re.search(r"<title[^>]*>Dagster</title>", page_html.text)

    data = dev.graphql("""{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name }
                            jobs { name } assetNodes { assetKey { path } } } } } }""")  # fmt: skip

    (repository,) = data["repositoriesOrError"]["nodes"]
    assert repository["location"]["name"] == dev.location
    assert {"analyze_conservative", "analyze_medium", "analyze_aggressive"} <= {j["name"] for j in repository["jobs"]}
    assert {"url_corpus", "image_analysis", "progress_report"} <= {
        a["assetKey"]["path"][-1] for a in repository["assetNodes"]
    }


def test_asset_graph_shows_the_pipeline_with_its_checks(dev, page):
    page.goto(f"{dev.base_url}/assets/image_analysis?view=lineage&lineageScope=neighbors&lineageDepth=1")
    for name in ("url_corpus", "image_analysis", "progress_report"):
        page.get_by_text(name, exact=True).last.wait_for(state="visible")
    page.get_by_text("0 / 3 Passed").first.wait_for(state="visible")  # image_analysis' three checks
    page.wait_for_timeout(1500)  # edges are drawn after the nodes
    shot(page, "01_asset_graph")
    # the edges run url_corpus -> image_analysis -> progress_report, left to right
    xs = [page.get_by_text(n, exact=True).last.bounding_box()["x"]
          for n in ("url_corpus", "image_analysis", "progress_report")]  # fmt: skip
    assert xs == sorted(xs), xs

    page.goto(f"{dev.base_url}/assets/image_analysis?view=checks")
    for check in ("every_url_final", "analyses_parse", "failure_ratio"):
        page.get_by_text(check, exact=True).first.wait_for(state="visible")
    shot(page, "02_image_analysis_checks")


def test_partitions_view_lists_the_shards_with_their_status(dev, page):
    add_partitions(dev, SHARDS)

    page.goto(f"{dev.base_url}/assets/image_analysis?view=partitions")
    for shard in SHARDS:
        page.get_by_text(shard, exact=True).first.wait_for(state="visible")
    page.get_by_text(f"Missing ({len(SHARDS)})").wait_for(state="visible")
    shot(page, "03_url_shards_partitions")


RUN_STATUS = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status jobName tags { key value }
  assetMaterializations { partition } } } }"""  # fmt: skip
# the conservative profile, with small batches so three URLs do not wait for a full request
CHOSEN_CONFIG = """ops:
  image_analysis:
    config:
      profile: conservative
      worker:
        images_per_request: 2
        chunk_size: 2
        lease_seconds: 5
        retry_delay: 0.05
"""


def test_a_shard_launched_from_the_launchpad_runs_to_success(dev, page):
    add_partitions(dev, SHARDS)  # idempotent: this test also runs alone
    page.goto(f"{dev.base_url}/locations/{dev.repository}@{dev.location}/jobs/analyze_conservative/playground")
    # the partition: type into the launchpad's partition picker and take the suggestion
    picker = page.get_by_placeholder("Partition")
    picker.click()
    picker.fill("s000001")
    page.get_by_text("s000001", exact=True).last.click()
    # the profile: replace the scaffolded config in the editor with the chosen one
    editor = page.locator(".CodeMirror").first
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(CHOSEN_CONFIG)  # no key events: the editor does not re-indent the YAML
    page.get_by_text("No errors").wait_for(state="visible")
    shot(page, "04_launchpad_conservative_s000001")
    page.get_by_role("button", name="Launch Run").click()

    page.wait_for_url("**/runs/**")
    run_id = page.url.rstrip("/").split("/runs/")[1].split("?")[0].split("/")[0]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        run = dev.graphql(RUN_STATUS, {"id": run_id})["runOrError"]
        status = run["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(2)
    assert status == "SUCCESS", (status, (dev.home / "imgpipe-dev.log").read_text()[-3000:])
    page.reload()
    page.get_by_text("Success", exact=True).first.wait_for(state="visible")  # the run's status tag
    shot(page, "05_run_success")
    assert run["jobName"] == "analyze_conservative"
    assert {t["key"]: t["value"] for t in run["tags"]}["dagster/partition"] == "s000001"
    assert [m["partition"] for m in run["assetMaterializations"]] == ["s000001"]
    with db.connect(dev.database_url) as conn:
        states = dict(conn.execute(
            "SELECT state::text, count(*) FROM corpus_urls WHERE shard_id = 's000001' GROUP BY 1").fetchall())  # fmt: skip
        gpus = {g for (g,) in conn.execute("SELECT DISTINCT gpu FROM url_analysis_results WHERE status = 'ok'")}
    assert states == {"done": 3}
    assert gpus and gpus <= {"gpu0", "gpu1"}  # analysed on the tiny-model servers

    page.goto(f"{dev.base_url}/assets/image_analysis?view=partitions")
    page.get_by_text("Materialized (1)").wait_for(state="visible")
    page.get_by_text("s000001", exact=True).first.click()
    page.get_by_text("conservative").first.wait_for(state="visible")  # the profile metadata of the shard
    shot(page, "06_partition_materialized")


def test_url_corpus_is_materialized_after_a_cli_ingest(dev, page):
    data = dev.graphql("""{ assetNodeOrError(assetKey: {path: ["url_corpus"]}) { ... on AssetNode {
        assetMaterializations(limit: 5) { tags { key value } metadataEntries { label
          ... on IntMetadataEntry { intValue } } } } } }""")  # fmt: skip
    materializations = data["assetNodeOrError"]["assetMaterializations"]
    assert len(materializations) == 2  # one per `imgpipe ingest`, newest first
    latest = {e["label"]: e.get("intValue") for e in materializations[0]["metadataEntries"]}
    assert latest["urls_added"] == 33 and latest["shards_added"] == 1
    assert {t["key"]: t["value"] for t in materializations[0]["tags"]}["imgpipe/source"] == "cli"

    page.goto(f"{dev.base_url}/assets/url_corpus")
    page.get_by_text("Latest materialization").first.wait_for(state="visible")
    page.get_by_text("urls_added", exact=True).first.wait_for(state="visible")
    page.get_by_text("Never materialized").wait_for(state="detached")
    shot(page, "07_url_corpus_after_cli_ingest")
    page.goto(f"{dev.base_url}/assets/url_corpus?view=checks")
    page.get_by_text("partitions_match_shards", exact=True).first.wait_for(state="visible")
    page.get_by_text("Passed").first.wait_for(state="visible")
    shot(page, "08_url_corpus_check_after_cli_ingest")


BACKFILL_CONFIG = """ops:
  image_analysis:
    config:
      profile: aggressive
      worker:
        images_per_request: 4
        chunk_size: 4
        lease_seconds: 5
        retry_delay: 0.05
"""
BACKFILLS = """{ partitionBackfillsOrError(limit: 5) { ... on PartitionBackfills { results { id status
  runs { runId status tags { key value } } } } } }"""
ANALYSIS_RUNS = """{ runsOrError(filter: {}) { ... on Runs { results { runId status jobName
  tags { key value } assetSelection { path } } } } }"""


def _backfill_ids(dev: DevServer) -> set[str]:
    return {b["id"] for b in dev.graphql(BACKFILLS)["partitionBackfillsOrError"]["results"]}


def _wait_for_backfill(dev: DevServer, earlier: set[str] = frozenset()) -> dict:
    """The newest backfill, not one of ``earlier``, once it and its runs have finished."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    backfill = None
    while time.monotonic() < deadline:
        results = [b for b in dev.graphql(BACKFILLS)["partitionBackfillsOrError"]["results"] if b["id"] not in earlier]
        backfill = results[0] if results else None
        runs = (backfill or {}).get("runs") or []
        if backfill and backfill["status"] in ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED") \
                and runs and all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs):  # fmt: skip
            return backfill
        time.sleep(2)
    pytest.fail(f"the backfill did not finish in {RUN_TIMEOUT_S}s: {backfill}\n"
                f"{(dev.home / 'imgpipe-dev.log').read_text()[-3000:]}")  # fmt: skip


def _metadata_value(page, label: str) -> str:
    """The value cell of a metadata row on the partition page."""
    row = page.locator("tr", has=page.get_by_text(label, exact=True)).first
    row.wait_for(state="visible")
    return row.locator("td").nth(1).inner_text().strip()


def _open_backfill_dialog_for_all_shards_with_config(page, dev: DevServer, config: str) -> None:
    """image_analysis → Materialize… → All partitions, ``config`` typed into the dialog's editor."""
    page.goto(f"{dev.base_url}/assets/image_analysis?view=partitions")
    page.get_by_text("s000002", exact=True).first.wait_for(state="visible")
    page.get_by_role("button", name="Materialize…").click()
    page.get_by_role("button", name="All", exact=True).click()
    page.get_by_text("Config", exact=True).click()
    page.get_by_role("button", name="Add config").click()
    page.locator(".CodeMirror").first.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(config)
    page.get_by_text("No errors").wait_for(state="visible")
    page.get_by_role("button", name="Save config").click()
    page.get_by_text("profile: aggressive").first.wait_for(state="visible")


def test_a_multi_shard_backfill_with_a_profile_picked_in_the_dialog(dev, page):
    _open_backfill_dialog_for_all_shards_with_config(page, dev, BACKFILL_CONFIG)
    shot(page, "09_backfill_dialog_aggressive_two_shards")
    page.get_by_role("button", name="Launch backfill").click()

    backfill = _wait_for_backfill(dev)
    assert [r["status"] for r in backfill["runs"]] == ["SUCCESS"], backfill  # both shards in one run
    (run,) = backfill["runs"]
    assert {t["key"]: t["value"] for t in run["tags"]}.get("imgpipe/profile") == "aggressive"
    page.goto(f"{dev.base_url}/runs/b/{backfill['id']}")
    page.get_by_text("s000002").first.wait_for(state="visible")
    shot(page, "10_backfill_page")


def test_every_analysis_run_carries_its_profile(dev):
    runs = [r for r in dev.graphql(ANALYSIS_RUNS)["runsOrError"]["results"]
            if r["jobName"].startswith("analyze_") or ["image_analysis"] in [a["path"] for a in r["assetSelection"] or []]]  # fmt: skip
    assert len(runs) >= 2  # the launchpad run and the backfill's (asset job) run
    profiles = {r["runId"]: {t["key"]: t["value"] for t in r["tags"]}.get("imgpipe/profile") for r in runs}
    assert None not in profiles.values(), profiles
    assert {"conservative", "aggressive"} <= set(profiles.values())


@pytest.mark.parametrize("shard", SHARDS)
def test_each_partition_shows_its_own_counts_and_results(dev, page, shard):
    page.goto(f"{dev.base_url}/assets/image_analysis?view=partitions&partition={shard}")
    page.get_by_text(shard, exact=True).first.wait_for(state="visible")
    assert _metadata_value(page, "urls_total") == str(SHARD_SIZES[shard])
    assert _metadata_value(page, "urls_done") == str(SHARD_SIZES[shard])
    assert _metadata_value(page, "profile") == "aggressive"
    shot(page, f"11_partition_{shard}_counts")
    sample = page.locator("tr", has=page.get_by_text("results_sample", exact=True)).first
    sample.scroll_into_view_if_needed()
    rows = sample.locator("table tr")
    assert rows.count() == 1 + min(8, SHARD_SIZES[shard])  # header + up to 8 analysed results
    assert "/img/" in rows.nth(1).inner_text()
    shot(page, f"12_partition_{shard}_results_sample")


def test_each_partition_has_its_own_check_results(dev, page):
    page.goto(f"{dev.base_url}/assets/image_analysis?view=checks&checkDetail=every_url_final")
    page.get_by_text("blocking").first.wait_for(state="visible")
    page.get_by_role("tab", name="Partitions").last.click()
    page.get_by_text("Passed (2)").wait_for(state="visible")  # one result per shard, both passed
    shot(page, "13_every_url_final_per_partition")


BAD_CONFIG = """ops:
  image_analysis:
    config:
      profile: medium
      worker:
        chunk_size: 0
"""
SENSOR_TICKS = """query($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) { ... on Sensor {
  sensorState { ticks(limit: 20) { status skipReason timestamp } } } } }"""


def test_a_bad_config_run_is_not_retried_and_the_sensor_says_why(dev, page):
    page.goto(f"{dev.base_url}/locations/{dev.repository}@{dev.location}/jobs/analyze_medium/playground")
    picker = page.get_by_placeholder("Partition")
    picker.click()
    picker.fill("s000001")
    page.get_by_text("s000001", exact=True).last.click()
    page.locator(".CodeMirror").first.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(BAD_CONFIG)
    page.get_by_text("No errors").wait_for(state="visible")  # a type-correct value the profile refuses
    page.get_by_role("button", name="Launch Run").click()
    page.wait_for_url("**/runs/**")
    run_id = page.url.rstrip("/").split("/runs/")[1].split("?")[0].split("/")[0]

    selector = {"repositoryName": dev.repository, "repositoryLocationName": dev.location,
                "sensorName": "shard_run_failures"}  # fmt: skip
    deadline = time.monotonic() + SENSOR_TIMEOUT_S
    tick = None
    while time.monotonic() < deadline and tick is None:
        ticks = dev.graphql(SENSOR_TICKS, {"selector": selector})["sensorOrError"]["sensorState"]["ticks"]
        tick = next((t for t in ticks if run_id in (t["skipReason"] or "")), None)
        time.sleep(3)
    assert tick is not None, f"no tick of shard_run_failures mentions run {run_id}"
    reason = tick["skipReason"]
    assert "not_retried" in reason and "config error" in reason and "chunk_size" in reason, reason
    runs = dev.graphql(ANALYSIS_RUNS)["runsOrError"]["results"]
    assert not [r for r in runs if {t["key"]: t["value"] for t in r["tags"]}.get("imgpipe/retry_of") == run_id]
    assert [r["status"] for r in runs if r["runId"] == run_id] == ["FAILURE"]

    # the tick's log in the UI: its row is labelled with the tick's time (the browser runs in UTC)
    page.goto(f"{dev.base_url}/locations/{dev.repository}@{dev.location}/sensors/shard_run_failures")
    label = datetime.fromtimestamp(tick["timestamp"], UTC).strftime("%-I:%M:%S %p")
    page.locator("tr", has_text=label).first.get_by_role("button", name="View logs").click()
    page.get_by_text("not_retried").first.wait_for(state="visible")
    shot(page, "14_bad_config_not_retried_sensor_tick")


def test_dev_printed_no_python_warnings_or_notices(dev):
    """Python warnings (ours or Dagster's about how we use it), alembic's storage check and Dagster's
    notice about a dagster.yaml in the working folder: none of them in what `imgpipe dev` prints."""
    log = (dev.home / "imgpipe-dev.log").read_text(errors="replace")
    noise = [line for line in log.splitlines()
             if re.search(r"\b\w+Warning: |alembic|Found a dagster instance configuration", line)]  # fmt: skip
    assert not noise, noise[:5]


STALENESS = """query($partition: String!) { assetNodeOrError(assetKey: {path: ["image_analysis"]}) {
  ... on AssetNode { staleStatus(partition: $partition) staleCauses(partition: $partition) { reason category } } } }"""


def _staleness(dev: DevServer) -> dict[str, tuple[str, set[str]]]:
    """{shard: (Dagster's stale status, the categories of its causes)}, as the partition page asks."""
    found = {}
    for shard in SHARDS:
        node = dev.graphql(STALENESS, {"partition": shard})["assetNodeOrError"]
        found[shard] = (node["staleStatus"], {cause["category"] for cause in node["staleCauses"]})
    return found


def _analyses(dev: DevServer) -> dict[str, dict[bytes, tuple]]:
    """{analysis version: {url_hash: the row's analysis and when it was written}} of both shards."""
    rows: dict[str, dict[bytes, tuple]] = {}
    with db.connect(dev.database_url) as conn:
        for version, url_hash, status, model_text, prompt_version, created_at in conn.execute(
            "SELECT analysis_version, url_hash, status, model_text, prompt_version, created_at"
            " FROM url_analysis_results"
        ):
            rows.setdefault(version, {})[url_hash] = (status, model_text, prompt_version, created_at)
    return rows


def _cli_verify(dev: DevServer, version: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from imgpipe_dagster.cli import main; sys.exit(main())",
         "verify", "--require-complete", "--analysis-version", version],
        env=dev.env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip


def test_a_prompt_change_shows_the_shards_out_of_date_and_a_backfill_reanalyses_them(dev, page):
    """Last in the module: it restarts `imgpipe dev` with another prompt (PROMPT_CHANGE)."""
    before = _analyses(dev)
    (old_version,) = before  # the launchpad run and the backfill analysed under the default prompt
    assert sum(len(rows) for rows in before.values()) == sum(SHARD_SIZES.values())
    assert _staleness(dev) == {shard: ("FRESH", set()) for shard in SHARDS}

    dev.restart_with(PROMPT_CHANGE)
    assert _staleness(dev) == {shard: ("STALE", {"CODE"}) for shard in SHARDS}
    # the partition page: Dagster's "Unsynced" tag, and on hover the cause, a code version change
    page.goto(f"{dev.base_url}/assets/image_analysis?view=partitions&partition=s000002")
    page.get_by_text("s000002", exact=True).first.wait_for(state="visible")
    unsynced = page.get_by_text("Unsynced (1)", exact=True)
    unsynced.wait_for(state="visible")
    unsynced.hover()
    page.get_by_text("1 change since last materialization").wait_for(state="visible")
    page.get_by_text("1 code version change", exact=True).wait_for(state="visible")
    shot(page, "15_stale_partitions_after_prompt_change")

    earlier = _backfill_ids(dev)
    _open_backfill_dialog_for_all_shards_with_config(page, dev, BACKFILL_CONFIG)
    page.get_by_role("button", name="Launch backfill").click()
    backfill = _wait_for_backfill(dev, earlier)
    assert [r["status"] for r in backfill["runs"]] == ["SUCCESS"], backfill
    assert _staleness(dev) == {shard: ("FRESH", set()) for shard in SHARDS}

    after = _analyses(dev)
    new_version = next(iter(set(after) - {old_version}), None)
    assert set(after) == {old_version, new_version} and new_version.startswith(f"{PROMPT_CHANGE[PROMPT_ENV]}:")
    assert after[old_version] == before[old_version]  # the old analyses kept as they were
    assert after[new_version].keys() == before[old_version].keys()  # every URL analysed again
    assert {prompt.split("@")[0] for _, _, prompt, _ in after[new_version].values()} == {PROMPT_CHANGE[PROMPT_ENV]}
    for version in (old_version, new_version):
        verified = _cli_verify(dev, version)
        assert verified.returncode == 0, verified.stdout + verified.stderr

    page.goto(f"{dev.base_url}/assets/image_analysis?view=partitions&partition=s000002")
    assert _metadata_value(page, "analysis_version") == new_version
    page.get_by_text("Unsynced (1)", exact=True).wait_for(state="detached")
    page.locator("tr", has=page.get_by_text("analysis_version", exact=True)).first.scroll_into_view_if_needed()
    shot(page, "16_partition_reanalysed_under_the_new_prompt")
