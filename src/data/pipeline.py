"""tf.data input pipeline.

    paths -> decode + resample + mono + crop/pad (in the graph, parallel)
          -> frontend features, once per clip (batched, the model's own frontend)
          -> cached (memory, and on disk keyed by files + frontend config)
    then per epoch: shuffle -> batch -> prefetch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from src.data.audio import decode_audio

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE


def waveform_dataset(
    paths: Sequence[str], sample_rate: int, clip_samples: int, remove_mean: bool = False
) -> tf.data.Dataset:
    """Decoded mono waveforms ``(clip_samples,)`` in the order of ``paths``."""
    ds = tf.data.Dataset.from_tensor_slices(list(paths))
    return ds.map(
        lambda p: decode_audio(p, sample_rate, clip_samples, remove_mean=remove_mean),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )


def _cache_key(paths, frontend_config: Mapping, extra: Mapping) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(dict(frontend_config), sort_keys=True, default=str).encode())
    h.update(json.dumps(dict(extra), sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def compute_features(
    frontend,
    paths: Sequence[str],
    *,
    sample_rate: int,
    clip_samples: int,
    remove_mean: bool = False,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    desc: str = "features",
) -> np.ndarray:
    """Frontend features ``(len(paths), frames, n_mels)`` as float32, computed once.

    With ``cache_dir``, features are stored as ``<key>.npy`` where the key
    covers the files (path, size, mtime), the frontend config, the sample rate
    and clip length; a later run with the same inputs loads them instead.
    """
    paths = [str(p) for p in paths]
    cache_file = None
    if cache_dir is not None:
        frontend_config = {
            k: v for k, v in frontend.get_config().items() if k not in ("name", "dtype", "trainable")
        }
        key = _cache_key(
            paths,
            frontend_config,
            dict(sample_rate=sample_rate, clip_samples=clip_samples, remove_mean=remove_mean),
        )
        cache_file = Path(cache_dir) / f"{key}.npy"
        if cache_file.exists():
            try:
                feats = np.load(cache_file)
                if feats.shape[0] == len(paths):
                    log.info("loaded cached features %s %s", cache_file, feats.shape)
                    return feats
            except (OSError, ValueError) as err:
                log.warning("ignoring unreadable feature cache %s: %s", cache_file, err)

    @tf.function(reduce_retracing=True)
    def featurize(wave):
        return frontend(wave)

    ds = waveform_dataset(paths, sample_rate, clip_samples, remove_mean).batch(batch_size)
    ds = ds.prefetch(AUTOTUNE)
    out = []
    with tqdm(total=len(paths), desc=desc, unit="clip", leave=False, dynamic_ncols=True) as bar:
        for wave in ds:
            out.append(featurize(wave).numpy())
            bar.update(int(wave.shape[0]))
    frames = frontend.num_frames(clip_samples)
    feats = (
        np.concatenate(out, axis=0)
        if out
        else np.zeros((0, frames, frontend.n_mels), dtype=np.float32)
    )
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, feats)
        os.replace(tmp, cache_file)  # atomic: a half-written cache is never read
    return feats


def feature_stats(features: np.ndarray) -> tuple[float, float]:
    """Mean and std over all values (as AST's dataset normalisation)."""
    x = features.astype(np.float64)
    return float(x.mean()), float(x.std())


def training_dataset(
    features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int
) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((features, labels.astype(np.int32)))
    ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def eval_dataset(features: np.ndarray, labels: np.ndarray, batch_size: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((features, labels.astype(np.int32)))
    return ds.batch(batch_size).prefetch(AUTOTUNE)
