"""G2P tests (issue #3): the decode-and-score path of g2p_error_rates on hand-made outputs, length-bucketed batches
(one source length and a run of target lengths per batch, every example still drawn with probability 1/N), and the
wall-time budget of a training run (max_minutes: the run stops, the cosine decay runs over the time, resume carries
the time spent).

The metric itself on hand-made strings (edit distance, any-pronunciation WER, PER) is in tests/test_train.py, beam
search against brute force in tests/test_generate.py."""
import json
import types
from collections import Counter

import pytest
import torch

from tinyformer import data
from tinyformer.eval import g2p_error_rates
from tinyformer.train import TrainConfig, lr_at, train

LETTERS = list("abcdgmot")
PHONES = ["AA", "AE", "AH", "AO", "D", "EY", "G", "K", "M", "OW", "T", "Z"]


def _pairs_folder(path, splits):
    """A prepared pairs folder (as data.prepare_g2p writes) over a small letter + phoneme vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(data.SPECIALS + LETTERS + PHONES)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_text(tok.to_str())
    (path / "pairs.json").write_text(json.dumps(splits))
    (path / "meta.json").write_text(json.dumps({"kind": "pairs"}))
    return data.PairData(path)


class _Scripted:
    """Stands in for a model: generate() returns <s> + the scripted pronunciation of each source word + </s>, padded
    with <pad>, as the real encoder-decoder generate does."""

    def __init__(self, pairs, outputs):
        self.pairs, self.outputs = pairs, outputs
        self.config = types.SimpleNamespace(max_seq_len=12)
        self.calls = []

    def parameters(self):
        return iter([torch.zeros(1)])

    def generate(self, src, max_new_tokens, **kw):
        self.calls.append((src.shape[0], kw["num_beams"]))
        letters = {i: t for t, i in self.pairs.tokenizer.get_vocab().items()}
        rows = []
        for row in src.tolist():
            word = "".join(letters[i] for i in row if i != data.PAD)
            rows.append([data.BOS] + self.pairs.encode_target(self.outputs[word]) + [data.EOS])
        return data.PairData.pad(rows)


def test_g2p_error_rates_decodes_and_scores_hand_made_outputs(tmp_path):
    test = [["cat", ["K AE T"]], ["tomato", ["T AH M EY T OW", "T AH M AA T OW"]], ["dog", ["D AO G"]]]
    pairs = _pairs_folder(tmp_path / "p", {"train": test, "val": test, "test": test})
    outputs = {"cat": "K AE T",              # right
               "tomato": "T AH M AA T OW",   # right: the second pronunciation
               "dog": "D AA G Z"}            # 1 substitution + 1 insertion against D AO G
    model = _Scripted(pairs, outputs)
    r = g2p_error_rates(model, pairs, "test", num_beams=3, batch_size=2)
    assert r == {"wer": pytest.approx(1 / 3), "per": pytest.approx(2 / (3 + 6 + 3)), "words": 3}
    assert model.calls == [(2, 3), (1, 3)]  # two batches, the beams passed through
    r = g2p_error_rates(model, pairs, "test", limit=1)
    assert r == {"wer": 0.0, "per": 0.0, "words": 1}


def test_evaluate_reports_greedy_and_beam_rates_on_the_held_out_words(tmp_path, monkeypatch):
    """`tinyformer eval` on an encoder-decoder (tinyformer.eval.evaluate): the default split "val" means the held-out
    test words, greedy and then beam search, one line each; the data must be paired and share the model's tokenizer."""
    from tinyformer.eval import evaluate
    val = [["cat", ["K AE T"]]]
    test = [["cat", ["K AE T"]], ["dog", ["D AO G"]]]
    pairs = _pairs_folder(tmp_path / "p", {"train": val, "val": val, "test": test})
    model = _Scripted(pairs, {"cat": "K AE T", "dog": "D AA G"})
    model.config.arch, model.tokenizer = "encoder-decoder", pairs.tokenizer
    lines = []
    r = evaluate(model, str(tmp_path / "p"), num_beams=4, log=lines.append)
    assert list(r) == [1, 4] and model.calls == [(2, 1), (2, 4)]
    assert r[4] == {"wer": pytest.approx(1 / 2), "per": pytest.approx(1 / 6), "words": 2}
    assert [line.split(":")[0] for line in lines] == [f"{tmp_path / 'p'} test (2 words), greedy",
                                                      f"{tmp_path / 'p'} test (2 words), beam 4"]
    model.calls.clear()
    assert list(evaluate(model, str(tmp_path / "p"), "train", num_beams=1, log=lines.append)) == [1]
    assert model.calls == [(1, 1)]  # the split asked for, decoded once when beam search is greedy
    model.tokenizer = data.char_tokenizer("abc")
    with pytest.raises(ValueError, match="another tokenizer"):
        evaluate(model, str(tmp_path / "p"))
    (tmp_path / "plain.txt").write_text("not pairs\n" * 50)
    monkeypatch.setenv("TINYFORMER_DATA", str(tmp_path / "cache"))  # where the text is tokenized before the check
    with pytest.raises(ValueError, match="paired data"):
        evaluate(model, str(tmp_path / "plain.txt"))


