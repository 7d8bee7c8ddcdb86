"""Quantized linear layers in a model: each equals the float layer with dequantized weights, the quantized model
stays close to the float one (SQNR), and saves/loads exactly (codes, scales, zeros, scheme in config.json)."""
import json

import pytest
import torch

import helpers
import tinyformer
from tinyformer.compress import quantize_
from tinyformer.kernels.quant import choose_qparams, dequantize, quantize, sqnr
from tinyformer.kernels.reference import dequantize_int4
from tinyformer.qlinear import FP8Linear, Int4Linear, Int8Linear, W8A8Linear


def model_pair(**kw):
    torch.manual_seed(0)
    float_model = tinyformer.build("llama-tiny", n_layer=2, **kw).eval()
    q = tinyformer.build("llama-tiny", n_layer=2, **kw).eval()
    q.load_state_dict(float_model.state_dict())
    return float_model, q


# (kwargs, minimum SQNR of the logits in dB): int8 per channel ~ 8 bits, int4 g64 ~ 4 bits of signal
@pytest.mark.parametrize("kw,min_db", [(dict(bits=8), 30.0), (dict(bits=8, activations=True), 25.0),
                                       (dict(bits=4, group_size=64), 12.0), (dict(bits=4, group_size=128), 12.0),
                                       (dict(dtype="fp8"), 20.0)])
def test_quantized_model_close_to_float_and_round_trips(kw, min_db, tmp_path):
    float_model, q = model_pair(d_model=192)  # 192 wide: at group 128, groups of 128 and 64 (a ragged last group)
    ids = torch.randint(0, 8192, (2, 40))  # M = 80 rows per matmul
    quantize_(q, **kw)
    expected = {"int8": Int8Linear, "w8a8": W8A8Linear, "int4": Int4Linear, "fp8": FP8Linear}
    kind = kw.get("dtype") or ("int4" if kw["bits"] == 4 else "w8a8" if kw.get("activations") else "int8")
    assert type(q.decoder.blocks[0].mlp.w1) is expected[kind]
    with torch.no_grad():
        ref, out = float_model(ids), q(ids)
    assert sqnr(ref, out) > min_db, sqnr(ref, out)
    q.save(tmp_path / "q")
    record = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert record["decoder.blocks.1.attn.wo"]["scheme"] == kind
    loaded = tinyformer.load(tmp_path / "q")
    for k, v in q.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert torch.equal(loaded(ids), out)  # also: loaded (memory-mapped) int8 weights are safe for torch's kernels


