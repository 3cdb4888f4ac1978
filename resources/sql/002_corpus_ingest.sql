-- 002: samples of the lines an ingest rejected, so a user can see what was dropped and why.
-- (Counts per reason are in corpus_files.rejected_by_reason; this keeps a few examples of each.)
CREATE TABLE corpus_rejects (
    file_id  bigint NOT NULL REFERENCES corpus_files(file_id) ON DELETE CASCADE,
    line     bigint,               -- 1-based line (record) number in the file; NULL when unknown
    reason   text   NOT NULL,      -- e.g. unsupported_scheme, credentials, invalid_utf8, too_long
    value    text   NOT NULL       -- the rejected value, truncated, control characters escaped
);
CREATE INDEX corpus_rejects_file ON corpus_rejects (file_id, reason);
