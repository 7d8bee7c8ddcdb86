"""Reliability: a run SIGKILLed at random moments and resumed ends exactly like the uninterrupted run; SIGINT saves
and exits cleanly; non-finite losses never reach a checkpoint; bad input through the real CLI gets one clear line;
fuzzed configs and token files fail cleanly; a crafted pickle is never executed."""
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import run_killing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import tinyformer
from tinyformer import ModelConfig, data
from tinyformer.train import TrainConfig, TrainingStopped, train

_RNG = random.Random(0)  # one generator: a new Random(0) per character gave 6000 copies of one letter
TEXT = "".join(_RNG.choice("abcdefgh \n") for _ in range(6000))
CMD = [sys.executable, "-m", "tinyformer"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    (d / "text.txt").write_text(TEXT)
    data.prepare(str(d / "text.txt"), d / "prepared", "char")
    return d


def train_args(corpus, out, iters=60):
    return ["train", "--data", str(corpus / "prepared"), "--out_dir", str(out), "--batch_size", "4",
            "--block_size", "16", "--max_iters", str(iters), "--lr_decay_iters", str(iters), "--warmup_iters", "3",
            "--eval_interval", "4", "--eval_iters", "2", "--log_interval", "1", "--n_layer", "1", "--n_head", "2",
            "--d_model", "32", "--progress", "false", "--plot", "false"]


def step_losses(out):
    return [(r["iter"], r["loss"]) for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


def final_val(out):
    return [r["val_loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "val_loss" in r][-1]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(corpus, tmp_path, optimizer):
    """Bit for bit: every logged loss and every weight. Batches of 12 x 64 and 64 wide, so that the backward splits
    over threads (where the embedding's gradient once summed in a thread-dependent order)."""
    iters = 120
    args = ["--optimizer", optimizer, "--d_model", "64", "--batch_size", "12", "--block_size", "64"]
    ref = subprocess.run(CMD + train_args(corpus, tmp_path / "ref", iters) + args, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    rng = random.Random(1234)
    out = tmp_path / "killed"
    targets = sorted(rng.sample(range(5, iters - 5), 3)) + [None]  # kill at 3 random iterations, then finish
    kills = run_killing(CMD + train_args(corpus, out, iters) + args, out, targets, rng)
    assert kills >= 2, "the test should kill the run at least twice"
    assert final_val(out) == final_val(tmp_path / "ref")
    assert step_losses(out) == step_losses(tmp_path / "ref")
    got, want = load_file(out / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(corpus, tmp_path):
    out = tmp_path / "int"
    gate = ["--target_loss", "0.01", "--target_gate", "0"]  # a target never reached: the gate skips evaluations
    p = subprocess.Popen(CMD + train_args(corpus, out, iters=100000) + gate, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "metrics.jsonl").exists() or os.path.getsize(out / "metrics.jsonl") < 200:
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert "SIGINT received" in stdout and "--resume" in stdout
    assert "Traceback" not in stderr
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["iter"] > 0
    # the gate's window: the losses since the last evaluation point decided (every 4; the signal stops the run before
    # deciding the point it has reached), so a resumed run decides the next one as this one would have
    assert len(saved["gate_losses"]) == (saved["iter"] - 1) % 4 + 1


def test_non_finite_loss_stops_without_poisoning_the_checkpoint(corpus, tmp_path, monkeypatch):
    import tinyformer.train as T
    real = T.compute_loss
    calls = {"n": 0}

    def poisoned(*a, **kw):  # finite for a while, then NaN
        calls["n"] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls["n"] > 30 else loss

    monkeypatch.setattr(T, "compute_loss", poisoned)
    cfg = TrainConfig(data=str(corpus / "prepared"), out_dir=str(tmp_path / "nan"), batch_size=4, block_size=16,
                      max_iters=40, eval_interval=4, eval_iters=1, progress=False, plot=False,
                      model=dict(n_layer=1, n_head=2, d_model=32))
    with pytest.raises(TrainingStopped, match=r"non-finite (loss|gradient norm) at iteration \d+"):
        train(cfg)
    saved = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    calls["n"] = 0
    cfg.out_dir, cfg.on_nan = str(tmp_path / "skip"), "skip"
    summary = train(cfg)  # skips the poisoned steps and finishes
    assert summary["iters"] == 40
    assert all(torch.isfinite(p).all() for p in tinyformer.load(tmp_path / "skip").parameters())


def _bad_inputs(tmp, corpus):
    (tmp / "empty.txt").write_text("")
    (tmp / "short.txt").write_text("abc")
    (tmp / "binary.txt").write_bytes(bytes(range(256)) * 4)
    model = tmp / "model"
    tinyformer.build(ModelConfig(n_layer=1, d_model=32, n_head=2, vocab_size=9, max_seq_len=16)).save(model)
    trunc = tmp / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_text((model / "config.json").read_text())
    (trunc / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:100])
    bad_ckpt = tmp / "badckpt"
    bad_ckpt.mkdir()
    (bad_ckpt / "ckpt.pt").write_bytes(b"\x80\x04garbage")
    d = str(corpus / "prepared")
    chars = tmp / "chars"  # a character-level model: its vocabulary is the corpus's few characters
    tok = data.TokenData(corpus / "prepared").tokenizer
    char_model = tinyformer.build(ModelConfig(n_layer=1, d_model=32, n_head=2, vocab_size=tok.get_vocab_size(),
                                              max_seq_len=16))
    char_model.tokenizer = tok
    char_model.save(chars)
    (tmp / "digits.txt").write_text("0123 456\n" * 20)
    from tokenizers import Tokenizer
    enc_cfg = ModelConfig(arch="encoder", n_layer=1, d_model=32, n_head=2, vocab_size=tok.get_vocab_size() + 1,
                          max_seq_len=16)
    for name, with_mask in (("enc", True), ("enc_nomask", False)):  # masked-LM trained / a tokenizer without [MASK]
        enc = tinyformer.build(enc_cfg)
        enc.tokenizer = Tokenizer.from_str(tok.to_str())
        if with_mask:
            enc.tokenizer.add_special_tokens(["[MASK]"])
        enc.save(tmp / name)
    return [
        (["train", "--data", str(tmp / "missing.txt")], "no such file or folder"),
        (["train", "--data", str(tmp / "empty.txt")], "is empty"),
        (["train", "--data", str(tmp / "short.txt"), "--block_size", "8"], "fewer than one block"),
        (["train", "--data", str(tmp / "binary.txt")], "is not UTF-8 text"),
        (["train", "--data", d, "--preset", "gpt5"], "unknown preset 'gpt5'"),
        (["train", "--data", d, "--n_head", "3"], "d_model: 128 is not divisible by n_head=3"),
        (["train", "--data", d, "--n_head", "4", "--n_kv_head", "3"], "n_head: 4 is not divisible by n_kv_head=3"),
        (["train", "--data", d, "--block_size", "128", "--max_seq_len", "64"], "exceeds the model's max_seq_len"),
        (["train", "--data", d, "--batch_size", "-1"], "--batch_size: must be > 0"),
        (["train", "--data", d, "--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["train", "--data", d, "--norm", "batchnorm"], "norm: unknown choice 'batchnorm'"),
        (["train", "--data", d, "--device", "cuda"], "CUDA is not available"),
        (["train", "--data", d, "--max_iters", "many"], "invalid int value: 'many'"),
        (["train", "--data", d, "--no_such_option", "1"], "unrecognized arguments: --no_such_option"),
        (["train", "--data", d, "--out_dir", str(tmp / "fresh"), "--resume"], "no checkpoint"),
        (["train", "--data", d, "--out_dir", str(bad_ckpt), "--resume"], "is unreadable"),
        (["sample", "--model", str(tmp / "nowhere")], "no such model folder"),
        (["sample", "--model", str(trunc)], "unreadable or truncated"),
        (["sample", "--model", str(model)], "has no tokenizer.json"),
        (["eval", "--model", str(tmp / "nowhere"), "--data", d], "no such model folder"),
        (["eval", "--model", str(chars), "--data", str(tmp / "digits.txt")], "are not in its"),
        (["sample", "--model", str(chars), "--prompt", "a 1"], "are not in its"),
        (["sample", "--model", str(chars), "--prompt", "ab", "--top_p", "1.5"], "top_p must be in (0, 1]"),
        (["eval", "--model", str(chars), "--data", "shakespeare", "--split", "test"], "not a test split"),
        (["eval", "--model", str(chars), "--data", "shakespear"], "not a built-in corpus"),
        (["eval", "--model", str(tmp / "enc"), "--data", "sotu"], "next-token perplexity protocol of decoders"),
        (["eval", "--model", str(tmp / "enc_nomask"), "--data", d], "has no [MASK] token"),
        (["prepare", "--data", str(tmp / "empty.txt"), "--out", str(tmp / "o")], "is empty"),
        (["prepare", "--data", "shakespear", "--out", str(tmp / "o")], "neither a built-in corpus"),
    ]


def test_bad_input_through_the_real_cli_gets_one_clear_line(corpus, tmp_path):
    failures = []
    for args, message in _bad_inputs(tmp_path, corpus):
        r = subprocess.run(CMD + args, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "TINYFORMER_DATA": str(tmp_path / "cache")})
        if r.returncode == 0 or message not in r.stderr or "Traceback" in r.stderr:
            failures.append(f"{args}: rc={r.returncode}, stderr={r.stderr[-400:]!r}")
    assert not failures, "\n".join(failures)


def test_debug_shows_the_traceback(tmp_path):
    r = subprocess.run(CMD + ["--debug", "sample", "--model", str(tmp_path / "nowhere")], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


FIELD_VALUES = {
    "arch": st.sampled_from(["decoder", "encoder", "encoder-decoder", "gpt", ""]),
    "n_layer": st.integers(-2, 4), "n_head": st.integers(-1, 8), "n_kv_head": st.one_of(st.none(), st.integers(-1, 8)),
    "d_model": st.integers(-8, 96), "d_ff": st.one_of(st.none(), st.integers(-4, 64)),
    "vocab_size": st.integers(-3, 64), "max_seq_len": st.integers(-1, 32),
    "norm": st.sampled_from(["layernorm", "rmsnorm", "x"]), "pos": st.sampled_from(["learned", "rope", "sinusoidal",
                                                                                      "alibi"]),
    "act": st.sampled_from(["gelu", "relu", "swiglu", "tanh"]), "dropout": st.one_of(st.floats(-1, 2), st.just(float("nan"))),
    "pad_token_id": st.one_of(st.none(), st.integers(-2, 70)),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=FIELD_VALUES))
def test_fuzzed_configs_either_build_and_run_or_raise_a_named_error(fields):
    try:
        cfg = ModelConfig(**fields)
    except ValueError as e:
        assert str(e).startswith("ModelConfig.")  # the message names the field
        return
    model = tinyformer.build(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, min(3, cfg.max_seq_len)))
    out = model(ids, ids) if cfg.arch == "encoder-decoder" else model(ids)
    assert torch.isfinite(out).all()


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64), st.booleans())
def test_fuzzed_token_files_load_or_raise_value_error(tmp_path_factory, blob, with_magic):
    path = tmp_path_factory.mktemp("fuzz") / "x.bin"
    head = data.MAGIC + np.array([1, 2], dtype=np.uint32).tobytes() if with_magic else b""
    path.write_bytes(head + blob)
    try:
        ids = data.read_ids(path)
    except ValueError:
        return
    assert len(ids) * ids.dtype.itemsize == path.stat().st_size - data.HEADER


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


def test_a_crafted_pickle_is_never_executed(corpus, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "ckpt.pt", "wb") as f:
        pickle.dump({"model": _Exploit()}, f)
    torch.save({"x": _Exploit()}, out / "pytorch_model.bin")  # a stray pickle beside a model is never opened
    r = subprocess.run(CMD + train_args(corpus, out) + ["--resume"], capture_output=True, text=True,
                       env={**os.environ, "EXPLOIT_MARKER": str(marker)})
    assert r.returncode == 2 and "is unreadable" in r.stderr
    tinyformer.build(ModelConfig(n_layer=1, d_model=32, n_head=2, vocab_size=9)).save(out)
    tinyformer.load(out)
    assert not marker.exists(), "the pickle's payload ran"


def test_a_dead_worker_stops_the_distributed_run(corpus, tmp_path):
    """SIGKILL one of two torchrun workers mid-training: the other must not hang; the run fails with an error."""
    out = tmp_path / "ddp"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", "-m", "tinyformer"] + train_args(corpus, out, iters=100000),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or os.path.getsize(out / "metrics.jsonl") < 200:
        assert time.time() < deadline and p.poll() is None, "the distributed run did not start"
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-f", "-P", str(p.pid), "tinyformer"], capture_output=True, text=True)
    pids = [int(x) for x in workers.stdout.split()]
    assert len(pids) == 2, workers.stdout
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.time()
    _, stderr = p.communicate(timeout=180)
    assert p.returncode != 0
    assert time.time() - t0 < 120, "the surviving worker hung"
    assert "Signal 9" in stderr or "SIGKILL" in stderr or "failed" in stderr.lower(), stderr[-2000:]
