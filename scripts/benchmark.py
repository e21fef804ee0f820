"""Benchmarks on the current device.

    python -m scripts.benchmark model [--embed 192 --layers 4 --heads 4 --ff 768 --mels 128
        --frames 512 --stride 10 --batch 32] [--jit] [--fused] [--fused-qkv]
        [--full-last-block] [--precision float32|mixed_bfloat16|mixed_float16]
        [--patchout T,F[,R]] [--passt-audioset] [--vs-pytorch] [--profile N]
        [--ab KERNEL[,KERNEL] [--ab-pairs 20]] [--json]
    python -m scripts.benchmark pretrain [--embed 192 --layers 4 --heads 4 --ff 768
        --mels 128 --frames 998 --batch 16] [--patchout T,F] [--mask-fraction 0.78] [--json]
    python -m scripts.benchmark optimizer [--embed 192 --layers 4 --heads 4 --ff 768
        --mels 128 --frames 512 --stride 10] [--pairs 40] [--json]
    python -m scripts.benchmark pipeline [--clips 240] [--seconds 5] [--rate 44100]
        [--tfio-clips 48] [--soxr-recipes] [--json]

The ``model`` and ``pretrain`` reports name the CPU: its model and the features that
decide which matmul kernels run (AVX2, AVX-512, AVX512-BF16, VNNI, AMX), from
``/proc/cpuinfo``.

``model``: training throughput (clips/s, steady state after compilation, Adam,
dropout 0), inference throughput (batch) and single-clip latency (waveform in,
frontend included), parameters, FLOPs per clip (from the shapes: matmuls and the
patch convolution, 2 FLOPs per multiply-add, the last block over the pooled rows
unless ``--full-last-block``; training = 3 x forward) and the
fraction of the device's measured peak (a 4096 x 4096 matmul with XLA in the model's compute
dtype: float32, or bfloat16 / float16 under ``--precision``). With
``--vs-pytorch`` (needs torch and transformers) it times Hugging Face's
``ASTForAudioClassification`` of the same dimensions in the same process,
alternating with ours, and prints our/theirs ratios. With ``--patchout T,F[,R]``
(``model.patchout``: T time columns, F frequency rows, then R random patches dropped
in training) it also times the same model without patchout, alternating, and
prints the with/without ratios; FLOPs are then given for a training step's forward
pass over the patches left as well. ``--passt-audioset``: PaSST's AudioSet shape, a
10 s clip of 128 mel bins x 998 frames, stride 10 (a 12 x 99 grid), with its
structured patchout t=40, f=4 (8 x 59 = 472 patches left) unless ``--patchout``
says otherwise. Training and inference run the compiled kernels of
``src.models.native`` where they build (the report says
``native_kernels=True``; ``AUDIO_TRANSFORMER_NATIVE=0`` times TensorFlow's ops
instead). ``--ab KERNEL[,KERNEL]`` (of attention, layer_norm, bias_gelu, bias) measures
what kernels are worth: the same model traced without them, alternating steps with the
default one in one process (``--ab-pairs`` pairs, in both orders), and the median and
quartiles of the step-time ratios; ``adam`` among them trains the other model with
Keras' own Adam update instead of the fused one. ``--profile N`` traces N training steps and N inference batches with
TensorFlow's profiler: op time by part of the model and by op type (an XLA-compiled
step under ``--jit`` has no per-op times).

``pretrain``: masked patch pretraining (SSAST: cluster masks, InfoNCE + MSE heads,
Adam) steps per second with structured patchout (``--patchout T,F``, default 25,3:
of a 10 s clip's 8 x 62 grid of non-overlapping 16 x 16 patches, 5 x 37 are left, a
ratio close to PaSST's AudioSet setting) and without it, alternating; the masks cover
the same fraction of the patches a step sees (``--mask-fraction``).

``optimizer``: one Adam update of every weight of the model (the ``model`` shape's
block and head), fused (``src.training.optim.Adam``: one ResourceApplyAdam per weight,
what training uses) against Keras' own element-wise update, alternating in one process:
ms per update and the ratio. ``--embed 768 --layers 12 --heads 12 --ff 3072 --frames
1024`` is AST-base (86M parameters).

``pipeline``: input pipeline throughput on generated 16-bit WAV clips in ESC-50
layout (5 s at 44.1 kHz by default, like ESC-50), resampled to 16 kHz: decode
only (``decode_audio`` at the file's rate, and ``tf.audio.decode_wav`` for
comparison); decode + resample with the previous
decoder (``tf.audio.decode_wav`` + tensorflow-io's resampler, on the first
``--tfio-clips`` clips, one run: it is slow); decode + resample with
``src.data.audio`` (``read_audio`` on one thread and on a pool of one thread per
core; ``decode_audio`` in ``tf.data``, sequential and with
``num_parallel_calls=AUTOTUNE``); building the feature store from scratch (decode +
resample + log-mel features + TFRecord shards, every file decoded once, all cores: what
the first run on a dataset costs); checking an up-to-date store (what every later run
costs); reading the stored features back from the shards; and a training epoch over
the store (shuffle buffer, targets, batch, prefetch), streamed and from the in-memory
cache. Clips per second, best of
``--repeats`` runs, and for the decode stages the cores kept busy (process CPU
time / wall time) and, on Linux, the cores other processes kept busy meanwhile
(on a shared machine a stage cannot use a core a neighbour holds). Cores: those this process may run on (its affinity mask;
``os.cpu_count()`` where there is none). ``--soxr-recipes`` instead compares
libsoxr's quality recipes: the worst error of single tones up to 0.9 x the lower
Nyquist frequency against the tone computed at the target rate (float64), per
rate pair, and the CPU time to resample a 5 s 44.1 kHz clip to 16 kHz.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
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


# CPU features that decide which matmul kernels run (oneDNN's and PyTorch's).
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
# Seconds of pause before each timed call in the model benchmark (see _settled).
SETTLE_S = 0.3


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU's model name and the matmul-relevant features it has, from
    ``/proc/cpuinfo`` (Linux), e.g. ``"AMD EPYC (avx2, avx512f, avx512_bf16)"``; the
    platform's processor string elsewhere."""
    import platform

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or platform.machine()
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    name = fields.get("model name") or platform.processor() or platform.machine()
    have = [f for f in _CPU_FLAGS if f in flags]
    return f"{name} ({', '.join(have)})" if have else name


