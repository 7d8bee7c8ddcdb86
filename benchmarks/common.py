"""What every benchmark script shares: the machine's name, versions and one CSV writer (one row per measurement, a
header when the file is new, the columns widened in place when a script gains one), and the reader the suite
(benchmarks/suite.py) builds benchmarks/RESULTS.md with, so that results files from different scripts and machines
read the same way. The default results folder, benchmarks/results, is committed: its CSV files are the evidence
behind every figure the README and RESULTS.md quote; rows are only ever appended, since the suite's index refers to
them by row number."""
from __future__ import annotations

import csv
import datetime
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # the default folder of every script's CSV rows


def machine_name() -> str:
    """CPU model, core count and the vector ISA torch's CPU kernels use (the GPU, where there is one, is named by each
    script). The ISA matters: machines sold as the same "AMD EPYC" can be AVX2-only or have AVX512-BF16, and bf16
    autocast with it: a baby GPT or G2P training step takes ~1.5x as long on the first."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch  # imported here (every script has it already) so that the report's reader side needs no torch
    from tinyformer.kernels.device import cpu_has_bf16
    isa = torch.backends.cpu.get_cpu_capability() + (" with bf16" if cpu_has_bf16() else "")
    return f"{cpu} ({os.cpu_count()} cpus, {isa})"


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


def cpu_busy_fraction(interval: float = 0.3) -> float:
    """Share of all CPUs busy over `interval` s (Linux /proc/stat), measured while this process sleeps: the load
    other processes put on the machine. -1 where /proc/stat is missing."""
    import time

    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait

    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except OSError:
        return -1.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def read_rows(path) -> tuple[list[str], list[dict]]:
    """(header, data rows as dicts) of a CSV file; ([], []) when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        rows = list(r)
        return list(r.fieldnames or []), rows


def append_rows(path, fieldnames, rows) -> None:
    """Append dict rows to a CSV, writing the header first when the file is new or empty.

    When the file's header differs from `fieldnames` (a script gained, lost or reordered a column), the rows are
    written under the file's own header, widened once (the file rewritten, old rows keeping their values and leaving
    the new columns empty) when `fieldnames` has columns the file lacks: a row never lands under the wrong header,
    and the row numbers of old rows stay the same (the suite's index refers to rows by number)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header, old = read_rows(path) if path.exists() and path.stat().st_size else ([], [])
    if header and any(f not in header for f in fieldnames):
        header = header + [f for f in fieldnames if f not in header]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
            w.writeheader()
            w.writerows(old)
        os.replace(tmp, path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header or list(fieldnames), extrasaction="ignore")
        if not header:
            w.writeheader()
        w.writerows(rows)


class Rows:
    """A script's measurements: each `add(**row)` stamps the machine, versions, threads and time, rounds the float
    `rounded` columns to six significant digits, keeps the row, prints its `shown` columns (none: quiet) and appends it
    to `csv` under `fields` (None: no file)."""

    def __init__(self, csv_path, fields, rounded=("value", "reference"), shown=()):
        import torch
        self.csv, self.fields, self.rounded, self.shown, self.rows = csv_path, fields, rounded, shown, []
        torch_v, triton_v = versions()
        self.base = dict(machine=machine_name(), torch=torch_v, triton=triton_v, threads=torch.get_num_threads())

    def add(self, **r):
        r = {**self.base, "timestamp": now(), **r}
        for k in self.rounded:
            if isinstance(r.get(k), float):
                r[k] = float(f"{r[k]:.6g}")
        self.rows.append(r)
        if self.shown:
            print("  " + ", ".join(f"{k}={r[k]}" for k in self.shown if r.get(k) not in (None, "")), flush=True)
        if self.csv:
            append_rows(self.csv, self.fields, [r])

