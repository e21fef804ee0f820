"""Where evaluation windows start in a clip longer than the model's input (one definition,
used by prediction on waveforms and by evaluation on stored features).

Windows of ``window`` units start every ``hop`` units from 0 while they end inside the
clip; the last window ends exactly at the end of the clip, so that no window but the
only one of a clip shorter than ``window`` holds padding. A window's weight in the
clip's average is its coverage: the fraction of it that holds the clip (1 for every
window of a clip at least one window long; ``length / window`` for a shorter clip's
single, padded window, which alone makes up that clip's average).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

__all__ = ["window_starts", "window_starts_tf", "window_weights"]


def window_starts(length: int, window: int, hop: int) -> np.ndarray:
    """Start offsets of the windows over a clip of ``length`` units."""
    length, window, hop = int(length), int(window), int(hop)
    if window <= 0 or hop <= 0:
        raise ValueError(f"window and hop must be positive, got {window} and {hop}")
    if length <= window:
        return np.zeros(1, dtype=np.int64)
    last = length - window
    starts = np.arange(0, last, hop, dtype=np.int64)
    return np.append(starts, last)


def window_weights(length: int, starts: np.ndarray, window: int) -> np.ndarray:
    """Coverage of each window: the fraction of it inside the clip."""
    starts = np.asarray(starts, dtype=np.int64)
    inside = np.minimum(starts + int(window), int(length)) - starts
    return np.clip(inside / float(window), 0.0, 1.0)


def window_starts_tf(length, window: int, hop: int):
    """:func:`window_starts` in the TensorFlow graph (``length`` a scalar tensor)."""
    length = tf.cast(length, tf.int64)
    window = tf.constant(int(window), tf.int64)
    hop = tf.constant(int(hop), tf.int64)
    last = length - window

    def many():
        return tf.concat([tf.range(0, last, hop, dtype=tf.int64), last[None]], axis=0)

    return tf.cond(length <= window, lambda: tf.zeros([1], tf.int64), many)
