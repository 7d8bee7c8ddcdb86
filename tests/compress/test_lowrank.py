"""Low-rank factorization (tinyformer.compress.lowrank): the primitives against hand-computed and independently
computed cases (exact rank-r recovery; Eckart-Young error from the eigenvalues of W W^T; the whitened optimum from the
eigenvalues of W H W^T), the rank rules by hand, ASVD/whitening beating plain SVD on inputs of very uneven scale,
and lowrank_ on tiny models: parameter count by hand, runs, saves/loads bit-exactly, composes with quantize_,
rejects bad arguments."""
import json

import pytest
import torch

import tinyformer
from tinyformer.compress import lowrank_, quantize_
from tinyformer.compress.calib import InputStats
from tinyformer.compress.lowrank import (activation_scale, asvd_factor, finetune, linear_params, output_error,
                                         rank_from_energy, rank_from_ratio, svd_factor, whiten_factor)
from tinyformer.model import Linear
from tinyformer.qlinear import Int8Linear, LowRankLinear


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """LAPACK's SVD on 2 threads of a busy 2-core machine spin-waits: lowrank_ of a 2-layer llama-tiny took 17-27 s
    there against 0.65 s on 1 thread (load average 11). These matrices are too small to gain from a second thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _uneven_inputs(n=3000, k=64, seed=0):
    """Inputs (n, k) whose column scales span 1e-2..1e2 (log-uniform), as LLM activations have outlier channels."""
    g = torch.Generator().manual_seed(seed)
    scales = 10 ** torch.linspace(-2, 2, k, dtype=torch.float64)[torch.randperm(k, generator=g)]
    return torch.randn(n, k, generator=g, dtype=torch.float64) * scales


# ----------------------------------------------------------------------------------------------------------------------
# primitives
def test_svd_factor_recovers_an_exact_rank_r_matrix():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(37, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 53, generator=g, dtype=torch.float64)
    A, B = svd_factor(W, 5)
    assert A.shape == (5, 53) and B.shape == (37, 5)
    assert torch.allclose(B @ A, W, atol=1e-10, rtol=0)
    A32, B32 = svd_factor(W.float(), 5)  # float32 in, float32 out
    assert A32.dtype == torch.float32
    assert (B32 @ A32 - W.float()).abs().max() <= 1e-5 * W.abs().max()


@pytest.mark.parametrize("rank", [1, 7, 39])
def test_svd_factor_error_is_eckart_young(rank):
    W = torch.randn(40, 70, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    A, B = svd_factor(W, rank)
    eig = torch.linalg.eigvalsh(W @ W.T).flip(0)  # sigma^2, descending, computed without an SVD
    err = ((W - B @ A) ** 2).sum()
    assert torch.allclose(err, eig[rank:].sum(), rtol=1e-9)
    # the singular values are split evenly: A A^T = B^T B = diag(sigma_1..r)
    sigma = eig[:rank].sqrt()
    assert torch.allclose(A @ A.T, torch.diag(sigma), atol=1e-9)
    assert torch.allclose(B.T @ B, torch.diag(sigma), atol=1e-9)


def test_rank_rules_by_hand():
    assert rank_from_ratio(256, 256, 0.5) == 64  # 0.5 * 65536 / 512
    assert rank_from_ratio(64, 256, 0.8) == 40  # floor(0.8 * 16384 / 320 = 40.96)
    assert rank_from_ratio(1536, 576, 0.6) == 251  # floor(0.6 * 884736 / 2112 = 251.35)
    assert rank_from_ratio(4, 4, 0.01) == 1  # never 0
    # sigma = 3, 2, 1, 1 -> sigma^2 = 9, 4, 1, 1 of 15: the top 1, 2, 3, 4 hold 60%, 86.7%, 93.3%, 100%
    for energy, r in [(0.5, 1), (0.6, 1), (0.61, 2), (0.9, 3), (0.94, 4), (1.0, 4)]:
        assert rank_from_energy(torch.tensor([3.0, 2.0, 1.0, 1.0]), energy) == r, energy
        assert rank_from_energy([1.0, 3.0, 1.0, 2.0], energy) == r, energy  # any order


def test_asvd_and_whitening_beat_svd_on_uneven_inputs():
    X = _uneven_inputs()  # (n, K)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    stats = InputStats.empty(64, hessian=True, device="cpu")
    stats.add(X)
    H = stats.hessian
    s = activation_scale(stats)  # rms(x_j)^0.5, by hand below
    assert torch.allclose(s, (X ** 2).mean(0).sqrt() ** 0.5)

    def brute(Wr):  # summed squared output error, straight from the inputs
        return float(((X @ W.T - X @ Wr.T) ** 2).sum())

    rank = 8
    errs = {}
    for name, (A, B) in {"svd": svd_factor(W, rank), "asvd": asvd_factor(W, rank, s),
                         "whiten": whiten_factor(W, rank, H, damp=0.0)}.items():
        errs[name] = output_error(W, B @ A, H)
        assert errs[name] == pytest.approx(brute(B @ A), rel=1e-8)
    assert errs["asvd"] < 0.5 * errs["svd"], errs
    assert errs["whiten"] <= errs["asvd"], errs
    # whitening is the optimum: the sum of the discarded eigenvalues of W H W^T (= (W L)(W L)^T)
    eig = torch.linalg.eigvalsh(W @ H @ W.T).flip(0)
    assert errs["whiten"] == pytest.approx(float(eig[rank:].sum()), rel=1e-6)


def test_full_rank_factors_reproduce_the_layer_with_its_bias():
    torch.manual_seed(3)
    lin = Linear(24, 10, bias=True)
    lin.reset_parameters()
    torch.nn.init.normal_(lin.bias)
    A, B = svd_factor(lin.weight, 10)
    lr = LowRankLinear.from_factors(A, B, lin.bias)
    x = torch.randn(3, 5, 24)
    assert lr(x).shape == (3, 5, 10)
    assert torch.allclose(lr(x), lin(x), atol=1e-5)
    assert torch.equal(lr.b.bias, lin.bias) and lr.a.bias is None


# ----------------------------------------------------------------------------------------------------------------------
# lowrank_ on models
def _expected_linear_params(cfg, ratio):
    """By hand: every block linear (out, in) becomes r * (out + in), r = floor(ratio * out * in / (out + in))."""
    C, F, qo, kvo = cfg.d_model, cfg.d_ff, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    shapes = [(qo, C), (kvo, C), (kvo, C), (C, qo), (F, C), (C, F)] + ([(F, C)] if cfg.act == "swiglu" else [])
    total = 0
    for out, inp in shapes:
        r = int(ratio * out * inp // (out + inp))
        total += r * (out + inp) + (out if cfg.bias else 0)
    return total * cfg.n_layer


@pytest.mark.parametrize("preset,ratio", [("llama-tiny", 0.6), ("bert-mini", 0.5)])
def test_lowrank_model_param_count_runs_saves_and_loads(preset, ratio, tmp_path):
    torch.manual_seed(4)
    model = tinyformer.build(preset, n_layer=2).eval()
    before = model.num_params()
    dense_linear = linear_params(model)
    lowrank_(model, rank_ratio=ratio)
    assert linear_params(model) == _expected_linear_params(model.config, ratio)
    assert model.num_params() == before - dense_linear + linear_params(model)
    lin = model.decoder.blocks[1].mlp.w1 if preset == "llama-tiny" else model.encoder.blocks[1].mlp.w1
    assert type(lin) is LowRankLinear and lin.rank == int(ratio * 256 * lin.n_out // (256 + lin.n_out))
    assert model.lowrank_skipped == []
    ids = torch.randint(0, 1000, (2, 24))
    out = model(ids)
    assert torch.isfinite(out).all()
    model.save(tmp_path / "m")
    record = json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]
    assert record[f"{'decoder' if preset == 'llama-tiny' else 'encoder'}.blocks.0.attn.wq"] == {
        "scheme": "lowrank", "rank": int(ratio * 256 * 256 // 512)}
    loaded = tinyformer.load(tmp_path / "m")
    assert torch.equal(loaded(ids), out)
    assert linear_params(loaded) == linear_params(model)


def test_lowrank_then_quantize_round_trips(tmp_path):
    torch.manual_seed(5)
    model = tinyformer.build("llama-tiny", n_layer=2).eval()
    lowrank_(model, rank_ratio=0.5)
    quantize_(model, bits=8)
    wq = model.decoder.blocks[0].attn.wq
    assert type(wq) is LowRankLinear and type(wq.a) is Int8Linear and type(wq.b) is Int8Linear
    ids = torch.randint(0, 8192, (2, 24))
    out = model(ids)
    model.save(tmp_path / "q")
    keys = list(json.loads((tmp_path / "q" / "config.json").read_text())["quantization"])
    assert keys.index("decoder.blocks.0.attn.wq") < keys.index("decoder.blocks.0.attn.wq.a")  # parent first
    loaded = tinyformer.load(tmp_path / "q")
    assert type(loaded.decoder.blocks[0].attn.wq.a) is Int8Linear
    assert torch.equal(loaded(ids), out)


def test_data_aware_methods_beat_svd_on_a_model_with_uneven_channels():
    """Norm weights spanning 1e-2..1e2 give the block linears inputs of very uneven scale; with calibration on the
    same tokens, ASVD and whitening change the logits less than plain SVD at the same parameter count."""
    torch.manual_seed(6)
    base = tinyformer.build("llama-tiny", n_layer=2, vocab_size=512).eval()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for blk in base.decoder.blocks:
            for norm in (blk.norm1, blk.norm2):
                norm.weight.copy_(10 ** (torch.rand(norm.weight.shape, generator=g) * 4 - 2))
    ids = torch.randint(0, 512, (8, 48), generator=g)
    with torch.no_grad():
        ref = base(ids)
    errs = {}
    for method in ("svd", "asvd", "whiten"):
        m = tinyformer.build("llama-tiny", n_layer=2, vocab_size=512).eval()
        m.load_state_dict(base.state_dict())
        lowrank_(m, rank_ratio=0.5, method=method, calib=ids)
        assert linear_params(m) == _expected_linear_params(m.config, 0.5)
        with torch.no_grad():
            errs[method] = float(((m(ids) - ref) ** 2).mean())
    assert errs["asvd"] < errs["svd"] and errs["whiten"] < errs["svd"], errs


def test_data_aware_factoring_of_a_loaded_model_matches_the_built_one(tmp_path):
    """A loaded model (its weights laid out for decoding) calibrates like the model it was saved from: the hooks on
    every linear see their inputs, so the factors are the same."""
    torch.manual_seed(9)
    built = tinyformer.build("llama-tiny", n_layer=2, vocab_size=512).eval()
    built.save(tmp_path / "m")
    loaded = tinyformer.load(tmp_path / "m")
    ids = torch.randint(0, 512, (4, 32))
    for m in (built, loaded):
        lowrank_(m, rank_ratio=0.5, method="whiten", calib=ids)
    for (name, a), b in zip(built.state_dict().items(), loaded.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_energy_rank_and_skipping():
    torch.manual_seed(7)
    model = tinyformer.build("llama-tiny", n_layer=1).eval()
    lowrank_(model, energy=1.0)  # full rank everywhere: no layer would shrink, so every one is skipped
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert len(model.lowrank_skipped) == 7
    w2 = model.decoder.blocks[0].mlp.w2.weight.detach().clone()
    lowrank_(model, energy=0.3)
    lin = model.decoder.blocks[0].mlp.w2
    assert type(lin) is LowRankLinear
    assert lin.rank == rank_from_energy(torch.linalg.eigvalsh(w2.double() @ w2.double().T).clamp(min=0).sqrt(), 0.3)
    with pytest.raises(ValueError, match="no float Linear layers to factor"):
        lowrank_(model, rank_ratio=0.5)  # the factors themselves are not factored again


def test_finetune_lowers_the_loss_and_trains_only_the_block_linears():
    torch.manual_seed(8)
    model = tinyformer.build("llama-tiny", n_layer=1, vocab_size=64, d_model=64, n_head=4, n_kv_head=2, d_ff=128)
    lowrank_(model, rank_ratio=0.5)
    ids = torch.arange(20).repeat(100) % 64  # a periodic sequence: easy to learn
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses = finetune(model, ids, steps=40, block_size=32, batch_size=4, lr=1e-2, warmup=2)
    assert len(losses) == 40
    # starts near log(64) = 4.16 (uniform over the vocabulary); learning which 20 tokens occur alone gives
    # log(20) = 3.00 (measured: 4.18 -> 2.99 in 40 steps)
    assert losses[0] > 4.0 and sum(losses[-5:]) / 5 < 3.2, (losses[0], losses[-5:])
    for k, v in model.state_dict().items():  # the factors moved; embeddings and norms did not
        assert torch.equal(v, before[k]) != (".a." in k or ".b." in k), k
    assert all(p.requires_grad for p in model.parameters()) and not model.training  # flags restored


# ----------------------------------------------------------------------------------------------------------------------
# errors
def test_bad_arguments_are_clear_errors():
    W = torch.randn(8, 12)
    for call, match in [(lambda: svd_factor(W, 0), "rank must be an int in 1..min"),
                        (lambda: svd_factor(W, 9), "rank must be an int in 1..min"),
                        (lambda: svd_factor(W[0], 2), "W must be a 2-D float tensor"),
                        (lambda: svd_factor(W.long(), 2), "W must be a 2-D float tensor"),
                        (lambda: asvd_factor(W, 2, torch.ones(8)), "scale must be a positive vector"),
                        (lambda: asvd_factor(W, 2, -torch.ones(12)), "scale must be a positive vector"),
                        (lambda: whiten_factor(W, 2, torch.eye(8)), r"hessian must be \(in, in\)"),
                        (lambda: rank_from_ratio(8, 12, 1.0), r"rank_ratio must be a number in \(0, 1\)"),
                        (lambda: rank_from_energy([1.0, 2.0], 0.0), r"energy must be a number in \(0, 1\]"),
                        (lambda: LowRankLinear(8, 12, False, 0), "rank must be a positive int")]:
        with pytest.raises(ValueError, match=match):
            call()
    model = tinyformer.build("llama-tiny", n_layer=1)
    for kw, match in [(dict(rank_ratio=0), "rank_ratio must be"), (dict(rank_ratio=1), "rank_ratio must be"),
                      (dict(rank_ratio="0.5"), "rank_ratio must be"), (dict(energy=1.5), "energy must be"),
                      (dict(method="qr"), "method must be one of svd, asvd, whiten"),
                      (dict(method="asvd"), "needs calibration data"),
                      (dict(method="whiten", calib=torch.randn(2, 8)), "integer token-id"),
                      (dict(method="asvd", calib=torch.zeros(2, 8, dtype=torch.long), alpha=-1), "alpha must be")]:
        with pytest.raises(ValueError, match=match):
            lowrank_(model, **kw)
    with pytest.raises(TypeError, match="model must be a tinyformer model"):
        lowrank_(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="decoder language model"):
        finetune(tinyformer.build("bert-mini", n_layer=1), torch.arange(100), steps=1)
    with pytest.raises(ValueError, match="train must be 'linears' or 'all'"):
        finetune(model, torch.arange(100), steps=1, block_size=8, train="factors")
    quantize_(model, bits=8)
    with pytest.raises(ValueError, match="no float Linear layers to factor"):
        lowrank_(model)
