"""Tests of the fused Triton attention (kernels/flash_attention.py): forward, backward and split-KV decode.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 first).
Accuracy rule, as in the FlashAttention-2 tests (Dao 2023): against the fp64 reference (`reference.attention` on
.double() inputs), the kernel's max error must be at most 2x the max error of plain torch at the same precision
(`reference.attention(..., upcast=False)` in the input dtype) plus a floor per dtype, written next to the dtype in
DTYPES and scaled by max(1, max|reference|). Forward and the three gradients are checked the same way.

Also here: the split-KV decode path (and that it really was taken), determinism of the backward, argument errors
raised before any launch, the CPU path without the interpreter (SDPA) and without triton, and the GPU autotune
wrapper driven by a CPU timer. Every shipped GPU config is run in tests/kernels/test_configs.py, compiled in
test_aot.py.
"""
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyformer.kernels import device
from tinyformer.kernels import flash_attention as fa
from tinyformer.kernels import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    not device.HAS_TRITON or (DEVICE == "cpu" and not device.INTERPRET),
    reason="needs triton and a CUDA device or TRITON_INTERPRET=1 (set by tests/conftest.py on CPU)")

# dtype, floor: fp16/bf16 floors are about one rounding step of the dtype at |x| ~ 1 (bf16: 2^-7; the interpreter
# also truncates fp32 -> bf16 stores instead of rounding, shared/TRITON_ON_CPU.md). fp32: where the exact gradient
# is 0 plain torch can be exactly 0 too, while FlashAttention's dS = P * (dP - delta) cancels two separately summed
# fp32 values: measured 1.16e-5 in dK for Tk=1 (P = 1) with 3 x 77 query rows, so the fp32 floor is 5e-5.
DTYPES = [
    pytest.param(torch.float32, 5e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 8e-3, id="bf16"),
]
FLOOR = {p.values[0]: p.values[1] for p in DTYPES}


# ----------------------------------------------------------------------------------------------------------------------
# helpers
def assert_close_by_rule(name, got, want64, plain, floor):
    """|got - want64| <= 2 * max|plain - want64| + floor * max(1, max|want64|) elementwise, no NaN."""
    base = (plain.double() - want64).abs().max().item()
    tol = 2 * base + floor * max(1.0, want64.abs().max().item())
    assert_close(got, want64, atol=tol, name=f"{name} [plain torch error {base:.3g}]")


def make_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, layout="contiguous", seed=0, device=DEVICE):
    """q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D). layout "bthd": views of (B, T, H, D) tensors (the layout a
    projection gives before transposing); "cache": k and v are the first Tk positions of a longer cache."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if layout == "bthd":
        q = rnd(B, Tq, Hq, D).transpose(1, 2)  # (B, Hq, Tq, D), strides of (B, Tq, Hq, D)
        k = rnd(B, Tk, Hkv, D).transpose(1, 2)
        v = rnd(B, Tk, Hkv, D).transpose(1, 2)
    elif layout == "cache":
        q = rnd(B, Hq, Tq, D)
        k = rnd(B, Hkv, Tk + 13, D)[:, :, :Tk]  # (B, Hkv, Tk, D) slice of a longer cache
        v = rnd(B, Hkv, Tk + 13, D)[:, :, :Tk]
    else:
        q, k, v = rnd(B, Hq, Tq, D), rnd(B, Hkv, Tk, D), rnd(B, Hkv, Tk, D)
    return q, k, v


def make_mask(kind, B, Tk, seed=0, device=DEVICE):
    """None, "random" (~30% padded keys, at least one kept per row) or "empty_row" (batch 0 fully padded)."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed + 1)
    m = torch.rand(B, Tk, generator=g) > 0.3
    m[:, 0] = True
    if kind == "empty_row":
        m[0] = False
    return m.to(device)


def run_fwd_bwd(B, Hq, Hkv, Tq, Tk, D, dtype, causal, mask_kind=None, layout="contiguous", seed=0, floor=None):
    """Kernel vs fp64 reference vs plain torch in `dtype`, forward and the three gradients."""
    floor = FLOOR[dtype] if floor is None else floor
    q, k, v = make_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, layout, seed)
    kpm = make_mask(mask_kind, B, Tk, seed)
    g = torch.Generator().manual_seed(seed + 2)
    do = torch.randn(B, Hq, Tq, D, generator=g).to(device=DEVICE, dtype=dtype)

    def grads(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, causal=causal, key_padding_mask=kpm)
        out.backward(cast(do))
        return [out] + [t.grad for t in leaves]

    want = grads(ref.attention, lambda t: t.double())
    plain = grads(lambda *a, **kw: ref.attention(*a, **kw, upcast=False), lambda t: t)
    got = grads(fa.attention, lambda t: t)
    for name, g_, w_, p_ in zip(("out", "dq", "dk", "dv"), got, want, plain):
        assert g_.dtype == dtype and g_.shape == w_.shape
        assert_close_by_rule(f"{name} [{dtype}, causal={causal}, mask={mask_kind}, {layout}]", g_, w_, p_, floor)
    return got