def _cores():
    """CPU cores this process may run on (``os.cpu_count()`` without an affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _tfio_waveform_dataset(paths, sample_rate, clip_samples):
    """The previous decoder, kept measurable: ``tf.audio.decode_wav`` + tensorflow-io's
    resampler in the graph, mean removal, crop/pad, ``num_parallel_calls=AUTOTUNE``."""
    import tensorflow as tf
    import tensorflow_io as tfio

    def decode(path):
        audio, rate = tf.audio.decode_wav(tf.io.read_file(path))
        audio = tfio.audio.resample(tf.reduce_mean(audio, axis=-1, keepdims=True),
                                    rate_in=tf.cast(rate, tf.int64),
                                    rate_out=tf.constant(sample_rate, tf.int64))[:, 0]
        audio = audio - tf.reduce_mean(audio)
        audio = audio[:clip_samples]
        audio = tf.pad(audio, [[0, clip_samples - tf.shape(audio)[0]]])
        return tf.clip_by_value(audio, -1.0, 1.0)

    ds = tf.data.Dataset.from_tensor_slices(list(paths))
    return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def bench_pipeline(clips, seconds, rate, n_mels, batch, repeats, workdir, tfio_clips=48):
    from concurrent.futures import ThreadPoolExecutor

    import tensorflow as tf

    from src.data.audio import decode_audio, read_audio
    from src.data.esc50 import read_esc50
    from src.data.pipeline import LabelTable, training_dataset
    from src.data.store import build_store
    from src.data.synthetic import CLASSES, generate_dataset
    from src.models.frontend import LogMel

    per_class = max(5, math.ceil(clips / len(CLASSES) / 5) * 5)
    root = generate_dataset(
        Path(workdir) / "clips", clips_per_class=per_class, sample_rate=rate, duration=seconds
    )
    paths = sorted(str(p) for p in (root / "audio").glob("*.wav"))[:clips]
    sr, clip_samples = 16000, int(16000 * seconds)
    frontend = LogMel(sample_rate=sr, n_mels=n_mels)
    cores = _cores()
    n = len(paths)

    def drain(ds, items=n):
        for _ in ds.take(items).batch(batch):
            pass

    def graph(sample_rate, samples, parallel):
        ds = tf.data.Dataset.from_tensor_slices(paths)
        return ds.map(lambda p: decode_audio(p, sample_rate, samples, remove_mean=True),
                      num_parallel_calls=parallel, deterministic=True if parallel else None)

    def decode_only():  # the same reader at the file's own rate: no resampling
        drain(graph(rate, int(rate * seconds), tf.data.AUTOTUNE))

    def decode_wav_only():  # TensorFlow's WAV decoder, for comparison
        def decode(path):
            audio, _ = tf.audio.decode_wav(tf.io.read_file(path))
            return tf.reduce_mean(audio, axis=-1)

        ds = tf.data.Dataset.from_tensor_slices(paths)
        drain(ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))

    def tfio_path():
        drain(_tfio_waveform_dataset(paths, sr, clip_samples), tfio_clips)

    def read(path):
        return read_audio(path, sr, clip_samples=clip_samples, remove_mean=True)

    def one_thread():
        for p in paths:
            read(p)

    pool = ThreadPoolExecutor(cores)

    def all_cores():
        for _ in pool.map(read, paths):
            pass

    def in_graph():
        drain(graph(sr, clip_samples, tf.data.AUTOTUNE))

    def in_graph_sequential():
        drain(graph(sr, clip_samples, None))

    index = read_esc50(root)
    keep = set(paths)
    index = dataclasses.replace(index, records=tuple(r for r in index.records if r.path in keep))
    store_dir = Path(workdir) / "store"

    def build(fresh=True):  # decode + resample + features + shards, all cores
        if fresh:
            shutil.rmtree(store_dir, ignore_errors=True)
        return build_store(index, frontend, sample_rate=sr, clip_samples=clip_samples,
                           cache_dir=store_dir, name="bench", remove_mean=True,
                           progress=False)

    def timed(key, fn, items=n, reps=repeats):
        fn()  # warm up: graph tracing, kernels, page cache
        wall, busy, others = _best_with_cpu(fn, reps)
        out[f"{key}_clips_per_s"], out[f"{key}_cpu_cores"] = items / wall, busy
        out[f"{key}_other_processes_cpu_cores"] = others

    out = {"clips": n, "clip_seconds": seconds, "file_rate": rate, "model_rate": sr,
           "n_mels": n_mels, "cpu_count": cores}
    stages = {
        "decode_only": decode_only,
        "decode_wav_only": decode_wav_only,
        "one_thread": one_thread,
        "all_cores": all_cores,
        "graph_sequential": in_graph_sequential,
        "decode_resample": in_graph,
    }
    for key, fn in stages.items():
        timed(key, fn)
    pool.shutdown()
    out["tfio_clips"] = min(tfio_clips, n)
    timed("tfio_resample", tfio_path, out["tfio_clips"], 1)
    out["first_epoch_features_clips_per_s"] = n / _best(build, repeats)
    store = build()
    out["store_check_clips_per_s"] = n / _best(lambda: build(fresh=False), repeats)
    out["feature_shape"] = [store.clip_frames, store.n_mels]

    def read_shards():
        for _ in store.records(store.shards).batch(batch).prefetch(tf.data.AUTOTUNE):
            pass

    read_shards()
    out["cache_load_clips_per_s"] = n / _best(read_shards, repeats)
    rows = range(len(index.records))
    labels = LabelTable(index)

    def epoch(cache_mb):  # the training stream: shuffle buffer, crop, targets, batch
        ds = training_dataset(store, index, rows, labels, batch_size=batch, seed=0,
                              memory_cache_mb=cache_mb)
        return lambda: [None for _ in ds]

    streamed, cached = epoch(0), epoch(1e6)
    streamed()
    cached()  # the first pass fills the cache
    out["cached_epoch_clips_per_s"] = n / _best(cached, repeats)
    out["streamed_epoch_clips_per_s"] = n / _best(streamed, repeats)
    return out


def _write_wav16(path, samples, rate):
    """16-bit PCM WAV with the standard library (no fsync per file, unlike libsndfile)."""
    import wave

    import numpy as np

    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


MEMORY_MIN_CLIPS = 100  # 10 classes x 10 folds: every fold holds every class


def make_memory_set(root, clips, seconds, rate=16000, classes=10, progress=True):
    """``clips`` AudioSet-like clips of ``seconds`` (noise plus a class tone, 16-bit WAV) in
    ``root/<class>/``, for the folder reader with ``labels_from_subdirs``; files already
    there are kept, so sets of several sizes share their first clips."""
    import numpy as np
    from tqdm.auto import tqdm

    root = Path(root)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    for i in tqdm(range(clips), desc="generating clips", unit="clip", disable=not progress,
                  leave=False):
        c = i % classes
        path = root / f"class{c:02d}" / f"clip{i:06d}.wav"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        x = 0.05 * rng.standard_normal(n) + 0.2 * np.sin(2 * np.pi * (300 + 150 * c) * t)
        _write_wav16(path, x, rate)
    return root


def bench_memory(sizes, seconds, n_mels, workdir, epochs=1, progress=True, shuffle_mb=512):
    """Peak RSS of a real training run (``python -m src.train``, streaming from the
    feature store) against the number of clips. For each size, in fresh processes: the
    first run builds the store and trains, the second trains from the finished store."""
    import subprocess

    workdir = Path(workdir)
    audio = workdir / "audio"
    rows = []
    for clips in sizes:
        make_memory_set(audio, max(sizes), seconds, progress=progress)
        subset = workdir / f"set_{clips}"
        if not subset.exists():  # the first ``clips`` files, linked
            for i in range(clips):
                src = audio / f"class{i % 10:02d}" / f"clip{i:06d}.wav"
                dst = subset / src.parent.name / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dst)
        base = [  # overrides of python -m src.train
            "data=folder", f"data.root={subset}",
            "data.labels_from_subdirs=true", "data.num_folds=10", "data.folds=[10]",
            f"data.clip_seconds={seconds}", f"frontend.n_mels={n_mels}",
            "model.embed_dim=16", "model.num_heads=2", "model.ff_dim=32", "model.num_layers=1",
            f"trainer.epochs={epochs}", "trainer.batch_size=64", "trainer.eval_batch_size=128",
            "trainer.attention_maps=0", "trainer.save_model=false", "trainer.verbose=0",
            "data.memory_cache_mb=0", f"data.shuffle_buffer_mb={shuffle_mb}", "logger=none",
        ]
        env = dict(os.environ, AUDIO_RUNS_DIR=str(workdir / "runs"),
                   AUDIO_CACHE_DIR=str(workdir / "cache"), TF_CPP_MIN_LOG_LEVEL="2")
        store_glob = "folder-*/shards/*.tfrecord"
        first = subprocess.run(  # a fresh child per measurement: ru_maxrss is per child
            [sys.executable, "-c", _RSS_CHILD, *base, f"name=memory_{clips}_build"],
            env=env, capture_output=True, text=True)
        second = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, *base, f"name=memory_{clips}_train"],
            env=env, capture_output=True, text=True)
        for run in (first, second):
            if run.returncode != 0:
                raise RuntimeError(f"training on {clips} clips failed:\n{run.stderr[-4000:]}")
        build = json.loads(first.stdout.strip().splitlines()[-1])
        train = json.loads(second.stdout.strip().splitlines()[-1])
        feature_mb = sum(f.stat().st_size for f in (workdir / "cache" / "features").glob(
            store_glob)) / 2**20
        rows.append({
            "clips": clips, "features_mb": feature_mb,
            "build_and_train_peak_rss_mb": build["peak_rss_mb"],
            "build_and_train_wall_s": build["wall_s"],
            "train_peak_rss_mb": train["peak_rss_mb"], "train_wall_s": train["wall_s"],
        })
        # the store of this size is not needed again
        for d in (workdir / "cache" / "features").glob("folder-*"):
            subprocess.run(["rm", "-rf", str(d)], check=False)
    return {"seconds": seconds, "n_mels": n_mels, "epochs": epochs,
            "shuffle_buffer_mb": shuffle_mb, "sizes": rows}


# Runs ``python -m src.train ARGS`` in this process (a fresh child of the benchmark) and
# prints its peak RSS and wall time as JSON on the last line.
_RSS_CHILD = """
import json, resource, runpy, sys, time
sys.argv = ["src.train", *sys.argv[1:]]
start = time.perf_counter()
try:
    runpy.run_module("src.train", run_name="__main__")
