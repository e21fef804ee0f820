"""The classifier: frontend -> normalise -> SpecAugment -> patches -> blocks -> head.

Two Keras models share their layers:

* ``SpectrogramTransformer`` (the backbone) maps log-mel features
  ``(batch, frames, n_mels)`` to logits. Training fits it on cached features so
  the STFT is computed once per clip, not once per epoch.
* ``AudioTransformer`` wraps a frontend and a backbone and maps a raw waveform
  ``(batch, samples)`` to logits. This is the model that is saved, exported
  and used for prediction: one frontend, two entry points.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from src.models.attention import PACKAGE
from src.models.patch import PatchEmbedding, patchout_config
from src.models.spec import Normalize, SpecAugment
from src.models.transformer import TransformerBlock
from src.models.waveform import preprocess_waveform

POOLINGS = ("cls", "mean", "cls_dist")


@keras.saving.register_keras_serializable(package=PACKAGE)
class SpectrogramTransformer(keras.Model):
    """Transformer backbone over a log-mel spectrogram.

    Input ``(batch, num_frames, num_mels)``; output logits ``(batch, num_classes)``.
    ``pooling``: "cls" ([CLS] token), "mean" (mean of the patch tokens) or
    "cls_dist" ((x[:, 0] + x[:, 1]) / 2 with a distillation token, as AST).
    ``pooled_last_block`` (default true): with "cls"/"cls_dist" pooling the last block
    computes only the rows of the pooled tokens (its attention still reads every
    token). The logits and gradients are those of the full computation (the other
    rows never reach the head), for about a fifth less work in a 4-block model.
    Attention maps (``return_attention_scores``) and :meth:`encode` compute every row.

    ``pos_embedding``: "grid" (one learned vector per patch, as AST; the input must
    have ``num_frames`` frames) or "disentangled" (a frequency plus a time embedding,
    as PaSST; inputs of any length up to ``num_frames`` frames, longer ones must be
    cut into windows). ``patchout`` (``{"time": t, "freq": f, "random": r}``, all 0 by
    default): in training, drop ``t`` time columns and ``f`` frequency rows of the
    patch grid and then ``r`` random patches, the same ones for the whole batch (see
    :class:`~src.models.patch.PatchEmbedding`); inference and attention maps use every
    patch.

    ``freeze`` (default 0): the lowest stages whose weights training leaves as they are,
    for fine-tuning a pretrained backbone on few labels: 1 the patch embedding
    (projection, [CLS] and position embeddings), 2 also ``block_0``, and so on.
    """

    def __init__(
        self,
        num_classes,
        num_frames,
        num_mels,
        embed_dim=64,
        num_layers=2,
        num_heads=4,
        ff_dim=128,
        patch_size=16,
        f_stride=16,
        t_stride=16,
        dropout_rate=0.1,
        attention_dropout=0.0,
        embedding_dropout=0.0,
        norm_first=False,
        activation="relu",
        epsilon=1e-6,
        pooling="cls",
        head_norm=True,
        head_dropout=0.0,
        norm_mean=0.0,
        norm_std=1.0,
        norm_scale=2.0,
        freq_mask_param=0,
        time_mask_param=0,
        freq_masks=1,
        time_masks=1,
        fused_attention=False,
        qkv_bias=True,
        fused_qkv=False,
        pooled_last_block=True,
        pos_embedding="grid",
        patchout=None,
        freeze=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if int(num_layers) < 1:
            raise ValueError(f"model.num_layers must be >= 1, got {num_layers}.")
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {POOLINGS}, got {pooling!r}.")
        if isinstance(freeze, bool) or not 0 <= int(freeze) <= int(num_layers) + 1:
            raise ValueError(
                f"model.freeze={freeze!r}: the number of lowest stages kept fixed (1: the "
                f"patch embedding, 2: it and block_0, ...), from 0 to num_layers + 1 = "
                f"{int(num_layers) + 1}."
            )
        self.hparams = dict(
            num_classes=int(num_classes),
            num_frames=int(num_frames),
            num_mels=int(num_mels),
            embed_dim=int(embed_dim),
            num_layers=int(num_layers),
            num_heads=int(num_heads),
            ff_dim=int(ff_dim),
            patch_size=int(patch_size),
            f_stride=int(f_stride),
            t_stride=int(t_stride),
            dropout_rate=float(dropout_rate),
            attention_dropout=float(attention_dropout),
            embedding_dropout=float(embedding_dropout),
            norm_first=bool(norm_first),
            activation=str(activation),
            epsilon=float(epsilon),
            pooling=str(pooling),
            head_norm=bool(head_norm),
            head_dropout=float(head_dropout),
            norm_mean=float(norm_mean),
            norm_std=float(norm_std),
            norm_scale=float(norm_scale),
            freq_mask_param=int(freq_mask_param),
            time_mask_param=int(time_mask_param),
            freq_masks=int(freq_masks),
            time_masks=int(time_masks),
            fused_attention=bool(fused_attention),
            qkv_bias=bool(qkv_bias),
            fused_qkv=bool(fused_qkv),
            pooled_last_block=bool(pooled_last_block),
            pos_embedding=str(pos_embedding),
            patchout=patchout_config(patchout),
            freeze=int(freeze),
        )
        h = self.hparams
        # Sub-layers take this model's dtype policy (set by the global policy when built
        # for training, or by the saved config when loaded), so a mixed-precision model
        # loads as it was trained.
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.dtype_policy)
        try:
            self._make_layers(h)
        finally:
            keras.mixed_precision.set_global_policy(previous)

    def _make_layers(self, h):
        self.pooling = h["pooling"]
        self.normalize = Normalize(h["norm_mean"], h["norm_std"], h["norm_scale"], name="normalize")
        self.specaugment = SpecAugment(
            h["freq_mask_param"], h["time_mask_param"], h["freq_masks"], h["time_masks"],
            name="specaugment",
        )
        self.patch_embed = PatchEmbedding(
            h["embed_dim"],
            patch_size=h["patch_size"],
            f_stride=h["f_stride"],
            t_stride=h["t_stride"],
            num_mels=h["num_mels"],
            num_frames=h["num_frames"],
            distillation_token=self.pooling == "cls_dist",
            dropout_rate=h["embedding_dropout"],
            pos_embedding=h["pos_embedding"],
            patchout=h["patchout"],
            name="patch_embed",
        )
        # Validates embed_dim % num_heads before anything is built.
        self.blocks = [
            TransformerBlock(
                h["embed_dim"],
                h["num_heads"],
                h["ff_dim"],
                dropout_rate=h["dropout_rate"],
                attention_dropout=h["attention_dropout"],
                norm_first=h["norm_first"],
                activation=h["activation"],
                epsilon=h["epsilon"],
                fused_attention=h["fused_attention"],
                qkv_bias=h["qkv_bias"],
                fused_qkv=h["fused_qkv"],
                name=f"block_{i}",
            )
            for i in range(h["num_layers"])
        ]
        # Pre-norm stacks end un-normalised: ViT/AST put a LayerNorm after the
        # last block. Post-norm blocks already end with one.
        self.final_norm = (
            layers.LayerNormalization(epsilon=h["epsilon"], name="final_norm")
            if h["norm_first"]
            else None
        )
        self.head_norm = (
            layers.LayerNormalization(epsilon=h["epsilon"], name="head_norm")
            if h["head_norm"]
            else None
        )
        self.head_dropout = layers.Dropout(h["head_dropout"])
        # float32 logits under mixed precision: a stable softmax / cross-entropy.
        self.classifier = layers.Dense(h["num_classes"], dtype="float32", name="classifier")
        # Fine-tuning a pretrained backbone with few labels: the lowest stages keep their
        # (pretrained) weights.
        for layer in [self.patch_embed, *self.blocks][: h["freeze"]]:
            layer.trainable = False

    @property
    def num_patches(self):
        return self.patch_embed.num_patches

    @property
    def grid(self):
        return self.patch_embed.f_dim, self.patch_embed.t_dim

    def build(self, input_shape):
        # input_shape: (batch, num_frames, num_mels)
        h = self.hparams
        tokens = (None, self.patch_embed.num_tokens, h["embed_dim"])
        self.patch_embed.build(input_shape)
        for block in self.blocks:
            block.build(tokens)
        if self.final_norm is not None:
            self.final_norm.build(tokens)
        if self.head_norm is not None:
            self.head_norm.build((None, h["embed_dim"]))
        self.classifier.build((None, h["embed_dim"]))
        self.built = True

    def encode(self, features, training=None, return_attention_scores=False, last_rows=None):
        """Features -> token sequence after the blocks (and per-block attention).

        ``last_rows``: the last block computes the first ``last_rows`` tokens only
        (see ``pooled_last_block``); ``None``: every token. With ``training`` the
        patch tokens are those left by patchout (``patch_embed.num_train_patches``);
        with ``return_attention_scores`` every patch, so the maps cover the grid.
        """
        x = self.normalize(features)
        x = self.specaugment(x, training=training)
        # (B, prefix + N, D); N' < N patches in training with patchout
        x = self.patch_embed(x, training=training, patchout=not return_attention_scores)
        return self.encode_tokens(
            x, training=training, return_attention_scores=return_attention_scores,
            last_rows=last_rows,
        )

    def encode_tokens(self, x, training=None, return_attention_scores=False, last_rows=None):
        """The blocks (and the final norm) over a token sequence ``(B, prefix + N, D)``
        from :class:`~src.models.patch.PatchEmbedding`: ``(tokens, attention weights)``.
        :meth:`encode` is normalise -> SpecAugment -> patch embedding -> this; masked
        patch pretraining (:mod:`src.models.ssast`) builds the tokens itself."""
        weights = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            rows = last_rows if i == last else None
            if return_attention_scores:
                x, w = block(
                    x, training=training, return_attention_scores=True, num_queries=rows
                )
                weights.append(w)  # (B, H, N + prefix, N + prefix)
            else:
                x = block(x, training=training, num_queries=rows)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, weights

    def pool(self, tokens):
        if self.pooling == "cls":
            return tokens[:, 0]
        if self.pooling == "cls_dist":
            return (tokens[:, 0] + tokens[:, 1]) / 2.0
        prefix = self.patch_embed.num_prefix_tokens
        return ops.mean(tokens[:, prefix:], axis=1)

    def pooled_rows(self):
        """How many leading tokens the head reads: 1 ([CLS]), 2 ([CLS] + [DIST]), or
        None (mean pooling reads every token)."""
        if self.pooling == "mean":
            return None
        return self.patch_embed.num_prefix_tokens

    def call(self, features, training=None, return_attention_scores=False):
        last_rows = None
        if self.hparams["pooled_last_block"] and not return_attention_scores:
            last_rows = self.pooled_rows()
        tokens, weights = self.encode(
            features, training=training, return_attention_scores=return_attention_scores,
            last_rows=last_rows,
        )
        x = self.pool(tokens)  # (B, D)
        if self.head_norm is not None:
            x = self.head_norm(x)
        x = self.head_dropout(x, training=training)
        logits = self.classifier(x)  # (B, num_classes)
        if return_attention_scores:
            return logits, weights
        return logits

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.hparams["num_classes"])

    def get_build_config(self):
        return {"input_shape": (None, self.hparams["num_frames"], self.hparams["num_mels"])}

    def build_from_config(self, config):
        self.build(tuple(config["input_shape"]))

    def get_config(self):
        config = super().get_config()
        config.update(self.hparams)
        return config


def fit_frames(features, target_frames):
    """Zero-pad or crop ``(batch, frames, n_mels)`` features to ``target_frames`` frames
    (AST pads its fbank with zeros to 512 frames). ``None`` leaves them unchanged. Works
    with an unknown number of frames (a traced function over clips of any length)."""
    if target_frames is None:
        return features
    target_frames = int(target_frames)
    frames = features.shape[1]
    if frames is not None:
        if frames >= target_frames:
            return features[:, :target_frames]
        return ops.pad(features, ((0, 0), (0, target_frames - frames), (0, 0)))
    features = features[:, :target_frames]
    missing = target_frames - ops.shape(features)[1]
    out = ops.pad(features, [[0, 0], [0, missing], [0, 0]])
    return ops.reshape(out, (-1, target_frames, features.shape[-1]))


# How a clip shorter than the model's input is padded at inference, as in the training
# the model had (``target_frames`` models; see src.predict.takes_short_input):
# "clip": zero samples up to clip_samples (src.train: fixed-length clips are zero-padded,
# the feature store pads variable-length ones with frames of silence), then zero frames
# up to target_frames; "features": the features of the clip alone, zero-padded to
# target_frames (AST's reference code pads its fbank so: imported AST checkpoints).
SHORT_INPUT = ("clip", "features")


@keras.saving.register_keras_serializable(package=PACKAGE)
class AudioTransformer(keras.Model):
    """Raw waveform ``(batch, samples)`` -> logits ``(batch, num_classes)``.

    ``frontend`` and ``backbone`` are layer instances (or their serialized
    configs, when loading a ``.keras`` file). The waveform is preprocessed as in training
    (:func:`src.models.waveform.preprocess_waveform`: the clip's mean removed when
    ``remove_mean``, samples clipped to [-1, 1]), so the saved model, its exports and
    ``src.predict`` need nothing from the run's config. ``multi_label``: the logits are
    independent sigmoids (tagging) rather than a softmax.
    """

    def __init__(
        self, frontend, backbone, clip_samples, class_names=None, target_frames=None,
        multi_label=False, remove_mean=True, short_input="clip", **kwargs
    ):
        super().__init__(**kwargs)
        if short_input not in SHORT_INPUT:
            raise ValueError(f"short_input={short_input!r}: one of {SHORT_INPUT}")
        if isinstance(frontend, dict):
            frontend = keras.saving.deserialize_keras_object(frontend)
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        self.frontend = frontend
        self.backbone = backbone
        self.clip_samples = int(clip_samples)
        self.target_frames = None if target_frames is None else int(target_frames)
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.multi_label = bool(multi_label)
        self.remove_mean = bool(remove_mean)
        self.short_input = str(short_input)

    @property
    def output_activation(self) -> str:
        return "sigmoid" if self.multi_label else "softmax"

    def build(self, input_shape):
        # input_shape: (batch, samples)
        feature_shape = self.frontend.compute_output_shape(input_shape)
        if self.target_frames is not None:
            feature_shape = (feature_shape[0], self.target_frames, feature_shape[2])
        if not self.frontend.built:
            self.frontend.build(input_shape)
        if not self.backbone.built:  # already built when loaded from a .keras file
            self.backbone.build(feature_shape)
        self.built = True

    def call(self, waveform, training=None):
        return self.backbone(self.features(waveform), training=training)

    def features(self, waveform):
        """Waveform -> the backbone's input ``(B, frames, n_mels)``."""
        x = preprocess_waveform(waveform, self.remove_mean)
        return fit_frames(self.frontend(x), self.target_frames)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.backbone.hparams["num_classes"])

    def get_build_config(self):
        return {"input_shape": (None, self.clip_samples)}

    def build_from_config(self, config):
        self.build(tuple(config["input_shape"]))

    def get_config(self):
        config = super().get_config()
        config.update(
            frontend=keras.saving.serialize_keras_object(self.frontend),
            backbone=keras.saving.serialize_keras_object(self.backbone),
            clip_samples=self.clip_samples,
            class_names=self.class_names,
            target_frames=self.target_frames,
            multi_label=self.multi_label,
            remove_mean=self.remove_mean,
            short_input=self.short_input,
        )
        return config