# ----------------------------------------------------------------------------------------------------------------------
# parametrized grid: ragged lengths, Tq < Tk and Tq > Tk, GQA ratios 1/2/3, head dims 16..256, strides
SHAPES = [  # (B, Hq, Hkv, Tq, Tk, D, layout)
    (1, 2, 2, 1, 1, 16, "contiguous"),
    (2, 3, 1, 77, 130, 64, "contiguous"),  # MQA, Tq < Tk
    (1, 4, 2, 130, 77, 80, "bthd"),  # GQA 2, Tq > Tk (causal: 53 rows see nothing)
    (1, 6, 2, 33, 33, 96, "contiguous"),  # GQA 3
    (1, 2, 1, 7, 70, 128, "cache"),
    (1, 1, 1, 40, 17, 256, "bthd"),
]


@needs_kernels
@pytest.mark.parametrize("dtype, floor", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B, Hq, Hkv, Tq, Tk, D, layout", SHAPES, ids=[f"{s[3]}x{s[4]}d{s[5]}" for s in SHAPES])
def test_grid_forward_backward(B, Hq, Hkv, Tq, Tk, D, layout, causal, dtype, floor):
    mask_kind = "random" if (Tq + Tk) % 2 else None  # half of the shapes with a padding mask
    run_fwd_bwd(B, Hq, Hkv, Tq, Tk, D, dtype, causal, mask_kind, layout, seed=Tq * 1000 + Tk, floor=floor)


# ~0.4 s per example under the interpreter on 2 cores; TINYFORMER_PROPERTY_EXAMPLES=1000 for a long soak
PROPERTY_EXAMPLES = int(os.environ.get("TINYFORMER_PROPERTY_EXAMPLES", "100"))


@needs_kernels
@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]),
    Tq=st.sampled_from([1, 7, 16, 33, 77, 130]),
    Tk=st.sampled_from([1, 7, 16, 33, 77, 130]),
    D=st.sampled_from([16, 40, 64, 80, 96, 128]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    causal=st.booleans(),
    mask_kind=st.sampled_from([None, "random", "empty_row"]),
    layout=st.sampled_from(["contiguous", "bthd", "cache"]),
    seed=st.integers(0, 2 ** 16),
)
def test_property_forward_backward(B, Hkv, group, Tq, Tk, D, dtype, causal, mask_kind, layout, seed):
    if B * Hkv * group > 6:  # keep interpreter time bounded: at most 6 (batch, head) programs per query tile
        B = 1
    run_fwd_bwd(B, Hkv * group, Hkv, Tq, Tk, D, dtype, causal, mask_kind, layout, seed)


# ----------------------------------------------------------------------------------------------------------------------
# rows that see no key
@needs_kernels
@pytest.mark.parametrize("dtype, floor", DTYPES)
def test_rows_without_keys_are_zero_and_gradients_finite(dtype, floor):
    B, Hq, Hkv, Tq, Tk, D = 2, 2, 1, 20, 9, 32
    kpm = torch.ones(B, Tk, dtype=torch.bool, device=DEVICE)
    kpm[1] = False  # batch 1: every key padded
    kpm[0, 3] = False
    q, k, v = (t.requires_grad_() for t in make_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, seed=5))
    out = fa.attention(q, k, v, causal=True, key_padding_mask=kpm)
    out.sum().backward()
    assert torch.all(out[1] == 0), "fully padded batch must give 0"
    assert torch.all(out[0, :, : Tq - Tk] == 0), "causal rows i < Tq - Tk see no key and must give 0"
    for name, t in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
    assert torch.all(q.grad[1] == 0) and torch.all(k.grad[1] == 0) and torch.all(v.grad[1] == 0)
    assert torch.all(k.grad[0, :, 3] == 0) and torch.all(v.grad[0, :, 3] == 0), "a padded key gets no gradient"


