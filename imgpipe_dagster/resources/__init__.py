"""Dagster resources (thin): the project database, the GPU model servers, the image fetcher."""

from imgpipe_dagster.resources.fetcher import FetcherResource
from imgpipe_dagster.resources.gpu_model import GpuModelResource
from imgpipe_dagster.resources.postgres import PostgresResource

__all__ = ["FetcherResource", "GpuModelResource", "PostgresResource"]