except SystemExit as e:
    if e.code not in (0, None):
        raise
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps({"peak_rss_mb": peak, "wall_s": time.perf_counter() - start}))
"""


def _system_busy_s():
    """CPU seconds all processes of the machine have run (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _best_with_cpu(fn, repeats):
    """Best wall time of ``repeats`` runs, the cores that run kept busy on average
    (process CPU time, all threads, / wall time) and the cores other processes kept busy
    meanwhile (None where /proc/stat is not available): on a shared machine, a stage whose
    neighbours took a core could not use it."""
    best = None
    for _ in range(repeats):
        system = _system_busy_s()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        wall = max(wall, 1e-9)
        others = None
        if system is not None:
            others = max(0.0, (_system_busy_s() - system - cpu) / wall)
        if best is None or wall < best[0]:
            best = (wall, cpu / wall, others)
    return best


# libsoxr quality recipes (soxr.h) compared by ``pipeline --soxr-recipes``.
SOXR_RECIPES = {"MQ": 0x02, "HQ": 0x04, "VHQ": 0x06, "16_BITQ|STEEP": 0x43,
                "HQ|STEEP": 0x44, "VHQ|STEEP": 0x46}
RESAMPLE_PAIRS = [(44100, 16000), (48000, 16000), (22050, 16000), (8000, 16000),
                  (32000, 16000)]


def _tone_error_db(resampler, rate_in, rate_out, freq, seconds=0.5):
    """Error / signal (dB) of a resampled tone against the tone computed at ``rate_out``
    in float64, on the middle half of the signal."""
    import numpy as np

    def tone(rate):
        return 0.5 * np.sin(2 * np.pi * freq * np.arange(round(rate * seconds)) / rate + 0.3)

    y = np.asarray(resampler(tone(rate_in).astype(np.float32), rate_in, rate_out), np.float64)
    ref = tone(rate_out)
    n = min(len(y), len(ref))
    mid = slice(n // 4, n - n // 4)
    return 10 * np.log10(np.sum((y[mid] - ref[mid]) ** 2) / np.sum(ref[mid] ** 2))


def bench_soxr_recipes(repeats, tones=90, seconds=5.0):
    """Per libsoxr recipe: the worst error of single tones up to 0.9 x the lower Nyquist
    frequency for each rate pair, and the CPU time to resample a ``seconds`` clip from
    44.1 kHz to 16 kHz (best of ``repeats`` x 10 calls)."""
    import numpy as np

    from src.data.audio import SOXR_RECIPE, resample

    clip = np.random.default_rng(0).uniform(-0.5, 0.5, round(44100 * seconds))
    clip = clip.astype(np.float32)
    out = {"used": next(k for k, v in SOXR_RECIPES.items() if v == SOXR_RECIPE),
           "pairs": [f"{a}->{b}" for a, b in RESAMPLE_PAIRS], "recipes": {}}
    for name, recipe in SOXR_RECIPES.items():
        def run(x, rate_in, rate_out, recipe=recipe):
            return resample(x, rate_in, rate_out, recipe=recipe)

        worst = []
        for rate_in, rate_out in RESAMPLE_PAIRS:
            top = 0.9 * min(rate_in, rate_out) / 2
            worst.append(max(_tone_error_db(run, rate_in, rate_out, f)
                             for f in np.linspace(top / tones, top, tones)))
        best = math.inf
        for _ in range(repeats):
            cpu = time.process_time()
            for _ in range(10):
                run(clip, 44100, 16000)
            best = min(best, (time.process_time() - cpu) / 10)
        out["recipes"][name] = {"recipe": recipe, "worst_error_db": worst,
                                "cpu_ms_per_clip": 1000 * best}
    return out


def model_flops(embed, layers, ff, mels, frames, patch, f_stride, t_stride, classes,
                prefix=2, last_rows=None, patchout=(0, 0, 0)):
    """Forward FLOPs per clip (2 per multiply-add) of the transformer backbone, and the
    number of patches. ``prefix``: [CLS] (+ [DIST]) tokens. ``last_rows``: rows the last
    block computes (``pooled_last_block``: queries, attention, output projection and
    MLP for those rows only; keys and values for all; with ``--fused-qkv`` the one q/k/v
    matmul also computes the other rows' queries, 2 * n * embed^2 more); ``None``: every
    row. ``patchout``: (time columns, frequency rows, random patches) dropped after the
    patch convolution (a training step): the blocks see the patches left."""
    f_dim = (mels - patch) // f_stride + 1
    t_dim = (frames - patch) // t_stride + 1
    drop_t, drop_f, drop_r = patchout
    n = (f_dim - drop_f) * (t_dim - drop_t) - drop_r + prefix

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


def _patchout_counts(text):
    """``"T,F"`` or ``"T,F,R"`` -> (time columns, frequency rows, random patches)."""
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        counts = []
    if len(counts) not in (2, 3) or min(counts) < 0:
        raise argparse.ArgumentTypeError(
            f"--patchout takes T,F or T,F,R (non-negative whole numbers), got {text!r}")
    return tuple(counts + [0] * (3 - len(counts)))


# ``--ab adam``: Keras' own Adam update (a dozen ops per variable) against the fused one.
FUSED_ADAM = "adam"


def _kernel_names(text):
    """``"attention,bias"`` -> the names, each one of ``src.models.native.KERNELS`` or
    :data:`FUSED_ADAM`."""
    from src.models import native

    known = (*native.KERNELS, FUSED_ADAM)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"--ab takes kernel names separated by commas, of {', '.join(known)}; "
            f"got {text!r}")
    return names


def ab_pairs(steps: dict, pairs: int) -> dict:
    """``steps``: ``{what: (default step, step without the kernels)}``. Times the two
    alternately, ``pairs`` times each, the order swapped every pair (a pair's ratio is
    then free of the machine's drift); per ``what``: the median step-time ratio
    (without / with: above 1 when the kernels help), its quartiles, and the median step
    times in ms."""
    import numpy as np

    out = {}
    for what, (with_kernels, without) in steps.items():
        times = {"with": [], "without": []}
        for i in range(pairs):
            order = (("with", with_kernels), ("without", without))
            for key, step in order if i % 2 == 0 else order[::-1]:
                times[key].append(_timed(step))
        ratio = np.array(times["without"]) / np.array(times["with"])
        out[what] = {"speedup": float(np.median(ratio)),
                     "speedup_quartiles": [float(np.percentile(ratio, 25)),
                                           float(np.percentile(ratio, 75))],
                     "step_ms": float(np.median(times["with"]) * 1e3),
                     "step_ms_without": float(np.median(times["without"]) * 1e3)}
    return out


def measured_peak_gflops(size=4096, repeats=5, dtype="float32"):
    """A square matmul with XLA, in the compute dtype of the model being measured."""
    import tensorflow as tf

    a = tf.cast(tf.random.normal((size, size)), dtype)
    b = tf.cast(tf.random.normal((size, size)), dtype)
    mm = tf.function(lambda x, y: tf.matmul(x, y), jit_compile=True)
    mm(a, b).numpy()
    best = min(_timed(lambda: mm(a, b).numpy()) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _settled(fn):
    """``_timed`` after a pause, for timings that alternate between libraries: each
    library's idle worker threads keep spinning for a while after its last op (OpenMP's
    and TensorFlow's thread pools), and the pause keeps one side's spinning out of the
    other side's time."""
    time.sleep(SETTLE_S)
    return _timed(fn)


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(args):
    import keras
    import numpy as np
    import tensorflow as tf

    from src.models import native
    from src.models.build import build_model
    from src.training.optim import Adam

    hop = 160
    clip_samples = (args.frames - 1) * hop + 400  # exactly `frames` frames
    if args.precision != "float32":
        keras.mixed_precision.set_global_policy(args.precision)
    patchout = dict(zip(("time", "freq", "random"), args.patchout))
    # AST's block and head (as Hugging Face's ASTForAudioClassification below).
    cfg = dict(embed_dim=args.embed, num_layers=args.layers, num_heads=args.heads,
               ff_dim=args.ff, f_stride=args.stride, t_stride=args.stride,
               dropout_rate=0.0, norm_first=True, activation="gelu", pooling="cls_dist",
               fused_attention=args.fused, fused_qkv=args.fused_qkv,
               pooled_last_block=not args.full_last_block, patchout=patchout)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.frames, args.mels)).astype("float32")
    y = rng.integers(0, args.classes, args.batch).astype("int32")

    def compiled(model_cfg, fused_adam=True):
        """(waveform model, its backbone compiled and warmed up, jitted inference)"""
        model = build_model(model_cfg, dict(n_mels=args.mels), num_classes=args.classes,
                            clip_samples=clip_samples)
        backbone = model.backbone
        backbone.compile(optimizer=Adam(1e-4, fused=fused_adam),
                         loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                         jit_compile=args.jit)
        for _ in range(2):  # compile + warm up
            backbone.train_on_batch(x, y)
        infer = tf.function(lambda v: backbone(v, training=False), jit_compile=args.jit)
        infer(x).numpy()
        return model, backbone, infer

    model, backbone, infer = compiled(cfg)
    without = None
    if args.ab:  # the same model traced without the named kernels
        kernels = [k for k in args.ab if k != FUSED_ADAM]
        with native.disabled(*kernels) if kernels else contextlib.nullcontext():
            without = compiled(cfg, fused_adam=FUSED_ADAM not in args.ab)
    # The same model without patchout, timed alternately with it.
    plain = compiled(dict(cfg, patchout=None)) if any(args.patchout) else None
    wave = rng.standard_normal((1, clip_samples)).astype("float32") * 0.1
    single = tf.function(lambda v: model(v, training=False), jit_compile=args.jit)
    single(wave).numpy()

    ours = {"train": [], "infer": [], "latency": []}
    theirs = {"train": [], "infer": []} if args.vs_pytorch else None
    torch_step = _pytorch_ast(args) if args.vs_pytorch else None
    for _ in range(args.repeats):
        ours["train"].append(args.batch / _settled(lambda: backbone.train_on_batch(x, y)))
        ours["infer"].append(args.batch / _settled(lambda: infer(x).numpy()))
        ours["latency"].append(_settled(lambda: single(wave).numpy()) * 1000)
        if torch_step is not None:
            theirs["train"].append(args.batch / _settled(torch_step["train"]))
            theirs["infer"].append(args.batch / _settled(torch_step["infer"]))
        if plain is not None:
            ours.setdefault("train_plain", []).append(
                args.batch / _settled(lambda: plain[1].train_on_batch(x, y)))
            ours.setdefault("infer_plain", []).append(
                args.batch / _settled(lambda: plain[2](x).numpy()))
    ab = None
    if without is not None:
        idle = [k for k in args.ab if k == "bias"
                and keras.backend.standardize_dtype(backbone.compute_dtype)
                not in native.BIAS_DTYPES]
        ab = {"kernels": list(args.ab), "pairs": args.ab_pairs,
              # kernels the model does not run at this precision: both sides are the same
              "not_used": idle, **ab_pairs(
            {"train": (lambda: backbone.train_on_batch(x, y),
                       lambda: without[1].train_on_batch(x, y)),
             "infer": (lambda: infer(x).numpy(), lambda: without[2](x).numpy())},
            args.ab_pairs)}
    profile = profile_infer = None
    if args.profile:
        profile = profile_steps(lambda: backbone.train_on_batch(x, y), args.profile)
        profile_infer = profile_steps(lambda: infer(x).numpy(), args.profile)
    flops, patches = model_flops(args.embed, args.layers, args.ff, args.mels, args.frames, 16,
                                 args.stride, args.stride, args.classes,
                                 last_rows=None if args.full_last_block else 2)
    train_flops, _ = model_flops(args.embed, args.layers, args.ff, args.mels, args.frames, 16,
                                 args.stride, args.stride, args.classes,
                                 last_rows=None if args.full_last_block else 2,
                                 patchout=args.patchout)
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
        "cpu": cpu_description(),
        "shape": dict(embed=args.embed, layers=args.layers, heads=args.heads, ff=args.ff,
                      mels=args.mels, frames=args.frames, stride=args.stride,
                      patches=patches, batch=args.batch),
        "grid": list(backbone.grid),
        "profile": profile,
        "profile_inference": profile_infer,
        "ab": ab,
        "patchout": patchout,
        "train_patches": int(backbone.patch_embed.num_train_patches),
        "jit_compile": args.jit,
        "fused_attention": args.fused,
        "fused_qkv": args.fused_qkv,
        "pooled_last_block": not args.full_last_block,
        # The compiled kernels (src/models/native.py: attention, LayerNorm, bias + GELU,
        # in float32 and bfloat16, and the other biases in bfloat16; inference and
        # training)?
        "native_kernels": bool(not args.jit and args.precision in ("float32", "mixed_bfloat16")
                                 and native.usable("float32")),
        "precision": args.precision,
        "parameters": int(backbone.count_params()),
        "gflops_per_clip_forward": flops / 1e9,
        "gflops_per_clip_forward_all_rows": full_flops / 1e9,
        "gflops_per_clip_train_forward": train_flops / 1e9,
        "train_clips_per_s": train_cps,
        "infer_clips_per_s": infer_cps,
        "latency_ms": float(np.median(ours["latency"])),
        "train_gflops_per_s": 3 * train_flops * train_cps / 1e9,
        "infer_gflops_per_s": flops * infer_cps / 1e9,
        "peak_gflops_per_s": peak,
    }
    out["train_fraction_of_peak"] = out["train_gflops_per_s"] / peak
    out["infer_fraction_of_peak"] = out["infer_gflops_per_s"] / peak
    if plain is not None:
        out["train_clips_per_s_without_patchout"] = float(np.median(ours["train_plain"]))
        out["infer_clips_per_s_without_patchout"] = float(np.median(ours["infer_plain"]))
        out["patchout_train_speedup"] = train_cps / out["train_clips_per_s_without_patchout"]
        out["patchout_infer_ratio"] = infer_cps / out["infer_clips_per_s_without_patchout"]
        out["patchout_train_flops_ratio"] = flops / train_flops
    if theirs is not None:
        out["pytorch_train_clips_per_s"] = float(np.median(theirs["train"]))
        out["pytorch_infer_clips_per_s"] = float(np.median(theirs["infer"]))
        out["train_ratio"] = train_cps / out["pytorch_train_clips_per_s"]
        out["infer_ratio"] = infer_cps / out["pytorch_infer_clips_per_s"]
    return out


