"""AST-style patch embedding over the (freq, time) plane, position embeddings and
PaSST's patchout (Koutini et al. 2022)."""

from __future__ import annotations

from collections.abc import Mapping

import keras
from keras import layers, ops

from src.models.attention import PACKAGE

POS_EMBEDDINGS = ("grid", "disentangled")
PATCHOUT_KEYS = ("time", "freq", "random")


def grid_size(n_mels, frames, patch_size, f_stride, t_stride):
    """AST's patch grid: (f_dim, t_dim) for a (n_mels, frames) spectrogram."""
    f_dim = (n_mels - patch_size) // f_stride + 1
    t_dim = (frames - patch_size) // t_stride + 1
    return f_dim, t_dim


def patchout_config(value) -> dict:
    """``model.patchout`` as ``{"time": int, "freq": int, "random": int}`` (missing keys 0).

    ``None`` (or an empty mapping) is no patchout. Unknown keys, non-integers and
    negative counts raise a ValueError naming the key.
    """
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ValueError(
            f"model.patchout must be a mapping like {{time: 0, freq: 0, random: 0}}, got {value!r}."
        )
    unknown = sorted(str(k) for k in value if k not in PATCHOUT_KEYS)
    if unknown:
        raise ValueError(
            f"unknown key model.patchout.{unknown[0]}; valid keys: {list(PATCHOUT_KEYS)}."
        )
    out = {}
    for key in PATCHOUT_KEYS:
        raw = value.get(key, 0)
        raw = 0 if raw is None else raw
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or int(raw) != raw:
            raise ValueError(f"model.patchout.{key} must be a whole number, got {raw!r}.")
        if raw < 0:
            raise ValueError(f"model.patchout.{key} must be >= 0 (0: off), got {raw}.")
        out[key] = int(raw)
    return out


