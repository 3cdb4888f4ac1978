-- 003: the throttle sensor's decisions, run failures with their bounded retries, and an index for
-- the retryable failures of the throttle's recent window.

-- Every throttle tick (and every nightly submission) with the inputs it decided on.
CREATE TABLE throttle_decisions (
    decision_id      bigserial   PRIMARY KEY,     -- also part of the run keys of the runs it requested
    decided_at       timestamptz NOT NULL DEFAULT now(),
    source           text        NOT NULL,        -- 'throttle' sensor or 'nightly' schedule
    action           text        NOT NULL,        -- submit / hold / idle / step_down / step_up / pause / resume
    profile          text        NOT NULL,        -- the profile in force after this decision
    previous_profile text,
    paused           boolean     NOT NULL,
    reason           text        NOT NULL,
    submitted        text[]      NOT NULL DEFAULT '{}',   -- shard ids requested by this decision
    inputs           jsonb       NOT NULL,        -- window stats, GPU health, backlog, runs in flight
    state            jsonb       NOT NULL,        -- the throttle state after the decision (also the cursor)
    tick_ms          real                          -- how long reading the inputs and deciding took
);
-- The report and the run-failure sensor read the latest decisions only.
CREATE INDEX throttle_decisions_decided_at ON throttle_decisions (decided_at);
-- Profile changes and pauses are rare: listing them does not scan every tick.
CREATE INDEX throttle_decisions_changes ON throttle_decisions (decided_at)
    WHERE action IN ('step_down', 'step_up', 'pause', 'resume');

-- One row per failed analysis run, written by the run-failure sensor.
CREATE TABLE run_failures (
    run_id          text        PRIMARY KEY,      -- a failure is recorded once, whatever the sensor retries
    job_name        text        NOT NULL,
    shard_ids       text[]      NOT NULL,
    cause           text        NOT NULL,         -- error class and first line, numbers masked: equal text = same cause
    error           text,
    urls_released   integer     NOT NULL DEFAULT 0,   -- leased URLs returned to pending
    failures_same_cause integer NOT NULL DEFAULT 1,   -- failures of these shards with this cause, this one included
    action          text        NOT NULL,         -- retried / budget_spent / left_to_throttle / dagster_retries
    retry_run_key   text,
    failed_at       timestamptz NOT NULL DEFAULT now()
);
-- "How often did this shard fail for this cause" looks shards up inside the arrays.
CREATE INDEX run_failures_shard_ids ON run_failures USING gin (shard_ids);
CREATE INDEX run_failures_failed_at ON run_failures (failed_at);

-- Retryable failures in the throttle's window (timeouts of a broken network show up here before
-- any URL reaches a final state); only failed_retryable rows are in it.
CREATE INDEX corpus_urls_retryable_recent ON corpus_urls (updated_at) WHERE state = 'failed_retryable';
