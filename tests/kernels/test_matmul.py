"""Tests of the low-bit kernels' shared machinery (kernels/matmul.py): the config lookup (one config under the
interpreter, the configs.csv candidates on GPUs with the sm_86/sm_89 stage cap), split-K ranges, the sum of the split
partials, and the GPU launch path (triton.autotune over several candidates) driven by a CPU timer under the
interpreter."""
import time

import pytest
import torch
from helpers import assert_close
from kernel_inputs import DEV, gen, magnitude, make_int4, needs_triton, rand_int8

from tinyformer.kernels import configs, int4_mm, int8_mm, int8_wo_mm, matmul, reference
from tinyformer.kernels.matmul import MatmulConfig


def test_one_config_under_the_interpreter_the_table_on_gpus():
    for kind in matmul.KINDS:
        assert matmul.matmul_configs(kind, None) == [matmul.INTERPRET_CONFIGS[kind]]
        for arch, fam in ((80, "sm80"), (90, "sm90"), (100, "sm90")):
            if kind in matmul.SM90_ONLY and fam == "sm80":
                continue
            table = [tuple(r[k] for k in configs.TILE) for _, r in configs.candidates(kind, fam)]
            got = [(c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages, c.group_m)
                   for c in matmul.matmul_configs(kind, arch)]
            assert got == table, (kind, arch)
        if kind not in matmul.SM90_ONLY:
            assert all(c.num_stages <= 2 for c in matmul.matmul_configs(kind, 86))  # ~100 KB of shared memory
    with pytest.raises(ValueError, match="kind must be one of"):
        matmul.matmul_configs("nope", None)


@pytest.mark.parametrize("M,N,K,block_k,align", [(1, 70, 4096, 128, 1), (3, 4096, 11008, 64, 128),
                                                  (16, 70, 100, 64, 1)])
def test_split_k_covers_k_in_whole_units(M, N, K, block_k, align):
    c = MatmulConfig(16, 64, block_k)
    splits, k_split = matmul.split_k(M, N, K, c, torch.device("cpu"), align=align)
    assert k_split % block_k == 0 and k_split % align == 0
    assert (splits - 1) * k_split < K <= splits * k_split  # every column in exactly one split, none empty


def test_finish_splits_sums_partials_then_adds_bias():
    g = gen(0)
    buf, bias = torch.randn(3, 4, 5, generator=g), torch.randn(5, generator=g)
    assert_close(matmul.finish_splits(buf, bias, torch.float64), buf.double().sum(0) + bias.double(), atol=1e-6)
    assert torch.equal(matmul.finish_splits(buf[:1], bias, torch.float32), buf[0])  # one split: finished in-kernel


@needs_triton
def test_autotuned_launch_path(monkeypatch):
    """The GPU launch path (triton.autotune over several candidates) under the interpreter, timed by a CPU clock: every
    candidate runs and the tuned results are right. Split-K decode tunes only candidates of its block_k."""
    def cpu_bench(fn, quantiles=None):
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return [ms, ms, ms] if quantiles else ms

    table = {"w8a8": [MatmulConfig(64, 64, 64, 4, 1), MatmulConfig(32, 64, 32, 4, 1)],
             "wo": [MatmulConfig(64, 64, 64, 4, 1), MatmulConfig(32, 32, 64, 4, 1)],
             "i4_prefill": [MatmulConfig(64, 64, 64, 4, 1), MatmulConfig(32, 32, 64, 4, 1)],
             "i4_decode": [MatmulConfig(16, 64, 64, 4, 1), MatmulConfig(16, 32, 64, 4, 1)]}
    lookup = lambda kind, arch: table.get(kind, [matmul.INTERPRET_CONFIGS[kind]])  # noqa: E731
    for module in (int8_mm, int8_wo_mm, int4_mm):
        monkeypatch.setattr(module, "matmul_configs", lookup)
    monkeypatch.setattr(matmul, "AUTOTUNE_DO_BENCH", cpu_bench)
    g = gen(9)
    a, b = rand_int8(40, 100, gen=g), rand_int8(70, 100, gen=g)
    assert torch.equal(int8_mm.int8_matmul_int32(a.to(DEV), b.to(DEV)).long().cpu(), reference.int8_matmul_int32(a, b))
    x, w, s = torch.randn(40, 100, generator=g), torch.randint(-127, 128, (70, 100), dtype=torch.int8), torch.rand(70)
    got = int8_wo_mm.int8_weight_only_matmul(x.to(DEV), w.to(DEV), s.to(DEV))
    assert_close(got, reference.int8_weight_only_matmul(x, w, s), atol=1e-5 * magnitude(x, w.float() * s[:, None]),
                 rtol=1e-5, name="wo")
    for M in (40, 3):
        w_packed, scales, zeros = make_int4(70, 128, 64, g)
        x = torch.randn(M, 128, generator=g)
        got = int4_mm.int4_matmul(x.to(DEV), w_packed.to(DEV), scales.to(DEV), zeros.to(DEV), 64)
        w4 = reference.dequantize_int4(w_packed, scales, zeros, 64)
        assert_close(got, reference.int4_matmul(x, w_packed, scales, zeros, 64), atol=1e-5 * magnitude(x, w4),
                     rtol=1e-5, name=f"int4 M={M}")
    assert matmul.autotuned.cache_info().currsize >= 3


def test_m_bucket():
    assert [matmul.m_bucket(M) for M in (1, 2, 3, 16, 17, 512, 513, 10 ** 6)] == [1, 2, 4, 16, 32, 512, 1024,
                                                                                    matmul.M_BUCKET_MAX]


@needs_triton
def test_autotune_keys_carry_the_m_bucket(monkeypatch):
    """Each matmul launcher keys its autotuner on the M bucket: two prefill lengths in different buckets are tuned
    apart (the first length seen does not fix the config of every M), two in one bucket share a tuning."""
    def cpu_bench(fn, quantiles=None):
        fn()
        return [1.0, 1.0, 1.0] if quantiles else 1.0

    tuners = []
    real = matmul.autotuned  # cached: one tuner per kernel, candidates and key

    def recording(fn, cands, key, do_bench=None):
        tuners.append(real(fn, cands, key, do_bench))
        return tuners[-1]
    two = [MatmulConfig(64, 64, 64, 4, 1), MatmulConfig(32, 64, 32, 4, 1)]
    monkeypatch.setattr(matmul, "autotuned", recording)
    monkeypatch.setattr(matmul, "AUTOTUNE_DO_BENCH", cpu_bench)
    monkeypatch.setattr(int8_mm, "matmul_configs", lambda kind, arch: two)
    g = gen(2)
    b = rand_int8(70, 64, gen=g)
    for M in (20, 40, 60):  # buckets 32, 64, 64
        int8_mm.int8_matmul_int32(rand_int8(M, 64, gen=g).to(DEV), b.to(DEV))
    assert "M_KEY" in tuners[0].keys and len({id(t) for t in tuners}) == 1
    assert len(tuners[0].cache) == 2