def bench_optimizer(args):
    """One Adam update of every trainable weight of the model (AST's block and head),
    fused (``src.training.optim.Adam``: one ResourceApplyAdam per weight) against Keras'
    own update, alternating in one process, gradients fixed."""
    import numpy as np
    import tensorflow as tf

    from src.models.build import build_model
    from src.training.optim import Adam

    cfg = dict(embed_dim=args.embed, num_layers=args.layers, num_heads=args.heads,
               ff_dim=args.ff, f_stride=args.stride, t_stride=args.stride, dropout_rate=0.0,
               norm_first=True, activation="gelu", pooling="cls_dist")
    backbone = build_model(cfg, dict(n_mels=args.mels), num_classes=args.classes,
                           clip_samples=(args.frames - 1) * 160 + 400).backbone
    weights = backbone.trainable_variables
    grads = [tf.random.stateless_normal(w.shape, (0, i)) * 1e-3 for i, w in enumerate(weights)]

    def update(fused):
        opt = Adam(1e-4, fused=fused)
        opt.build(weights)
        step = tf.function(lambda: opt.apply_gradients(zip(grads, weights)))
        for _ in range(2):  # trace + warm up
            step()
        return step

    fused, plain = update(True), update(False)
    ab = ab_pairs({"update": (fused, plain)}, args.pairs)["update"]
    return {"cpu": cpu_description(), "cpu_count": os.cpu_count(),
            "device": (tf.config.list_physical_devices("GPU") or ["CPU"])[0].__str__(),
            "parameters": int(sum(np.prod(w.shape) for w in weights)),
            "weights": len(weights), "pairs": args.pairs,
            "fused_ms": ab["step_ms"], "keras_ms": ab["step_ms_without"],
            "speedup": ab["speedup"], "speedup_quartiles": ab["speedup_quartiles"]}


