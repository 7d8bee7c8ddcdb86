"""The GPU launch configurations as data (kernels/configs.csv, read by kernels/configs.py).

Every configuration a launcher can pick on a GPU runs once here, under the Triton interpreter, on a ragged shape,
against the reference: a tile size that breaks a mask, a K split or the decode combine shows up as a wrong number on
any machine, before a GPU runs it (registers and spills, which the interpreter cannot see, are the AOT report's:
test_aot.py). Rows that share a kernel, bucket, variant and tile run once: their sm80/sm90 copies and their warps and
stages differ only on a GPU. Also: the table holds exactly the keys the launchers ask for, it is measured, and the
AOT report's refresh keeps its rows.
"""
import pytest
import torch
from helpers import assert_close
from kernel_inputs import DEV, gen, magnitude, make_int4, needs_triton, rand_int8

from tinyformer.kernels import configs, flash_attention as fa, int4_mm, int8_mm, int8_wo_mm, matmul
from tinyformer.kernels import fp8_mm, per_token_quant, reference, w4a8_mm
from tinyformer.kernels.matmul import MatmulConfig

FP32_ATOL = 2e-4  # fp32 kernels against the fp64 reference: accumulation-order rounding of sums over <= 300 terms
SHIPPED_FORWARD = ("attn_fwd", "attn_decode") + matmul.KINDS  # a spill there fails the AOT check


def _unique_rows():
    """{(kernel, bucket, variant, block_m, block_n, block_k, group_m): [row indices]}"""
    cases = {}
    for i, r in enumerate(configs.rows()):
        key = (r["kernel"], r["bucket"], r["variant"], r["block_m"], r["block_n"], r["block_k"], r["group_m"])
        cases.setdefault(key, []).append(i)
    return cases


CASES = list(_unique_rows().items())
IDS = ["_".join(str(v) for v in key if v not in ("", 0)) for key, _ in CASES]


def _pin(monkeypatch, module, name, kind, cfg):
    """Make `module.name` (a config lookup taking the kind first) answer [cfg] for `kind`; returns the list of calls
    that got it, so a test can tell the pinned config was really asked for."""
    lookup, used = getattr(module, name), []

    def pinned(k, *args, **kwargs):
        if k != kind:
            return lookup(k, *args, **kwargs)
        used.append(k)
        return [cfg]
    monkeypatch.setattr(module, name, pinned)
    return used


def _qkv(B, Hq, Hkv, Tq, Tk, D, seed):
    g = gen(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(DEV) for H, T in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk)))
    kpm = torch.rand(B, Tk, generator=g) > 0.3
    kpm[:, 0] = True
    return q, k, v, kpm.to(DEV)


def _attention_case(kind, bucket, variant, cfg, monkeypatch):
    D = 16 if bucket == 16 else bucket // 2 + 4  # ragged, in the bucket: block_d(D) == bucket
    assert fa.block_d(D) == bucket
    used = _pin(monkeypatch, fa, "kernel_configs", kind, cfg)
    if kind in ("decode", "decode_combine"):
        Hq, Tq = (4, 3) if variant != "rows64" else (6, 7)  # G * Tq = 6 or 21 rows per kv head
        q, k, v, kpm = _qkv(2, Hq, 2, Tq, 300, D, seed=bucket)
        assert fa.plan(q, k, v, True, kpm, needs_grad=False).path == "decode"
        before = fa.stats["decode_split_kv"]
        with torch.no_grad():
            out = fa.attention(q, k, v, causal=True, key_padding_mask=kpm)
        assert fa.stats["decode_split_kv"] == before + 1
        want = reference.attention(q.double(), k.double(), v.double(), causal=True, key_padding_mask=kpm)
        assert_close(out, want, atol=FP32_ATOL, name=f"decode out, {cfg}")
    elif variant == "varlen":  # the packed-document forward: documents of 1, 40 and 52 tokens in one row
        q, k, v, _ = _qkv(1, 2, 1, 93, 93, D, seed=bucket)
        cu = torch.tensor([0, 1, 41, 93], dtype=torch.int32, device=DEV)
        out = fa.attention(q, k, v, causal=True, cu_seqlens=cu)
        want = reference.attention(q.double(), k.double(), v.double(), causal=True, cu_seqlens=cu)
        assert_close(out, want, atol=FP32_ATOL, name=f"varlen out, {cfg}")
    else:  # the forward, or the forward + one pinned backward kernel
        q, k, v, kpm = _qkv(1, 2, 1, 77, 93, D, seed=bucket)  # GQA 2, Tq < Tk: causal rows see 17..93 keys
        kpm = kpm if variant == "kpm" or kind != "fwd" else None
        leaves = [t.clone().requires_grad_(kind != "fwd") for t in (q, k, v)]
        out = fa.attention(*leaves, causal=True, key_padding_mask=kpm)
        ref_leaves = [t.double().requires_grad_(kind != "fwd") for t in (q, k, v)]
        want = reference.attention(*ref_leaves, causal=True, key_padding_mask=kpm)
        assert_close(out, want, atol=FP32_ATOL, name=f"out, {cfg}")
        if kind != "fwd":
            do = torch.randn(out.shape, generator=gen(1)).to(DEV)
            out.backward(do)
            want.backward(do.double())
            for name, a, b in zip(("dq", "dk", "dv"), leaves, ref_leaves):
                assert_close(a.grad, b.grad, atol=FP32_ATOL, name=f"{name}, {cfg}")
    assert used, f"the {kind} launcher never asked for its config"


