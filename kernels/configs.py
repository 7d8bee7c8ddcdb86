"""The GPU launch configurations of every kernel, as data: `configs.csv` next to this file.

Each row is one candidate a launcher may pick, and what the ahead-of-time compile report measured for it
(`python -m tinyformer.kernels.aot --write-configs` refreshes the measured columns and keeps the rows):

    kernel        attn_fwd, attn_decode, attn_decode_combine, attn_bwd_preprocess, attn_bwd_dkdv, attn_bwd_dq
                  (flash_attention.py); w8a8, w8a8_decode (int8_mm.py); wo, wo_decode (int8_wo_mm.py); quant
                  (per_token_quant.py); i4_gemv, i4_decode, i4_prefill (power-of-two groups), i4 (other groups)
                  (int4_mm.py); fp8 (fp8_mm.py; its sm80 rows are for sm_89); w4a8, w4a8_e4m3 (w4a8_mm.py: int8 or
                  e4m3 activations; e4m3's sm80 rows are for sm_89)
    arch          sm80 (Ampere and Ada, with a stage cap for sm_86/sm_89 applied by the launchers) or sm90 (Hopper)
    bucket        attention: BLOCK_D, the head dim rounded up to a power of two >= 16; matmuls: empty
    variant       attn_fwd: "", "kpm" (with a key padding mask) or "varlen" (packed documents); attn_decode:
                  "rows16" or "rows64" (query rows packed per kv head, G * Tq, up to 16 or more); otherwise empty
    block_m, block_n, block_k, num_warps, num_stages, group_m
                  the tile config; 0 where the kernel has no such parameter
    registers, spill_stores, spill_loads, shared_bytes
                  the worst over the compiles the row stands for (fp16 and bf16, every AOT head dim of the bucket,
                  both attention mask variants of decode and backward, the backward with and without packed
                  documents, int4 group-size buckets), on the report's
                  triton and ptxas; empty until measured
    note          a present-tense reason, where a row needs one

The rows of one (kernel, arch, bucket, variant) are its candidates in file order, the default first: the one used
when autotuning is off and where the launcher does not autotune; on a GPU the autotuner picks among all of them.
Under the interpreter the launchers use their own small configs instead (this table is for GPUs).
"""
from __future__ import annotations

import csv
import functools
import os
from typing import Dict, List, Optional

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs.csv")
TILE = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "group_m")
MEASURED = ("registers", "spill_stores", "spill_loads", "shared_bytes")
FIELDS = ("kernel", "arch", "bucket", "variant") + TILE + MEASURED + ("note",)


def arch_family(arch: Optional[int]) -> str:
    """The table an arch reads: sm90 for sm_90+ (Hopper: 228 KB of shared memory, wgmma), sm80 below."""
    return "sm90" if arch is not None and arch >= 90 else "sm80"


def read(path: str = PATH) -> List[Dict]:
    """Every row, in file order; tile columns as ints, measured columns as ints or None."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for i, r in enumerate(rows):
        if tuple(r) != FIELDS:
            raise ValueError(f"{path}: row {i + 2} has columns {tuple(r)}, expected {FIELDS}")
        r.update({k: int(r[k]) for k in TILE})
        r.update({k: int(r[k]) if r[k] != "" else None for k in MEASURED})
    return rows


@functools.lru_cache(maxsize=1)
def rows() -> tuple:
    """The shipped table (read once, on first use: importing the kernels reads no file)."""
    return tuple(read())


@functools.lru_cache(maxsize=None)
def candidates(kernel: str, arch: str, bucket: str = "", variant: str = "") -> tuple:
    """(row index, row) of the candidates of one kernel and bucket, default first."""
    found = tuple((i, r) for i, r in enumerate(rows())
                  if (r["kernel"], r["arch"], r["bucket"], r["variant"]) == (kernel, arch, bucket, variant))
    if not found:
        raise ValueError(f"no {kernel} config for arch {arch}, bucket {bucket!r}, variant {variant!r} in {PATH}")
    return found


def refresh(table: List[Dict], results: List[Dict]) -> List[Dict]:
    """The table with its measured columns set from AOT report rows (`aot.compile_spec` results carrying the index
    `row` of the table row they compiled): per row the worst registers, spills and shared memory over its compiles.
    Rows without a result in `results` keep their values; failed compiles are left out."""
    worst: Dict[int, Dict] = {}
    for res in results:
        if res.get("row") is None or res.get("error"):
            continue
        w = worst.setdefault(res["row"], {k: 0 for k in MEASURED})
        got = dict(registers=res["registers"], spill_stores=res["spill_stores"], spill_loads=res["spill_loads"],
                   shared_bytes=res["shared"])
        for k in MEASURED:
            w[k] = max(w[k], int(got[k]))
    return [{**r, **worst.get(i, {})} for i, r in enumerate(table)]


def write(table: List[Dict], path: str = PATH) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows({k: ("" if r[k] is None else r[k]) for k in FIELDS} for r in table)
