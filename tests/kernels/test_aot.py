"""Tests of the ahead-of-time compile report (kernels/aot.py): its specs cover every row of configs.csv and every
config the launchers can pick on sm_80/sm_90 (attention per head-dim bucket, int4 per group size), are typed over
exactly each kernel's arguments, and one real compile for sm_80 (no GPU needed) reports registers, spills and shared
memory and writes them back into a copy of configs.csv."""
import csv
import subprocess
import sys

import pytest
import torch

from tinyformer.kernels import aot, configs, device, flash_attention as fa, fused_rms_norm, int4_mm, matmul, w4a8_mm

needs_triton = pytest.mark.skipif(not device.HAS_TRITON, reason="needs triton")


@pytest.fixture(scope="module")
def specs():
    return aot.all_specs()


@needs_triton
def test_every_config_row_is_compiled(specs):
    compiled = {s["row"] for s in specs}
    missing = [i + 2 for i in range(len(configs.rows())) if i not in compiled]
    assert not missing, f"configs.csv lines {missing} are in no AOT spec"


@needs_triton
def test_every_launcher_choice_is_compiled(specs):
    """Whatever the launchers pick on sm_80/sm_90 for fp16/bf16 has been compiled (and spill-checked) by the report:
    same kernel, head-dim bucket or group size, variant (key padding mask, packed documents) and tile config."""
    names = {(s["name"], s["targets"][0]) for s in specs}
    bucket_rep = {fa.block_d(d): d for d in aot.ATTN_HEAD_DIMS if fa.block_d(d) == d}  # bucket -> its AOT head dim
    for arch in (80, 90):
        for dtype in (torch.float16, torch.bfloat16):
            for D in (16, 24, 40, 64, 80, 96, 112, 128, 160, 256):
                rep = bucket_rep[fa.block_d(D)]
                for kind in fa.KERNELS:
                    for has_kpm, varlen in aot.attention_variants(kind):
                        for rows in ((1, 48) if kind == "decode" else (1,)):
                            for c in fa.kernel_configs(kind, D, dtype, arch, rows=rows, has_kpm=has_kpm,
                                                       varlen=varlen):
                                name = aot.attention_spec(kind, rep, dtype, arch, c, has_kpm=has_kpm,
                                                          varlen=varlen)["name"]
                                assert (name, arch) in names, f"{name} (D={D}, sm_{arch}) is not compiled"
        for G, rows in ((32, (1, 3, 100)), (64, (1, 3, 100)), (128, (1, 3, 100)), (256, (1, 3, 100)), (96, (100,)),
                        (192, (100,))):  # groups that are not powers of two: their prefill ("i4")
            for M in rows:
                for c in int4_mm.int4_configs(M, G, arch):
                    tile = (f"{c.block_n}x{c.block_k}" if M == 1 else f"{c.block_m}x{c.block_n}x{c.block_k}") + \
                        f"_w{c.num_warps}s{c.num_stages}"
                    bucket = min(G, 128) if G & (G - 1) == 0 else G  # powers of two >= 128 compile like 128
                    name = f"int4_mm.{int4_mm.int4_kind(M, G)}_fp16_g{bucket}_{tile}"
                    assert (name, arch) in names, f"{name} (G={G}, sm_{arch}) is not compiled"
        for G in (32, 64, 128, 256, 1024):  # W4A8: spans of min(G, 256) columns
            for c in w4a8_mm.w4a8_configs(G, arch):
                name = f"w4a8_mm.w4a8_g{min(G, w4a8_mm.MAX_SPAN)}_{aot._tile(c)}"
                assert (name, arch) in names, f"{name} (G={G}, sm_{arch}) is not compiled"
        for kind, op in (("w8a8", "int8_mm.w8a8"), ("w8a8_decode", "int8_mm.w8a8_decode"),
                         ("wo", "int8_wo_mm.wo_fp16"), ("wo_decode", "int8_wo_mm.wo_decode_fp16")):
            for c in matmul.matmul_configs(kind, arch):
                assert (f"{op}_{aot._tile(c)}", arch) in names, (kind, c)


@needs_triton
def test_every_norm_launch_is_compiled(specs):
    """The fused RMSNorm and LayerNorm launchers pick BLOCK_D (D rounded up to a power of two) and the warps for it;
    the report compiles that pick at each of its widths, forward and backward, LayerNorm with and without a bias,
    fp16 and bf16, on sm_80 and sm_90 (a forward spill fails the report)."""
    names = {(s["name"], s["targets"][0]) for s in specs}
    for arch in (80, 90):
        for D in aot.NORM_WIDTHS:
            bd = fused_rms_norm._block_d(D)
            tile = f"d{bd}_w{fused_rms_norm._warps(bd)}"
            for ty in ("fp16", "bf16"):
                for way in ("fwd", "bwd"):
                    assert (f"rms_norm.{way}_{ty}_{tile}", arch) in names
                    for bias in ("bias", "nobias"):
                        assert (f"layer_norm.{way}_{ty}_{bias}_{tile}", arch) in names


