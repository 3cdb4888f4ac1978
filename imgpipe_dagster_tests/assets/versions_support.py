"""Helpers for tests that change the analysis version and look at what Dagster makes of it (the
staleness test here, and the UI test, which can show the same partitions out of date in the browser
by starting the webserver with ``PROMPT_CHANGE`` in its environment)."""

from __future__ import annotations

from collections.abc import Sequence

from dagster import AssetKey, AssetsDefinition, DagsterInstance
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView
from dagster._core.definitions.assets.graph.asset_graph import AssetGraph
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.definitions.temporal_context import TemporalContext
from dagster._time import get_current_datetime

from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.environment import PROMPT_ENV
from imgpipe_dagster.versioning import configured_analysis_version

# The environment of a prompt change: another bundled prompt than the default analysis_v1.
PROMPT_CHANGE = {PROMPT_ENV: "caption_short_v1"}


def image_analysis_as_configured() -> AssetsDefinition:
    """image_analysis with the code version the current environment gives (what a reloaded code
    location would show after IMGPIPE_PROMPT or IMGPIPE_MODEL_PATH changed)."""
    version = configured_analysis_version().label
    return image_analysis.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version))


def stale_partitions(
    instance: DagsterInstance, asset: AssetsDefinition, partition_keys: Sequence[str]
) -> dict[str, list[str]]:
    """{partition: the reasons Dagster gives} for each of the partitions it shows as out of date."""
    graph = AssetGraph.from_assets([asset])
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=graph)  # fmt: skip
    resolver = CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
    key = AssetKey("image_analysis")
    return {
        partition: [cause.reason for cause in resolver.get_stale_causes(key, partition)]
        for partition in partition_keys
        if resolver.get_status(key, partition) == StaleStatus.STALE
    }
