"""requeue_failed: `imgpipe requeue` as a Dagster job (store/requeue.py does the work).

The requeued URLs are pending again, so the throttle sensor (or a backfill of the listed shards)
analyses them again."""

from typing import Optional

from dagster import Config, Failure, MetadataValue, Nothing, OpExecutionContext, Out, Output, job, op
from pydantic import Field

from imgpipe_dagster.resources import PostgresResource
from imgpipe_dagster.store.requeue import RequeueFilter, UnknownErrorClassError, parse_since, requeue


class RequeueConfig(Config):
    error_classes: list[str] = Field(description="error classes to requeue, e.g. [http_5xx]")
    host: Optional[str] = Field(default=None, description="only URLs of this host (host or host:port)")  # noqa: UP045
    shards: list[str] = Field(default_factory=list, description="only these shards; empty: all")
    since: Optional[str] = Field(  # noqa: UP045 - Dagster reads typing.Optional
        default=None, description="only URLs that failed since: ISO time or an age (90m, 6h, 2d)")
    dry_run: bool = Field(default=False, description="count what would be requeued, change nothing")


@op(out=Out(Nothing))
def requeue_failed_urls(context: OpExecutionContext, config: RequeueConfig, postgres: PostgresResource):
    try:
        selected = RequeueFilter(tuple(config.error_classes), host=config.host, shard_ids=tuple(config.shards),
                                 failed_since=parse_since(config.since) if config.since else None)  # fmt: skip
    except ValueError as exc:
        raise Failure(str(exc)) from None
    with postgres.connect() as conn:
        try:
            report = requeue(conn, selected, dry_run=config.dry_run, requested_by=context.run_id)
        except UnknownErrorClassError as exc:
            raise Failure(str(exc)) from None
    context.log.info("\n".join(report.lines()))
    yield Output(None, metadata={
        "dry_run": report.dry_run,
        "urls": report.urls,
        "urls_by_class": MetadataValue.json(report.urls_by_class),
        "urls_by_state": MetadataValue.json(report.urls_by_state),
        "shards": MetadataValue.json(report.shards),
        "requeue_id": report.requeue_id or 0,
    })  # fmt: skip


@job(description="Put failed URLs of chosen error classes back to pending (attempts reset); "
     "config: error_classes, host, shards, since, dry_run.")  # fmt: skip
def requeue_failed():
    requeue_failed_urls()