def test_each_layer_equals_float_matmul_with_dequantized_weight():
    torch.manual_seed(1)
    w, b, x = torch.randn(48, 128), torch.randn(48), torch.randn(5, 7, 128)
    int8 = Int8Linear.from_weight(w, b)
    w8 = dequantize(int8.weight, int8.scale, torch.zeros_like(int8.scale), group_size=-1)
    assert (w8 - w).abs().max() <= int8.scale.max() / 2 + 1e-6
    ref8 = x @ w8.T + b  # the CPU path rounds activations to bf16 (8 bits of mantissa)
    assert (int8(x) - ref8).abs().max() <= 2 ** -7 * ref8.abs().max()
    int4 = Int4Linear.from_weight(w, b, group_size=32)
    w4 = dequantize_int4(int4.weight_packed, int4.scales, int4.zeros, 32)
    assert (w4 - w).abs().max() <= int4.scales.max() / 2 + 1e-6
    ref4 = x @ w4.T + b
    assert (int4(x) - ref4).abs().max() <= 2 ** -7 * ref4.abs().max()
    assert int4(x).shape == (5, 7, 48)
    # a ragged last group (100 = 64 + 36): the same, the buffers padded to whole groups
    w, x = torch.randn(48, 100), torch.randn(5, 100)
    int4 = Int4Linear.from_weight(w, b, group_size=64)
    assert int4.weight_packed.shape == (48, 64) and int4.scales.shape == (48, 2)
    scale, zero = choose_qparams(w, 4, 64, symmetric=False)
    ref4 = x @ dequantize(quantize(w, scale, zero, 4, 64), scale, zero, 64).T + b
    assert (int4(x) - ref4).abs().max() <= 2 ** -7 * ref4.abs().max()


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_under_autocast_a_quantized_layer_returns_autocast_dtype_like_a_float_one(kind):
    """As F.linear under autocast: a float32 input is taken in autocast's dtype and the output comes back in it (QLoRA's
    activations stay bf16), while the gradient reaches the float32 input as float32."""
    torch.manual_seed(2)
    w, b = torch.randn(64, 128), torch.randn(64)
    layer = {"int8": lambda: Int8Linear.from_weight(w, b), "int4": lambda: Int4Linear.from_weight(w, b, group_size=32),
             "fp8": lambda: FP8Linear.from_weight(w, b)}[kind]()
    x = torch.randn(300, 128, requires_grad=True)  # many rows: the dequantize-then-GEMM path on CPU
    want = layer(x.detach())  # outside autocast: float32 in, float32 out
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert torch.nn.Linear(128, 64)(x).dtype == y.dtype == torch.bfloat16
    # bf16 inputs (8 bits); e4m3 codes of them (4 bits) may round a step apart from those of the float32 input
    tol = 2 ** -3 if kind == "fp8" else 2 ** -6
    assert (y.float() - want).abs().max() <= tol * want.abs().max()
    if kind != "fp8":  # the weight-only products are differentiable in x
        y.float().sum().backward()
        assert x.grad.dtype == torch.float32 and x.grad.shape == x.shape


def test_quantize_rejects_bad_arguments():
    _, q = model_pair()
    for kw, match in [(dict(bits=3), "bits must be 8 or 4"), (dict(method="gptq"), "needs calibration data"),
                      (dict(bits=4, activations=True, group_size=24), "power-of-two group_size"), (dict(bits=4, group_size=7), "positive even"),
                      (dict(dtype="int2"), "dtype must be None or 'fp8'"),
                      (dict(dtype="fp8", method="gptq"), "leave method and activations")]:
        with pytest.raises(ValueError, match=match):
            quantize_(q, **kw)
    quantize_(q, bits=8)
    with pytest.raises(ValueError, match="no float Linear layers"):
        quantize_(q, bits=8)


@pytest.mark.parametrize("kw", [dict(bits=8), dict(bits=8, activations=True), dict(bits=4, group_size=32),
                                dict(dtype="fp8")])
def test_backends_agree_on_quantized_layers(kw):
    """torch's CPU kernels (bf16 activations for weight-only), the Triton kernels (interpreter) and the reference."""
    _, q = model_pair()
    quantize_(q, **kw)
    lin = q.decoder.blocks[0].attn.wo
    x = torch.randn(9, lin.n_in)
    outs = {}
    for name in ("reference", "torch", "triton"):
        with tinyformer.use_backend(name):
            outs[name] = lin(x)
    bf16 = not kw.get("activations")  # weight-only CPU kernels compute in bf16; W8A8 accumulates exactly
    for name in ("torch", "triton"):
        err = (outs[name] - outs["reference"]).abs().max()
        bound = 2 ** -7 * outs["reference"].abs().max() if bf16 and name == "torch" else 1e-5
        assert err <= bound, (name, err, bound)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_compiles_without_frozen_weights(bits):
    """Compiled without freezing (a user's own torch.compile), the packed CPU products run as one opaque op each over
    the layers' own tensors, in one graph, and give the eager model's logits exactly."""
    model = quantize_(helpers.tiny(act="swiglu", norm="rmsnorm", pos="rope", d_model=64, vocab_size=64), bits=bits,
                      group_size=32, head=True).eval()
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
        assert torch.equal(compiled(ids), model(ids))