def bench_pretrain(args):
    import numpy as np
    import tensorflow as tf

    from src.models.build import build_model
    from src.models.ssast import (
        MaskedPatchPretrainer,
        cluster_masks,
        mask_count,
        training_grid,
        training_mask_count,
    )
    from src.training.optim import Adam

    clip_samples = (args.frames - 1) * 160 + 400  # exactly `frames` frames
    cfg = dict(embed_dim=args.embed, num_layers=args.layers, num_heads=args.heads,
               ff_dim=args.ff, patch_size=16, f_stride=16, t_stride=16, dropout_rate=0.0,
               norm_first=True, activation="gelu", pooling="mean")
    x = np.random.default_rng(0).standard_normal(
        (args.batch, args.frames, args.mels)).astype("float32")

    def compiled(patchout):
        """The pretrainer, a batch with masks on its training grid, and the counts."""
        model = build_model(dict(cfg, patchout=patchout), dict(n_mels=args.mels),
                            num_classes=2, clip_samples=clip_samples)
        backbone = model.backbone
        pretrainer = MaskedPatchPretrainer(backbone)
        pretrainer.build()
        pretrainer.compile(optimizer=Adam(1e-4))
        n = int(backbone.num_patches)
        count = mask_count(n, fraction=args.mask_fraction)
        grid = training_grid(backbone)
        train_count = training_mask_count(count, n, grid[0] * grid[1])
        masks = cluster_masks(tf.constant([0, 1]), args.batch, grid, train_count)
        batch = {"features": x, "mask_index": masks}
        for _ in range(2):  # compile + warm up
            pretrainer.train_on_batch(batch)
        info = {"grid": list(backbone.grid), "train_grid": list(grid), "patches": n,
                "train_patches": grid[0] * grid[1], "mask_count": count,
                "train_mask_count": train_count}
        return pretrainer, batch, info

    with_po = compiled(dict(zip(("time", "freq"), args.patchout)))
    without = compiled(None)
    times = {"with": [], "without": []}
    for _ in range(args.repeats):
        for key, (pretrainer, batch, _) in (("with", with_po), ("without", without)):
            step = functools.partial(pretrainer.train_on_batch, batch)
            times[key].append(args.batch / _timed(step))
    out = {
        "device": (tf.config.list_physical_devices("GPU") or ["CPU"])[0].__str__(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_description(),
        "shape": dict(embed=args.embed, layers=args.layers, heads=args.heads, ff=args.ff,
                      mels=args.mels, frames=args.frames, batch=args.batch),
        "patchout": dict(zip(("time", "freq"), args.patchout)),
        **with_po[2],
        "train_clips_per_s": float(np.median(times["with"])),
        "train_clips_per_s_without_patchout": float(np.median(times["without"])),
    }
    out["patchout_train_speedup"] = (out["train_clips_per_s"]
                                     / out["train_clips_per_s_without_patchout"])
    return out


_PARTS = (  # (part, a regular expression over an op's name), the first match wins
    ("optimizer", r"(^|/)adam(_\d+)?/"),
    ("layer norm", r"layernorm|final_norm|head_norm"),
    ("MLP (fc1, GELU, fc2)", r"/(ffn|fc1|fc2)(_\d+)?/"),
    ("attention projections (q, k, v, out)",
     r"/(query_dense|key_dense|value_dense|qkv_dense|combine_heads)(_\d+)?/"),
    ("attention core (scores, softmax, weighted sum)", r"/att(_\d+)?/"),
    ("patch embedding", r"patch_embed"),
    ("loss, head", r"classifier|loss|Loss"),
)


def profile_steps(step, steps=5):
    """Where a step (``step()``: a training step or a batch's inference) spends its
    time: ``steps`` steps traced with TensorFlow's profiler; the execution time of each
    op (as seen by TensorFlow's inter-op threads, intra-op work included) summed by op
    type and by part of the model, per step."""
    import glob
    import tempfile as _tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with _tempfile.TemporaryDirectory(prefix="profile-") as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
        tf.profiler.experimental.stop()
        (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        space = xplane_pb2.XSpace()
        with open(path, "rb") as fh:
            space.ParseFromString(fh.read())
    by_type: dict[str, float] = {}
    by_part: dict[str, float] = {}
    for plane in space.planes:
        meta = plane.event_metadata
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                m = meta[event.metadata_id]
                if ":" not in m.name or "::" in m.name:  # executor bookkeeping, not an op
                    continue
                ms = event.duration_ps / 1e9 / steps
                op_type = m.display_name or m.name.rsplit(":", 1)[-1]
                by_type[op_type] = by_type.get(op_type, 0.0) + ms
                part = next((p for p, pattern in _PARTS if re.search(pattern, m.name)),
                            "other")
                by_part[part] = by_part.get(part, 0.0) + ms
    total = sum(by_type.values())

    def table(d):
        return [{"name": k, "ms_per_step": v, "share": v / total if total else 0.0}
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])]

    out = {"step_ms": wall * 1000, "op_ms_per_step": total, "by_type": table(by_type),
           "by_part": table(by_part)}
    if not total:  # an XLA-compiled step runs as one cluster: no TensorFlow ops to time
        out["note"] = "no per-op times (an XLA-compiled step); profile without --jit"
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


