"""The machine a benchmark ran on, as its results record it: the CPU's model name (from /proc/cpuinfo
where there is one) and the device string of a study cell."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name, e.g. "Intel(R) Xeon(R) Processor"; the platform's word where none is read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name() -> str:
    """The GPU's name, or the CPU's model, architecture, cores and torch threads."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return (
        f"CPU ({cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads)"
    )
