"""progress_report refreshes by itself: its automation condition requests it after a shard of
image_analysis materializes and on its cron, and not otherwise, evaluated as the daemon does."""

from __future__ import annotations

import datetime

from dagster import AssetKey, AssetMaterialization, evaluate_automation_conditions

from imgpipe_dagster.definitions import defs
from imgpipe_dagster.partitions import URL_SHARDS

REPORT = AssetKey("progress_report")


def requested(result) -> bool:
    return result.get_num_requested(REPORT) > 0


def test_report_is_requested_after_a_shard_run_and_on_its_cron(dagster_instance):
    dagster_instance.add_dynamic_partitions(URL_SHARDS, ["s000001"])
    start = datetime.datetime(2026, 12, 1, 6, 1, tzinfo=datetime.UTC)
    first = evaluate_automation_conditions(defs=defs, instance=dagster_instance, evaluation_time=start)
    later = start + datetime.timedelta(minutes=2)
    quiet = evaluate_automation_conditions(defs=defs, instance=dagster_instance, cursor=first.cursor,
                                           evaluation_time=later)  # fmt: skip
    assert not requested(quiet)  # nothing happened, no cron tick passed

    dagster_instance.report_runless_asset_event(AssetMaterialization("image_analysis", partition="s000001"))
    after_run = evaluate_automation_conditions(defs=defs, instance=dagster_instance, cursor=quiet.cursor,
                                               evaluation_time=later + datetime.timedelta(minutes=1))  # fmt: skip
    assert requested(after_run)

    past_cron = evaluate_automation_conditions(defs=defs, instance=dagster_instance, cursor=after_run.cursor,
                                               evaluation_time=start + datetime.timedelta(minutes=15))  # fmt: skip
    assert requested(past_cron)  # 06:15 passed