def _shape_args(parser, frames: int) -> None:
    """The model's shape flags (AST's block at the benchmark's size by default)."""
    for name, default in (("embed", 192), ("layers", 4), ("heads", 4), ("ff", 768),
                          ("mels", 128), ("frames", frames)):
        parser.add_argument(f"--{name}", type=int, default=default)


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
    p.add_argument("--tfio-clips", type=int, default=48,
                   help="clips for the (slow) tensorflow-io resampler stage")
    p.add_argument("--soxr-recipes", action="store_true",
                   help="only compare libsoxr quality recipes: accuracy and speed")
    p.add_argument("--json", action="store_true")
    mem = sub.add_parser("memory", help="peak RSS of training against the number of clips")
    mem.add_argument("--clips", default="5000,20000,50000",
                     help="comma-separated set sizes (default: 5000,20000,50000)")
    mem.add_argument("--seconds", type=float, default=10.0)
    mem.add_argument("--n-mels", type=int, default=64)
    mem.add_argument("--epochs", type=int, default=1)
    mem.add_argument("--shuffle-mb", type=float, default=512,
                     help="data.shuffle_buffer_mb of the runs (default: the config's 512)")
    mem.add_argument("--workdir", type=Path, default=None,
                     help="where the clips and stores go (default: a temporary directory, "
                          "removed afterwards; the 50k set needs about 30 GB)")
    mem.add_argument("--json", action="store_true")
    m = sub.add_parser("model", help="training / inference throughput of the transformer")
    _shape_args(m, frames=512)
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
    m.add_argument("--patchout", type=_patchout_counts, default=None, metavar="T,F[,R]",
                   help="model.patchout in training: T time columns and F frequency rows of "
                        "the patch grid, then R random patches dropped; also times the model "
                        "without patchout")
    m.add_argument("--passt-audioset", action="store_true",
                   help="PaSST's AudioSet shape: 128 mels x 998 frames (10 s), stride 10 "
                        "(12 x 99 patches), patchout 40,4 unless --patchout is given")
    m.add_argument("--vs-pytorch", action="store_true")
    m.add_argument("--ab", type=_kernel_names, default=(), metavar="KERNEL[,KERNEL]",
                   help="also time the model traced without these compiled kernels "
                        "(attention, layer_norm, bias_gelu, bias) or, for adam, trained with "
                        "Keras' own Adam update instead of the fused one, alternating steps "
                        "in one process, and print the step-time ratios")
    m.add_argument("--ab-pairs", type=int, default=20, metavar="N",
                   help="pairs of steps for --ab (default 20; the ratios' spread shows "
                        "whether that is enough)")
    m.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also trace STEPS training steps and STEPS batches' inference with "
                        "TensorFlow's profiler and print the time per op type and per part of "
                        "the model")
    m.add_argument("--json", action="store_true")
    pt = sub.add_parser("pretrain", help="masked patch pretraining steps with and without "
                        "structured patchout")
    _shape_args(pt, frames=998)
    pt.add_argument("--batch", type=int, default=16)
    pt.add_argument("--repeats", type=int, default=5)
    pt.add_argument("--patchout", type=_patchout_counts, default=(25, 3, 0), metavar="T,F",
                    help="time columns and frequency rows dropped in a training step "
                         "(default 25,3)")
    pt.add_argument("--mask-fraction", type=float, default=0.78,
                    help="masked share of the patches (pretrain.mask.fraction)")
    pt.add_argument("--json", action="store_true")
    o = sub.add_parser("optimizer", help="Adam's update of the model's weights: fused "
                       "against Keras' own")
    _shape_args(o, frames=512)
    o.add_argument("--stride", type=int, default=10)
    o.add_argument("--classes", type=int, default=50)
    o.add_argument("--pairs", type=int, default=40,
                   help="pairs of updates, alternating in one process (default 40)")
    o.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.what == "optimizer":
        if args.pairs < 1:
            parser.error(f"optimizer: --pairs must be at least 1, got {args.pairs}")
        r = bench_optimizer(args)
        if args.json:
            print(json.dumps(r))
            return 0
        q1, q3 = r["speedup_quartiles"]
        print(f"optimizer: Adam over {r['parameters']:,} parameters in {r['weights']} "
              f"weights; {r['device']}, {r['cpu_count']} CPU(s)")
        print(f"  CPU: {r['cpu']}")
        print(f"  fused (one ResourceApplyAdam per weight) {r['fused_ms']:8.2f} ms per update")
        print(f"  Keras' own update                        {r['keras_ms']:8.2f} ms per update")
        print(f"  {r['speedup']:.2f}x (quartiles {q1:.2f}-{q3:.2f}, {r['pairs']} pairs "
              "alternating in one process)")
        return 0
    if args.what == "pretrain":
        if args.patchout[2]:
            parser.error("pretrain --patchout: T,F only (random patchout is not supported "
                         "while pretraining)")
        try:
            r = bench_pretrain(args)
        except ValueError as err:  # sizes that do not fit the grid: say so, no traceback
            parser.error(f"pretrain: {err} (--patchout T,F sets model.patchout.time / .freq)")
        if args.json:
            print(json.dumps(r))
            return 0
        sh = r["shape"]
        print(f"masked patch pretraining: embed {sh['embed']}, {sh['layers']} layers, "
              f"{sh['heads']} heads, ff {sh['ff']}, {sh['mels']} mels x {sh['frames']} "
              f"frames, 16 x 16 patches, batch {sh['batch']}; {r['device']}, "
              f"{r['cpu_count']} CPU(s); {r['cpu']}")
        (f, t), (kf, kt) = r["grid"], r["train_grid"]
        print(f"  patchout time={r['patchout']['time']} freq={r['patchout']['freq']}: "
              f"{f} x {t} = {r['patches']} patches -> {kf} x {kt} = {r['train_patches']} "
              f"in a step; {r['train_mask_count']} masked (without: {r['mask_count']})")
        print(f"  training   {r['train_clips_per_s']:8.2f} clips/s with patchout, "
              f"{r['train_clips_per_s_without_patchout']:.2f} without: "
              f"{r['patchout_train_speedup']:.2f}x")
        return 0
    if args.what == "model":
        if args.passt_audioset:
            args.mels, args.frames, args.stride = 128, 998, 10
            if args.patchout is None:
                args.patchout = (40, 4, 0)
        args.patchout = args.patchout or (0, 0, 0)

    if args.what == "memory":
        try:
            sizes = [int(c) for c in str(args.clips).split(",")]
        except ValueError:
            parser.error(f"memory: --clips {args.clips}: comma-separated whole numbers")
        if min(sizes) < MEMORY_MIN_CLIPS:
            parser.error(f"memory: --clips {args.clips}: each set needs at least "
                         f"{MEMORY_MIN_CLIPS} clips (10 classes dealt into 10 folds, one fold "
                         "tested)")
        if args.workdir is None:
            with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
                r = bench_memory(sizes, args.seconds, args.n_mels, tmp, args.epochs,
                                 progress=not args.json, shuffle_mb=args.shuffle_mb)
        else:
            r = bench_memory(sizes, args.seconds, args.n_mels, args.workdir, args.epochs,
                             progress=not args.json, shuffle_mb=args.shuffle_mb)
        if args.json:
            print(json.dumps(r))
            return 0
        print(f"training memory: {r['seconds']:g} s clips, {r['n_mels']} mels, "
              f"{r['epochs']} epoch(s), streaming from the feature store (shuffle buffer "
              f"{r['shuffle_buffer_mb']:g} MB)")
        print(f"  {'clips':>7}  {'features':>10}  {'peak RSS, build + train':>24}  "
              f"{'peak RSS, train':>16}")
        for row in r["sizes"]:
            print(f"  {row['clips']:>7}  {row['features_mb'] / 1024:8.2f} GB  "
                  f"{row['build_and_train_peak_rss_mb'] / 1024:18.2f} GB ({row['build_and_train_wall_s']:.0f} s)"
                  f"  {row['train_peak_rss_mb'] / 1024:10.2f} GB ({row['train_wall_s']:.0f} s)")
        return 0

    if args.what == "model":
        if args.jit and set(args.ab) - {FUSED_ADAM}:
            parser.error("model: --ab with --jit measures nothing (an XLA-compiled step "
                         "never runs the compiled kernels)")
        if args.ab_pairs < 1:
            parser.error(f"model: --ab-pairs must be at least 1, got {args.ab_pairs}")
        try:
            r = bench_model(args)
        except ValueError as err:  # sizes that do not fit the grid: say so, no traceback
            parser.error(f"model: {err} (--patchout T,F,R sets model.patchout)")
        if args.json:
            print(json.dumps(r))
            return 0
        sh = r["shape"]
        print(f"model: embed {sh['embed']}, {sh['layers']} layers, {sh['heads']} heads, "
              f"ff {sh['ff']}, {sh['mels']} mels x {sh['frames']} frames, stride {sh['stride']} "
              f"({sh['patches']} patches), batch {sh['batch']}, jit={r['jit_compile']}, "
              f"fused={r['fused_attention']}, fused_qkv={r['fused_qkv']}, "
              f"pooled_last_block={r['pooled_last_block']}, "
              f"native_kernels={r['native_kernels']}, "
              f"{r['precision']}; {r['device']}, {r['cpu_count']} CPU(s)")
        print(f"  CPU: {r['cpu']}")
        print(f"  parameters {r['parameters']:,}; {r['gflops_per_clip_forward']:.2f} GFLOP/clip "
              f"forward ({r['gflops_per_clip_forward_all_rows']:.2f} when every row of the "
              f"last block is computed); measured peak {r['peak_gflops_per_s']:.0f} GFLOP/s")
        if "patchout_train_speedup" in r:
            po, (f_dim, t_dim) = r["patchout"], r["grid"]
            print(f"  patchout time={po['time']} freq={po['freq']} random={po['random']}: "
                  f"{f_dim} x {t_dim} = {f_dim * t_dim} patches -> {r['train_patches']} in "
                  f"training; {r['gflops_per_clip_train_forward']:.2f} GFLOP/clip training "
                  f"forward ({r['patchout_train_flops_ratio']:.2f}x fewer)")
        print(f"  training   {r['train_clips_per_s']:8.2f} clips/s  "
              f"({r['train_gflops_per_s']:.0f} GFLOP/s, {100 * r['train_fraction_of_peak']:.0f}%"
              " of peak)")
        print(f"  inference  {r['infer_clips_per_s']:8.2f} clips/s  "
              f"({r['infer_gflops_per_s']:.0f} GFLOP/s, {100 * r['infer_fraction_of_peak']:.0f}%"
              " of peak)")
        print(f"  latency    {r['latency_ms']:8.1f} ms for one clip (waveform in)")
        if r["ab"]:
            ab = r["ab"]
            print(f"  A/B without {' + '.join(ab['kernels'])} ({ab['pairs']} pairs of "
                  "steps, alternating in one process; step-time ratio without / with):")
            if ab["not_used"]:
                from src.models import native

                print(f"    ({', '.join(ab['not_used'])}: not used under {r['precision']} "
                      f"(only in {', '.join(native.BIAS_DTYPES)}), so both sides run the "
                      "same ops)")
            for what, label in (("train", "training"), ("infer", "inference")):
                q1, q3 = ab[what]["speedup_quartiles"]
                print(f"    {label:<10} {ab[what]['speedup']:.3f}x (quartiles {q1:.3f}-{q3:.3f}; "
                      f"{ab[what]['step_ms']:.1f} ms with, {ab[what]['step_ms_without']:.1f} "
                      "ms without)")
        for what, key in (("a training step", "profile"), ("a batch's inference",
                                                               "profile_inference")):
            pr = r.get(key)
            if not pr:
                continue
            if pr.get("note"):
                print(f"  profile of {what}: {pr['note']}")
                continue
            print(f"  profile of {what} ({pr['step_ms']:.0f} ms wall; op time "
                  f"{pr['op_ms_per_step']:.0f} ms, intra-op threads included):")
            for title, rows, top in (("by part", pr["by_part"], 10), ("by op", pr["by_type"], 15)):
                print(f"    {title}:")
                for row in rows[:top]:
                    print(f"      {row['name']:<48} {row['ms_per_step']:8.1f} ms  "
                          f"{100 * row['share']:5.1f}%")
        if "patchout_train_speedup" in r:
            print(f"  without patchout: training {r['train_clips_per_s_without_patchout']:.2f} "
                  f"clips/s, inference {r['infer_clips_per_s_without_patchout']:.2f} clips/s; "
                  f"patchout {r['patchout_train_speedup']:.2f}x training throughput, "
                  f"{r['patchout_infer_ratio']:.2f}x inference")
        if "train_ratio" in r:
            print(f"  PyTorch AST: training {r['pytorch_train_clips_per_s']:.2f} clips/s, "
                  f"inference {r['pytorch_infer_clips_per_s']:.2f} clips/s; ours/theirs "
                  f"{r['train_ratio']:.2f}x training, {r['infer_ratio']:.2f}x inference")
        return 0

    if args.soxr_recipes:
        r = bench_soxr_recipes(args.repeats)
        if args.json:
            print(json.dumps(r))
            return 0
        print("libsoxr recipes: worst error of single tones up to 0.9 x the lower Nyquist "
              "frequency (dB re signal), CPU ms to resample 5 s 44.1 kHz -> 16 kHz")
        print(f"  {'recipe':<16}" + "".join(f"{p:>13}" for p in r["pairs"]) + "    ms/clip")
        for name, v in r["recipes"].items():
            used = "  <- used" if name == r["used"] else ""
            print(f"  {name:<16}" + "".join(f"{e:13.1f}" for e in v["worst_error_db"])
                  + f"{v['cpu_ms_per_clip']:11.2f}{used}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        r = bench_pipeline(args.clips, args.seconds, args.rate, args.n_mels, args.batch,
                           args.repeats, workdir, tfio_clips=args.tfio_clips)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"input pipeline: {r['clips']} clips of {r['clip_seconds']} s at {r['file_rate']} Hz "
          f"-> {r['model_rate']} Hz, log-mel {tuple(r['feature_shape'])}, "
          f"{r['cpu_count']} CPU core(s)")
    cores = r["cpu_count"]
    rows = [
        ("decode only, decode_audio at the file's rate (tf.data AUTOTUNE)", "decode_only"),
        ("decode only, tf.audio.decode_wav (tf.data AUTOTUNE)", "decode_wav_only"),
        (f"decode + resample, tensorflow-io (previous; {r['tfio_clips']} clips, 1 run)",
         "tfio_resample"),
        ("decode + resample, read_audio, 1 thread", "one_thread"),
        (f"decode + resample, read_audio, {cores} thread(s)", "all_cores"),
        ("decode + resample, decode_audio in tf.data, sequential", "graph_sequential"),
        ("decode + resample, decode_audio in tf.data AUTOTUNE", "decode_resample"),
        ("feature store from scratch (decode, resample, features, shards)",
         "first_epoch_features"),
        ("feature store up to date (check only)", "store_check"),
        ("read features from the shards", "cache_load"),
        ("training epoch over the store, streamed", "streamed_epoch"),
        ("training epoch over the store, in-memory cache", "cached_epoch"),
    ]
    width = max(len(k) for k, _ in rows)
    for label, key in rows:
        busy, others = r.get(f"{key}_cpu_cores"), r.get(f"{key}_other_processes_cpu_cores")
        note = f"  ({busy:.2f} cores busy" if busy is not None else ""
        if others is not None:
            note += f"; other processes {others:.2f}"
        note += ")" if note else ""
        print(f"  {label:<{width}}  {r[f'{key}_clips_per_s']:10.1f} clips/s{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
