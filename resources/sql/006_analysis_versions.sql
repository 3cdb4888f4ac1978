-- 006: results kept per analysis version (prompt text + model identity), and duplicate images reused.
--
-- A URL has one result row per analysis version. corpus_urls.state is the URL's state under the version
-- its shard is bound to (shards.analysis_version); a run under another version rebinds the shard in one
-- transaction, setting each URL's state from its result under the new version (store/versions.py).

-- Rows written before versions existed keep the label 'unversioned'; the first versioned run of their
-- shard adopts them (they were written by the prompt and model configured then). The default also keeps
-- hand-written test rows and older writers valid.
ALTER TABLE url_analysis_results ADD COLUMN analysis_version text NOT NULL DEFAULT 'unversioned';
ALTER TABLE url_analysis_results DROP CONSTRAINT url_analysis_results_pkey;
ALTER TABLE url_analysis_results ADD PRIMARY KEY (url_hash, analysis_version);

-- Set when the analysis was copied from an identical image (same sha256, same version) instead of
-- sending this one to the GPU: the url_hash of the URL whose image the GPU analysed.
ALTER TABLE url_analysis_results ADD COLUMN reused_from bytea;

-- The version the shard's URL states refer to; NULL until a versioned run first takes the shard.
ALTER TABLE shards ADD COLUMN analysis_version text;

-- Looking up an already analysed image by its bytes is an equality test only: a hash index is about a
-- fifth of a btree over 64-character hex digests.
CREATE INDEX url_analysis_results_sha256_ok ON url_analysis_results USING hash (sha256) WHERE status = 'ok';
