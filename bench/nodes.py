"""Images/s with one Celery node and with two, on the same latency-bound web, in one run.

    python bench/nodes.py [--shards 4] [--urls-per-shard 300] [--hosts 32] [--web realistic] [--seed 7]

The web and the GPU stand-in are bench/web_hosts.py's (the realistic mix of bench/web.py by default: lognormal
latency, slow, dead, hanging and trickling hosts, 404s; the stand-in answers at once, so only the run side is
measured). For each setup (one node, then two) the bench makes fresh scratch databases on the embedded
PostgreSQL (or IMGPIPE_DATABASE_URL), ingests the same URLs into the same shards, starts a private Redis
and one `dagster-celery worker start` per node (its own queue and IMGPIPE_HOME, one run slot each, the
instance of deploy/celery/dagster.yaml), and launches one analyze_medium run per shard through the
CeleryRunLauncher, the shards dealt to the nodes' queues in turn (what the throttle's placement does with
equal nodes). Time runs from the first launch to the last run's end.

One JSON line per figure: images/s and URLs finalised/s per setup, the two-to-one ratio, the CPU the
whole setup used (workers and their runs, as cores of this machine), the runs' mean wall time and the
machine's load average at the end (other jobs on a shared machine slow both setups).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from web import plan_web  # noqa: E402

from imgpipe_dagster_tests.private_redis import PrivateRedis  # noqa: E402

BIN = Path(sys.executable).parent
PROFILE = "medium"
RUN_DEADLINE_S = 900


def emit(**figure) -> None:
    print(json.dumps(figure), flush=True)


def tree_cpu_seconds(processes: list[psutil.Process]) -> float:
    """CPU seconds of the processes and their live children (runs ending between samples are missed:
    a lower bound, sampled often)."""
    total = 0.0
    for process in processes:
        try:
            family = [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for member in family:
            try:
                times = member.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
    return total


def run_setup(
    nodes: int, server_url: str, urls: list[str], shard_size: int, gpu_url: str, state: Path
) -> dict:
    from dagster import DagsterInstance, DagsterRunStatus
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    from imgpipe_dagster.corpus import ingest_files, sync_shard_partitions
    from imgpipe_dagster.definitions import defs
    from imgpipe_dagster.processes import stop_process_group
    from imgpipe_dagster.profiles import profile_run_config
    from imgpipe_dagster.store import database as db
    from imgpipe_dagster.store.migrations import migrate
    from imgpipe_dagster.throttle.placement import QUEUE_TAG

    tag = uuid.uuid4().hex[:6]
    project = db.with_database(server_url, f"imgpipe_bench_nodes_{tag}")
    dagster = db.with_database(server_url, f"imgpipe_bench_nodes_{tag}_dagster")
    for url in (project, dagster):
        db.ensure_database(url)
    folder = state / f"{nodes}-nodes"
    dagster_home = folder / "dagster_home"
    dagster_home.mkdir(parents=True)
    config = yaml.safe_load((ROOT / "deploy" / "celery" / "dagster.yaml").read_text())
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config))
    workers: list[subprocess.Popen] = []
    try:
        url_file = folder / "urls.txt"
        url_file.write_text("\n".join(urls) + "\n")
        with db.connect(project) as conn:
            migrate(conn)
            shards = list(ingest_files(conn, [url_file], shard_size=shard_size).shards_added)
        with PrivateRedis() as redis:
            env = {
                **os.environ,
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "DAGSTER_HOME": str(dagster_home),
                "IMGPIPE_CELERY_BROKER": redis.url,
                "IMGPIPE_DATABASE_URL": project,
                "IMGPIPE_DAGSTER_DATABASE_URL": db.sqlalchemy_url(dagster),
                "IMGPIPE_DEPLOYMENT": "external",
                "IMGPIPE_GPU_ENDPOINTS": gpu_url,
                "IMGPIPE_ALLOWED_NETWORKS": "127.0.0.0/8",
            }
            os.environ.update({k: v for k, v in env.items() if k.startswith(("IMGPIPE_", "DAGSTER_"))})
            queues = [f"node-{chr(ord('a') + i)}" for i in range(nodes)]
            for queue in queues:
                home = folder / queue
                home.mkdir()
                workers.append(subprocess.Popen(
                    [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
                     "-y", str(ROOT / "deploy" / "celery" / "worker.yaml"), "-q", queue, "-n", queue,
                     "--", "--concurrency=1"],
                    cwd=ROOT, env={**env, "IMGPIPE_HOME": str(home)}, stdout=(folder / f"{queue}.log").open("wb"),
                    stderr=subprocess.STDOUT, start_new_session=True,
                ))  # fmt: skip
            watched = [psutil.Process(w.pid) for w in workers]
            with DagsterInstance.get() as instance:
                with db.connect(project) as conn:
                    sync_shard_partitions(instance, conn)
                _wait_for_workers(instance, len(queues))
                job_name = f"analyze_{PROFILE}"
                origin = (
                    ReconstructableRepository.for_module("imgpipe_dagster.definitions", "defs", str(ROOT))
                    .get_reconstructable_job(job_name)
                    .get_python_origin()
                )
                job_def = defs.resolve_job_def(job_name)
                cpu_before = tree_cpu_seconds(watched)
                started = time.monotonic()
                run_ids = []
                for index, shard in enumerate(shards):
                    run = instance.create_run_for_job(
                        job_def=job_def, run_config=profile_run_config(PROFILE), job_code_origin=origin,
                        tags={**job_def.tags, "dagster/partition": shard, QUEUE_TAG: queues[index % len(queues)]},
                    )  # fmt: skip
                    instance.launch_run(run.run_id, workspace=None)  # type: ignore[arg-type]
                    run_ids.append(run.run_id)
                cpu_peak_sample = cpu_before
                while True:
                    runs = [instance.get_run_by_id(run_id) for run_id in run_ids]
                    cpu_peak_sample = max(cpu_peak_sample, tree_cpu_seconds(watched))
                    if all(r.is_finished for r in runs):
                        break
                    if time.monotonic() - started > RUN_DEADLINE_S:
                        raise RuntimeError(f"runs not finished within {RUN_DEADLINE_S} s: "
                                           f"{[r.status.value for r in runs]}")  # fmt: skip
                    time.sleep(0.5)
                wall = time.monotonic() - started
                run_walls = []
                for r in runs:
                    stats = instance.get_run_stats(r.run_id)
                    if stats.start_time and stats.end_time:
                        run_walls.append(stats.end_time - stats.start_time)
                succeeded = sum(r.status == DagsterRunStatus.SUCCESS for r in runs)
            with db.connect(project) as conn:
                counts = dict(
                    conn.execute("SELECT state::text, count(*) FROM corpus_urls GROUP BY 1").fetchall()
                )
        return {
            "wall": wall, "counts": counts, "runs": len(run_ids), "succeeded": succeeded,
            "cpu": cpu_peak_sample - cpu_before, "run_wall_mean": sum(run_walls) / max(1, len(run_walls)),
        }  # fmt: skip
    finally:
        for worker in workers:
            stop_process_group(worker, grace_s=20)
        for url in (project, dagster):
            db.drop_database(url)


def _wait_for_workers(instance, count: int, deadline_s: float = 180) -> None:
    """Until every worker answers Celery's ping (a worker imports Dagster and the project first)."""
    app = instance.run_launcher.celery
    deadline = time.monotonic() + deadline_s
    while True:
        answers = app.control.ping(timeout=1.0) or []
        if len(answers) >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(answers)} of {count} Celery workers answered within {deadline_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--urls-per-shard", type=int, default=300)
    parser.add_argument("--hosts", type=int, default=32)
    parser.add_argument("--web", default="realistic", choices=["realistic", "latency", "fast"])
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="imgpipe-bench-nodes-"))
    total = args.shards * args.urls_per_shard
    specs, url_paths = plan_web(args.web, args.hosts, total)
    plan_file = state / "plan.json"
    plan_file.write_text(json.dumps({"seed": args.seed, "hosts": specs}))
    server = subprocess.Popen([sys.executable, str(ROOT / "bench" / "web_hosts.py"), str(plan_file)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        ports = json.loads(server.stdout.readline())
        urls = [f"http://{a}:{ports['hosts'][a]}{p}" for a, p in url_paths]
        from imgpipe_dagster.store import database as db

        server_url = os.environ.get("IMGPIPE_DATABASE_URL") or db.resolve_database_url()
        rates = {}
        for nodes in (1, 2):
            result = run_setup(nodes, server_url, urls, args.urls_per_shard, ports["gpu"], state)
            counts, wall = result["counts"], result["wall"]
            final = counts.get("done", 0) + counts.get("failed_permanent", 0)
            rates[nodes] = counts.get("done", 0) / wall
            common = {"nodes": nodes, "web": args.web, "urls": total, "shards": args.shards}
            emit(figure="images_per_s", value=round(rates[nodes], 2), wall_s=round(wall, 1), **common)
            emit(figure="urls_finalised_per_s", value=round(final / wall, 2), final=final,
                 unfinished=total - final, runs_succeeded=f"{result['succeeded']}/{result['runs']}", **common)  # fmt: skip
            emit(figure="cpu_used", value=round(result["cpu"] / wall, 2), unit="cores of 2 (workers and runs)",
                 **common)  # fmt: skip
            emit(figure="run_wall_mean_s", value=round(result["run_wall_mean"], 1), **common)
        emit(figure="images_per_s_ratio_two_to_one", value=round(rates[2] / rates[1], 3), web=args.web)
        emit(figure="load_average_1min", value=round(os.getloadavg()[0], 1), cores=os.cpu_count())
    finally:
        server.stdin.close()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
