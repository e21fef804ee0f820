"""Benchmarks on the current device.

    python -m scripts.benchmark model [--embed 192 --layers 4 --heads 4 --ff 768 --mels 128
        --frames 512 --stride 10 --batch 32] [--jit] [--fused] [--fused-qkv]
        [--full-last-block] [--precision float32|mixed_bfloat16|mixed_float16] [--vs-pytorch] [--json]
    python -m scripts.benchmark pipeline [--clips 240] [--seconds 5] [--rate 44100] [--json]

``model``: training throughput (clips/s, steady state after compilation, Adam,
dropout 0), inference throughput (batch) and single-clip latency (waveform in,
frontend included), parameters, FLOPs per clip (from the shapes: matmuls and the
patch convolution, 2 FLOPs per multiply-add, the last block over the pooled rows
unless ``--full-last-block``; training = 3 x forward) and the
fraction of the device's measured peak (a 4096 x 4096 matmul with XLA in the model's compute
dtype: float32, or bfloat16 / float16 under ``--precision``). With
``--vs-pytorch`` (needs torch and transformers) it times Hugging Face's
``ASTForAudioClassification`` of the same dimensions in the same process,
alternating with ours, and prints our/theirs ratios.

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


def model_flops(embed, layers, ff, mels, frames, patch, f_stride, t_stride, classes,
                prefix=2, last_rows=None):
    """Forward FLOPs per clip (2 per multiply-add) of the transformer backbone, and the
    number of patches. ``prefix``: [CLS] (+ [DIST]) tokens. ``last_rows``: rows the last
    block computes (``pooled_last_block``: queries, attention, output projection and
    MLP for those rows only; keys and values for all; with ``--fused-qkv`` the one q/k/v
    matmul also computes the other rows' queries, 2 * n * embed^2 more); ``None``: every
    row."""
    f_dim = (mels - patch) // f_stride + 1
    t_dim = (frames - patch) // t_stride + 1
    n = f_dim * t_dim + prefix

    def block(rows):
        kv = 2 * 2 * n * embed * embed
        q_out = 2 * 2 * rows * embed * embed
        attention = 2 * 2 * rows * n * embed
        mlp = 2 * 2 * rows * embed * ff
        return kv + q_out + attention + mlp

    conv = 2 * f_dim * t_dim * patch * patch * embed
    blocks = (layers - 1) * block(n) + block(n if last_rows is None else last_rows)
    head = 2 * embed * classes
    return conv + blocks + head, f_dim * t_dim


def measured_peak_gflops(size=4096, repeats=5, dtype="float32"):
    """A square matmul with XLA, in the compute dtype of the model being measured."""
    import tensorflow as tf

    a = tf.cast(tf.random.normal((size, size)), dtype)
    b = tf.cast(tf.random.normal((size, size)), dtype)
    mm = tf.function(lambda x, y: tf.matmul(x, y), jit_compile=True)
    mm(a, b).numpy()
    best = min(_timed(lambda: mm(a, b).numpy()) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(args):
    import keras
    import numpy as np
    import tensorflow as tf

    from src.models.build import build_model

    hop = 160
    clip_samples = (args.frames - 1) * hop + 400  # exactly `frames` frames
    if args.precision != "float32":
        keras.mixed_precision.set_global_policy(args.precision)
    # AST's block and head (as Hugging Face's ASTForAudioClassification below).
    cfg = dict(embed_dim=args.embed, num_layers=args.layers, num_heads=args.heads,
               ff_dim=args.ff, f_stride=args.stride, t_stride=args.stride,
               dropout_rate=0.0, norm_first=True, activation="gelu", pooling="cls_dist",
               fused_attention=args.fused, fused_qkv=args.fused_qkv,
               pooled_last_block=not args.full_last_block)
    model = build_model(cfg, dict(n_mels=args.mels), num_classes=args.classes,
                        clip_samples=clip_samples)
    backbone = model.backbone
    backbone.compile(optimizer=keras.optimizers.Adam(1e-4),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     jit_compile=args.jit)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.frames, args.mels)).astype("float32")
    y = rng.integers(0, args.classes, args.batch).astype("int32")
    for _ in range(2):  # compile + warm up
        backbone.train_on_batch(x, y)
    infer = tf.function(lambda v: backbone(v, training=False), jit_compile=args.jit)
    infer(x).numpy()
    wave = rng.standard_normal((1, clip_samples)).astype("float32") * 0.1
    single = tf.function(lambda v: model(v, training=False), jit_compile=args.jit)
    single(wave).numpy()

    ours = {"train": [], "infer": [], "latency": []}
    theirs = {"train": [], "infer": []} if args.vs_pytorch else None
    torch_step = _pytorch_ast(args) if args.vs_pytorch else None
    for _ in range(args.repeats):
        ours["train"].append(args.batch / _timed(lambda: backbone.train_on_batch(x, y)))
        ours["infer"].append(args.batch / _timed(lambda: infer(x).numpy()))
        ours["latency"].append(_timed(lambda: single(wave).numpy()) * 1000)
        if torch_step is not None:
            theirs["train"].append(args.batch / _timed(torch_step["train"]))
            theirs["infer"].append(args.batch / _timed(torch_step["infer"]))
    flops, patches = model_flops(args.embed, args.layers, args.ff, args.mels, args.frames, 16,
                                 args.stride, args.stride, args.classes,
                                 last_rows=None if args.full_last_block else 2)
    full_flops, _ = model_flops(args.embed, args.layers, args.ff, args.mels, args.frames, 16,
                                args.stride, args.stride, args.classes)
    train_cps = float(np.median(ours["train"]))
    infer_cps = float(np.median(ours["infer"]))
    peak = measured_peak_gflops(dtype="bfloat16" if args.precision == "mixed_bfloat16"
                                else "float16" if args.precision == "mixed_float16"
                                else "float32")
    out = {
        "device": (tf.config.list_physical_devices("GPU") or ["CPU"])[0].__str__(),
        "cpu_count": os.cpu_count(),
        "shape": dict(embed=args.embed, layers=args.layers, heads=args.heads, ff=args.ff,
                      mels=args.mels, frames=args.frames, stride=args.stride,
                      patches=patches, batch=args.batch),
        "jit_compile": args.jit,
        "fused_attention": args.fused,
        "fused_qkv": args.fused_qkv,
        "pooled_last_block": not args.full_last_block,
        "precision": args.precision,
        "parameters": int(backbone.count_params()),
        "gflops_per_clip_forward": flops / 1e9,
        "gflops_per_clip_forward_all_rows": full_flops / 1e9,
        "train_clips_per_s": train_cps,
        "infer_clips_per_s": infer_cps,
        "latency_ms": float(np.median(ours["latency"])),
        "train_gflops_per_s": 3 * flops * train_cps / 1e9,
        "infer_gflops_per_s": flops * infer_cps / 1e9,
        "peak_gflops_per_s": peak,
    }
    out["train_fraction_of_peak"] = out["train_gflops_per_s"] / peak
    out["infer_fraction_of_peak"] = out["infer_gflops_per_s"] / peak
    if theirs is not None:
        out["pytorch_train_clips_per_s"] = float(np.median(theirs["train"]))
        out["pytorch_infer_clips_per_s"] = float(np.median(theirs["infer"]))
        out["train_ratio"] = train_cps / out["pytorch_train_clips_per_s"]
        out["infer_ratio"] = infer_cps / out["pytorch_infer_clips_per_s"]
    return out


def hf_ast_config(config_cls, embed, layers, heads, ff, mels, frames, stride, classes):
    """Hugging Face's ``ASTConfig`` with our benchmark's dimensions, dropout 0."""
    return config_cls(hidden_size=embed, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=ff, num_mel_bins=mels, max_length=frames,
                      frequency_stride=stride, time_stride=stride, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, num_labels=classes)


def _pytorch_ast(args):
    """Hugging Face's AST with the same dimensions: a train step and an inference call."""
    try:
        import torch
        from transformers import ASTConfig, ASTForAudioClassification
    except ImportError as err:
        raise SystemExit(f"--vs-pytorch needs torch and transformers ({err}); "
                         "pip install torch transformers") from None
    torch.manual_seed(0)
    model = ASTForAudioClassification(hf_ast_config(
        ASTConfig, args.embed, args.layers, args.heads, args.ff, args.mels, args.frames,
        args.stride, args.classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.frames, args.mels)
    y = torch.randint(0, args.classes, (args.batch,))

    # Like for like: with a bfloat16 policy on our side, PyTorch runs under CPU autocast
    # to bfloat16 (float32 weights, bfloat16 matmuls).
    bf16 = args.precision == "mixed_bfloat16"

    def cast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def train():
        model.train()
        opt.zero_grad()
        with cast():
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()

    def infer():
        model.eval()
        with torch.inference_mode(), cast():
            model(x)

    for _ in range(2):
        train()
        infer()
    return {"train": train, "infer": infer}


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
    m = sub.add_parser("model", help="training / inference throughput of the transformer")
    m.add_argument("--embed", type=int, default=192)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--ff", type=int, default=768)
    m.add_argument("--mels", type=int, default=128)
    m.add_argument("--frames", type=int, default=512)
    m.add_argument("--stride", type=int, default=10)
    m.add_argument("--batch", type=int, default=32)
    m.add_argument("--classes", type=int, default=50)
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--jit", action="store_true", help="XLA jit_compile")
    m.add_argument("--fused", action="store_true", help="fused attention kernel")
    m.add_argument("--fused-qkv", action="store_true", help="one q/k/v projection matmul")
    m.add_argument("--full-last-block", action="store_true",
                   help="the last block computes every token's row (model.pooled_last_block="
                        "false), as Hugging Face's AST does")
    m.add_argument("--precision", default="float32",
                   choices=["float32", "mixed_bfloat16", "mixed_float16"],
                   help="Keras dtype policy (mixed_float16 needs a GPU)")
    m.add_argument("--vs-pytorch", action="store_true")
    m.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    if args.what == "model":
        r = bench_model(args)
        if args.json:
            print(json.dumps(r))
            return 0
        sh = r["shape"]
        print(f"model: embed {sh['embed']}, {sh['layers']} layers, {sh['heads']} heads, "
              f"ff {sh['ff']}, {sh['mels']} mels x {sh['frames']} frames, stride {sh['stride']} "
              f"({sh['patches']} patches), batch {sh['batch']}, jit={r['jit_compile']}, "
              f"fused={r['fused_attention']}, fused_qkv={r['fused_qkv']}, "
              f"pooled_last_block={r['pooled_last_block']}, "
              f"{r['precision']}; {r['device']}, {r['cpu_count']} CPU(s)")
        print(f"  parameters {r['parameters']:,}; {r['gflops_per_clip_forward']:.2f} GFLOP/clip "
              f"forward ({r['gflops_per_clip_forward_all_rows']:.2f} when every row of the "
              f"last block is computed); measured peak {r['peak_gflops_per_s']:.0f} GFLOP/s")
        print(f"  training   {r['train_clips_per_s']:8.2f} clips/s  "
              f"({r['train_gflops_per_s']:.0f} GFLOP/s, {100 * r['train_fraction_of_peak']:.0f}%"
              " of peak)")
        print(f"  inference  {r['infer_clips_per_s']:8.2f} clips/s  "
              f"({r['infer_gflops_per_s']:.0f} GFLOP/s, {100 * r['infer_fraction_of_peak']:.0f}%"
              " of peak)")
        print(f"  latency    {r['latency_ms']:8.1f} ms for one clip (waveform in)")
        if "train_ratio" in r:
            print(f"  PyTorch AST: training {r['pytorch_train_clips_per_s']:.2f} clips/s, "
                  f"inference {r['pytorch_infer_clips_per_s']:.2f} clips/s; ours/theirs "
                  f"{r['train_ratio']:.2f}x training, {r['infer_ratio']:.2f}x inference")
        return 0

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
