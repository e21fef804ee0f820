"""Mixup (Zhang et al. 2018) on batches of cached log-mel features.

AST mixes waveforms: ``w = lam * w1 + (1 - lam) * w2`` with ``lam ~ Beta(a, a)``,
per example with probability ``prob``, and mixes the labels the same way. Our
training pipeline caches log-mel features, so by default the mix is done in
the power domain, where it matches waveform mixing up to the cross terms of
the two spectra (zero in expectation for independent sounds):
``mel = lam**2 * mel1 + (1 - lam)**2 * mel2``. ``domain="logmel"`` mixes the
log-mel values linearly instead (cheaper, common in other repos).
"""

from __future__ import annotations

import tensorflow as tf

DOMAINS = ("power", "logmel")


def _beta(shape, alpha, seed):
    g1 = tf.random.stateless_gamma(shape, seed=seed, alpha=alpha)
    g2 = tf.random.stateless_gamma(shape, seed=seed + [0, 1], alpha=alpha)
    return g1 / (g1 + g2)


def mixup_batch(x, y, *, prob: float, alpha: float, domain: str, seed):
    """Mix a batch ``x (B, T, F)`` log-mel, ``y (B, K)`` one-hot with a shuffled copy.

    ``seed``: int32 tensor of shape (2,), a stateless seed for this batch.
    """
    if domain not in DOMAINS:
        raise ValueError(f"augment.mixup_domain must be one of {DOMAINS}, got {domain!r}.")
    seed = tf.cast(seed, tf.int32)
    batch = tf.shape(x)[0]
    perm = tf.random.experimental.stateless_shuffle(tf.range(batch), seed=seed + [0, 2])
    lam = _beta([batch], float(alpha), seed)
    apply = tf.random.stateless_uniform([batch], seed=seed + [0, 3]) < prob
    apply = apply & (perm != tf.range(batch))  # an example mixed with itself stays as it is
    lam = tf.where(apply, lam, tf.ones_like(lam))  # lam = 1: the example unchanged
    x2, y2 = tf.gather(x, perm), tf.gather(y, perm)
    lx = lam[:, None, None]
    if domain == "power":
        mixed = tf.math.log(lx**2 * tf.exp(x) + (1.0 - lx) ** 2 * tf.exp(x2))
    else:
        mixed = lx * x + (1.0 - lx) * x2
    ly = lam[:, None]
    return mixed, ly * y + (1.0 - ly) * tf.cast(y2, y.dtype)


def apply_mixup(ds: tf.data.Dataset, *, prob: float, alpha: float, domain: str, seed: int):
    """Map mixup over a batched ``(x, one_hot_y)`` dataset; no-op when prob is 0."""
    if prob <= 0.0:
        return ds
    if alpha <= 0.0:
        raise ValueError(f"augment.mixup_alpha must be positive, got {alpha}.")
    counter = tf.data.Dataset.counter()  # a fresh stateless seed for every batch
    return tf.data.Dataset.zip((ds, counter)).map(
        lambda xy, i: mixup_batch(
            xy[0], xy[1], prob=prob, alpha=alpha, domain=domain,
            seed=tf.stack([tf.cast(seed, tf.int32), tf.cast(i, tf.int32)]),
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
