"""A floor under every number: logistic regression on pooled log-mel statistics.

Per mel band, the mean, standard deviation and maximum over time (3 x n_mels
features), standardised by batch statistics, then one Dense layer (softmax
regression, L2-regularised). Same frontend, normalisation, augmentation and
cross-validation as the transformer, so a results table can show both.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from src.models.attention import PACKAGE
from src.models.spec import Normalize, SpecAugment

STATS = ("mean", "std", "max")


@keras.saving.register_keras_serializable(package=PACKAGE)
class PooledStatsClassifier(keras.Model):
    """Input ``(batch, num_frames, num_mels)`` -> logits ``(batch, num_classes)``."""

    def __init__(
        self,
        num_classes,
        num_frames,
        num_mels,
        stats=STATS,
        l2=1e-4,
        dropout_rate=0.0,
        norm_mean=0.0,
        norm_std=1.0,
        norm_scale=2.0,
        freq_mask_param=0,
        time_mask_param=0,
        freq_masks=1,
        time_masks=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        stats = tuple(stats)
        unknown = [s for s in stats if s not in STATS]
        if not stats or unknown:
            raise ValueError(f"model.stats must be a non-empty subset of {STATS}, got {stats}.")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        self.hparams = dict(
            num_classes=int(num_classes),
            num_frames=int(num_frames),
            num_mels=int(num_mels),
            stats=list(stats),
            l2=float(l2),
            dropout_rate=float(dropout_rate),
            norm_mean=float(norm_mean),
            norm_std=float(norm_std),
            norm_scale=float(norm_scale),
            freq_mask_param=int(freq_mask_param),
            time_mask_param=int(time_mask_param),
            freq_masks=int(freq_masks),
            time_masks=int(time_masks),
        )
        h = self.hparams
        self.normalize = Normalize(h["norm_mean"], h["norm_std"], h["norm_scale"], name="normalize")
        self.specaugment = SpecAugment(
            h["freq_mask_param"], h["time_mask_param"], h["freq_masks"], h["time_masks"],
            name="specaugment",
        )
        # Standardise each pooled feature (no learned affine: the model stays linear).
        self.standardize = layers.BatchNormalization(center=False, scale=False, name="standardize")
        self.dropout = layers.Dropout(h["dropout_rate"])
        self.classifier = layers.Dense(
            h["num_classes"],
            kernel_regularizer=keras.regularizers.L2(h["l2"]) if h["l2"] else None,
            name="classifier",
        )

    def build(self, input_shape):
        width = len(self.hparams["stats"]) * self.hparams["num_mels"]
        self.standardize.build((None, width))
        self.classifier.build((None, width))
        self.built = True

    def pooled(self, features, training=None):
        x = self.normalize(features)
        x = self.specaugment(x, training=training)  # (B, T, F)
        parts = []
        for stat in self.hparams["stats"]:
            if stat == "mean":
                parts.append(ops.mean(x, axis=1))
            elif stat == "std":
                parts.append(ops.std(x, axis=1))
            else:
                parts.append(ops.max(x, axis=1))
        return ops.concatenate(parts, axis=-1)  # (B, len(stats) * F)

    def call(self, features, training=None):
        x = self.standardize(self.pooled(features, training=training), training=training)
        return self.classifier(self.dropout(x, training=training))

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