MATMUL_MODULES = {"w8a8": int8_mm, "w8a8_decode": int8_mm, "wo": int8_wo_mm, "wo_decode": int8_wo_mm,
                  "quant": per_token_quant, "i4_gemv": int4_mm, "i4_decode": int4_mm, "i4": int4_mm,
                  "i4_prefill": int4_mm, "fp8": fp8_mm, "w4a8": w4a8_mm, "w4a8_e4m3": w4a8_mm}


def _matmul_case(kind, cfg, monkeypatch):
    used = _pin(monkeypatch, MATMUL_MODULES[kind], "matmul_configs", kind, cfg)
    M = {"w8a8": 37, "wo": 37, "i4": 37, "i4_prefill": 37, "w8a8_decode": 3, "wo_decode": 3, "i4_decode": 3,
         "i4_gemv": 1, "fp8": 37, "w4a8": 37, "w4a8_e4m3": 37}.get(kind)
    N, g = 70, gen(sum(map(ord, kind)))  # a seed per kind
    if kind.startswith("w8a8"):
        a, b = rand_int8(M, 200, gen=g).to(DEV), rand_int8(N, 200, gen=g).to(DEV)
        assert torch.equal(int8_mm.int8_matmul_int32(a, b).long().cpu(), reference.int8_matmul_int32(a, b).cpu())
        sa, sb, bias = (torch.rand(n, generator=g).to(DEV) for n in (M, N, N))
        got = int8_mm.int8_matmul(a, b, sa, sb, bias)
        assert_close(got, reference.int8_matmul(a, b, sa, sb, bias), atol=1e-6, rtol=1e-6, name=f"{kind} {cfg}")
    elif kind.startswith("wo"):
        x = torch.randn(M, 200, generator=g).to(DEV)
        w = torch.randint(-127, 128, (N, 200), dtype=torch.int8, generator=g).to(DEV)
        s, bias = torch.rand(N, generator=g).to(DEV), torch.randn(N, generator=g).to(DEV)
        got = int8_wo_mm.int8_weight_only_matmul(x, w, s, bias)
        assert_close(got, reference.int8_weight_only_matmul(x, w, s, bias), rtol=1e-5,
                     atol=1e-5 * magnitude(x, w.float() * s[:, None]), name=f"{kind} {cfg}")
    elif kind == "fp8":
        a, sa = reference.quantize_fp8(torch.randn(M, 200, generator=g))
        b, sb = reference.quantize_fp8(torch.randn(N, 200, generator=g))
        a, b, sa, sb = (t.to(DEV) for t in (a, b, sa, sb))
        got = fp8_mm.fp8_matmul(a, b, sa, sb, out_dtype=torch.float32)
        assert_close(got, reference.fp8_matmul(a, b, sa, sb, out_dtype=torch.float32), atol=1e-5, rtol=1e-5,
                     name=f"{kind} {cfg}")
    elif kind.startswith("w4a8"):  # G = 128: two 64-wide K tiles per span where block_k is 64
        G, K = 128, 384
        w_packed, scales, zeros = (t.to(DEV) for t in make_int4(N, K, G, g, zero_float=True))
        if kind == "w4a8":
            a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g).to(DEV)
            sa = (torch.rand(M, generator=g) * 0.01).to(DEV)
        else:  # e4m3 activations
            a, sa = (t.to(DEV) for t in reference.quantize_fp8(torch.randn(M, K, generator=g)))
        bias = torch.randn(N, generator=g).to(DEV)
        got = w4a8_mm.w4a8_matmul(a, w_packed, sa, scales, zeros, G, bias)
        want = reference.w4a8_matmul(a, w_packed, sa, scales, zeros, G, bias, out_dtype=torch.float64)
        w = reference.dequantize_int4(w_packed, scales, zeros, G)
        assert_close(got, want, atol=2e-6 * magnitude(a.float() * sa[:, None], w) + 1e-6, rtol=1e-5,
                     name=f"{kind} {cfg}")
    elif kind == "quant":
        x = torch.randn(5, 1100, generator=g).to(DEV)  # one whole K tile and a ragged one
        q, s = per_token_quant.quantize_per_token(x)
        q_ref, s_ref = reference.quantize_per_token(x.cpu())
        assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)
    else:  # "i4" is the prefill of groups that are not powers of two: 96 straddles the 64-wide K tiles
        G, K = (96, 384) if kind == "i4" else (128, 384)
        w_packed, scales, zeros = (t.to(DEV) for t in make_int4(N, K, G, g, zero_float=True))
        x, bias = torch.randn(M, K, generator=g).to(DEV), torch.randn(N, generator=g).to(DEV)
        got = int4_mm.int4_matmul(x, w_packed, scales, zeros, G, bias)
        w = reference.dequantize_int4(w_packed, scales, zeros, G)
        assert_close(got, reference.int4_matmul(x, w_packed, scales, zeros, G, bias), rtol=1e-5,
                     atol=1e-5 * magnitude(x, w), name=f"{kind} {cfg}")
    assert used, f"the {kind} launcher never asked for its config"


