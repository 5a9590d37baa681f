"""What the numbers were measured on: CPU, cores, memory, library versions, and how busy it was."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path


def describe_machine() -> list[tuple[str, str]]:
    import torch
    import transformers

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return [
        ("date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("cpu", _cpu_model()),
        ("cores", f"{os.cpu_count()} logical, {usable} usable by this process"),
        ("ram", _memory_total()),
        ("gpu", _gpu(torch)),
        ("torch", f"{torch.__version__}, {torch.get_num_threads()} intra-op threads"),
        ("transformers", transformers.__version__),
        ("python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("load average", f"{load} (1, 5, 15 min) when the run started"),
    ]


def print_machine() -> None:
    rows = describe_machine()
    width = max(len(name) for name, _ in rows)
    print("Machine\n")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "n/a"


def _memory_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "n/a"


def _gpu(torch: object) -> str:
    cuda = torch.cuda  # type: ignore[attr-defined]
    if not cuda.is_available():
        return "none (CPU only)"
    return ", ".join(cuda.get_device_name(i) for i in range(cuda.device_count()))
