"""GPU utilization and memory from NVML (`nvidia-ml-py`), sampled when asked.

`open_nvml()` returns a sampler only where NVML initialises and sees at least one device; on a CPU-only
machine it returns None and the GPU metrics are simply not exported. This module must never invent
numbers: no GPU means no sample, never a zero that a reader could take for an idle GPU.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuSample:
    index: int
    utilization_ratio: float  # 0..1, NVML's "percent of time a kernel was running" over its last period
    memory_used_bytes: int
    memory_total_bytes: int


class NvmlSampler:
    """Holds NVML open for the process; `sample()` reads every device (a few microseconds each)."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self._nvml = nvml
        self._handles = handles

    @property
    def num_devices(self) -> int:
        return len(self._handles)

    def sample(self) -> list[GpuSample]:
        samples = []
        for index, handle in enumerate(self._handles):
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except self._nvml.NVMLError as error:  # a device that fell off the bus: skip it, don't fake it
                log.warning("NVML could not read GPU %d: %s", index, error)
                continue
            samples.append(
                GpuSample(
                    index=index,
                    utilization_ratio=float(util.gpu) / 100.0,
                    memory_used_bytes=int(mem.used),
                    memory_total_bytes=int(mem.total),
                )
            )
        return samples

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


def open_nvml() -> NvmlSampler | None:
    """An NVML sampler, or None where there is no NVIDIA driver or no device (CPU machines)."""
    try:
        import pynvml  # noqa: PLC0415  (nvidia-ml-py; optional at import time, absent from the operator image)
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    except pynvml.NVMLError as error:
        log.warning("NVML initialised but could not list devices: %s", error)
        pynvml.nvmlShutdown()
        return None
    if not handles:
        pynvml.nvmlShutdown()
        return None
    return NvmlSampler(pynvml, handles)
