"""Data and training tests: tokenizers round-trip, token files validate, a tiny run's loss falls, resume is exact,
torchrun with 2 processes follows one process, the CLI fails with one clear line."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from tinyformer import data
from tinyformer.train import TrainConfig, _gated, lr_at, train

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "tiny.txt").write_text(TEXT)
    data.prepare(str(d / "tiny.txt"), d / "prepared", "char")
    return d


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_tokenizers_round_trip(kind, tmp_path):
    text = "Speak, speak.\nYou are all resolved rather to die than to famish?\n" * 20
    if kind == "char":
        tok = data.char_tokenizer(text)
    elif kind == "word":
        tok = data.word_tokenizer(text)
    else:
        (tmp_path / "t.txt").write_text(text)
        tok = data.bpe_tokenizer([str(tmp_path / "t.txt")], vocab_size=300)
    ids = data.encode(tok, text, chunk_chars=50)  # several chunks
    assert len(ids) > 0
    decoded = tok.decode(ids.tolist())
    assert decoded == (" ".join(text.split()) if kind == "word" else text)


def test_prepared_dataset_and_token_files(corpus, tmp_path):
    d = data.TokenData(corpus / "prepared")
    assert d.meta["train_tokens"] + d.meta["val_tokens"] == len(TEXT)
    assert d.tokenizer.decode(np.asarray(d.splits["train"][:40]).tolist()) == TEXT[:40]
    x, y = d.get_batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="fewer than one block"):
        d.check_block_size(10_000)
    raw = (corpus / "prepared" / "train.bin").read_bytes()
    (tmp_path / "bad.bin").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="truncated"):
        data.read_ids(tmp_path / "bad.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a token file at all")
    with pytest.raises(ValueError, match="not a tinyformer token file"):
        data.read_ids(tmp_path / "junk.bin")


def test_play_conversion_layout():
    md = "# Play\n\n## ACT I\n\n_Enter A_\n\n**FIRST LORD**  \nHello there,  \nfriend.\n\n_Exit B_\n\nStill me.\n"
    assert data.play_to_text(md) == "First Lord:\nHello there,\nfriend.\nStill me.\n"


def _cfg(corpus, out, **kw):
    base = dict(data=str(corpus / "prepared"), out_dir=str(out), batch_size=8, block_size=32, max_iters=40,
                lr_decay_iters=40, warmup_iters=5, eval_interval=20, eval_iters=2, log_interval=1,
                progress=False, plot=False, model=dict(n_layer=1, n_head=2, d_model=32))
    return TrainConfig(**{**base, **kw})


def _losses(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_tiny_training_run_loss_decreases(corpus, tmp_path):
    s = train(_cfg(corpus, tmp_path / "run", max_iters=60, lr_decay_iters=60))
    rows = _losses(tmp_path / "run")
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0] - 0.5, val
    assert all(k in rows[1] for k in ("iter", "loss", "lr", "dt_ms", "tokens_per_s"))
    assert s["iters"] == 60
    import tinyformer
    model = tinyformer.load(tmp_path / "run")  # the out_dir is a loadable model folder
    assert model.tokenizer is not None and model.config.n_layer == 1


@pytest.mark.parametrize("average", [{}, {"ema_decay": 0.9}, {"ema_power": 2.0}, {"optimizer": "muon"}])
def test_resume_ends_exactly_where_the_uninterrupted_run_ends(corpus, tmp_path, average):
    full = train(_cfg(corpus, tmp_path / "full", **average))
    train(_cfg(corpus, tmp_path / "part", max_iters=20, **average))  # checkpoint at iteration 20...
    resumed = train(_cfg(corpus, tmp_path / "part", resume=True, **average))  # ...continued to 40
    assert resumed["val_loss"] == full["val_loss"]
    assert resumed["ema_val_loss"] == full["ema_val_loss"]  # the power average needs its step count back too
    assert (full["ema_val_loss"] is None) == ("optimizer" in average or not average)
    a = [r["loss"] for r in _losses(tmp_path / "full") if "loss" in r]
    b = [r["loss"] for r in _losses(tmp_path / "part") if "loss" in r]
    assert a == b
    import tinyformer
    sa, sb = (tinyformer.load(tmp_path / d).state_dict() for d in ("full", "part"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    if average:  # resuming needs the average, or the optimizer state, the checkpoint holds
        train(_cfg(corpus, tmp_path / "plain", max_iters=20))
        with pytest.raises(ValueError, match="holds the state of adamw" if "optimizer" in average else
                           "holds no weight average"):
            train(_cfg(corpus, tmp_path / "plain", resume=True, **average))


def test_muon_run_learns(corpus, tmp_path):
    s = train(_cfg(corpus, tmp_path / "run", optimizer="muon", max_iters=60, lr_decay_iters=60))
    val = [r["val_loss"] for r in _losses(tmp_path / "run") if "val_loss" in r]
    assert val[-1] < val[0] - 0.5, val
    assert s["iters"] == 60


def test_target_loss_stops_at_the_first_evaluation_reaching_it(corpus, tmp_path):
    train(_cfg(corpus, tmp_path / "full", eval_train=False))
    evals = {r["iter"]: r["val_loss"] for r in _losses(tmp_path / "full") if "val_loss" in r}
    assert sorted(evals) == [0, 20, 40] and evals[20] < evals[0]
    # runs are deterministic, so a run with iteration 20's loss as its target stops there
    s = train(_cfg(corpus, tmp_path / "target", target_loss=evals[20], eval_train=False))
    assert s["iters"] == 20 and s["val_loss"] == evals[20] and s["train_loss"] is None
    assert max(r["iter"] for r in _losses(tmp_path / "target")) == 20


def test_target_gate_evaluates_only_near_the_target(corpus, tmp_path, monkeypatch):
    """An evaluation point runs only where the validation loss predicted from training (the mean training loss since
    the previous point, plus the validation-minus-training gap of the last evaluation) is at most target_loss +
    target_gate, and at the end; the run still stops at the first evaluation reaching the target."""
    kw = dict(eval_train=False, eval_interval=5, max_iters=60, lr_decay_iters=60)
    train(_cfg(corpus, tmp_path / "full", **kw))
    target = {r["iter"]: r["val_loss"] for r in _losses(tmp_path / "full") if "val_loss" in r}[40]
    gate = 0.3  # wide: several evaluations before the target, each setting the gap the next prediction uses
    s = train(_cfg(corpus, tmp_path / "gated", target_loss=target, target_gate=gate, **kw))
    rows = _losses(tmp_path / "gated")
    step_loss = {r["iter"]: r["loss"] for r in rows if "loss" in r}
    evaluated = {r["iter"]: r["val_loss"] for r in rows if "val_loss" in r}
    points, gap = range(0, s["iters"] + 1, 5), 0.0
    for it in points:
        window = [step_loss[i] for i in range(it - 5, it) if i in step_loss]  # none before iteration 0
        mean = sum(window) / len(window) if window else math.inf
        assert (it in evaluated) == (mean + gap <= target + gate or it == kw["max_iters"]), (it, mean, gap, evaluated)
        if it in evaluated and window:
            gap = evaluated[it] - mean
    assert len(evaluated) < len(points)  # some were skipped, the first one at least
    assert s["val_loss"] <= target and all(v > target for it, v in evaluated.items() if it < s["iters"])
    # a gap measured at one evaluation, whole or stopped by its screen, holds the next ones back: here validation runs
    # far above training
    import tinyformer.train as T
    for screened in (False, True):
        calls = []
        monkeypatch.setattr(T, "evaluate", lambda run, screen=None: calls.append(run.it) or (
            {"screened_val_loss": 5.0} if screened and screen is not None else {"val_loss": 5.0}))
        train(_cfg(corpus, tmp_path / f"gap{screened}", target_loss=target, target_gate=gate, **kw))
        assert len(calls) == 2 and calls[0] > 0 and calls[1] == kw["max_iters"], (screened, calls)
    # the rule itself: skip while the prediction is above target + gate, or when there is no prediction yet
    cfg = _cfg(corpus, tmp_path / "rule", target_loss=2.0, target_gate=0.1)
    assert [_gated(cfg, losses) for losses in ([1.5, 2.0], [2.05, 2.09], [2.1, 2.2], [])] == [False, False, True, True]
    assert [_gated(cfg, [2.0], gap) for gap in (-0.2, 0.05, 0.15)] == [False, False, True]
    assert not _gated(_cfg(corpus, tmp_path / "rule", target_loss=2.0), [9.0])  # no gate: never skips
    assert not _gated(_cfg(corpus, tmp_path / "rule", target_gate=0.0), [9.0])  # no target: never skips


def test_evaluations_leave_the_training_batches_alone(corpus, tmp_path):
    # how often and how far a run evaluates (the gate, the screen, eval_iters) changes none of its training losses
    a = train(_cfg(corpus, tmp_path / "a", max_iters=12, lr_decay_iters=12, eval_interval=3, eval_iters=3))
    b = train(_cfg(corpus, tmp_path / "b", max_iters=12, lr_decay_iters=12, eval_interval=12, eval_iters=1))
    loss = [[r["loss"] for r in _losses(tmp_path / out) if "loss" in r] for out in ("a", "b")]
    assert len(loss[0]) == 12 and loss[0] == loss[1], loss
    assert a["val_loss"] != b["val_loss"]  # the last evaluation itself differs: 3 batches against 1


def test_a_screened_evaluation_stops_early_only_far_above_its_target(corpus, tmp_path, monkeypatch):
    import tinyformer.train as T
    monkeypatch.setattr(T, "EVAL_ROWS", 8)  # one batch a pass: the first fifth of 20 batches is 4 passes
    run = T.setup(_cfg(corpus, tmp_path / "run", eval_iters=20, eval_train=False))
    start = run.eval_gen.get_state()
    full = T.evaluate(run)["val_loss"]
    run.eval_gen.set_state(start)
    screened = T.evaluate(run, screen=full / 2)  # far above: stopped after 4 of the 20 batches, with their mean
    drawn = run.eval_gen.get_state()
    run.eval_gen.set_state(start)
    with torch.inference_mode():
        first = [T.compute_loss(run, T.get_batch(run, "val", run.eval_gen)).item() for _ in range(4)]
    assert torch.equal(run.eval_gen.get_state(), drawn)
    assert set(screened) == {"screened_val_loss"} and math.isclose(screened["screened_val_loss"], sum(first) / 4,
                                                                    rel_tol=1e-6), (screened, first)
    for target in (full + 1.0, full - 1e-3):  # below, or just above the target: the whole estimate, unchanged
        run.eval_gen.set_state(start)
        assert T.evaluate(run, screen=target) == {"val_loss": full}
    # later looks, with smaller errors, stop nearer estimates: passes of 3, 7, 3, 7 then 5s against a target of 3 are
    # 1.7 standard errors above it after 4 passes, 3.7 after 8 and 5.7 after 12, where the screen stops
    losses = iter([3.0, 7.0, 3.0, 7.0] + [5.0] * 16)
    calls = []
    monkeypatch.setattr(T, "compute_loss", lambda run, batch: calls.append(1) or torch.tensor(next(losses)))
    assert T.evaluate(run, screen=3.0) == {"screened_val_loss": 5.0} and len(calls) == 12


def test_weight_average_follows_its_formula_and_is_what_gets_saved(corpus, tmp_path):
    from tinyformer.train import WeightEMA
    w = torch.nn.Parameter(torch.zeros(3))
    m = torch.nn.Module()
    m.w = w
    ema = WeightEMA(m, 0.5)
    expected = torch.zeros(3)
    for n, value in enumerate([1.0, 2.0, 4.0, 8.0, 16.0]):
        with torch.no_grad():
            w.fill_(value)
        ema.update()
        d = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.18..., then capped at 0.5
        expected = d * expected + (1 - d) * value
        assert torch.allclose(ema.average[0], expected), (n, ema.average[0], expected)
    with pytest.raises(RuntimeError, match="inside"):
        with ema.applied():
            assert torch.equal(w.detach(), expected)
            raise RuntimeError("inside")
    assert torch.equal(w.detach(), torch.full((3,), 16.0))  # its own weights back, even after an error
    # a run: model.safetensors holds the average, ckpt.pt the weights the optimizer trains
    train(_cfg(corpus, tmp_path / "run", max_iters=20, ema_decay=0.9))
    import tinyformer
    loaded = tinyformer.load(tmp_path / "run")
    saved = loaded.state_dict()
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    names = [k for k, _ in loaded.named_parameters()]
    assert [torch.equal(saved[k], a) for k, a in zip(names, ckpt["ema"]["average"])] == [True] * len(names)
    assert not all(torch.equal(saved[k], ckpt["model"][k]) for k in names)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="ema_power"):
        TrainConfig(ema_power=-1.0)
    with pytest.raises(ValueError, match="one of them"):
        TrainConfig(ema_decay=0.9, ema_power=4.0)
    # at a learning rate too small to move an fp32 weight, the average is the weights: the same loss on the same
    # validation batches
    train(_cfg(corpus, tmp_path / "still", max_iters=20, ema_decay=0.9, learning_rate=1e-12, min_lr=0.0))
    rows = [r for r in _losses(tmp_path / "still") if "val_loss" in r]
    assert len(rows) == 2 and all(r["ema_val_loss"] == r["val_loss"] for r in rows), rows


@pytest.mark.parametrize("steps", [40, 400])
def test_power_average_covers_the_same_share_of_any_run_length(steps):
    # with d_t = (1 - 1/t)^(g+1), the t-th weights end up with (t/T)^(g+1) - ((t-1)/T)^(g+1) of the average after
    # T steps (the products of d telescope): the first half of any run weighs exactly 0.5^(g+1)
    from tinyformer.train import WeightEMA
    g = 4.0
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ema = WeightEMA(m, power=g)
    values = torch.randn(steps, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in range(1, steps + 1):
        with torch.no_grad():
            m.w[0] = values[t - 1]
            m.w[1] = 1.0 if t <= steps // 2 else 0.0
        ema.update()
    share = [(t / steps) ** (g + 1) - ((t - 1) / steps) ** (g + 1) for t in range(1, steps + 1)]
    expected = float(torch.tensor(share, dtype=torch.float64) @ values)
    assert float(ema.average[0][0]) == pytest.approx(expected, abs=1e-12)
    assert float(ema.average[0][1]) == pytest.approx(0.5 ** (g + 1), abs=1e-12)
    with pytest.raises(ValueError, match="one of decay and power"):
        WeightEMA(m, decay=0.9, power=4.0)


def test_schedule_matches_nanogpt():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000)
    assert lr_at(cfg, 0) == pytest.approx(1e-3 / 101)
    assert lr_at(cfg, 100) == pytest.approx(1e-3)
    assert lr_at(cfg, 1050) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(cfg, 2000) == pytest.approx(1e-4) and lr_at(cfg, 5000) == 1e-4


def test_auto_dtype_is_bf16_autocast_where_the_cpu_has_bf16(monkeypatch):
    from tinyformer import train as tr
    monkeypatch.setattr(tr.device_probe, "cpu_has_bf16", lambda: True)
    ctx, scaler = tr._autocast(TrainConfig(), torch.device("cpu"))
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16 and not scaler
    monkeypatch.setattr(tr.device_probe, "cpu_has_bf16", lambda: False)
    ctx, _ = tr._autocast(TrainConfig(), torch.device("cpu"))
    assert not isinstance(ctx, torch.autocast)  # fp32
    ctx, _ = tr._autocast(TrainConfig(dtype="bfloat16"), torch.device("cpu"))  # asked for: always
    assert isinstance(ctx, torch.autocast)


def test_attention_under_cpu_bf16_autocast_computes_in_fp32_on_short_sequences(monkeypatch):
    """Training under CPU bf16 autocast, ops.attention runs SDPA in fp32 below CPU_BF16_ATTENTION_MIN_T positions
    (torch's bf16 kernel is 2-4x slower there): the output is the fp32 result rounded to bf16 (up to ties), and the
    gradients are closer to fp32's than bf16's. From that length on it runs in bf16, whose kernel is faster there."""
    from tinyformer import ops
    from tinyformer.kernels import cpu, reference
    seen = []
    sdpa = cpu.sdpa_attention
    monkeypatch.setattr(cpu, "sdpa_attention", lambda q, *a, **kw: seen.append(q.dtype) or sdpa(q, *a, **kw))
    torch.manual_seed(0)
    for T in (16, ops.CPU_BF16_ATTENTION_MIN_T):
        q, k, v = [torch.randn(1, 2, T, 32).bfloat16().requires_grad_() for _ in range(3)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ops.attention(q, k, v, causal=True)
        out.float().pow(2).sum().backward()
        q32, k32, v32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref = reference.attention(q32, k32, v32, causal=True)
        ref.pow(2).sum().backward()
        assert out.dtype == torch.bfloat16
        if T == 16:
            same = (out.float() == ref.bfloat16().float()).float().mean()  # bf16 SDPA matched only ~74% of them
            assert same > 0.99  # (not 1.0: fp32 SDPA and the reference may round an element on either side of a tie)
        assert (q.grad.float() - q32.grad).abs().max() < (0.03 if T == 16 else 0.02) * q32.grad.abs().max()
    assert seen == [torch.float32, torch.bfloat16]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tinyformer", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900)  # generous: CI machines are shared


def _torchrun(port, *args):
    """`torchrun --nproc_per_node 2 ARGS` on CPU, one thread a process."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_torchrun_two_processes_follow_one_process(corpus, tmp_path, optimizer):
    common = ["train", "--optimizer", optimizer, "--data", str(corpus / "prepared"), "--batch_size", "8",
              "--block_size", "32",
              "--max_iters", "12", "--lr_decay_iters", "12", "--warmup_iters", "2", "--eval_interval", "6",
              "--eval_iters", "2", "--log_interval", "1", "--n_layer", "1", "--n_head", "2", "--d_model", "32",
              "--progress", "false", "--plot", "false",
              "--dtype", "float32"]  # fp32: bf16 rounding (auto on CPUs with bf16) would hide what is compared
    one = _cli(*common, "--out_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = _torchrun(29531, "-m", "tinyformer", *common, "--out_dir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a = [r["loss"] for r in _losses(tmp_path / "one") if "loss" in r]
    b = [r["loss"] for r in _losses(tmp_path / "two") if "loss" in r]
    assert len(a) == len(b) == 12
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    if optimizer == "muon":  # and two torchrun runs are bitwise equal
        again = _torchrun(29535, "-m", "tinyformer", *common, "--out_dir", str(tmp_path / "again"))
        assert again.returncode == 0, again.stderr[-3000:]
        assert b == [r["loss"] for r in _losses(tmp_path / "again") if "loss" in r]


def test_torchrun_time_budget_keeps_ranks_in_step(corpus, tmp_path):
    """Under --max_minutes the learning rate follows wall time. Rank 1's clock here runs 1.5x fast: unless the ranks
    share one clock, rank 1 would step with a smaller learning rate and the two replicas' weights would drift apart
    (DDP averages gradients, not weights), leaving rank 0's checkpoint unlike the model rank 1 trained."""
    script = tmp_path / "skewed_clock.py"
    script.write_text(
        "import os, sys, time, torch\n"
        "import tinyformer.train as T\n"
        "from tinyformer.cli import main\n"
        "rank, real = int(os.environ['RANK']), time.perf_counter\n"
        "if rank == 1:\n"
        "    time.perf_counter = lambda: 1.5 * real()\n"
        "built, build = [], T.build\n"
        "T.build = lambda *a, **k: built.append(build(*a, **k)) or built[-1]\n"
        "main(sys.argv[1:])\n"
        "out = sys.argv[sys.argv.index('--out_dir') + 1]\n"
        "torch.save(built[0].state_dict(), os.path.join(out, f'rank{rank}.pt'))\n")
    out = tmp_path / "run"
    run = _torchrun(29533, str(script), "train", "--data", str(corpus / "prepared"), "--batch_size", "8",
                    "--block_size", "32", "--max_minutes", "0.05", "--warmup_iters", "0", "--eval_interval", "100000",
                    "--eval_iters", "1", "--log_interval", "1", "--n_layer", "1", "--n_head", "2", "--d_model", "32",
                    "--progress", "false", "--plot", "false", "--dtype", "float32", "--out_dir", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    lrs = [r["lr"] for r in _losses(out) if "loss" in r]
    assert len(lrs) > 5 and lrs[-1] < 0.5 * lrs[0]  # the cosine ran over the budget
    w0, w1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_error_rates_on_hand_made_examples():
    from tinyformer.eval import edit_distance, error_rates
    assert edit_distance("kitten".split(), "kitten".split()) == 0
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert edit_distance([], ["A", "B"]) == 2
    refs = [["K AE T"], ["T AH M EY T OW", "T AH M AA T OW"], ["D AO G"]]
    preds = ["K AE T", "T AH M AA T OW", "D AA G Z"]  # right, right (second pronunciation), 2 errors in 3
    r = error_rates(preds, refs)
    assert r["wer"] == pytest.approx(1 / 3)
    assert r["per"] == pytest.approx(2 / (3 + 6 + 3))
    with pytest.raises(ValueError, match="2 predictions for 3 words"):
        error_rates(preds[:2], refs)


def test_cmudict_entries_strip_stress_and_group_alternates():
    e = data.cmudict_entries()
    assert e["tomato"] == ["T AH M EY T OW", "T AH M AA T OW"]
    assert all(not any(ch.isdigit() for ch in p) for prons in list(e.values())[:1000] for p in prons)


@pytest.mark.parametrize("arch", ["encoder", "encoder-decoder"])
def test_encoder_and_seq2seq_objectives_train(arch, corpus, tmp_path):
    if arch == "encoder-decoder":
        pairs = tmp_path / "pairs"
        pairs.mkdir()
        from tokenizers import Tokenizer, models, pre_tokenizers
        vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "a", "b", "c", "A", "B", "C"])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        (pairs / "tokenizer.json").write_text(tok.to_str())
        words = ["".join(np.random.default_rng(i).choice(list("abc"), 5)) for i in range(300)]
        split = {"train": [[w, [" ".join(w.upper())]] for w in words[:250]],  # "abc" -> "A B C": a copy task
                 "val": [[w, [" ".join(w.upper())]] for w in words[250:280]],
                 "test": [[w, [" ".join(w.upper())]] for w in words[280:]]}
        (pairs / "pairs.json").write_text(json.dumps(split))
        (pairs / "meta.json").write_text(json.dumps({"kind": "pairs"}))
        cfg = _cfg(corpus, tmp_path / "run", data=str(pairs), preset="seq2seq-small", max_iters=300,
                   lr_decay_iters=300, eval_interval=100, label_smoothing=0.1, block_size=16, batch_size=16,
                   learning_rate=3e-3,
                   model=dict(n_layer=1, n_decoder_layer=1, n_head=2, d_model=32, dropout=0.0))
    else:
        cfg = _cfg(corpus, tmp_path / "run", preset="bert-mini", max_iters=150, lr_decay_iters=150, eval_interval=50,
                   eval_iters=6, learning_rate=3e-3,
                   model=dict(n_layer=1, n_head=2, d_model=32, max_seq_len=32))
    train(cfg)
    val = [r["val_loss"] for r in _losses(tmp_path / "run") if "val_loss" in r]
    assert val[-1] < val[0] - 0.3, val
    import tinyformer
    model = tinyformer.load(tmp_path / "run")
    if arch == "encoder":
        mask_id = model.tokenizer.token_to_id("[MASK]")
        assert mask_id == model.config.vocab_size - 1
        from tinyformer.eval import masked_lm_loss  # what `tinyformer eval` reports for an encoder
        ids = np.asarray(data.TokenData(corpus / "prepared").splits["val"], dtype=np.int64)
        loss, n = masked_lm_loss(model, ids, 32, mask_id)
        assert abs(loss - val[-1]) < 0.25, (loss, val[-1])  # training's val loss: the same objective, other masks
        assert 0.1 < n / (len(ids) // 32 * 32) < 0.2  # ~15% of the positions scored
        assert masked_lm_loss(tinyformer.build(model.config), ids, 32, mask_id)[0] > loss + 0.3  # untrained: worse
    else:  # the copy task is learned: greedy decoding spells the word in capitals
        from tinyformer.eval import g2p_error_rates
        r = g2p_error_rates(model, data.PairData(pairs), "test")
        assert r["per"] < 0.2, r


def test_arch_and_data_must_fit(corpus, tmp_path):
    with pytest.raises(ValueError, match="cannot train on"):
        train(_cfg(corpus, tmp_path / "x", preset="seq2seq-small"))


def test_demo_runs_end_to_end(tmp_path):
    r = _cli("demo", "--iters", "20", "--out_dir", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "val loss" in r.stdout and "tokens/s" in r.stdout and "--- sample" in r.stdout
    assert (tmp_path / "demo" / "loss.png").exists() and (tmp_path / "demo" / "model.safetensors").exists()
    # the compression step: a report row per stage, and a compressed model that loads with int8 linears at 50% zeros
    assert "| prune -> finetune -> quantize |" in r.stdout
    import tinyformer
    from tinyformer.qlinear import Int8Linear
    small = tinyformer.load(tmp_path / "demo-compressed")
    w1 = small.decoder.blocks[0].mlp.w1
    assert type(w1) is Int8Linear and (w1.weight == 0).float().mean() >= 0.5


def test_every_command_line_option_is_explained():
    """`tinyformer COMMAND --help` explains every option; train's come from the comments on TrainConfig's and
    ModelConfig's fields (config.field_docs), continuation lines included."""
    from tinyformer import cli
    from tinyformer.config import ModelConfig, field_docs
    docs = field_docs(TrainConfig)
    assert "t^ema_power" in docs["ema_power"] and docs["ema_power"].endswith("gives (WeightEMA)")
    assert docs["grad_clip"] == "clip the gradient's global norm to this; 0 disables"
    for cls in (TrainConfig, ModelConfig):
        undocumented = [f.name for f in dataclasses.fields(cls) if not field_docs(cls).get(f.name)]
        assert not undocumented, (cls.__name__, undocumented)
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        assert [a.dest for a in parser._actions if not a.help] == [], name
        parser.format_help()  # a stray % in a help text would raise here


def test_eval_scores_a_built_in_corpus_split_in_the_models_tokenizer(tmp_path):
    """`tinyformer eval --data shakespeare`: the last 10% of the corpus text (prepare's val split) in the model's own
    tokenizer, scored in disjoint windows: the same token count and perplexity as computing it here."""
    import re

    import tinyformer
    from tinyformer.eval import perplexity
    text = data.corpus_text("shakespeare")
    tok = data.char_tokenizer(text)
    torch.manual_seed(0)
    model = tinyformer.build("baby-shakespeare-char", vocab_size=tok.get_vocab_size(), n_layer=1)
    model.tokenizer = tok
    model.save(tmp_path / "m")
    r = _cli("eval", "--model", str(tmp_path / "m"), "--data", "shakespeare")
    assert r.returncode == 0, r.stderr
    ids = data.encode(tok, text[int(len(text) * 0.9):])
    got = re.search(r"([\d,]+) tokens, block 64, stride 64: .* perplexity ([\d.]+)", r.stdout)
    assert got and int(got.group(1).replace(",", "")) == len(ids)
    expect = perplexity(tinyformer.load(tmp_path / "m"), ids, 64, None)
    assert float(got.group(2)) == pytest.approx(expect, rel=1e-3)


def test_encoding_a_long_text_ignores_the_tokenizers_truncation():
    """BERT's tokenizer.json truncates every encoding (MiniLM: 128 tokens); a text to score is encoded whole."""
    text = "the cat sat on the mat\n" * 50
    tok = data.word_tokenizer(text)
    tok.enable_truncation(8)
    assert len(data.encode(tok, text)) == 300
    from tinyformer.eval import _encode
    assert _encode(tok, text).numel() == 300
    assert len(tok.encode(text).ids) == 8  # the caller's tokenizer keeps its setting


def test_eval_of_a_prepared_folder_scores_its_split_in_the_datas_tokenizer(corpus):
    """`tinyformer eval --data FOLDER` (tinyformer.eval.evaluate): a decoder's perplexity and an encoder's masked-LM
    loss on the folder's split, as computed here; a model with another tokenizer is refused."""
    import tinyformer
    from tinyformer.eval import evaluate, masked_lm_loss, perplexity
    d = data.TokenData(corpus / "prepared")
    torch.manual_seed(0)
    dec = tinyformer.build("baby-shakespeare-char", vocab_size=d.vocab_size, n_layer=1, max_seq_len=32)
    dec.tokenizer = d.tokenizer
    lines = []
    for split in ("val", "train"):
        r = evaluate(dec, str(corpus / "prepared"), split, stride=16, log=lines.append)
        ids = np.asarray(d.splits[split], dtype=np.int64)
        assert r["tokens"] == len(ids) and (r["block_size"], r["stride"]) == (32, 16)
        assert r["perplexity"] == pytest.approx(perplexity(dec, ids, 32, 16), rel=1e-6)
        assert lines[-1].startswith(f"the {split} split of {corpus / 'prepared'}: {len(ids):,} tokens")
    with pytest.raises(ValueError, match="not a test split"):
        evaluate(dec, str(corpus / "prepared"), "test")
    from tokenizers import Tokenizer
    masked = Tokenizer.from_str(d.tokenizer.to_str())
    masked.add_special_tokens(["[MASK]"])
    enc = tinyformer.build("bert-mini", vocab_size=d.vocab_size + 1, n_layer=1, d_model=32, n_head=2, max_seq_len=32)
    enc.tokenizer = masked  # the data's tokens and one more, as masked-LM training leaves it
    r = evaluate(enc, str(corpus / "prepared"), block_size=16, log=lines.append)
    ids = np.asarray(d.splits["val"], dtype=np.int64)
    assert (r["loss"], r["masked"]) == masked_lm_loss(enc, ids, 16, d.vocab_size)
    dec.tokenizer = masked  # a decoder's tokenizer must be the data's exactly
    with pytest.raises(ValueError, match="another tokenizer"):
        evaluate(dec, str(corpus / "prepared"))
    dec.tokenizer = data.char_tokenizer(TEXT + "#")  # another character set: other ids
    with pytest.raises(ValueError, match="another tokenizer"):
        evaluate(dec, str(corpus / "prepared"))


def test_calibration_windows_are_seeded_slices_of_the_train_text(tmp_path):
    """`tinyformer compress --calib FILE`: windows at seeded random offsets of the file's first 90% (its train split),
    never of the last 10% (val)."""
    from tinyformer.eval import calibration_windows
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("ab \n"), 900)) + "".join(rng.choice(list("cd"), 100))  # train: a, b; val: c, d
    (tmp_path / "t.txt").write_text(text)
    tok = data.char_tokenizer(text)
    train_ids = data.encode(tok, text[:900]).tolist()
    w = calibration_windows(tok, str(tmp_path / "t.txt"), 6, 20, seed=3)
    assert w.shape == (6, 20) and w.dtype == torch.long
    assert all(any(train_ids[i:i + 20] == row for i in range(len(train_ids) - 19)) for row in w.tolist())
    assert torch.equal(w, calibration_windows(tok, str(tmp_path / "t.txt"), 6, 20, seed=3))
    assert not torch.equal(w, calibration_windows(tok, str(tmp_path / "t.txt"), 6, 20, seed=4))
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(tok, str(tmp_path / "t.txt"), 1, 900)


FUSED_BY_MODEL = [  # a Llama-style decoder (RMSNorm, SwiGLU, RoPE) and a GPT-2-style one (LayerNorm with bias, GELU)
    ("llama-tiny", dict(n_kv_head=2), {"rms_norm", "swiglu", "rope", "linear_cross_entropy"}),
    ("gpt2", dict(max_seq_len=16), {"layer_norm", "linear_cross_entropy"}),
]


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the fused kernels need CUDA or the Triton interpreter")
@pytest.mark.parametrize("preset, overrides, fused", FUSED_BY_MODEL, ids=[m[0] for m in FUSED_BY_MODEL])
def test_training_uses_the_fused_kernels_only_where_they_run(monkeypatch, preset, overrides, fused):
    """A decoder's training loss (train.compute_loss) goes through ops, which picks the fused norm (RMSNorm or
    LayerNorm), SwiGLU, RoPE and linear + cross-entropy kernels the model has with the triton backend (CUDA's default;
    here the interpreter) and none of them with the CPU's default torch backend; both give the same loss and
    gradients."""
    from collections import Counter
    from types import SimpleNamespace

    import tinyformer
    from tinyformer import kernels
    from tinyformer.train import compute_loss
    calls = Counter()
    for name in ("rms_norm", "layer_norm", "swiglu", "rope", "linear_cross_entropy"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, _real=real, _name=name, **k: calls.update([_name]) or _real(*a, **k))
    torch.manual_seed(0)
    model = tinyformer.build(preset, n_layer=1, d_model=64, n_head=4, vocab_size=200, **overrides)
    x, y = torch.randint(0, 200, (2, 9)), torch.randint(0, 200, (2, 9))
    run = SimpleNamespace(model=model, raw_model=model, model_config=model.config, autocast=nullcontext(), data=None,
                          cfg=SimpleNamespace(label_smoothing=0.0))
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        calls.clear()
        with tinyformer.use_backend(backend):
            loss = compute_loss(run, [x, y])
            loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters()], dict(calls))
    assert results["torch"][2] == {}  # the CPU default: torch's ops, no Triton kernel
    assert set(results["triton"][2]) == fused, results["triton"][2]
    assert torch.allclose(results["torch"][0], results["triton"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results["torch"][1], results["triton"][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_runs_with_one_seed_are_bitwise_equal(corpus, tmp_path, dtype):
    """Windows of 64 over 64 channels: the embedding's backward is then large enough to run on several threads, where
    the backward of indexing (wte[ids]) summed repeated ids' rows in a varying order."""
    sizes = dict(batch_size=12, block_size=64, max_iters=8, lr_decay_iters=8, warmup_iters=2, eval_interval=4,
                 model=dict(n_layer=1, n_head=2, d_model=64), dtype=dtype)
    a, b = (train(_cfg(corpus, tmp_path / run, **sizes)) for run in ("a", "b"))
    assert a["val_loss"] == b["val_loss"]
    assert [r.get("loss") for r in _losses(tmp_path / "a")] == [r.get("loss") for r in _losses(tmp_path / "b")]


def test_speedrun_preset_fits_the_parameter_budget():
    """Issue: at most 0.85 M parameters with the 67 characters of the 8 plays (shared/DATA.md)."""
    from tinyformer import ModelConfig, build
    assert build(ModelConfig.from_name("speedrun-shakespeare-char", vocab_size=67)).num_params() <= 850_000
