"""What every benchmark script shares: the machine's name and one CSV writer (one row per measurement, a header
when the file is new), so that results files from different scripts and machines read the same way."""
from __future__ import annotations

import csv
import datetime
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_name() -> str:
    """CPU model and core count (the GPU, where there is one, is named by each script)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cpus)"


def versions() -> tuple[str, str]:
    """(torch version, triton version or "none")."""
    import torch
    try:
        import triton
        return torch.__version__, triton.__version__
    except ImportError:
        return torch.__version__, "none"


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def append_rows(path, fieldnames, rows) -> None:
    """Append dict rows to a CSV, writing the header first when the file is new or empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
