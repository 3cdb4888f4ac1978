"""The run loop (no Dagster): claim URLs of shards, fetch, analyse on the GPU servers, write outcomes."""
