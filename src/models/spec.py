"""Spectrogram-level layers: dataset normalisation and SpecAugment."""

from __future__ import annotations

import keras
from keras import layers, ops

from src.models.attention import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
class Normalize(layers.Layer):
    """``(x - mean) / (scale * std)`` with dataset statistics (AST uses scale 2)."""

    def __init__(self, mean=0.0, std=1.0, scale=2.0, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        if float(std) <= 0.0 or float(scale) <= 0.0:
            raise ValueError(f"normalisation std and scale must be positive, got {std}, {scale}.")
        self.mean = float(mean)
        self.std = float(std)
        self.scale = float(scale)

    def call(self, x):
        return (x - self.mean) / (self.scale * self.std)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(mean=self.mean, std=self.std, scale=self.scale)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class SpecAugment(layers.Layer):
    """Frequency and time masking (Park et al. 2019), training only.

    Each example gets ``freq_masks`` masks of width ~ U[0, freq_mask_param] mel
    bins and ``time_masks`` masks of width ~ U[0, time_mask_param] frames, set
    to ``mask_value`` (0 after normalisation = the dataset mean, as AST).
    Input/output ``(batch, frames, n_mels)``.
    """

    def __init__(
        self,
        freq_mask_param=0,
        time_mask_param=0,
        freq_masks=1,
        time_masks=1,
        mask_value=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.freq_mask_param = int(freq_mask_param)
        self.time_mask_param = int(time_mask_param)
        self.freq_masks = int(freq_masks)
        self.time_masks = int(time_masks)
        self.mask_value = float(mask_value)
        self.seed = seed
        if min(self.freq_mask_param, self.time_mask_param, self.freq_masks, self.time_masks) < 0:
            raise ValueError("SpecAugment mask widths and counts must be >= 0.")
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _masks(self, batch, length, width_param, count):
        # returns bool (batch, length): True where masked
        positions = ops.arange(length)[None, :]  # (1, L)
        masked = ops.zeros((batch, length), dtype="bool")
        for _ in range(count):
            u1 = keras.random.uniform((batch, 1), seed=self.seed_generator)
            u2 = keras.random.uniform((batch, 1), seed=self.seed_generator)
            width = ops.floor(u1 * (width_param + 1))  # U{0..width_param}
            start = ops.floor(u2 * (ops.cast(length, "float32") - width + 1.0))
            pos = ops.cast(positions, "float32")
            masked = ops.logical_or(masked, ops.logical_and(pos >= start, pos < start + width))
        return masked

    def call(self, x, training=None):
        if not training or (self.freq_masks * self.freq_mask_param == 0 and
                            self.time_masks * self.time_mask_param == 0):
            return x
        shape = ops.shape(x)
        batch, frames, mels = shape[0], shape[1], shape[2]
        mask = ops.zeros_like(x, dtype="bool")
        if self.freq_masks and self.freq_mask_param:
            fmask = self._masks(batch, mels, self.freq_mask_param, self.freq_masks)
            mask = ops.logical_or(mask, fmask[:, None, :])
        if self.time_masks and self.time_mask_param:
            tmask = self._masks(batch, frames, self.time_mask_param, self.time_masks)
            mask = ops.logical_or(mask, tmask[:, :, None])
        return ops.where(mask, ops.cast(self.mask_value, x.dtype), x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            freq_mask_param=self.freq_mask_param,
            time_mask_param=self.time_mask_param,
            freq_masks=self.freq_masks,
            time_masks=self.time_masks,
            mask_value=self.mask_value,
            seed=self.seed,
        )
        return config