# ----------------------------------------------------------------------------------------------------------------------
# decode: split-KV (flash-decoding)
@needs_kernels
@pytest.mark.parametrize("dtype, floor", DTYPES)
@pytest.mark.parametrize("Tq, Hq, Hkv, causal, mask_kind", [
    (1, 8, 2, True, None),  # one new token, GQA 4: 4 query heads packed into the rows of one program
    (5, 3, 3, True, "random"),  # a 5-token verify step, causal inside the step
    (16, 6, 2, False, "random"),  # G * Tq = 48 rows: the 64-row decode tile
])
def test_decode_split_kv(Tq, Hq, Hkv, causal, mask_kind, dtype, floor):
    B, Tk, D = 2, 300, 64
    q, k, v = make_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, layout="cache", seed=Tq)
    kpm = make_mask(mask_kind, B, Tk, seed=Tq)
    p = fa.plan(q, k, v, causal, kpm)
    assert p.path == "decode" and p.num_splits > 1, p
    assert p.num_splits * p.chunk >= Tk > (p.num_splits - 1) * p.chunk, p
    before = fa.stats["decode_split_kv"]
    with torch.no_grad():
        out = fa.attention(q, k, v, causal=causal, key_padding_mask=kpm)
    assert fa.stats["decode_split_kv"] == before + 1, "the split-KV path was not taken"
    want = ref.attention(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=kpm)
    plain = ref.attention(q, k, v, causal=causal, key_padding_mask=kpm, upcast=False)
    assert out.dtype == dtype
    assert_close_by_rule(f"decode out [{dtype}]", out, want, plain, floor)


@needs_kernels
def test_decode_not_used_when_gradients_are_needed():
    q, k, v = make_inputs(1, 2, 1, 1, 300, 32, torch.float32)
    assert fa.plan(q, k, v).path == "decode"
    assert fa.plan(q.requires_grad_(), k, v).path == "flash"


# ----------------------------------------------------------------------------------------------------------------------
# determinism, autotune wrapper
@needs_kernels
def test_backward_is_deterministic():
    """dK/dV of a kv head are reduced inside one program (no atomics): two backward passes agree bit for bit."""
    q, k, v = make_inputs(1, 6, 2, 77, 100, 64, torch.float16, seed=3)
    kpm = make_mask("random", 1, 100, seed=3)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(q)
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        fa.attention(*leaves, causal=True, key_padding_mask=kpm).backward(do)
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        assert torch.equal(a, b), f"{name} differs between two identical backward passes"


def test_dkdv_grid_widens_for_few_kv_heads(monkeypatch):
    """The dK/dV grid is one program per K/V tile and kv head: with MQA/GQA and few tiles it splits the query heads
    over more programs (about a wave on the GPU), never more splits than heads; MHA and full grids stay unsplit."""
    monkeypatch.setattr(fa, "num_sms", lambda index: 132)
    monkeypatch.setattr(fa, "cuda_index", lambda device: 0)
    cuda = torch.device("cuda")
    for programs, G in ((32, 8), (32, 32), (4, 3), (100, 2)):
        S, per = fa.dkdv_head_splits(programs, G, cuda)
        assert S > 1 and (S - 1) * per < G <= S * per and programs * S <= 2 * 132, (programs, G, S, per)
    assert fa.dkdv_head_splits(1024, 8, cuda) == (1, 8)  # enough programs already
    assert fa.dkdv_head_splits(32, 1, cuda) == (1, 1)  # MHA: nothing to split
    assert fa.dkdv_head_splits(4, 3, torch.device("cpu")) == (2, 2)  # interpreter: 2 uneven splits, summed


def _cpu_bench(fn, quantiles=None):
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms, ms, ms]


@needs_kernels
def test_autotune_wrapper_with_two_configs():
    """The GPU path wraps the forward in triton.autotune over the heuristic's candidates; drive that wrapper here
    with two configs and a CPU timer (the default timer needs a GPU)."""
    if DEVICE != "cpu":
        pytest.skip("CPU timer test; the GPU uses triton's own benchmarker")
    q, k, v = make_inputs(1, 2, 1, 70, 90, 32, torch.float32, seed=7)
    cands = [fa.KernelConfig(32, 64, 4, 1), fa.KernelConfig(16, 32, 4, 1)]
    out, lse = fa._flash_fwd(q, k, v, True, 32 ** -0.5, None, configs=cands, do_bench=_cpu_bench)
    tuner = fa._autotuned_fwd(tuple(cands), _cpu_bench)
    assert len(tuner.cache) == 1 and tuner.best_config.kwargs["BLOCK_M"] in (16, 32)
    want = ref.attention(q.double(), k.double(), v.double(), causal=True)
    assert (out.double() - want).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# wrong inputs: ValueError/TypeError naming the argument, before any launch
def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device) if device != "meta" else torch.empty(*shape, device="meta")


