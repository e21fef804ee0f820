"""Benchmarks on the current device.

    python -m scripts.benchmark pipeline [--clips 240] [--seconds 5] [--rate 44100] [--json]

``pipeline``: input pipeline throughput on generated clips in ESC-50 layout
(5 s at 44.1 kHz by default, like ESC-50): decode + resample to 16 kHz alone,
decode + resample + log-mel features (what the first epoch costs), loading
the cached features from disk, and an epoch over cached features (shuffle +
batch + prefetch, what every later epoch costs). Clips per second, best of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_pipeline(clips, seconds, rate, n_mels, batch, repeats, workdir):
    import numpy as np

    from src.data.pipeline import compute_features, training_dataset, waveform_dataset
    from src.data.synthetic import CLASSES, generate_dataset
    from src.models.frontend import LogMel

    per_class = max(5, math.ceil(clips / len(CLASSES) / 5) * 5)
    root = generate_dataset(
        Path(workdir) / "clips", clips_per_class=per_class, sample_rate=rate, duration=seconds
    )
    paths = sorted(str(p) for p in (root / "audio").glob("*.wav"))[:clips]
    sr, clip_samples = 16000, int(16000 * seconds)
    frontend = LogMel(sample_rate=sr, n_mels=n_mels)

    def decode():
        for _ in waveform_dataset(paths, sr, clip_samples, remove_mean=True).batch(batch):
            pass

    def features(cache_dir=None):
        return compute_features(frontend, paths, sample_rate=sr, clip_samples=clip_samples,
                                remove_mean=True, batch_size=batch, cache_dir=cache_dir)

    decode()  # warm up: graph tracing, tfio kernels
    t_decode = _best(decode, repeats)
    t_features = _best(features, repeats)
    cache = Path(workdir) / "cache"
    feats = features(cache)  # writes the cache
    t_load = _best(lambda: features(cache), repeats)
    labels = np.zeros(len(paths), dtype=np.int32)

    def epoch():
        for _ in training_dataset(feats, labels, batch, seed=0):
            pass

    epoch()
    t_epoch = _best(epoch, repeats)
    n = len(paths)
    return {
        "clips": n,
        "clip_seconds": seconds,
        "file_rate": rate,
        "model_rate": sr,
        "n_mels": n_mels,
        "feature_shape": list(feats.shape[1:]),
        "decode_resample_clips_per_s": n / t_decode,
        "first_epoch_features_clips_per_s": n / t_features,
        "cache_load_clips_per_s": n / t_load,
        "cached_epoch_clips_per_s": n / t_epoch,
        "cpu_count": os.cpu_count(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pipeline", help="input pipeline throughput")
    p.add_argument("--clips", type=int, default=240)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=int, default=44100)
    p.add_argument("--n-mels", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        r = bench_pipeline(args.clips, args.seconds, args.rate, args.n_mels, args.batch,
                           args.repeats, workdir)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"input pipeline: {r['clips']} clips of {r['clip_seconds']} s at {r['file_rate']} Hz "
          f"-> {r['model_rate']} Hz, log-mel {tuple(r['feature_shape'])}, "
          f"{r['cpu_count']} CPU(s)")
    rows = [
        ("decode + resample", r["decode_resample_clips_per_s"]),
        ("decode + resample + features (first epoch)", r["first_epoch_features_clips_per_s"]),
        ("load cached features from disk", r["cache_load_clips_per_s"]),
        ("epoch over cached features (shuffle, batch)", r["cached_epoch_clips_per_s"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v:10.1f} clips/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
