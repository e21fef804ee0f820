"""Mixup (Zhang et al. 2018) on training batches: log-mel features or waveforms.

AST mixes waveforms: ``w = lam * w1 + (1 - lam) * w2`` with ``lam ~ Beta(a, a)``,
per example with probability ``prob``, and mixes the labels the same way.
``domain="waveform"`` does exactly that, on the waveform batches ``(B, samples)`` of a
waveform store (``data.store.content=waveform``; the model's frontend then computes the
features of the mix). The feature store's batches are log-mel features, so there the
mix is done in the power domain by default, where it matches waveform mixing up to the
cross terms of the two spectra (zero in expectation for independent sounds):
``mel = lam**2 * mel1 + (1 - lam)**2 * mel2``. ``domain="logmel"`` mixes the log-mel
values linearly instead (cheaper, common in other repos).
"""

from __future__ import annotations

import tensorflow as tf

DOMAINS = ("power", "logmel", "waveform")
# The rank of the batches each domain mixes: (B, samples) or (B, frames, n_mels).
_RANK = {"power": 3, "logmel": 3, "waveform": 2}


def _beta(shape, alpha, seed=None):
    if seed is None:
        g1 = tf.random.gamma(shape, alpha)
        g2 = tf.random.gamma(shape, alpha)
    else:
        g1 = tf.random.stateless_gamma(shape, seed=seed, alpha=alpha)
        g2 = tf.random.stateless_gamma(shape, seed=seed + [0, 1], alpha=alpha)
    return g1 / (g1 + g2)


def mixup_batch(x, y, *, prob: float, alpha: float, domain: str, seed=None):
    """Mix a batch ``x`` (log-mel ``(B, T, F)``, or waveforms ``(B, samples)`` with
    ``domain="waveform"``), ``y (B, K)`` one-hot or multi-hot targets with a shuffled
    copy of itself.

    ``seed``: an int32 tensor of shape (2,), a stateless seed for this batch; None uses
    TensorFlow's stateful random ops (seeded by ``keras.utils.set_random_seed``), which
    keeps the training pipeline's file list its only source (shardable by file).
    """
    if domain not in DOMAINS:
        raise ValueError(f"augment.mixup_domain must be one of {DOMAINS}, got {domain!r}.")
    rank = x.shape.rank
    if rank is not None and rank != _RANK[domain]:
        kind = "waveforms (B, samples)" if rank == 2 else f"rank-{rank} batches"
        raise ValueError(
            f"augment.mixup_domain={domain} cannot mix {kind}: waveform mixup needs "
            "data.store.content=waveform, power and logmel mixup data.store.content=features."
        )
    batch = tf.shape(x)[0]
    if seed is None:
        perm = tf.random.shuffle(tf.range(batch))
        lam = _beta([batch], float(alpha))
        apply = tf.random.uniform([batch]) < prob
    else:
        seed = tf.cast(seed, tf.int32)
        perm = tf.random.experimental.stateless_shuffle(tf.range(batch), seed=seed + [0, 2])
        lam = _beta([batch], float(alpha), seed)
        apply = tf.random.stateless_uniform([batch], seed=seed + [0, 3]) < prob
    apply = apply & (perm != tf.range(batch))  # an example mixed with itself stays as it is
    lam = tf.where(apply, lam, tf.ones_like(lam))  # lam = 1: the example unchanged
    x2, y2 = tf.gather(x, perm), tf.gather(y, perm)
    inner = [1] * (_RANK[domain] - 1)
    lx = tf.reshape(lam, [-1, *inner])
    if domain == "power":
        mixed = tf.math.log(lx**2 * tf.exp(x) + (1.0 - lx) ** 2 * tf.exp(x2))
    else:  # logmel values or waveform samples: linear
        mixed = lx * x + (1.0 - lx) * x2
    # An example that is not mixed keeps its exact values (log(exp(x)) is x only up to
    # rounding, and lam * x + 0 * x2 is x only up to the sign of zero).
    mixed = tf.where(tf.reshape(apply, [-1, *inner]), mixed, x)
    ly = lam[:, None]
    return mixed, ly * y + (1.0 - ly) * tf.cast(y2, y.dtype)


def apply_mixup(ds: tf.data.Dataset, *, prob: float, alpha: float, domain: str,
                seed: int | None = None):
    """Map mixup over a batched ``(x, targets)`` dataset; no-op when prob is 0. Multi-hot
    targets are mixed with the same lam (soft targets for the binary cross-entropy).

    ``seed``: each batch's draws from a stateless seed of
    :func:`src.data.pipeline.epoch_seeds` (new every epoch, the same for the same seed);
    None: TensorFlow's stateful ops, which keep the dataset's file list its only source
    (shardable by file) but repeat their draws in every new iterator once a global seed
    is set (use it with an endless, repeated dataset)."""
    if prob <= 0.0:
        return ds
    if alpha <= 0.0:
        raise ValueError(f"augment.mixup_alpha must be positive, got {alpha}.")
    if seed is None:
        return ds.map(
            lambda x, y: mixup_batch(x, y, prob=prob, alpha=alpha, domain=domain),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    from src.data.pipeline import epoch_seeds

    return tf.data.Dataset.zip((ds, epoch_seeds(seed))).map(
        lambda batch, s: mixup_batch(*batch, prob=prob, alpha=alpha, domain=domain, seed=s),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