BAD_INPUTS = [  # (id, q, k, v, kwargs, exception, text in message)
    ("q_3d", _t(2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {}, ValueError, "q must be 4-D"),
    ("k_v_shapes", _t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 9, 16), {}, ValueError, "k and v"),
    ("head_dim_mismatch", _t(1, 2, 8, 32), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {}, ValueError, "head dim"),
    ("batch_mismatch", _t(2, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {}, ValueError, "batch"),
    ("hq_not_multiple", _t(1, 3, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {}, ValueError, "multiple"),
    ("d8", _t(1, 2, 8, 8), _t(1, 2, 8, 8), _t(1, 2, 8, 8), {}, ValueError, "16..256"),
    ("d300", _t(1, 1, 4, 300), _t(1, 1, 4, 300), _t(1, 1, 4, 300), {}, ValueError, "16..256"),
    ("mixed_dtypes", _t(1, 2, 8, 16, dtype=torch.float16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {}, TypeError,
     "share a dtype"),
    ("int_dtype", torch.ones(1, 2, 8, 16, dtype=torch.int32), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {}, TypeError,
     "q must be float"),
    ("mixed_devices", _t(1, 2, 8, 16), _t(1, 2, 8, 16, device="meta"), _t(1, 2, 8, 16), {}, ValueError,
     "one device"),
    ("mask_shape", _t(2, 2, 8, 16), _t(2, 2, 8, 16), _t(2, 2, 8, 16),
     {"key_padding_mask": torch.ones(2, 9, dtype=torch.bool)}, ValueError, "key_padding_mask must have shape"),
    ("mask_dtype", _t(2, 2, 8, 16), _t(2, 2, 8, 16), _t(2, 2, 8, 16),
     {"key_padding_mask": torch.ones(2, 8)}, TypeError, "key_padding_mask must be bool"),
    ("q_not_tensor", [[1.0]], _t(1, 2, 8, 16), _t(1, 2, 8, 16), {}, TypeError, "q must be a torch.Tensor"),
    ("scale_str", _t(1, 2, 8, 16), _t(1, 2, 8, 16), _t(1, 2, 8, 16), {"scale": "0.1"}, TypeError, "scale"),
]


@pytest.mark.parametrize("name, q, k, v, kwargs, exc, text", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_wrong_inputs_raise_before_launch(name, q, k, v, kwargs, exc, text):
    before = dict(fa.stats)
    with pytest.raises(exc, match=text):
        fa.attention(q, k, v, **kwargs)
    assert dict(fa.stats) == before, "something was launched before the arguments were rejected"


# ----------------------------------------------------------------------------------------------------------------------
# the CPU paths without the interpreter, and without triton
_CPU_SCRIPT = r"""
import os, sys
if sys.argv[1] == "no_triton":
    sys.modules["triton"] = None  # import triton -> ImportError
import torch
from tinyformer.kernels import device, flash_attention as fa, reference as ref
assert device.HAS_TRITON == (sys.argv[1] != "no_triton"), device.HAS_TRITON
g = torch.Generator().manual_seed(0)
q = torch.randn(2, 4, 37, 40, generator=g, requires_grad=True)
k = torch.randn(2, 2, 53, 40, generator=g, requires_grad=True)
v = torch.randn(2, 2, 53, 40, generator=g, requires_grad=True)
m = torch.rand(2, 53, generator=g) > 0.3
m[1] = False
assert fa.plan(q, k, v, True, m).backend == "sdpa"
out = fa.attention(q, k, v, causal=True, key_padding_mask=m)
want = ref.attention(q.double(), k.double(), v.double(), causal=True, key_padding_mask=m)
assert (out.double() - want).abs().max().item() < 1e-5, (out.double() - want).abs().max()
out.sum().backward()
assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
assert fa.stats["sdpa"] == 1 and fa.stats["flash_fwd"] == 0, fa.stats
print("CPU-PATH-OK")
"""


@pytest.mark.parametrize("mode", ["no_interpreter", "no_triton"])
def test_cpu_path_without_interpreter(mode, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "cpu_path.py"
    script.write_text(_CPU_SCRIPT)
    res = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "CPU-PATH-OK" in res.stdout, res.stdout + res.stderr


# ----------------------------------------------------------------------------------------------------------------------
# packed documents (cu_seqlens, flash-attn's varlen convention)
def make_cu_seqlens(lens, device=DEVICE):
    """(n_docs + 1,) int32 offsets of documents with these lengths, in order."""
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


VARLEN_SHAPES = [  # (B, Hq, Hkv, T, D, document lengths over all rows): under the interpreter's 32x64 tiles,
    # tiles straddle documents, documents span several tiles, and long documents have whole unmasked key tiles
    (1, 2, 1, 105, 64, [1, 7, 33, 64]),  # GQA 2
    (2, 3, 3, 100, 16, [70, 30, 1, 99]),
    (2, 4, 2, 130, 80, [129, 1, 5, 0, 100, 25]),  # an empty document; GQA 2, D padded to 128
]


@needs_kernels
@pytest.mark.parametrize("dtype, floor", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B, Hq, Hkv, T, D, lens", VARLEN_SHAPES, ids=[f"T{s[3]}d{s[4]}" for s in VARLEN_SHAPES])
def test_varlen_forward_backward(B, Hq, Hkv, T, D, lens, causal, dtype, floor):
    """The varlen kernels against the fp64 reference, forward and dq, dk, dv, by the 2x-plain-torch rule; q is a
    transposed (B, T, H, D) view, as a model's projection gives it."""
    cu = make_cu_seqlens(lens)
    q, k, v = make_inputs(B, Hq, Hkv, T, T, D, dtype, layout="bthd", seed=T)
    do = torch.randn(B, Hq, T, D, generator=torch.Generator().manual_seed(T + 1)).to(device=DEVICE, dtype=dtype)

    def grads(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, causal=causal, cu_seqlens=cu)
        out.backward(cast(do))
        return [out] + [t.grad for t in leaves]

    before = fa.stats["flash_bwd"]
    got = grads(fa.attention, lambda t: t)
    assert fa.stats["flash_bwd"] == before + 1, "the Triton backward did not run"
    want = grads(ref.attention, lambda t: t.double())
    plain = grads(lambda *a, **kw: ref.attention(*a, **kw, upcast=False), lambda t: t)
    for name, g_, w_, p_ in zip(("out", "dq", "dk", "dv"), got, want, plain):
        assert g_.dtype == dtype and g_.shape == w_.shape
        assert_close_by_rule(f"varlen {name} [{dtype}, causal={causal}, docs {lens}]", g_, w_, p_, floor)


def test_document_mask_is_block_diagonal():
    """Documents [0, 2) and [2, 3) of row 0 and the whole row 1 (T = 3): attention stays inside each."""
    cu = torch.tensor([0, 2, 3, 6])
    m = ref.document_mask(cu, 2, 3, causal=False)[:, 0].int().tolist()
    assert m == [[[1, 1, 0], [1, 1, 0], [0, 0, 1]], [[1, 1, 1], [1, 1, 1], [1, 1, 1]]]
    m = ref.document_mask(cu, 2, 3, causal=True)[:, 0].int().tolist()
    assert m == [[[1, 0, 0], [1, 1, 0], [0, 0, 1]], [[1, 0, 0], [1, 1, 0], [1, 1, 1]]]


BAD_CU_SEQLENS = [  # (id, cu_seqlens for B=2, T=8, other kwargs, text in message)
    ("float", torch.tensor([0.0, 8.0, 16.0]), {}, "int32/int64"),
    ("2d", torch.tensor([[0, 8, 16]], dtype=torch.int32), {}, "1-D"),
    ("not_tensor", [0, 8, 16], {}, "torch.Tensor"),
    ("start", torch.tensor([1, 8, 16], dtype=torch.int32), {}, "start at 0"),
    ("end", torch.tensor([0, 8, 15], dtype=torch.int32), {}, "end at B \\* T = 16"),
    ("decreasing", torch.tensor([0, 8, 5, 16], dtype=torch.int32), {}, "non-decreasing"),
    ("crosses_rows", torch.tensor([0, 5, 12, 16], dtype=torch.int64), {}, "row boundary"),
    ("with_mask", torch.tensor([0, 8, 16], dtype=torch.int32),
     {"key_padding_mask": torch.ones(2, 8, dtype=torch.bool)}, "key_padding_mask"),
    ("cross_attention", torch.tensor([0, 8, 16], dtype=torch.int32), {"k_len": 9}, "Tq == Tk"),
]


@pytest.mark.parametrize("name, cu, kwargs, text", BAD_CU_SEQLENS, ids=[b[0] for b in BAD_CU_SEQLENS])
def test_wrong_cu_seqlens_raise_before_launch(name, cu, kwargs, text):
    kwargs = dict(kwargs)
    Tk = kwargs.pop("k_len", 8)
    q, k, v = _t(2, 2, 8, 16), _t(2, 1, Tk, 16), _t(2, 1, Tk, 16)
    before = dict(fa.stats)
    for fn in (fa.attention, ref.attention):
        with pytest.raises(ValueError, match=text):
            fn(q, k, v, cu_seqlens=cu, **kwargs)
    assert dict(fa.stats) == before, "something was launched before the arguments were rejected"
