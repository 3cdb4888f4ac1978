"""The one Definitions object of the code location."""

from dagster import Definitions

from imgpipe_dagster.assets.analysis import image_analysis
from imgpipe_dagster.assets.corpus import url_corpus
from imgpipe_dagster.assets.report import progress_report
from imgpipe_dagster.jobs import ANALYSIS_JOBS, INGEST_JOB, REPORT_JOB
from imgpipe_dagster.resources import FetcherResource, GpuModelResource, PostgresResource
from imgpipe_dagster.schedules import SCHEDULES
from imgpipe_dagster.sensors import SENSORS

defs = Definitions(
    assets=[url_corpus, image_analysis, progress_report],
    jobs=[*ANALYSIS_JOBS.values(), INGEST_JOB, REPORT_JOB],
    sensors=SENSORS,
    schedules=SCHEDULES,
    resources={
        "postgres": PostgresResource(),
        "gpu_model": GpuModelResource(),
        "fetcher": FetcherResource(),
    },
)
