"""`DeviceClock`: the time of a shard's device steps, without synchronising the pipeline."""

from __future__ import annotations

import time
from typing import Any

import torch


class DeviceClock:
    """Time spent in the device step (`with clock:`): CUDA events on a GPU (read once, at the
    end of the shard, so timing never synchronises the pipeline), wall time on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cpu_seconds = 0.0
        self._events: list[tuple[Any, Any]] = []
        self._started = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def __enter__(self) -> "DeviceClock":
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((start, torch.cuda.Event(enable_timing=True)))
        else:
            self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self._events[-1][1].record()
        else:
            self._cpu_seconds += time.perf_counter() - self._started

    @property
    def seconds(self) -> float:
        """Total device-step seconds so far."""
        if self.device.type != "cuda":
            return self._cpu_seconds
        torch.cuda.synchronize(self.device)
        return sum(start.elapsed_time(end) for start, end in self._events) / 1000

    def peak_bytes(self) -> int:
        """Peak device memory allocated during the shard (0 on the CPU)."""
        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else 0
