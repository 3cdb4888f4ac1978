"""The pipeline against a realistic web on loopback, beside a fast web, for each profile, in one run.

    python bench/web.py [--urls 2000] [--hosts 32] [--profiles conservative,medium,aggressive]
                        [--webs fast,realistic,latency] [--latency-urls 6000] [--latency-hosts 128] [--seed 7]

Each (profile, web) gets a scratch database on the embedded PostgreSQL (or IMGPIPE_DATABASE_URL): a
URL file is ingested (the real ingest), the shard is materialized by a real Dagster run of
image_analysis with the profile's run config (profiles/<name>.yaml unchanged), and the GPU tier is a
stand-in that answers at once (bench/web_hosts.py), so only the host side is measured.

The webs (seeded; bench/web_hosts.py documents the host kinds). Hosts are 127.0.W.1…N, one address each:

    fast       every host answers at once; every URL an image
    realistic  of 32 hosts: 24 ok (lognormal latency, median 0.25 s, sigma 0.6), 2 slow (2 s), 2 dead
               (connection refused), 1 hanging, 1 trickling (160 B/s), 1 resetting, 1 rate-limited
               (429 with Retry-After 2 s for 30% of requests); 6% of the URLs on answering hosts are 404s;
               30% of one host's URLs are under /private/, which its robots.txt disallows.
               With more hosts the same shares apply.
    latency    every image after 1 s, nothing fails (latency hiding alone): --latency-urls over
               --latency-hosts, so that 700+ downloads may be in flight within the per-host cap of 8

One JSON line per figure: images/s and URLs finalised/s per web (over the whole run, and up to the
moment 90% of what the run finalised was final: the bulk without the tail), realistic/fast ratios, downloads in
flight (mean / peak), slot seconds by outcome kind, the tail after the first pass (seconds from the
last fresh URL's outcome to the end of the run, and images sent to the GPU tier in it), CPU used
(process CPU seconds / wall: 2.0 = both cores of this machine) and peak RSS of the process running
the pipeline. URLs a run leaves waiting for a retry are counted as not finalised.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# share of the hosts of each kind on the realistic web (the rest answer normally)
REALISTIC_KINDS = {"slow": 2 / 32, "dead": 2 / 32, "hang": 1 / 32, "trickle": 1 / 32, "reset": 1 / 32, "limited": 1 / 32}
MEDIAN_S, SIGMA = 0.25, 0.6
MISSING_SHARE = 0.06
PRIVATE_SHARE = 0.30
LATENCY_S = 1.0
WEB_OCTET = {"fast": 1, "realistic": 2, "latency": 3}


def emit(**figure) -> None:
    print(json.dumps(figure), flush=True)


def host_spec(address: str, kind: str, web: str) -> dict:
    median = MEDIAN_S if web == "realistic" else 0.0
    return {"address": address, "kind": kind, "median_s": median, "mu": math.log(median) if median else 0.0,
            "sigma": SIGMA, "slow_s": LATENCY_S if web == "latency" else 2.0, "trickle_bytes_per_s": 160,
            "limited_share": 0.3, "retry_after_s": 2}  # fmt: skip


def plan_web(web: str, hosts: int, urls: int) -> tuple[list[dict], list[str]]:
    """Host specs and the URL list (with {port:ADDRESS} placeholders filled in later)."""
    addresses = [f"127.0.{WEB_OCTET[web]}.{i + 1}" for i in range(hosts)]
    kinds = ["ok"] * hosts
    if web == "latency":
        kinds = ["slow"] * hosts
    elif web == "realistic":
        position = 0
        for kind, share in REALISTIC_KINDS.items():
            for _ in range(max(1, round(share * hosts))):
                kinds[position] = kind
                position += 1
        # spread the faulty hosts over the address range (a deterministic shuffle)
        kinds = kinds[::3] + kinds[1::3] + kinds[2::3]
    specs = [host_spec(a, k, web) for a, k in zip(addresses, kinds, strict=True)]
    private_host = next((i for i, k in enumerate(kinds) if k == "ok"), 0)
    url_list = []
    for n in range(urls):
        h = n % hosts
        path = f"/img/{n}.jpg"
        if web == "realistic":
            if h == private_host and (n // hosts) % 10 < PRIVATE_SHARE * 10:
                path = f"/private/{n}.jpg"
            elif kinds[h] not in ("dead",) and (n * 7919) % 100 < MISSING_SHARE * 100:
                path = f"/missing/{n}.jpg"
        url_list.append((addresses[h], path))
    return specs, url_list


class ResourceSampler:
    """Peak RSS of this process over an interval, sampled in a thread."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.2)

    def __enter__(self) -> ResourceSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_one(server_url: str, profile: str, web: str, urls: list[str], state: Path) -> dict:
    from dagster import DagsterInstance, materialize

    from imgpipe_dagster.assets.analysis import image_analysis
    from imgpipe_dagster.corpus.ingest import ingest_files
    from imgpipe_dagster.partitions import URL_SHARDS
    from imgpipe_dagster.profiles import profile_run_config
    from imgpipe_dagster.resources import FetcherResource, GpuModelResource, PostgresResource
    from imgpipe_dagster.store import database as db
    from imgpipe_dagster.store.migrations import migrate
    from imgpipe_dagster.store.verify import verify

    database = db.with_database(server_url, f"imgpipe_bench_web_{uuid.uuid4().hex[:6]}")
    db.ensure_database(database)
    try:
        url_file = state / f"{profile}-{web}.txt"
        url_file.write_text("\n".join(urls) + "\n")
        with db.connect(database) as conn:
            migrate(conn)
            report = ingest_files(conn, [url_file], shard_size=len(urls))
            shards = report.shards_added
        instance = DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(URL_SHARDS, shards)
        resources = {
            "postgres": PostgresResource(database_url=database),
            "gpu_model": GpuModelResource(mode="external", endpoints=[GPU_URL], model_path="gpu-stand-in"),
            "fetcher": FetcherResource(allowed_networks=["127.0.0.0/8"]),
        }
        process = psutil.Process()
        cpu_before = sum(process.cpu_times()[:2])
        with ResourceSampler() as sampler:
            started_epoch = time.time()
            started = time.perf_counter()
            result = materialize([image_analysis], instance=instance, resources=resources,
                                 run_config=profile_run_config(profile), partition_key=shards[0],
                                 raise_on_error=False)  # fmt: skip
            wall = time.perf_counter() - started
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        with db.connect(database) as conn:
            report = verify(conn, shards)
            counts = dict(conn.execute("SELECT state::text, count(*) FROM corpus_urls GROUP BY 1").fetchall())
            # seconds from the run's start until 90% of the URLs it finalised were final: the bulk of
            # the work, without the tail a few slow or rate-limited hosts make on a corpus this small
            bulk_s = conn.execute(
                "SELECT extract(epoch FROM percentile_disc(0.9) WITHIN GROUP (ORDER BY updated_at)) - %s"
                " FROM corpus_urls WHERE state IN ('done', 'failed_permanent')", (started_epoch,)).fetchone()[0]  # fmt: skip
        metadata = {}
        for event in result.get_asset_materialization_events():
            metadata = {k: v.value for k, v in event.materialization.metadata.items()}
        return {"wall": wall, "cpu": cpu, "rss_peak": sampler.peak, "counts": counts, "success": result.success,
                "bulk_s": float(bulk_s or wall),
                "consistent": report.ok, "metadata": metadata}  # fmt: skip
    finally:
        db.drop_database(database)


