"""The corpus is split into shards of N URLs; each shard is one dynamic partition of url_shards."""

from dagster import DynamicPartitionsDefinition

URL_SHARDS = "url_shards"

url_shards = DynamicPartitionsDefinition(name=URL_SHARDS)
