"""Image fetch stage: safe, bounded downloads, decode and resize (no Dagster imports here).

Public API::

    from imgpipe_dagster.fetch import ErrorClass, FetchError, FetchResult, FetchSettings, ImageFetcher

    async with ImageFetcher(FetchSettings(...)) as fetcher:
        result = await fetcher.fetch(url, key=row_id)            # one URL, never raises per URL
        async for result in fetcher.stream((key, url) for ...):  # many, bounded, completion order
            ...
"""

from imgpipe_dagster.fetch.errors import ErrorClass, FetchError
from imgpipe_dagster.fetch.fetcher import FetchResult, ImageFetcher
from imgpipe_dagster.fetch.settings import FetchSettings

__all__ = ["ErrorClass", "FetchError", "FetchResult", "FetchSettings", "ImageFetcher"]
