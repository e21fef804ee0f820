"""What happens to a waveform before the frontend, in training and in a saved model.

One function, used by the feature store (training) and by the saved waveform model
(``AudioTransformer``: prediction, export), so that a model sees the same input in both:
the DC offset of the clip is removed (AST subtracts the waveform mean) when
``remove_mean`` is set, then samples are clipped to [-1, 1].
"""

from __future__ import annotations

from keras import ops


def preprocess_waveform(waveform, remove_mean: bool):
    """``(batch, samples)`` float waveform -> the frontend's input, same shape."""
    x = ops.cast(waveform, "float32")
    if remove_mean:
        x = x - ops.mean(x, axis=-1, keepdims=True)
    return ops.clip(x, -1.0, 1.0)