@needs_triton
def test_specs_are_typed_over_exactly_the_kernel_arguments(specs):
    assert len({(s["name"], s["targets"][0]) for s in specs}) == len(specs)  # one compile per name and target
    for s in specs:
        arg_names = s["fn"].arg_names
        assert set(s["signature"]) == set(arg_names), s["name"]
        assert all(s["signature"][k] == "constexpr" for k in s["constexprs"]), s["name"]
        assert all(s["signature"][k] != "constexpr" for k in set(arg_names) - set(s["constexprs"])), s["name"]
        assert set(s["divisible_by_16"]) <= set(arg_names) - set(s["constexprs"]), s["name"]
        assert s["targets"][0] in (*aot.DEFAULT_TARGETS, 89) and s["num_warps"] in (1, 2, 4, 8, 16), s["name"]


@needs_triton
def test_aot_compiles_a_forward_config_for_sm80_and_writes_it_into_the_table(tmp_path):
    """`python -m tinyformer.kernels.aot` compiles a shipped forward config for sm_80, reports registers, spills and
    shared memory, and --write-configs refreshes that config's row of a copy of configs.csv (and no other row).
    TRITON_INTERPRET=1 is set in this process: the tool must re-run itself without it."""
    c = fa.kernel_configs("fwd", 64, torch.float16, 80)[0]
    name = aot.attention_spec("fwd", 64, torch.float16, 80, c)["name"]
    out_csv, table = tmp_path / "aot.csv", tmp_path / "configs.csv"
    res = subprocess.run([sys.executable, "-m", "tinyformer.kernels.aot", "--targets", "80", "--filter", name,
                          "--modules", "flash_attention", "--jobs", "1", "--csv", str(out_csv),
                          "--write-configs", str(table)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["name"] for r in rows] == [name], rows
    r = rows[0]
    assert r["status"] == "ok" and r["target"] == "sm_80", r
    assert int(r["registers"]) > 0 and int(r["shared"]) > 0, r
    assert int(r["spill_stores"]) == 0 and int(r["spill_loads"]) == 0, r
    assert name in res.stdout and "regs" in res.stdout
    old, new = configs.read(), configs.read(str(table))
    changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
    assert len(new) == len(old) and set(changed) <= {c.row}
    assert (new[c.row]["registers"], new[c.row]["shared_bytes"]) == (int(r["registers"]), int(r["shared"]))


def _fake_spec():
    def kern(x_ptr, stride_xm, stride_xk, M, BLOCK: "tl.constexpr"):
        pass
    kern.arg_names = ["x_ptr", "stride_xm", "stride_xk", "M", "BLOCK"]
    return dict(fn=kern, signature={"x_ptr": "*fp16", "stride_xm": "i32", "stride_xk": "constexpr", "M": "i32",
                                    "BLOCK": "constexpr"})


def test_ptx_check_finds_a_row_offset_multiplied_in_32_bits():
    """A stride read from its parameter (numbered over the runtime arguments) and multiplied by mul.lo.s32 /
    mad.lo.s32, directly or through a mov, is reported; a widening multiply (mul.wide.s32) is not."""
    head = "ld.param.b64 %rd1, [k_param_0];\n\tld.param.b32 %r2, [k_param_1];\n\tld.param.b32 %r3, [k_param_2];\n"
    narrow = head + "\tmul.lo.s32 %r9, %r7, %r2;\n\tmad.wide.s32 %rd4, %r9, 2, %rd1;\n"
    via_mov = head + "\tmov.b32 %r5, %r2;\n\tmad.lo.s32 %r9, %r7, %r5, %r8;\n"
    wide = head + "\tmul.wide.s32 %rd3, %r7, %r2;\n\tadd.s64 %rd4, %rd1, %rd3;\n\tmul.lo.s32 %r9, %r3, %r7;\n"
    spec = _fake_spec()
    assert aot.narrow_stride_products(narrow, spec) == ["stride_xm"]
    assert aot.narrow_stride_products(via_mov, spec) == ["stride_xm"]
    assert aot.narrow_stride_products(wide, spec) == []  # param 2 is M (stride_xk is a constexpr): not a stride


def test_sass_summary_reads_the_loop_the_loads_and_the_mma():
    sass = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.U16 R2, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.EF.128 R4, desc[UR4][R6.64] ;
        /*0030*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ;
        /*0040*/                   FFMA R8, R9, R10, R8 ;
        /*0050*/              @!P0 BRA 0x10 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
"""
    assert aot.sass_summary(sass) == dict(loop_instrs=5, widest_load="128", mma="HGMMA")
    rs = sass.replace("HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ", "HGMMA.64x64x16.F32 R24, R88, gdesc[UR4], R24")
    assert aot.sass_summary(rs)["mma"] == "HGMMA:RS"  # the left operand in registers
