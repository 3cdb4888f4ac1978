-- 004: run heartbeats. A shard run renews its row while its process lives (the same beat that renews
-- its URL leases); a run Dagster still calls in progress whose heartbeat expired is dead, whatever
-- launched it (local subprocess, `dagster job execute`, a Celery worker, a pod). See docs/OPERATIONS.md.
CREATE TABLE run_heartbeats (
    run_id      text        PRIMARY KEY,          -- the Dagster run id, also the URL lease owner
    shard_ids   text[]      NOT NULL,
    host        text        NOT NULL,             -- where the run's process lives (for operators)
    pid         integer     NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    beat_at     timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL              -- dead after this unless renewed
);
