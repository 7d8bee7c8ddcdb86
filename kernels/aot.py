"""Ahead-of-time compile report for tinyformer's Triton kernels, on a machine without a GPU.

`python -m tinyformer.kernels.aot [--targets 80,90] [--filter TEXT] [--csv PATH] [--jobs N]` compiles every kernel
configuration that the launchers can pick (the `aot_specs()` of kernels/flash_attention.py, int8_mm.py and
int4_mm.py) for sm_80 and sm_90 with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`: the whole
pipeline TTIR -> TTGIR -> LLIR -> PTX -> cubin runs here, with the ptxas bundled in the triton wheel. For each
kernel and target it prints registers per thread, spill stores/loads (the `ptxas -v` log of triton's own cubin
step, or ptxas -v run again on the PTX when the cubin came from a warm cache), shared memory
(`ck.metadata.shared`) and the compile time. Exit status: 1 if any compile fails, if a shipped forward
configuration spills (other spills are reported as warnings) or if nothing matched, else 0. By default a fresh
temporary triton cache is used, so the compile times are real (--cache reuses ~/.triton/cache).

The interpreter cannot show register pressure or shared-memory overflow; this report can, so CI runs it.
Measured facts behind it: shared/TRITON_ON_CPU.md ("Ahead-of-time compile for real GPUs, without a GPU").

A spec is a dict: name, fn (a JITFunction), signature {arg: "*fp16" | "i32" | "fp32" | "constexpr" ...},
constexprs {arg: value}, num_warps, num_stages, optional targets [80, 90], optional divisible_by_16 [arg names the
JIT would mark 16-aligned], optional shipped_forward (bool: a spill there is an error).

References: Triton's compiler API (triton.compiler.ASTSource, triton.backends.compiler.GPUTarget); NVIDIA ptxas -v
resource report.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

MODULES = ("flash_attention", "int8_mm", "int4_mm")
DEFAULT_TARGETS = (80, 90)
_PKG = __package__ or "tinyformer.kernels"


def _load_specs(modules) -> tuple:
    """[(module, index, spec)] for every spec; a missing int8_mm/int4_mm is a note, any other import error fails."""
    rows, notes, failures = [], [], []
    for name in modules:
        try:
            mod = importlib.import_module(f"{_PKG}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{_PKG}.{name}" and name != "flash_attention":
                notes.append(f"note: {_PKG}.{name} does not exist yet; skipped")
                continue
            failures.append(f"import {_PKG}.{name} failed: {e!r}")
            continue
        except Exception as e:  # noqa: BLE001 - any other import error is a failure to report
            failures.append(f"import {_PKG}.{name} failed: {e!r}")
            continue
        if not hasattr(mod, "aot_specs"):
            failures.append(f"{_PKG}.{name} has no aot_specs()")
            continue
        for i, spec in enumerate(mod.aot_specs()):
            rows.append((name, i, spec))
    return rows, notes, failures


def _interpreted(rows) -> bool:
    from triton.runtime.jit import JITFunction
    return any(not isinstance(spec["fn"], JITFunction) for _, _, spec in rows)


_SPEC_CACHE: dict = {}


def _spec(module: str, index: int) -> dict:
    if module not in _SPEC_CACHE:
        _SPEC_CACHE[module] = importlib.import_module(f"{_PKG}.{module}").aot_specs()
    return _SPEC_CACHE[module][index]


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Run the bundled ptxas -v on PTX; returns registers, spill_stores, spill_loads, stack (bytes)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # the flags of triton's own make_cubin step (regAllocOptLevel=2 works around a ptxas 13 bug there)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               src, "-o", os.path.join(d, "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stderr + res.stdout
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed ({res.returncode}): {log[-2000:]}")
    usage = parse_ptxas_log(log)
    if usage is None:
        raise RuntimeError(f"no resource report in the ptxas log: {log[-2000:]}")
    return usage


def parse_ptxas_log(log: str) -> Optional[dict]:
    """registers, stack, spill_stores, spill_loads from a `ptxas -v` log (one kernel); None if there is none."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spill:
        return None
    return dict(registers=int(regs.group(1)), stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
                spill_loads=int(spill.group(3)))


def compile_one(module: str, index: int, arch: int) -> dict:
    """Compile spec `index` of `module` for one target; returns a report row (error set on failure)."""
    return compile_spec(_spec(module, index), arch, module)


