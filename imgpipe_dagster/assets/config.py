"""Run config of image_analysis: a profile name plus optional per-field overrides.

The override classes are derived from the profile models so a field added to a profile shows up in
the Launchpad without being written twice. Dagster checks the types when a run is launched; the
merged values are validated against the profile model (ranges, orderings) when the run starts.
"""


from enum import Enum
from typing import Optional

from dagster import Config
from pydantic import Field

from imgpipe_dagster.profiles import PROFILE_NAMES, GpuServerProfile, WorkerProfile, resolve


def _overrides(model, name: str, doc: str) -> type[Config]:
    annotations = {}
    namespace: dict = {"__doc__": doc, "__module__": __name__}
    for field_name, info in model.model_fields.items():
        annotations[field_name] = Optional[info.annotation]  # noqa: UP045 - Dagster reads typing.Optional
        namespace[field_name] = Field(default=None, description=f"overrides the profile's {field_name}")
    namespace["__annotations__"] = annotations
    return type(name, (Config,), namespace)


WorkerOverrides = _overrides(WorkerProfile, "WorkerOverrides", "Worker settings; unset fields keep the profile's value.")
GpuServerOverrides = _overrides(
    GpuServerProfile, "GpuServerOverrides", "GPU server settings; unset fields keep the profile's value."
)


# Jobs named after a profile carry it in this run tag: a run launched from their Launchpad with the
# profile field left empty still gets the job's profile.
PROFILE_TAG = "imgpipe/profile"
DEFAULT_PROFILE = "medium"
# The Dagster concurrency pool of GPU work: one slot per shard run in flight, whatever launched it.
GPU_POOL = "imgpipe_gpu"
ASSET_OWNERS = ["team:imgpipe"]


# Dagster config takes an optional Enum (not an optional Literal).
Profile = Enum("Profile", {name: name for name in PROFILE_NAMES}, type=str)


class ImageAnalysisConfig(Config):
    profile: Optional[Profile] = Field(  # noqa: UP045 - Dagster reads typing.Optional
        default=None,
        description="conservative | medium | aggressive: base values from profiles/<name>.yaml; "
        f"empty: the job's {PROFILE_TAG} tag, else {DEFAULT_PROFILE}",
    )
    worker: WorkerOverrides = Field(default_factory=WorkerOverrides)  # type: ignore[valid-type]
    gpu_server: GpuServerOverrides = Field(default_factory=GpuServerOverrides)  # type: ignore[valid-type]
    reuse_duplicates: bool = Field(
        default=True,
        description="an image whose bytes (sha256) were already analysed under the same analysis version "
        "reuses that analysis (its row marked reused_from) instead of going to the GPU",
    )

    def profile_name(self, run_tags: dict | None = None) -> str:
        if self.profile is not None:
            return Profile(self.profile).value
        return (run_tags or {}).get(PROFILE_TAG) or DEFAULT_PROFILE

    def resolve(self, run_tags: dict | None = None) -> tuple[WorkerProfile, GpuServerProfile]:
        return resolve(self.profile_name(run_tags), self.worker.model_dump(), self.gpu_server.model_dump())