@keras.saving.register_keras_serializable(package=PACKAGE)
class PatchEmbedding(layers.Layer):
    """Split a spectrogram into (overlapping) patches and embed them.

    Input ``(batch, frames, n_mels)`` -> transposed to ``(batch, n_mels, frames, 1)``
    -> Conv2D(embed_dim, kernel patch_size, strides (f_stride, t_stride))
    -> ``(batch, f_dim, t_dim, embed_dim)`` -> + position embedding -> patchout
    (training only) -> flattened frequency-major, as AST -> the [CLS] token (and
    optionally a distillation token) prepended, each with its own position
    embedding. Output ``(batch, num_tokens, embed_dim)`` with ``num_tokens =
    f_dim * t_dim + num_prefix_tokens`` (fewer patches in training with patchout).

    ``pos_embedding``:

    * ``"grid"`` (AST): one learned vector per token, ``position_embedding``
      ``(1, prefix + f_dim * t_dim, D)``. The input must have exactly
      ``num_frames`` frames.
    * ``"disentangled"`` (PaSST): ``freq_embedding`` ``(f_dim, D)`` plus
      ``time_embedding`` ``(t_dim, D)``, broadcast over the grid, and
      ``prefix_embedding`` ``(1, prefix, D)`` for the [CLS]/[DIST] tokens. Any
      input from one patch (``patch_size`` frames) to ``num_frames`` frames: a
      shorter one reads the first ``t`` time positions (at a random offset in
      training); a longer one must be cut into windows by the caller.

    ``patchout`` (``{"time": t, "freq": f, "random": r}``; training only): drop ``t``
    whole time columns and ``f`` whole frequency rows of the patch grid, then ``r``
    of the remaining patches, after the position embedding is added. The indices
    are drawn anew at every call and shared by the whole batch, so the tokens stay
    a dense ``(batch, prefix + (f_dim - f) * (t_dim - t) - r, D)`` tensor with a
    static shape. The prefix tokens are never dropped. ``call(..., patchout=False)``
    turns it off (attention maps read the whole grid).
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
        pos_embedding="grid",
        patchout=None,
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
        self.pos_embedding = str(pos_embedding)
        self.patchout = patchout_config(patchout)
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise ValueError(
                f"model.pos_embedding must be one of {POS_EMBEDDINGS}, got {pos_embedding!r}."
            )
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
        self._check_patchout()
        po = self.patchout
        # Tokens in training: the grid less the dropped rows/columns, less the random ones.
        self.num_train_patches = (
            (self.f_dim - po["freq"]) * (self.t_dim - po["time"]) - po["random"]
        )

        self.projection = layers.Conv2D(
            self.embed_dim,
            kernel_size=self.patch_size,
            strides=(self.f_stride, self.t_stride),
            padding="valid",
            name="projection",
        )
        self.dropout = layers.Dropout(self.dropout_rate)
        # Random patchout indices / time offsets; only where they are used, so a model
        # without them keeps the variables it always had.
        needs_random = any(po.values()) or self.pos_embedding == "disentangled"
        self.seed_generator = keras.random.SeedGenerator() if needs_random else None

    def _grid_text(self):
        return (f"{self.f_dim} x {self.t_dim} for {self.num_mels} mel bins x "
                f"{self.num_frames} frames")

    def _check_patchout(self):
        po = self.patchout
        for key, size, what in (("time", self.t_dim, "time columns"),
                                ("freq", self.f_dim, "frequency rows")):
            if po[key] > size:
                raise ValueError(
                    f"model.patchout.{key}={po[key]} drops more {what} than the patch grid has "
                    f"({self._grid_text()}); use at most {size - 1}."
                )
            if po[key] == size:
                raise ValueError(
                    f"model.patchout.{key}={po[key]} drops all {size} {what} of the patch grid "
                    f"({self._grid_text()}), leaving no patches; use at most {size - 1}."
                )
        left = (self.f_dim - po["freq"]) * (self.t_dim - po["time"])
        if po["random"] >= left:
            raise ValueError(
                f"model.patchout.random={po['random']} drops "
                f"{'more than' if po['random'] > left else 'all of'} the {left} patches left "
                f"after model.patchout.time={po['time']} and model.patchout.freq={po['freq']} "
                f"(patch grid {self._grid_text()}), leaving no patches; use at most {left - 1}."
            )

    def _check_frames(self, frames):
        """Raise when a static frame count does not fit the position embedding."""
        if frames is None:
            return
        frames = int(frames)
        if self.pos_embedding == "grid":
            if frames != self.num_frames:
                raise ValueError(
                    f"got {frames} frames: a grid position embedding fixes the input to "
                    f"{self.num_frames} frames; pad/crop or window the input, or use "
                    "model.pos_embedding=disentangled."
                )
            return
        if frames > self.num_frames:
            raise ValueError(
                f"got {frames} frames, more than the {self.num_frames} frames the time position "
                f"embedding covers ({self.t_dim} patch columns); cut the input into windows of at "
                f"most {self.num_frames} frames and combine their outputs."
            )
        if frames < self.patch_size:
            raise ValueError(
                f"got {frames} frames, fewer than one patch ({self.patch_size} frames); pad the "
                "input."
            )

    def _assert_frames(self, features):
        """The same check for a frame count known only at run time (a traced function
        over inputs of any length): ``features``, once the check has passed."""
        import tensorflow as tf

        frames = tf.shape(features)[1]
        with tf.control_dependencies(self._frame_assertions(frames)):
            return tf.identity(features)

    def _frame_assertions(self, frames):
        import tensorflow as tf

        if self.pos_embedding == "grid":
            return [tf.debugging.assert_equal(
                frames, self.num_frames,
                message=f"a grid position embedding fixes the input to {self.num_frames} "
                        "frames; pad/crop or window the input, or use "
                        "model.pos_embedding=disentangled",
            )]
        return [
            tf.debugging.assert_less_equal(
                frames, self.num_frames,
                message=f"input longer than the {self.num_frames} frames the time position "
                        f"embedding covers; cut it into windows of at most {self.num_frames} "
                        "frames",
            ),
            tf.debugging.assert_greater_equal(
                frames, self.patch_size,
                message=f"input shorter than one patch ({self.patch_size} frames)",
            ),
        ]

    def build(self, input_shape):
        # input_shape: (batch, frames, n_mels); frames may be None (any length)
        frames, mels = input_shape[1], input_shape[2]
        if mels is not None and mels != self.num_mels:
            raise ValueError(
                f"PatchEmbedding built for {self.num_mels} mel bins, got input "
                f"{tuple(input_shape)}."
            )
        self._check_frames(frames)
        self.projection.build((None, self.num_mels, self.num_frames, 1))
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        self.cls_token = self.add_weight(
            shape=(1, 1, self.embed_dim), initializer=init, name="cls_token"
        )
        if self.distillation_token:
            self.dist_token = self.add_weight(
                shape=(1, 1, self.embed_dim), initializer=init, name="dist_token"
            )
        if self.pos_embedding == "grid":
            self.position_embedding = self.add_weight(
                shape=(1, self.num_tokens, self.embed_dim), initializer=init,
                name="position_embedding",
            )
        else:
            self.prefix_embedding = self.add_weight(
                shape=(1, self.num_prefix_tokens, self.embed_dim), initializer=init,
                name="prefix_embedding",
            )
            self.freq_embedding = self.add_weight(
                shape=(self.f_dim, self.embed_dim), initializer=init, name="freq_embedding"
            )
            self.time_embedding = self.add_weight(
                shape=(self.t_dim, self.embed_dim), initializer=init, name="time_embedding"
            )
        self.built = True

    def _time_positions(self, t_dim, dtype, training):
        """The time embedding's rows for ``t_dim`` patch columns ``(t_dim, D)``: all of
        them, the first ``t_dim`` (inference) or ``t_dim`` from a random offset
        (training)."""
        time = ops.cast(self.time_embedding, dtype)
        if isinstance(t_dim, int) and t_dim == self.t_dim:
            return time
        if training:
            span = ops.cast(self.t_dim - t_dim + 1, "float32")
            u = keras.random.uniform((), seed=self.seed_generator)
            offset = ops.minimum(ops.cast(ops.floor(u * span), "int32"),
                                 ops.cast(self.t_dim - t_dim, "int32"))
            return ops.slice(time, (offset, 0), (t_dim, self.embed_dim))
        return time[:t_dim]

    @staticmethod
    def _scaled_drop(drop: int, size, full: int):
        """How many of ``size`` to drop where ``model.patchout`` drops ``drop`` of the
        training input's ``full``: ``drop`` itself at the training length; for a shorter
        input (a disentangled model takes any length) the same share, at least one kept."""
        if isinstance(size, int):
            if size == full:
                return drop
            return max(0, min(int(round(drop * size / full)), size - 1))
        share = ops.round(ops.cast(size, "float32") * (drop / full))
        return ops.maximum(ops.minimum(ops.cast(share, "int32"), size - 1), 0)

    def _keep(self, size, drop):
        """``size - drop`` of ``range(size)``, drawn without replacement, ascending."""
        scores = keras.random.uniform((size,), seed=self.seed_generator)
        _, keep = ops.top_k(scores, size - drop, sorted=False)
        return ops.sort(keep)

    def structured_keep(self, t_dim=None):
        """What one training step's structured patchout keeps: ``(time, freq)``, the time
        columns (of ``t_dim``, default the model's) and frequency rows left, ascending
        int32 indices, each ``None`` where ``model.patchout`` drops none. Fresh draws on
        every call; :meth:`tokens_from_grid` draws them the same way unless given
        ``keep``."""
        po = self.patchout
        t_dim = self.t_dim if t_dim is None else t_dim
        time = (self._keep(t_dim, self._scaled_drop(po["time"], t_dim, self.t_dim))
                if po["time"] else None)
        freq = self._keep(self.f_dim, po["freq"]) if po["freq"] else None
        return time, freq

    def call(self, features, training=None, patchout=True):
        return self.tokens_from_grid(
            self.patch_grid(features), training=training, patchout=patchout
        )

    def patch_grid(self, features):
        """The patch embeddings before anything is added: ``(B, T, F)`` features ->
        ``(B, f_dim, t_dim, D)``. :meth:`call` is ``tokens_from_grid(patch_grid(x))``;
        masked patch pretraining (:mod:`src.models.ssast`) replaces some of these
        embeddings with a mask token in between."""
        frames = features.shape[1]
        self._check_frames(frames)
        if frames is None:
            features = self._assert_frames(features)
        # features: (B, T, F) -> (B, F, T, 1): frequency on the first image axis, as AST
        x = ops.expand_dims(ops.transpose(features, (0, 2, 1)), -1)
        return self.projection(x)  # (B, f_dim, t_dim, D)

    def tokens_from_grid(self, x, training=None, patchout=True, keep=None):
        """``(B, f_dim, t_dim, D)`` patch embeddings -> the token sequence
        ``(B, prefix + N', D)``: position embedding, patchout (training only), prefix
        tokens, dropout. ``keep``: ``(time, freq)`` indices from :meth:`structured_keep`
        to keep instead of drawing them (then only these columns and rows are dropped,
        in any mode; masked patch pretraining needs to know them)."""
        shape = ops.shape(x)
        batch, t_dim = shape[0], shape[2]
        dim = self.embed_dim
        if self.pos_embedding == "grid":
            pos = ops.cast(self.position_embedding, x.dtype)
            prefix_pos = pos[:, : self.num_prefix_tokens]  # (1, prefix, D)
            x = x + ops.reshape(pos[:, self.num_prefix_tokens:], (1, self.f_dim, self.t_dim, dim))
        else:
            prefix_pos = ops.cast(self.prefix_embedding, x.dtype)
            freq = ops.cast(self.freq_embedding, x.dtype)  # (f_dim, D)
            time = self._time_positions(t_dim, x.dtype, training)  # (t_dim, D)
            x = x + freq[None, :, None, :] + time[None, None, :, :]
        po = self.patchout if (training and patchout) else dict.fromkeys(PATCHOUT_KEYS, 0)
        # Structured patchout: whole time columns, then whole frequency rows.
        if keep is None:
            keep = self.structured_keep(t_dim) if po["time"] or po["freq"] else (None, None)
        time_keep, freq_keep = keep
        if time_keep is not None:
            x = ops.take(x, time_keep, axis=2)
        if freq_keep is not None:
            x = ops.take(x, freq_keep, axis=1)
        # (B, f', t', D) -> (B, f' * t', D), frequency-major; static when the shape is
        f_keep, t_keep = x.shape[1], x.shape[2]
        n = f_keep * t_keep if f_keep is not None and t_keep is not None else -1
        x = ops.reshape(x, (batch, n, dim))
        if po["random"]:  # unstructured patchout: any of the remaining patches
            size = n if n != -1 else ops.shape(x)[1]
            full = (self.f_dim - po["freq"]) * (self.t_dim - po["time"])
            x = ops.take(x, self._keep(size, self._scaled_drop(po["random"], size, full)), axis=1)
        prefix = [ops.cast(self.cls_token, x.dtype) + prefix_pos[:, :1]]
        if self.distillation_token:
            prefix.append(ops.cast(self.dist_token, x.dtype) + prefix_pos[:, 1:2])
        prefix = [ops.broadcast_to(p, (batch, 1, dim)) for p in prefix]
        x = ops.concatenate(prefix + [x], axis=1)  # (B, prefix + N', D)
        return self.dropout(x, training=training)

    def compute_output_shape(self, input_shape):
        frames = input_shape[1]
        if frames is None:
            return (input_shape[0], None, self.embed_dim)
        _, t_dim = grid_size(self.num_mels, int(frames), self.patch_size, self.f_stride,
                             self.t_stride)
        return (input_shape[0], self.f_dim * t_dim + self.num_prefix_tokens, self.embed_dim)

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
            pos_embedding=self.pos_embedding,
            patchout=dict(self.patchout),
        )
        return config