@needs_triton
@pytest.mark.parametrize("key, rows", CASES, ids=IDS)
def test_every_shipped_config_runs_on_a_ragged_shape(key, rows, monkeypatch):
    kernel, bucket, variant, block_m, block_n, block_k, group_m = key
    r = configs.rows()[rows[0]]
    if kernel.startswith("attn_"):
        cfg = fa.KernelConfig(block_m, block_n, r["num_warps"], r["num_stages"])
        _attention_case(kernel[len("attn_"):], int(bucket), variant, cfg, monkeypatch)
    else:
        _matmul_case(kernel, MatmulConfig(block_m, block_n, block_k, r["num_warps"], r["num_stages"], group_m),
                     monkeypatch)


def _launcher_keys():
    """Every (kernel, arch, bucket, variant) the launchers look up on a GPU."""
    keys = set()
    for fam in ("sm80", "sm90"):
        for kind in fa.KERNELS:
            for bucket in (16, 32, 64, 128, 256):
                for variant in {fa.table_variant(kind, rows, kpm, varlen) for rows in (1, 64)
                                for kpm, varlen in ((False, False), (True, False), (False, True))}:
                    keys.add(("attn_" + kind, fam, str(bucket), variant))
        keys.update((kind, fam, "", "") for kind in matmul.KINDS if fam == "sm90" or kind not in matmul.SM90_ONLY)
    return keys


def test_the_table_holds_exactly_the_keys_the_launchers_read():
    table = {(r["kernel"], r["arch"], r["bucket"], r["variant"]) for r in configs.rows()}
    assert not _launcher_keys() - table, f"no rows for {sorted(_launcher_keys() - table)}"
    assert not table - _launcher_keys(), f"rows no launcher reads: {sorted(table - _launcher_keys())}"
    with pytest.raises(ValueError, match="no attn_fwd config"):
        configs.candidates("attn_fwd", "sm80", "48")


def test_every_row_is_measured_and_no_shipped_forward_row_spills():
    for i, r in enumerate(configs.rows()):
        assert None not in [r[k] for k in configs.MEASURED], f"row {i + 2} is not measured: python -m " \
                                                              "tinyformer.kernels.aot --write-configs"
        assert r["registers"] <= 255 and r["shared_bytes"] <= 232448, r  # sm_90: 255 registers, 227 KB shared
        if r["kernel"] in SHIPPED_FORWARD:
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"row {i + 2} spills: {r}"


def test_refresh_takes_the_worst_compile_per_row_and_keeps_the_rest(tmp_path):
    table = [dict(r) for r in configs.rows()[:3]]
    res = [dict(row=0, registers=100, spill_stores=0, spill_loads=0, shared=4096, error=""),
           dict(row=0, registers=120, spill_stores=8, spill_loads=4, shared=1024, error=""),
           dict(row=1, registers=999, spill_stores=0, spill_loads=0, shared=0, error="CompilationError: x"),
           dict(row=None, registers=50, spill_stores=0, spill_loads=0, shared=0, error="")]
    new = configs.refresh(table, res)
    assert [new[0][k] for k in configs.MEASURED] == [120, 8, 4, 4096]
    assert new[1] == table[1] and new[2] == table[2]  # a failed compile and no compile leave a row as it was
    assert all(new[0][k] == table[0][k] for k in configs.FIELDS if k not in configs.MEASURED)
    path = tmp_path / "configs.csv"
    configs.write(new, str(path))
    assert configs.read(str(path)) == new


def test_the_writer_reproduces_the_shipped_file(tmp_path):
    """--write-configs rewrites configs.csv in its own format: a refresh changes only measured numbers."""
    path = tmp_path / "configs.csv"
    configs.write(list(configs.read()), str(path))
    assert path.read_text() == open(configs.PATH).read()
