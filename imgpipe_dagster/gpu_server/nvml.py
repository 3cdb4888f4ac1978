"""GPU memory and utilisation through NVML, where ``pynvml`` (nvidia-ml-py) is importable."""

from __future__ import annotations

import os
from typing import Any


class GpuMonitor:
    """Reads one GPU's NVML counters; every method returns None where NVML is unavailable."""

    def __init__(self, device: str) -> None:
        self._handle: Any = None
        self._nvml: Any = None
        if not device.startswith("cuda"):
            return
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = self._resolve_handle(pynvml, device)
        except Exception:  # no driver, no library, or an unknown device: report nothing
            self._handle = None

    @staticmethod
    def _resolve_handle(pynvml: Any, device: str) -> Any:
        # NVML numbers GPUs physically and ignores CUDA_VISIBLE_DEVICES, which the launcher narrows.
        local_index = int(device.partition(":")[2] or 0)
        visible = [
            entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()
        ]
        if visible:
            physical = visible[local_index]
            if physical.isdigit():
                return pynvml.nvmlDeviceGetHandleByIndex(int(physical))
            return pynvml.nvmlDeviceGetHandleByUUID(physical)
        return pynvml.nvmlDeviceGetHandleByIndex(local_index)

    @property
    def available(self) -> bool:
        return self._handle is not None

    def read(self) -> dict[str, Any] | None:
        if self._handle is None:
            return None
        try:
            memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            utilization = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            return {
                "memory_used_bytes": int(memory.used),
                "memory_total_bytes": int(memory.total),
                "utilization_percent": int(utilization.gpu),
                "memory_utilization_percent": int(utilization.memory),
            }
        except Exception:
            return None
