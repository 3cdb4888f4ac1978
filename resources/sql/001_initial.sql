-- 001: corpus, shards, per-URL state, results, monitoring view.
-- url_hash is md5(normalised url) as 16 raw bytes: identical in Python (hashlib.md5) and SQL (decode(md5(url),'hex')).

CREATE TYPE url_state AS ENUM ('pending', 'leased', 'done', 'failed_retryable', 'failed_permanent');

-- One row per ingested input file; a file's shards appear in one transaction with it.
CREATE TABLE corpus_files (
    file_id        bigserial PRIMARY KEY,
    path           text        NOT NULL,
    content_sha256 text        NOT NULL UNIQUE,
    size_bytes     bigint      NOT NULL,
    rows_read      bigint      NOT NULL DEFAULT 0,
    urls_added     bigint      NOT NULL DEFAULT 0,
    duplicates     bigint      NOT NULL DEFAULT 0,
    rejected       bigint      NOT NULL DEFAULT 0,
    rejected_by_reason jsonb   NOT NULL DEFAULT '{}'::jsonb,
    shards_added   integer     NOT NULL DEFAULT 0,
    ingested_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shards (
    shard_id    text        PRIMARY KEY,          -- also the Dagster dynamic partition key
    shard_no    integer     NOT NULL UNIQUE,
    file_id     bigint      REFERENCES corpus_files(file_id),
    url_count   integer     NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE corpus_urls (
    url_hash        bytea       PRIMARY KEY,
    url             text        NOT NULL,
    shard_id        text        NOT NULL REFERENCES shards(shard_id),
    source_file_id  bigint      REFERENCES corpus_files(file_id),
    source_line     bigint,
    metadata        jsonb,
    state           url_state   NOT NULL DEFAULT 'pending',
    attempts        integer     NOT NULL DEFAULT 0,    -- fetch/inference attempts charged to the URL
    lease_owner     text,                 -- the run (Dagster run id) holding the lease
    lease_expires_at timestamptz,
    next_attempt_at timestamptz,          -- backoff: a failed_retryable URL is not claimed before this
    last_error_class text,
    last_error      text,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- Claiming work and per-shard counts filter by shard then state.
CREATE INDEX corpus_urls_shard_state ON corpus_urls (shard_id, state);
-- Backlog and lease-expiry scans only touch the unfinished part of the corpus.
CREATE INDEX corpus_urls_unfinished ON corpus_urls (state, lease_expires_at)
    WHERE state IN ('pending', 'leased', 'failed_retryable');
-- Failures are a minority: counting them through this index keeps progress queries cheap
-- (done = total - unfinished - failed, without scanning 20M rows).
CREATE INDEX corpus_urls_failed ON corpus_urls (shard_id) WHERE state = 'failed_permanent';

CREATE TABLE url_analysis_results (
    url_hash        bytea       PRIMARY KEY,
    url             text        NOT NULL,
    shard_id        text        NOT NULL,
    status          text        NOT NULL,            -- 'ok' or 'failed'
    created_at      timestamptz NOT NULL DEFAULT now(),
    http_status     integer,
    content_type    text,
    bytes           integer,
    width           integer,
    height          integer,
    format          text,
    sha256          text,
    phash           bigint,
    model_text      text,
    analysis        jsonb,
    parse_ok        boolean,
    model           text,
    prompt_version  text,
    prompt_tokens   integer,
    generated_tokens integer,
    download_ms     real,
    inference_ms    real,
    gpu             text,
    attempts        integer,
    error_class     text,
    error_message   text,
    run_id          text
);
-- Rate windows (sensors every 30 s, the per-minute view) scan recent rows only.
CREATE INDEX url_analysis_results_created_at ON url_analysis_results (created_at);
CREATE INDEX url_analysis_results_shard ON url_analysis_results (shard_id);

-- The legacy monitoring query as a view: URLs processed per minute over the last 24 hours
-- (bounded so the created_at index serves it on a 20M-row table).
CREATE VIEW urls_processed_per_minute AS
SELECT date_trunc('minute', created_at) AS minute,
       count(*)                                  AS urls_processed,
       count(*) FILTER (WHERE status = 'ok')     AS urls_ok,
       count(*) FILTER (WHERE status <> 'ok')    AS urls_failed
FROM url_analysis_results
WHERE created_at > now() - interval '24 hours'
GROUP BY 1;
