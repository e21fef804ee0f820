"""AST-style patch embedding over the (freq, time) plane."""

from __future__ import annotations

import keras
from keras import layers, ops

from src.models.attention import PACKAGE


def grid_size(n_mels, frames, patch_size, f_stride, t_stride):
    """AST's patch grid: (f_dim, t_dim) for a (n_mels, frames) spectrogram."""
    f_dim = (n_mels - patch_size) // f_stride + 1
    t_dim = (frames - patch_size) // t_stride + 1
    return f_dim, t_dim


@keras.saving.register_keras_serializable(package=PACKAGE)
class PatchEmbedding(layers.Layer):
    """Split a spectrogram into (overlapping) patches and embed them.

    Input ``(batch, frames, n_mels)`` -> transposed to ``(batch, n_mels, frames, 1)``
    -> Conv2D(embed_dim, kernel patch_size, strides (f_stride, t_stride))
    -> ``(batch, f_dim * t_dim, embed_dim)`` (frequency-major, as AST), then the
    [CLS] token (and optionally a distillation token) is prepended and a
    learned position embedding added. Output ``(batch, num_tokens, embed_dim)``
    with ``num_tokens = f_dim * t_dim + num_prefix_tokens``.
    """

    def __init__(
        self,
        embed_dim,
        patch_size=16,
        f_stride=16,
        t_stride=16,
        num_mels=128,
        num_frames=512,
        distillation_token=False,
        dropout_rate=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.f_stride = int(f_stride)
        self.t_stride = int(t_stride)
        self.num_mels = int(num_mels)
        self.num_frames = int(num_frames)
        self.distillation_token = bool(distillation_token)
        self.dropout_rate = float(dropout_rate)
        for key in ("patch_size", "f_stride", "t_stride"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}.")
        if self.f_stride > self.patch_size or self.t_stride > self.patch_size:
            raise ValueError(
                f"model.f_stride={self.f_stride} / model.t_stride={self.t_stride} larger than "
                f"model.patch_size={self.patch_size} would skip parts of the spectrogram; use "
                f"strides <= patch_size (equal: no overlap; AST uses 10 with patch 16)."
            )
        if self.num_mels < self.patch_size or self.num_frames < self.patch_size:
            raise ValueError(
                f"the spectrogram ({self.num_mels} mel bins x {self.num_frames} frames) is smaller "
                f"than one patch ({self.patch_size}x{self.patch_size}); lower model.patch_size or "
                f"use more mel bins (frontend.n_mels) / longer clips (data.clip_seconds)."
            )
        self.f_dim, self.t_dim = grid_size(
            self.num_mels, self.num_frames, self.patch_size, self.f_stride, self.t_stride
        )
        self.num_patches = self.f_dim * self.t_dim
        self.num_prefix_tokens = 2 if self.distillation_token else 1
        self.num_tokens = self.num_patches + self.num_prefix_tokens

        self.projection = layers.Conv2D(
            self.embed_dim,
            kernel_size=self.patch_size,
            strides=(self.f_stride, self.t_stride),
            padding="valid",
            name="projection",
        )
        self.dropout = layers.Dropout(self.dropout_rate)

    def build(self, input_shape):
        # input_shape: (batch, frames, n_mels)
        frames, mels = input_shape[1], input_shape[2]
        if (frames is not None and frames != self.num_frames) or (
            mels is not None and mels != self.num_mels
        ):
            raise ValueError(
                f"PatchEmbedding built for {self.num_frames} frames x {self.num_mels} mel bins, "
                f"got input {tuple(input_shape)}."
            )
        self.projection.build((None, self.num_mels, self.num_frames, 1))
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        self.cls_token = self.add_weight(
            shape=(1, 1, self.embed_dim), initializer=init, name="cls_token"
        )
        if self.distillation_token:
            self.dist_token = self.add_weight(
                shape=(1, 1, self.embed_dim), initializer=init, name="dist_token"
            )
        self.position_embedding = self.add_weight(
            shape=(1, self.num_tokens, self.embed_dim), initializer=init, name="position_embedding"
        )
        self.built = True

    def call(self, features, training=None):
        # features: (B, T, F) -> (B, F, T, 1): frequency on the first image axis, as AST
        x = ops.expand_dims(ops.transpose(features, (0, 2, 1)), -1)
        x = self.projection(x)  # (B, f_dim, t_dim, D)
        batch = ops.shape(x)[0]
        x = ops.reshape(x, (batch, self.num_patches, self.embed_dim))  # (B, N, D)
        prefix = [ops.broadcast_to(ops.cast(self.cls_token, x.dtype), (batch, 1, self.embed_dim))]
        if self.distillation_token:
            prefix.append(
                ops.broadcast_to(ops.cast(self.dist_token, x.dtype), (batch, 1, self.embed_dim))
            )
        x = ops.concatenate(prefix + [x], axis=1)  # (B, N + prefix, D)
        x = x + ops.cast(self.position_embedding, x.dtype)
        return self.dropout(x, training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_tokens, self.embed_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            embed_dim=self.embed_dim,
            patch_size=self.patch_size,
            f_stride=self.f_stride,
            t_stride=self.t_stride,
            num_mels=self.num_mels,
            num_frames=self.num_frames,
            distillation_token=self.distillation_token,
            dropout_rate=self.dropout_rate,
        )
        return config
