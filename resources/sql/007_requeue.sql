-- 007: requeues of failed URLs. A requeue puts failed URLs back to pending with their attempts reset;
-- the failure each had (its state, error and result row's figures) is kept here, so nothing is lost.

CREATE TABLE requeues (
    requeue_id     bigserial   PRIMARY KEY,
    requested_at   timestamptz NOT NULL DEFAULT now(),
    requested_by   text        NOT NULL,      -- 'cli' or the Dagster run id of the requeue_failed job
    error_classes  text[]      NOT NULL,
    host           text,                      -- the filters as given (NULL: any)
    shard_ids      text[],
    failed_since   timestamptz,
    urls_by_class  jsonb       NOT NULL DEFAULT '{}'::jsonb
);

-- One row per URL a requeue moved: its failure as it was before the requeue.
CREATE TABLE requeued_failures (
    requeue_id     bigint      NOT NULL REFERENCES requeues(requeue_id) ON DELETE CASCADE,
    url_hash       bytea       NOT NULL,
    url            text        NOT NULL,
    shard_id       text        NOT NULL,
    state_before   url_state   NOT NULL,
    error_class    text,
    error_message  text,
    attempts       integer     NOT NULL,
    http_status    integer,
    failed_at      timestamptz NOT NULL,
    PRIMARY KEY (requeue_id, url_hash)
);
CREATE INDEX requeued_failures_url ON requeued_failures (url_hash);

-- Selecting failures by class touches only the failed minority of the corpus.
CREATE INDEX corpus_urls_failed_class ON corpus_urls (last_error_class, updated_at)
    WHERE state IN ('failed_permanent', 'failed_retryable');