def compile_spec(spec: dict, arch: int, module: str = "") -> dict:
    """Compile one spec dict for one target; returns a report row (error set on failure)."""
    row = dict(module=module, name=spec["name"], target=f"sm_{arch}", num_warps=spec["num_warps"],
               num_stages=spec["num_stages"], registers="", spill_stores="", spill_loads="", shared="",
               compile_s="", shipped_forward=bool(spec.get("shipped_forward", False)), error="")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        fn = spec["fn"]
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.get("divisible_by_16", ())}
        src = ASTSource(fn, signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
        # triton runs ptxas -v itself when it makes the cubin; with dump_ptxas_log it prints that log, so the
        # resource report costs no second ptxas run (it does when the cubin came from a warm cache: --cache)
        triton.knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):
            ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["shared"] = int(ck.metadata.shared)
        usage = parse_ptxas_log(log.getvalue()) or ptxas_usage(ck.asm["ptx"], arch)
        row.update(registers=usage["registers"], spill_stores=usage["spill_stores"], spill_loads=usage["spill_loads"])
    except Exception as e:  # noqa: BLE001 - a failed compile is a report row, not a crash of the whole run
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return row


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m tinyformer.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)),
                    help="comma-separated CUDA compute capabilities (default 80,90)")
    ap.add_argument("--modules", default=",".join(MODULES), help="kernel modules to read aot_specs() from")
    ap.add_argument("--filter", default="", help="only specs whose name contains this text")
    ap.add_argument("--limit", type=int, default=0, help="at most this many specs per target (0 = all)")
    ap.add_argument("--csv", default="", help="also write the rows to this CSV file")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    ap.add_argument("--cache", action="store_true",
                    help="reuse triton's compile cache (default: a fresh temporary one, so compile times are real)")
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # @triton.jit decides interpreter-or-compiler when a module is imported, so the kernels must be imported
        # in a process where TRITON_INTERPRET is not set: run again in one.
        print("aot: TRITON_INTERPRET is set; kernels must be compiled, not interpreted: re-running without it",
              flush=True)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", f"{_PKG}.aot", *argv], env=env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, set to silence its warning
    try:
        import triton  # noqa: F401
    except ImportError:
        print("aot: triton is not installed; nothing to compile", file=sys.stderr)
        return 1

    targets = [int(t) for t in args.targets.split(",") if t.strip()]
    rows, notes, failures = _load_specs([m.strip() for m in args.modules.split(",") if m.strip()])
    for n in notes:
        print(n)
    if _interpreted(rows):
        print("aot: the kernels were imported under the interpreter in this process; re-running in a clean one",
              flush=True)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", f"{_PKG}.aot", *argv], env=env)

    jobs = []
    for arch in targets:
        picked = [(m, i) for m, i, s in rows
                  if args.filter in s["name"] and arch in s.get("targets", targets)]
        if args.limit:
            picked = picked[:args.limit]
        jobs += [(m, i, arch) for m, i in picked]
    if not jobs:
        print(f"aot: no spec matches (filter {args.filter!r}, targets {targets})"
              + "".join(f"\nFAILED: {f}" for f in failures))
        return 1

    saved_cache = os.environ.get("TRITON_CACHE_DIR")
    tmp_cache = None if args.cache else tempfile.TemporaryDirectory(prefix="tinyformer-aot-")
    if tmp_cache is not None:  # a fresh cache: real compile times, nothing stale
        os.environ["TRITON_CACHE_DIR"] = tmp_cache.name
    t0 = time.perf_counter()
    try:
        if args.jobs > 1 and len(jobs) > 1:
            import multiprocessing as mp
            with mp.get_context("fork").Pool(min(args.jobs, len(jobs))) as pool:
                results = pool.starmap(compile_one, jobs, chunksize=1)
        else:
            results = [compile_one(*j) for j in jobs]
    finally:
        if tmp_cache is not None:
            tmp_cache.cleanup()
            if saved_cache is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved_cache
    wall = time.perf_counter() - t0

    cols = ("target", "name", "num_warps", "num_stages", "registers", "spill_stores", "spill_loads", "shared",
            "compile_s")
    head = ("target", "kernel", "warps", "stages", "regs", "spill_st", "spill_ld", "shared_B", "compile_s")
    width = max([len("kernel")] + [len(r["name"]) for r in results])
    fmt = "{:<7} {:<%d} {:>5} {:>6} {:>5} {:>8} {:>8} {:>8} {:>9}  {}" % width
    print(fmt.format(*head, "status"))
    errors = spill_errors = spill_warnings = 0
    for r in results:
        status = "ok"
        if r["error"]:
            status, errors = "FAILED: " + r["error"], errors + 1
        elif (r["spill_stores"] or 0) > 0 or (r["spill_loads"] or 0) > 0:
            if r["shipped_forward"]:
                status, spill_errors = "SPILLS (shipped forward config: error)", spill_errors + 1
            else:
                status, spill_warnings = "spills (warning)", spill_warnings + 1
        r["status"] = status
        print(fmt.format(*[r[c] for c in cols], status))
    for f in failures:
        print("FAILED:", f)
    print(f"aot: {len(results)} compiles for {','.join('sm_%d' % a for a in targets)} in {wall:.1f} s wall "
          f"({args.jobs} jobs); {errors + len(failures)} failed, {spill_errors} shipped forward configs spill, "
          f"{spill_warnings} other configs spill (warnings)")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["module", *cols, "shipped_forward", "status", "error"],
                               extrasaction="ignore")
            w.writeheader()
            w.writerows(results)
        print(f"aot: wrote {args.csv}")
    return 1 if (errors or failures or spill_errors) else 0


if __name__ == "__main__":
    sys.exit(main())
