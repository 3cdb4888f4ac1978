"""The asset checks of image_analysis, each built by one small function from typed figures.

The checks are partitioned like the asset (one result per shard), and ``every_url_final`` is
blocking: a shard with a lost or inconsistent URL fails its run, so nothing downstream
(progress_report, an export) is materialized from it.
"""

import warnings

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

from imgpipe_dagster.partitions import url_shards
from imgpipe_dagster.store.shard_report import ShardFigures
from imgpipe_dagster.store.stats import ParseStats
from imgpipe_dagster.store.verify import VerifyReport

# The failure-ratio check warns above the first and errors above the second share of failed URLs.
FAILURE_RATIO_WARN = 0.10
FAILURE_RATIO_ERROR = 0.50
# Below this share of analyses parsing as JSON, the prompt or the model is wrong.
MIN_PARSED_SHARE = 0.5

CHECK_COMPLETE = "every_url_final"
CHECK_PARSE = "analyses_parse"
CHECK_FAILURES = "failure_ratio"


def analysis_check_specs(asset: str) -> list[AssetCheckSpec]:
    # Partitioned checks are a preview feature of Dagster 1.13; we use them on purpose, so the
    # preview notice would only be noise in every process that loads the definitions.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [
            AssetCheckSpec(CHECK_COMPLETE, asset=asset, partitions_def=url_shards, blocking=True,
                           description="every URL of the shard is in exactly one final state with its result row "
                                       "(blocking: a lost or inconsistent URL stops downstream assets; URLs still "
                                       "waiting in the pool only warn)"),
            AssetCheckSpec(CHECK_PARSE, asset=asset, partitions_def=url_shards,
                           description="analyses of successful URLs are non-empty and parse as JSON"),
            AssetCheckSpec(CHECK_FAILURES, asset=asset, partitions_def=url_shards,
                           description=f"failed URLs stay under {FAILURE_RATIO_WARN:.0%} (warn) / "
                                       f"{FAILURE_RATIO_ERROR:.0%} (error)"),
        ]  # fmt: skip


def every_url_final(report: VerifyReport) -> AssetCheckResult:
    # Only a lost or inconsistent URL is an error that blocks downstream assets and fails the run. URLs
    # still in the pool (waiting for a retry's due time or a deferred host) are the shard's honest
    # state between runs: a warning, and a later run finishes them.
    return AssetCheckResult(
        check_name=CHECK_COMPLETE, passed=report.complete,
        severity=AssetCheckSeverity.ERROR if not report.ok else AssetCheckSeverity.WARN,
        metadata={"report": MetadataValue.text("\n".join(report.lines())), "urls": report.urls,
                  "final": report.final, "unfinished": MetadataValue.json(report.unfinished),
                  "inconsistent": MetadataValue.json(report.inconsistent)},
    )  # fmt: skip


def analyses_parse(stats: ParseStats, tiny_model: bool) -> AssetCheckResult:
    # the tiny test model emits noise: only a real model is held to producing JSON
    passed = tiny_model or (stats.empty == 0 and stats.parsed_share >= MIN_PARSED_SHARE)
    return AssetCheckResult(
        check_name=CHECK_PARSE, passed=passed, severity=AssetCheckSeverity.WARN,
        metadata={"analyses": stats.analyses, "parsed_json": stats.parsed_json, "empty": stats.empty,
                  "note": "tiny test model: JSON parsing not expected" if tiny_model else ""},
    )  # fmt: skip


def failure_ratio(shard: ShardFigures) -> AssetCheckResult:
    ratio = shard.failure_ratio
    failed = shard.state_counts.get("failed_permanent", 0)
    return AssetCheckResult(
        check_name=CHECK_FAILURES, passed=ratio <= FAILURE_RATIO_WARN,
        severity=AssetCheckSeverity.ERROR if ratio > FAILURE_RATIO_ERROR else AssetCheckSeverity.WARN,
        metadata={"failure_ratio": round(ratio, 4), "failed": failed,
                  "finished": shard.state_counts.get("done", 0) + failed,
                  "top_errors": MetadataValue.json(shard.failures_by_class)},
    )  # fmt: skip
