"""Run config of image_analysis: a profile name plus optional per-field overrides.

The override classes are derived from the profile models so a field added to a profile shows up in
the Launchpad without being written twice. Dagster checks the types when a run is launched; the
merged values are validated against the profile model (ranges, orderings) when the run starts.
"""


from typing import Optional

from dagster import Config
from pydantic import Field

from imgpipe_dagster.profiles import GpuServerProfile, ProfileName, WorkerProfile, resolve


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


class ImageAnalysisConfig(Config):
    profile: ProfileName = Field(
        default="medium", description="conservative | medium | aggressive: base values from profiles/<name>.yaml"
    )
    worker: WorkerOverrides = Field(default_factory=WorkerOverrides)  # type: ignore[valid-type]
    gpu_server: GpuServerOverrides = Field(default_factory=GpuServerOverrides)  # type: ignore[valid-type]

    def resolve(self) -> tuple[WorkerProfile, GpuServerProfile]:
        return resolve(self.profile, self.worker.model_dump(), self.gpu_server.model_dump())
