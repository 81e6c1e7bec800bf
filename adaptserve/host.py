"""The host a run happened on, as reports record it: the CPU and the flags that decide which kernels run."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# AVX2-only hosts, AVX-512 hosts and AMX hosts get different llama.cpp kernels and different torch bf16 numerics.
KERNEL_FLAGS = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile"})


def cpu_info() -> dict[str, Any]:
    """CPU model name, the kernel-deciding flags it has, core count and physical memory."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    names = (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {
        "cpu": next(names, platform.machine()),
        "cpu_flags": sorted(set(cpuinfo.split()) & KERNEL_FLAGS),
        "cores": os.cpu_count(),
        "memory_bytes": memory,
    }