def _bucket_data(tmp_path):
    # source lengths 1..19 with uneven counts: buckets <=3 and >=16 merge several lengths
    words = [c * n for n in range(1, 20) for c in "abcdgmot"[: 1 + n % 4]]
    split = [[w, ["T " * (len(w) % 5) + "K"]] for w in words]
    return _pairs_folder(tmp_path / "b", {"train": split, "val": split, "test": split}), words


def test_bucketed_batches_hold_one_length_bucket(tmp_path):
    pairs, _ = _bucket_data(tmp_path)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        src, mask, tgt_in, tgt_out = pairs.get_batch("train", 8, 32, g, bucket=True)
        lengths = mask.sum(1).tolist()
        assert len({min(max(n, 3), 16) for n in lengths}) == 1, lengths
        assert (tgt_in[:, 0] == data.BOS).all()
        assert ((tgt_out == data.EOS).sum(1) == 1).all()
    a = pairs.get_batch("train", 8, 32, torch.Generator().manual_seed(5), bucket=True)
    b = pairs.get_batch("train", 8, 32, torch.Generator().manual_seed(5), bucket=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_buckets_split_a_source_length_into_runs_of_target_lengths(tmp_path, monkeypatch):
    # source lengths 4..6, eight words each, target lengths 1..4 (two words each) within every source length
    split = [[c * n, ["T " * (LETTERS.index(c) % 4) + "K"]] for n in (4, 5, 6) for c in LETTERS]
    pairs = _pairs_folder(tmp_path / "r", {"train": split, "val": split, "test": split})
    for least, runs in ((3, [(1, 2), (3, 4)]), (5, [(1, 4)]), (2, [(1, 1), (2, 2), (3, 3), (4, 4)])):
        monkeypatch.setattr(data, "BUCKET_MIN", least)
        pairs._bucket_cache.clear()
        buckets, bucket_of = pairs._buckets("train")
        got = sorted((len(pairs.examples["train"][int(b[0])][0]),
                      tuple(sorted({len(pairs.examples["train"][i][1]) for i in b.tolist()}))) for b in buckets)
        assert got == sorted((n, tuple(range(lo, hi + 1))) for n in (4, 5, 6) for lo, hi in runs), (least, got)
        assert sorted(torch.cat(buckets).tolist()) == list(range(len(split)))  # a partition of the examples
        assert all(int(bucket_of[i]) == k for k, b in enumerate(buckets) for i in b.tolist())
        g = torch.Generator().manual_seed(least)
        for _ in range(50):  # a batch: one source length, target lengths within one run
            src, mask, tgt_in, tgt_out = pairs.get_batch("train", 6, 16, g, bucket=True)
            lengths = set(mask.sum(1).tolist())
            targets = set(((tgt_out != data.PAD).sum(1) - 1).tolist())
            assert len(lengths) == 1 and any(targets <= set(range(lo, hi + 1)) for lo, hi in runs), (lengths, targets)


@pytest.mark.parametrize("least", [512, 2])
def test_bucketed_sampling_draws_every_example_equally_often(tmp_path, monkeypatch, least):
    monkeypatch.setattr(data, "BUCKET_MIN", least)  # source buckets only / target-length runs as well
    pairs, words = _bucket_data(tmp_path)
    n, batches, size = len(words), 6000, 8
    g = torch.Generator().manual_seed(1)
    counts = Counter()
    for _ in range(batches):
        src, mask, _, _ = pairs.get_batch("train", size, 32, g, bucket=True)
        counts.update("".join(pairs.tokenizer.id_to_token(i) for i in row if i) for row in src.tolist())
    expected = batches * size / n  # uniform marginal: 1/N per draw
    assert set(counts) == set(words)
    worst = max(abs(counts[w] - expected) / expected for w in words)
    assert worst < 0.3, worst  # 0.3 is several standard deviations of these counts


def test_schedule_runs_over_the_time_budget():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=20, max_minutes=2)
    assert lr_at(cfg, 5, 500.0) == pytest.approx(1e-3 * 6 / 11)  # warmup counts iterations
    assert lr_at(cfg, 10, 0.0) == pytest.approx(1e-3)
    assert lr_at(cfg, 30, 60.0) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half the time: half way down the cosine
    assert lr_at(cfg, 11, 90.0) == pytest.approx(1e-4 + 0.5 * (1 - 0.5 ** 0.5) * 9e-4)  # cos(3 pi / 4)
    assert lr_at(cfg, 50, 120.0) == pytest.approx(1e-4) and lr_at(cfg, 50, 999.0) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(max_minutes=-1)