GPU_URL = ""


def main() -> None:
    global GPU_URL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=2000)
    parser.add_argument("--hosts", type=int, default=32)
    parser.add_argument("--profiles", default="conservative,medium,aggressive")
    parser.add_argument("--webs", default="fast,realistic,latency")
    parser.add_argument("--latency-urls", type=int, default=6000)
    parser.add_argument("--latency-hosts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="imgpipe-bench-web-"))
    os.environ["IMGPIPE_HOME"] = str(state / "home")  # the machine-wide download budget lives there
    webs = args.webs.split(",")
    sizes = {web: (args.latency_hosts, args.latency_urls) if web == "latency" else (args.hosts, args.urls)
             for web in webs}  # fmt: skip
    plans = {web: plan_web(web, *sizes[web]) for web in webs}
    plan_file = state / "plan.json"
    plan_file.write_text(json.dumps({"seed": args.seed, "hosts": [s for web in webs for s in plans[web][0]]}))
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("web_hosts.py")), str(plan_file)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        ports = json.loads(server.stdout.readline())
        GPU_URL = ports["gpu"]
        from imgpipe_dagster.store import database as db

        server_url = os.environ.get("IMGPIPE_DATABASE_URL") or db.resolve_database_url()
        # other work on the machine lowers the fast web's rate most (it is CPU-bound): say how busy it was
        emit(figure="machine_load_before", load_1min=round(os.getloadavg()[0], 2), cpus=os.cpu_count())
        table = []
        for profile in args.profiles.split(","):
            rates, bulk_rates = {}, {}
            for web in webs:
                urls = [f"http://{a}:{ports['hosts'][a]}{p}" for a, p in plans[web][1]]
                run = run_one(server_url, profile, web, urls, state)
                counts, wall, meta = run["counts"], run["wall"], run["metadata"]
                downloads = meta.get("downloads") or {}
                final = counts.get("done", 0) + counts.get("failed_permanent", 0)
                rates[web] = final / wall
                hosts, n_urls = sizes[web]
                common = {"profile": profile, "web": web, "urls": n_urls, "hosts": hosts}
                emit(figure="images_per_s", value=round(counts.get("done", 0) / wall, 2), **common)
                emit(figure="urls_finalised_per_s", value=round(rates[web], 2), wall_s=round(wall, 1),
                     final=final, unfinished=n_urls - final, run_success=run["success"],
                     consistent=run["consistent"], **common)  # fmt: skip
                bulk_rates[web] = 0.9 * final / run["bulk_s"]
                emit(figure="urls_finalised_per_s_first_90pct", value=round(bulk_rates[web], 2),
                     seconds=round(run["bulk_s"], 1), **common)  # fmt: skip
                emit(figure="downloads_in_flight", mean=downloads.get("in_flight_mean"),
                     peak=downloads.get("in_flight_peak"), limit_peak=downloads.get("in_flight_limit_peak"),
                     slot_seconds_per_url=downloads.get("slot_seconds_per_url"), **common)  # fmt: skip
                emit(figure="slot_seconds_by_outcome", value=downloads.get("slot_seconds"), **common)
                emit(figure="tail_after_first_pass", seconds=downloads.get("tail_after_first_pass_s"),
                     images_to_gpu=downloads.get("images_to_gpu_in_tail"),
                     waiting_for_retry=meta.get("run_urls_waiting_for_retry"),
                     tail_handed_back=downloads.get("tail_handed_back"), **common)  # fmt: skip
                emit(figure="cpu_used", value=round(run["cpu"] / wall, 2), unit="cores of 2", **common)
                emit(figure="rss_peak_mb", value=round(run["rss_peak"] / 2**20), **common)
                table.append(f"{profile:13} {web:9} {rates[web]:8.1f} {final:6d}/{n_urls:<6d} {wall:6.1f} "
                             f"{bulk_rates[web]:9.1f} {downloads.get('in_flight_peak') or 0:5d} "
                             f"{run['rss_peak'] / 2**20:7.0f}")
            for web in webs:
                if web != "fast" and "fast" in rates:
                    emit(figure=f"finalised_ratio_{web}_to_fast", value=round(rates[web] / rates["fast"], 3),
                         profile=profile)  # fmt: skip
                    emit(figure=f"first_90pct_ratio_{web}_to_fast", value=round(bulk_rates[web] / bulk_rates["fast"], 3),
                         profile=profile)  # fmt: skip
                    table.append(f"{profile:13} {web + '/fast':19} ratio {rates[web] / rates['fast']:.2f}"
                                 f" (first 90%: {bulk_rates[web] / bulk_rates['fast']:.2f})")
        emit(figure="machine_load_after", load_1min=round(os.getloadavg()[0], 2), cpus=os.cpu_count())
        print("\nprofile       web       final/s  final/URLs   wall  first-90%/s  peak in flight  RSS MB",
              file=sys.stderr)
        print("\n".join(table), file=sys.stderr)
    finally:
        server.stdin.close()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
