from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from imgpipe_dagster.environment import ALLOWED_NETWORKS_ENV
from imgpipe_dagster.fetch.settings import DEFAULT_USER_AGENT, FetchSettings
from imgpipe_dagster.profiles import WorkerProfile
from imgpipe_dagster.settings_map import fetch_settings


class FetcherResource(ConfigurableResource):
    """Download policy that is not a throughput knob (those come from the profile)."""

    user_agent: str = Field(default=DEFAULT_USER_AGENT, description="User-Agent sent to image hosts")
    honour_noai_opt_out: bool = Field(default=True, description="skip images whose host sends X-Robots-Tag noai")
    contact_url: str = Field(default="", description="where site owners reach the operator; sent in the User-Agent")
    obey_robots_txt: bool = Field(
        default=True, description="honour each host's robots.txt; switch off only for corpora you have permission for"
    )
    allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDR networks exempt from the private-address block (tests, a demo on 127.0.0.1); "
        f"definitions.py fills it from ${ALLOWED_NETWORKS_ENV} (comma-separated)",
    )
    max_bytes: int = Field(default=20 * 1024 * 1024, description="largest download accepted, bytes")
    max_image_pixels: int = Field(default=40_000_000, description="larger images are refused before decoding")
    target_pixels: int = Field(default=448 * 448, description="pixel budget of the resized image sent to the model")

    def settings(self, worker: WorkerProfile) -> FetchSettings:
        """The profile's download fields with this resource's policy (settings_map.fetch_settings)."""
        return fetch_settings(
            worker,
            user_agent=self.user_agent,
            honour_noai_opt_out=self.honour_noai_opt_out,
            contact_url=self.contact_url,
            obey_robots_txt=self.obey_robots_txt,
            allowed_networks=list(self.allowed_networks),
            max_bytes=self.max_bytes,
            max_image_pixels=self.max_image_pixels,
            target_pixels=self.target_pixels,
        )