def test_max_minutes_stops_evaluates_saves_and_resumes(tmp_path):
    import tinyformer
    split = [[w, [" ".join({"a": "AA", "b": "D", "c": "K"}[c] for c in w)]]
             for w in ("ab", "ba", "abc", "cab", "bca", "ccab", "abca", "bb")]
    _pairs_folder(tmp_path / "p", {"train": split, "val": split, "test": split})
    kw = dict(data=str(tmp_path / "p"), preset="seq2seq-small", out_dir=str(tmp_path / "run"), max_iters=10 ** 6,
              lr_decay_iters=10 ** 6, warmup_iters=0, eval_interval=10 ** 5, eval_iters=1, batch_size=4,
              block_size=8, bucket_by_length=True, progress=False, plot=False,
              model=dict(n_layer=1, n_decoder_layer=1, n_head=2, d_model=16, d_ff=32))
    s = train(TrainConfig(**kw, max_minutes=0.02))  # 1.2 s
    assert 0 < s["iters"] < 10 ** 6
    assert 1.2 <= s["seconds"] < 30
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iter"] == s["iters"] and "val_loss" in rows[-1]  # evaluated where it stopped
    assert rows[-1]["lr"] == pytest.approx(TrainConfig(**kw).min_lr)  # the decay ended with the time
    model = tinyformer.load(tmp_path / "run")
    assert model.num_params() == s["params"]
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["elapsed_s"] >= 1.2
    budget = ckpt["elapsed_s"] + 1.2  # the time already spent counts: 1.2 s more to go
    s2 = train(TrainConfig(**kw, max_minutes=budget / 60, resume=True))
    assert s2["iters"] > s["iters"]
    assert 1.2 <= s2["seconds"] < 30
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["elapsed_s"] >= budget


def test_prepare_command_writes_the_g2p_pairs(tmp_path):
    from tinyformer import cli
    assert cli.main(["prepare", "--data", "cmudict-g2p", "--out", str(tmp_path / "g2p"), "--val_fraction", "0.05"]) == 0
    pairs = data.PairData(tmp_path / "g2p")
    n = {s: len(v) for s, v in pairs.words.items()}
    assert n["val"] == pytest.approx(0.05 * sum(n.values()), abs=1) and n["test"] > n["val"] > 0
    assert pairs.decode_target(pairs.encode_target("K AE T")) == "K AE T"
    assert cli.main(["prepare", "--data", "cmudict-g2p", "--out", str(tmp_path / "b"), "--tokenizer", "bpe"]) == 2
    with pytest.raises(ValueError, match="leave words to train on"):
        data.prepare_g2p(tmp_path / "c", val_fraction=0.95)


def test_train_on_word_pairs_picks_the_encoder_decoder_preset(tmp_path):
    """`tinyformer train --data cmudict-g2p` (the issue's command line) trains the G2P encoder-decoder: paired data
    without --preset takes the g2p-cmudict preset (model and hyperparameters); an explicit --preset stays."""
    from tinyformer import cli
    parse = lambda *a: cli._train_config(cli.build_parser().parse_args(["train", *a]))  # noqa: E731
    cfg = parse("--data", "cmudict-g2p", "--max_iters", "7")
    assert cfg.preset == "g2p-cmudict" and cfg.bucket_by_length and cfg.max_iters == 7
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "pairs.json").write_text("{}")  # a prepared pairs folder (`tinyformer prepare --data cmudict-g2p`)
    assert parse("--data", str(pairs)).preset == "g2p-cmudict"
    assert parse("--data", "cmudict-g2p", "--preset", "seq2seq-small").preset == "seq2seq-small"
    assert parse("--data", "shakespeare").preset == "baby-shakespeare-char"
