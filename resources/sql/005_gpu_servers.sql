-- 005: GPU servers announce themselves here (registry with heartbeats) instead of being listed by hand.
-- A server upserts its row when it starts and renews last_seen every few seconds; readers take the
-- rows seen within a window (store/gpu_registry.py LIVE_WINDOW_S) as the live set. A server that
-- exits cleanly deletes its row; one that dies leaves it to age out.
CREATE TABLE gpu_servers (
    url                        text        PRIMARY KEY,   -- base URL other machines reach it at
    api                        text        NOT NULL DEFAULT 'native',  -- protocols it answers ('native+openai')
    model                      text        NOT NULL,      -- model name (checkpoint directory name)
    model_path                 text        NOT NULL,
    settings_hash              text        NOT NULL,      -- gpu_server.settings.settings_hash
    device                     text        NOT NULL,
    hostname                   text        NOT NULL,
    pid                        integer     NOT NULL,
    status                     text        NOT NULL,      -- loading / ready / draining / failed
    max_batch_images           integer     NOT NULL,      -- capacity: images per generate()
    max_inference_batch_size   integer     NOT NULL,      -- capacity: requests merged per batch
    max_concurrent_generations integer     NOT NULL,      -- capacity: batches in its pipeline
    queue_capacity             integer     NOT NULL,      -- images admitted before 429
    queue_size                 integer     NOT NULL DEFAULT 0,
    processed                  bigint      NOT NULL DEFAULT 0,
    started_at                 timestamptz NOT NULL,
    last_seen                  timestamptz NOT NULL DEFAULT now()
);
-- The live set is a range scan on last_seen.
CREATE INDEX gpu_servers_last_seen ON gpu_servers (last_seen);
