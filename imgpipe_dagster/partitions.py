"""The corpus is split into shards of N URLs; each shard is one dynamic partition of url_shards.

The name comes from the corpus code (no Dagster there), which keeps the partitions equal to its shards.
"""

from dagster import DynamicPartitionsDefinition

from imgpipe_dagster.corpus.shards import URL_SHARDS

url_shards = DynamicPartitionsDefinition(name=URL_SHARDS)
