"""Fine-tuning through the training loop (`tinyformer train --init_from`): instruction data with LoRA and in full,
classification with a new head, the adapter files a LoRA run leaves, `tinyformer eval` on a classifier, and a LoRA run
killed with SIGKILL and resumed ending exactly where the uninterrupted run ends. Tiny pretrained stand-ins (a
Llama-style decoder with a chat template, a BERT-style encoder) keep it fast."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from helpers import assert_close, run_killing

import tinyformer
from tinyformer import ModelConfig, build
from tinyformer.train import TrainConfig, train

CMD = [sys.executable, "-m", "tinyformer"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = "red green blue cat dog fish one two three four add plus is what how the sum of".split()


def _tokenizer(tmp_path):
    from tinyformer.data import bpe_tokenizer
    text = tmp_path / "tok.txt"
    rng = random.Random(0)
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)))
    tok = bpe_tokenizer([str(text)], vocab_size=300)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tok


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Folders of a tiny "pretrained" decoder (with a chat template) and encoder, sharing a byte-level BPE."""
    d = tmp_path_factory.mktemp("pretrained")
    tok = _tokenizer(d)
    V = tok.get_vocab_size()
    torch.manual_seed(0)
    dec = build(ModelConfig(arch="decoder", n_layer=2, n_head=4, n_kv_head=2, d_model=32, vocab_size=V,
                            max_seq_len=64, norm="rmsnorm", pos="rope", act="swiglu", bias=False))
    dec.tokenizer, dec.chat_template = tok, TEMPLATE
    dec.eos_token_id = tok.token_to_id("<|im_end|>")
    dec.save(d / "decoder")
    enc = build(ModelConfig(arch="encoder", n_layer=2, n_head=4, d_model=32, vocab_size=V, max_seq_len=64,
                            norm_position="post", embed_norm=True, type_vocab_size=2, mlm_head="none"))
    enc.tokenizer = tok
    enc.save(d / "encoder")
    return d


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """Conversations whose answers follow from the question: "what is the sum of one and two" -> "three"."""
    d = tmp_path_factory.mktemp("chats")
    rng = random.Random(1)
    names = ["one", "two", "three", "four"]
    with open(d / "chats.jsonl", "w") as f:
        for _ in range(80):
            a, b = rng.randrange(2), rng.randrange(2)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is the sum of {names[a]} and "
                                                                          f"{names[b]}"},
                                             {"role": "assistant", "content": f"the sum is {names[a + b]}"}]}) + "\n")
    return d / "chats.jsonl"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Texts labelled by the animal they name: a task a small model learns in a few dozen steps."""
    d = tmp_path_factory.mktemp("labelled")
    rng = random.Random(2)
    for split, n in (("train", 120), ("test", 40)):
        with open(d / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                label = rng.choice(["cat", "dog", "fish"])
                words = [rng.choice(["red", "green", "blue", "one", "two"]) for _ in range(6)]
                words.insert(rng.randrange(7), label)
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return d


def _cfg(init_from, data, out, **kw):
    base = dict(init_from=str(init_from), data=str(data), out_dir=str(out), batch_size=4, block_size=48,
                max_iters=30, lr_decay_iters=30, warmup_iters=2, learning_rate=3e-3, min_lr=3e-4, eval_interval=10,
                eval_iters=2, log_interval=1, progress=False, plot=False, dtype="float32")
    return TrainConfig(**{**base, **kw})


def _losses(out):
    return [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


@pytest.mark.parametrize("base_bits", [0, 4])
def test_lora_sft_run_writes_a_peft_adapter_and_leaves_the_base_unchanged(pretrained, chats, tmp_path, base_bits):
    before = tinyformer.load(pretrained / "decoder").state_dict()
    s = train(_cfg(pretrained / "decoder", chats, tmp_path / "lora", lora_rank=4, lora_alpha=8, learning_rate=1e-2,
                   base_bits=base_bits))
    out = tmp_path / "lora"
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()  # an adapter run saves the adapter, not a copy of the base
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    losses = _losses(out)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    base = tinyformer.load(pretrained / "decoder")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    tuned = tinyformer.load(out)  # the adapter folder names its base
    ids = torch.randint(0, 300, (1, 12))
    assert not torch.allclose(tuned(ids), base(ids))
    assert s["val_loss"] is not None


def test_full_sft_run_saves_a_model_that_loads(pretrained, chats, tmp_path):
    s = train(_cfg(pretrained / "decoder", chats, tmp_path / "full", packed=False))
    model = tinyformer.load(tmp_path / "full")
    assert model.chat_template == TEMPLATE and model.config.num_labels == 0
    assert s["val_loss"] < _first_val(tmp_path / "full")


def _first_val(out):
    return [r["val_loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "val_loss" in r][0]


@pytest.mark.parametrize("lora", [0, 4])
def test_classifier_fine_tuning_and_tinyformer_eval(pretrained, labelled, tmp_path, lora):
    out = tmp_path / "cls"
    train(_cfg(pretrained / "encoder", labelled / "train.jsonl", out, max_iters=60, lr_decay_iters=60,
               lora_rank=lora, learning_rate=1e-2 if lora else 3e-3))
    r = subprocess.run(CMD + ["eval", "--model", str(out), "--data", str(labelled / "test.jsonl")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "accuracy" in r.stdout and "macro-F1" in r.stdout and "confusion matrix" in r.stdout
    accuracy = float(r.stdout.split("accuracy ")[1].split("%")[0])
    assert accuracy > 60, r.stdout  # three classes: chance is 33%


def test_lora_run_killed_and_resumed_matches_the_uninterrupted_run(pretrained, chats, tmp_path):
    args = ["train", "--init_from", str(pretrained / "decoder"), "--data", str(chats), "--batch_size", "4",
            "--block_size", "48", "--max_iters", "40", "--lr_decay_iters", "40", "--warmup_iters", "2",
            "--eval_interval", "5", "--eval_iters", "2", "--log_interval", "1", "--lora_rank", "4",
            "--learning_rate", "1e-2", "--dtype", "float32", "--progress", "false", "--plot", "false"]
    ref = subprocess.run(CMD + args + ["--out_dir", str(tmp_path / "ref")], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    kills = run_killing(CMD + args + ["--out_dir", str(out)], out, (12, 27, None), random.Random(7))
    assert kills >= 1
    assert _losses(out) == _losses(tmp_path / "ref")
    from safetensors.torch import load_file
    a, b = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_lora_sft_follows_one_process(pretrained, chats, tmp_path):
    """DDP over a LoRA run (a frozen base, packed conversations, each rank its rows' cu_seqlens): two processes of
    one thread give one process's losses and adapter."""
    args = ["train", "--init_from", str(pretrained / "decoder"), "--data", str(chats), "--batch_size", "4",
            "--block_size", "48", "--max_iters", "8", "--lr_decay_iters", "8", "--warmup_iters", "2",
            "--eval_interval", "4", "--eval_iters", "2", "--log_interval", "1", "--lora_rank", "4",
            "--learning_rate", "1e-2", "--dtype", "float32", "--progress", "false", "--plot", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(CMD + args + ["--out_dir", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29541", "-m", "tinyformer", *args, "--out_dir", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 8
    assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=1e-4, name="losses")
    # (not the weights: Adam turns a gradient of ~0, summed in another order, into a step of +-lr either way)
    va, vb = (torch.tensor([r["val_loss"] for r in map(json.loads, open(tmp_path / d / "metrics.jsonl"))
                            if "val_loss" in r]) for d in ("one", "two"))
    assert len(va) == 3  # iterations 0, 4 and 8
    assert_close(vb, va, atol=1e-5, rtol=1e-4, name="val losses")
    assert (tmp_path / "two" / "adapter_model.safetensors").exists()


def test_fine_tuning_options_need_init_from_and_lora_for_a_quantized_base(pretrained, chats, tmp_path):
    with pytest.raises(ValueError, match="--init_from"):
        TrainConfig(data=str(chats), lora_rank=4)
    with pytest.raises(ValueError, match="--base_bits"):
        TrainConfig(init_from=str(pretrained / "decoder"), data=str(chats), base_bits=4)
    with pytest.raises(ValueError, match="block_size"):
        train(_cfg(pretrained / "decoder", chats, tmp_path / "x", block_size=128))
