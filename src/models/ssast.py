"""Masked patch modelling as SSAST (Gong et al. 2022): self-supervised pretraining of the
:class:`~src.models.audio_transformer.SpectrogramTransformer` on unlabeled audio.

For every clip, ``count`` of the ``N`` non-overlapping 16 x 16 patches are masked
(:func:`cluster_masks`: a random anchor patch and its k x k neighbourhood, k in 3..5,
repeated until ``count`` patches are masked). The embeddings of the masked patches are
replaced by a learnable mask token *before* the position embedding is added, so the
encoder knows where a masked patch is but not what it holds. The encoder is the
fine-tuning model's own normalisation, patch embedding and blocks (not a copy):
:class:`MaskedPatchPretrainer` wraps the backbone and adds only what pretraining needs.

Two small heads (Dense -> ReLU -> Dense, as SSAST) map the encoder's output at each
masked position to the 256 values of a patch:

* discriminative: InfoNCE over the masked patches of the same clip. With ``p_j`` the
  prediction at masked position ``j`` and ``x_i`` the content (the normalised
  spectrogram values) of masked patch ``i``, ``logits[j, i] = p_j . x_i`` and the loss
  is the cross-entropy of picking ``i = j`` among the clip's ``count`` masked patches
  (:func:`info_nce`); the retrieval accuracy is how often the arg-max is ``j``
  (:func:`retrieval_accuracy`). SSAST's code normalises the same logits over the
  predictions for each target instead; both are InfoNCE over the same pairs.
* generative: mean squared error between the reconstruction and the patch content.

``loss = InfoNCE + mse_weight * MSE`` (SSAST: 10), from one forward pass (SSAST runs
the two objectives as two passes with two masks). Masked patches of constant content
(the silence a short clip is padded with) are left out of both, as targets and as
negatives (:func:`informative_targets`): any two of them are the same patch.

Structured patchout (``model.patchout.time`` / ``.freq``, PaSST) makes pretraining
cheaper the way it makes fine-tuning cheaper: in training, each step keeps a random
subset of the time columns and frequency rows, and the masks are drawn on that smaller
grid (:func:`training_grid`, with the same masked fraction, :func:`training_mask_count`),
so every masked patch is one the encoder sees as a mask token. Validation uses the whole
grid. Random patchout is refused: it leaves no grid to draw clusters on.

The mask token and the heads live in the pretrainer, not in the backbone: the saved
backbone has exactly the weights of a fine-tuning model and loads with
``model.pretrained`` (:mod:`src.models.pretrained`), which adapts its position grid to
another stride or input length.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import layers, ops

from src.models.attention import PACKAGE

__all__ = [
    "MaskedPatchPretrainer",
    "check_pretrainable",
    "cluster_masks",
    "info_nce",
    "informative_targets",
    "mask_count",
    "masked_patch_losses",
    "patch_targets",
    "retrieval_accuracy",
    "retrieval_logits",
    "training_grid",
    "training_mask_count",
]


def mask_count(num_patches: int, count=None, fraction=None) -> int:
    """Masked patches per clip: ``count`` when given, else ``round(fraction *
    num_patches)``. InfoNCE needs at least two masked patches, and the encoder at least
    one visible one."""
    if count is not None:
        if isinstance(count, bool) or int(count) != count:
            raise ValueError(f"pretrain.mask.count={count!r} must be a whole number.")
        value, key = int(count), f"pretrain.mask.count={count}"
    else:
        if fraction is None:
            raise ValueError("set pretrain.mask.count or pretrain.mask.fraction.")
        fraction = float(fraction)
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"pretrain.mask.fraction={fraction:g} must lie in (0, 1).")
        value = int(round(fraction * num_patches))
        key = f"pretrain.mask.fraction={fraction:g} ({value} patches)"
    if value < 2 or value >= num_patches:
        raise ValueError(
            f"{key}: masking needs at least 2 masked patches (InfoNCE tells them apart) and "
            f"at least one visible one, of the {num_patches} patches of a clip; use a count "
            f"in [2, {num_patches - 1}] (SSAST: 400 of 512)."
        )
    return value


def _cluster_plan(seed, batch, grid, sizes):
    """The clusters :func:`cluster_masks` draws: ``k (B,)``, ``anchors (B, L, 2)``
    (frequency row, time column) and their coverage ``(B, L, N)``."""
    f_dim, t_dim = int(grid[0]), int(grid[1])
    n = f_dim * t_dim
    lo, hi = int(sizes[0]), int(sizes[1])
    # Enough clusters that their union covers the grid but for a few edge cells, even
    # with the smallest clusters and heavy overlap.
    clusters = max(16, math.ceil(4 * n / lo**2))
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
    k = tf.random.stateless_uniform([batch], seeds[0], minval=lo, maxval=hi + 1, dtype=tf.int32)
    af = tf.random.stateless_uniform([batch, clusters], seeds[1], 0, f_dim, dtype=tf.int32)
    at = tf.random.stateless_uniform([batch, clusters], seeds[2], 0, t_dim, dtype=tf.int32)
    # The k x k block around the anchor (rows/columns [a - (k-1)//2, a - (k-1)//2 + k)),
    # clipped at the grid's edges.
    start_f = af - (k[:, None] - 1) // 2  # (B, L)
    start_t = at - (k[:, None] - 1) // 2
    rows = tf.range(f_dim)[None, None, :]
    cols = tf.range(t_dim)[None, None, :]
    kk = k[:, None, None]
    in_f = (rows >= start_f[..., None]) & (rows < start_f[..., None] + kk)  # (B, L, f)
    in_t = (cols >= start_t[..., None]) & (cols < start_t[..., None] + kk)  # (B, L, t)
    cover = in_f[..., :, None] & in_t[..., None, :]  # (B, L, f, t)
    cover = tf.reshape(cover, [batch, clusters, n])
    return k, tf.stack([af, at], axis=-1), cover, seeds[3]


def cluster_masks(seed, batch, grid, count, sizes=(3, 5), return_clusters=False):
    """Cluster masking (SSAST): ``(B, count)`` int32 indices of the masked patches of
    each clip, ascending, into the frequency-major patch order of the patch embedding.

    Per clip a cluster size ``k`` is drawn from ``sizes`` (inclusive; SSAST: 3..5), then
    anchor patches one after the other, each masking its k x k neighbourhood clipped at
    the grid's edges, until ``count`` patches are masked: the mask is the union of the
    first clusters plus the first cells (in patch order) of the next one, so every clip
    has exactly ``count``. Cells that no cluster reaches (only when ``count`` is close to
    the whole grid) are added at random. ``seed``: a stateless seed ``(2,)``, so the
    same seed gives the same masks (validation) and fresh seeds fresh ones (training).
    ``return_clusters``: also ``(k (B,), anchors (B, L, 2))``, the clusters in order.
    """
    f_dim, t_dim = int(grid[0]), int(grid[1])
    n = f_dim * t_dim
    k, anchors, cover, rest_seed = _cluster_plan(seed, batch, grid, sizes)
    clusters = cover.shape[1]
    order = tf.range(clusters, dtype=tf.int32)[None, :, None]
    # The first cluster that reaches each cell (clusters when none does).
    first = tf.reduce_min(tf.where(cover, order, clusters), axis=1)  # (B, N)
    cell = tf.range(n, dtype=tf.float32)[None, :]
    spare = tf.random.stateless_uniform([batch, n], rest_seed)
    key = tf.where(
        first < clusters,
        tf.cast(first, tf.float32) * n + cell,  # cluster by cluster, then patch order
        float(clusters * n) + spare * n,  # cells no cluster reaches: random order, last
    )
    _, index = tf.math.top_k(-key, k=int(count), sorted=True)
    index = tf.sort(index, axis=-1)
    if return_clusters:
        return index, k, anchors
    return index


def patch_targets(x, patch_size, f_dim, t_dim):
    """The content of every patch: ``(B, T, F)`` spectrogram -> ``(B, f_dim * t_dim,
    patch_size**2)``, in the patch embedding's (frequency-major) order, each patch's
    values frequency-major too. For non-overlapping patches (strides = patch size)."""
    p = int(patch_size)
    xt = ops.transpose(x, (0, 2, 1))[:, : f_dim * p, : t_dim * p]  # (B, F', T')
    b = ops.shape(x)[0]
    xt = ops.reshape(xt, (b, f_dim, p, t_dim, p))
    xt = ops.transpose(xt, (0, 1, 3, 2, 4))  # (B, f, t, p, p)
    return ops.reshape(xt, (b, f_dim * t_dim, p * p))


def retrieval_logits(pred, target):
    """``logits[b, j, i] = pred[b, j] . target[b, i]``: every prediction scored against
    every masked patch of the same clip. ``(B, K, P), (B, K, P) -> (B, K, K)``."""
    return ops.einsum("bjp,bip->bji", pred, target)


def informative_targets(target):
    """``(B, K)`` float 1/0: whether a masked patch's content varies. A constant patch
    (the silence features a short clip is padded with, or digital silence) is the same
    as every other constant patch of its clip: no prediction can tell them apart, so
    such patches are left out of the losses, as targets and as negatives."""
    spread = ops.max(target, axis=-1) - ops.min(target, axis=-1)
    return ops.cast(spread > 1e-6, "float32")


def _weighted_mean(values, weights):
    return ops.sum(values * weights) / ops.maximum(ops.sum(weights), 1.0)


def _exclude_columns(logits, valid):
    """Logits with the columns of left-out targets pushed out of every softmax."""
    if valid is None:
        return logits
    return ops.where(valid[:, None, :] > 0, logits, ops.cast(-1e9, logits.dtype))


def info_nce(logits, valid=None):
    """InfoNCE: mean over clips and masked positions ``j`` of
    ``-log softmax_i(logits[b, j, i])[i = j]``; with ``valid`` ``(B, K)`` (1/0), over
    the valid positions only, the others being no negatives either."""
    logp = ops.log_softmax(_exclude_columns(logits, valid), axis=-1)
    eye = ops.eye(ops.shape(logits)[-1], dtype=logp.dtype)
    own = -ops.sum(logp * eye, axis=-1)  # (B, K)
    return ops.mean(own) if valid is None else _weighted_mean(own, valid)


def retrieval_accuracy(logits, valid=None):
    """Fraction of masked positions whose prediction scores its own patch highest
    (with ``valid``: among the valid patches, over the valid positions)."""
    k = ops.shape(logits)[-1]
    picked = ops.argmax(_exclude_columns(logits, valid), axis=-1)  # (B, K)
    truth = ops.arange(k, dtype=picked.dtype)[None, :]
    hits = ops.cast(ops.equal(picked, truth), "float32")
    return ops.mean(hits) if valid is None else _weighted_mean(hits, valid)


def masked_patch_losses(logits, reconstruction, target, mse_weight=10.0):
    """``{"nce", "mse", "accuracy", "loss"}`` with ``loss = nce + mse_weight * mse``,
    over the masked patches whose content varies (:func:`informative_targets`; all of
    them unless a clip is padded or silent)."""
    valid = informative_targets(target)
    nce = info_nce(logits, valid)
    per_patch = ops.mean(ops.square(reconstruction - target), axis=-1)  # (B, K)
    mse = _weighted_mean(per_patch, valid)
    return {
        "nce": nce,
        "mse": mse,
        "accuracy": retrieval_accuracy(logits, valid),
        "loss": nce + float(mse_weight) * mse,
        "informative": ops.sum(valid),
    }


class InformativeMean(keras.metrics.Mean):
    """The mean of per-batch values over masked patches, each batch weighted by its
    number of informative patches (``sample_weight``); NaN while there were none (a
    silent validation split has nothing to score, rather than a loss of 0)."""

    def result(self):
        return ops.where(self.count > 0, super().result(), float("nan"))


def check_pretrainable(backbone) -> None:
    """Raise a ValueError naming the config key when ``backbone`` cannot be pretrained
    by masked patch modelling."""
    from src.models.audio_transformer import SpectrogramTransformer

    if not isinstance(backbone, SpectrogramTransformer):
        raise ValueError(
            f"masked patch pretraining needs a transformer (model.type=transformer), not a "
            f"{type(backbone).__name__}."
        )
    pe = backbone.patch_embed
    if pe.f_stride != pe.patch_size or pe.t_stride != pe.patch_size:
        raise ValueError(
            f"model.f_stride={pe.f_stride} / model.t_stride={pe.t_stride}: masked patch "
            f"pretraining needs non-overlapping patches (both strides = model.patch_size="
            f"{pe.patch_size}), or a masked patch would be visible in its neighbours. Set "
            f"model.stride={pe.patch_size}; fine-tuning may use overlapping strides "
            "(model.pretrained adapts the position grid)."
        )
    if pe.patchout["random"]:
        raise ValueError(
            f"model.patchout.random={pe.patchout['random']}: random patchout is not "
            "supported while pretraining (masks are clusters on the patch grid, and random "
            "drops leave no grid); set model.patchout.random=0. Structured patchout "
            "(model.patchout.time / model.patchout.freq) works: the masks are drawn on the "
            "columns and rows each step keeps."
        )


def training_grid(backbone) -> tuple[int, int]:
    """The patch grid ``(f, t)`` of a training step: the backbone's, less the frequency
    rows and time columns that structured patchout drops."""
    pe = backbone.patch_embed
    return int(pe.f_dim) - pe.patchout["freq"], int(pe.t_dim) - pe.patchout["time"]


def training_mask_count(count: int, num_patches: int, kept: int) -> int:
    """Masked patches per clip in a training step that keeps ``kept`` of the
    ``num_patches`` patches: ``count`` scaled to the same fraction (``count`` itself
    without patchout); a clear error when that leaves fewer than 2 masked or no visible
    patch."""
    if kept == num_patches:
        return int(count)
    value = int(round(count * kept / num_patches))
    if value < 2 or value >= kept:
        raise ValueError(
            f"pretrain.mask: {count} of {num_patches} patches masked is {value} of the "
            f"{kept} that model.patchout keeps in a training step; masking needs at least "
            "2 masked patches and one visible one: mask a different share, or drop fewer "
            "columns / rows (model.patchout.time / model.patchout.freq)."
        )
    return value


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskedPatchPretrainer(keras.Model):
    """A backbone plus what masked patch modelling adds: the mask token ``(1, 1, D)``
    and the discriminative and generative heads (``D -> head_hidden -> patch_size**2``).

    Input: ``{"features": (B, T, F) log-mel, "mask_index": (B, K) int}`` (K masked
    patches per clip, :func:`cluster_masks`; in training with structured patchout, on
    the :func:`training_grid` of the columns and rows the step keeps). Output:
    ``{"logits": (B, K, K), "reconstruction": (B, K, P), "target": (B, K, P),
    "patch_index": (B, K)}`` (``patch_index``: the masked patches' indices on the
    whole grid, frequency-major); :meth:`compute_loss` turns them
    into the loss and tracks ``nce_loss``, ``mse_loss`` and ``retrieval_accuracy``. Train
    it with ``compile(optimizer)`` and ``fit`` (no loss argument).
    """

    def __init__(self, backbone, mse_weight=10.0, head_hidden=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        check_pretrainable(backbone)
        self.backbone = backbone
        # While wrapped, every stage trains (model.freeze is for fine-tuning) and the
        # classifier head does not (fine-tuning starts it afresh); release_backbone()
        # restores both.
        self._head = [lay for lay in (backbone.head_norm, backbone.classifier) if lay is not None]
        self._frozen = [lay for lay in (backbone.patch_embed, *backbone.blocks)
                        if not lay.trainable]
        for lay in self._head:
            lay.trainable = False
        for lay in self._frozen:
            lay.trainable = True
        pe = backbone.patch_embed
        self.embed_dim = int(pe.embed_dim)
        self.patch_dim = int(pe.patch_size) ** 2
        self.mse_weight = float(mse_weight)
        self.head_hidden = int(head_hidden or self.embed_dim)
        # float32 outputs under mixed precision: stable softmax and squared errors.
        self.disc_hidden = layers.Dense(self.head_hidden, activation="relu", name="disc_hidden")
        self.disc_out = layers.Dense(self.patch_dim, dtype="float32", name="disc_out")
        self.gen_hidden = layers.Dense(self.head_hidden, activation="relu", name="gen_hidden")
        self.gen_out = layers.Dense(self.patch_dim, dtype="float32", name="gen_out")
        self.nce_tracker = InformativeMean(name="nce_loss")
        self.mse_tracker = InformativeMean(name="mse_loss")
        self.accuracy_tracker = InformativeMean(name="retrieval_accuracy")

    def build(self, input_shape=None):
        # The backbone is built already (build_model builds it); input_shape is unused.
        if not self.backbone.built:
            h = self.backbone.hparams
            self.backbone.build((None, h["num_frames"], h["num_mels"]))
        self.mask_token = self.add_weight(
            shape=(1, 1, self.embed_dim), initializer="glorot_normal", name="mask_token"
        )
        for hidden, out in ((self.disc_hidden, self.disc_out), (self.gen_hidden, self.gen_out)):
            hidden.build((None, None, self.embed_dim))
            out.build((None, None, self.head_hidden))
        self.built = True

    def call(self, inputs, training=None):
        features = inputs["features"]
        index = ops.cast(inputs["mask_index"], "int32")  # (B, K)
        bb = self.backbone
        pe = bb.patch_embed
        n, d = pe.num_patches, self.embed_dim
        x = bb.normalize(features)  # (B, T, F), no SpecAugment: the mask is the task
        grid = pe.patch_grid(x)  # (B, f, t, D), before the position embedding
        b = ops.shape(grid)[0]
        keep, patch_index = None, index
        if training and (pe.patchout["time"] or pe.patchout["freq"]):
            # The masks index the grid of the kept rows and columns; on the whole grid,
            # kept position r is row freq[r // t'], column time[r % t'].
            keep = pe.structured_keep()
            time, freq = keep
            t_kept = training_grid(bb)[1]
            rows, cols = index // t_kept, index % t_kept
            if freq is not None:
                rows = ops.take(freq, rows)
            if time is not None:
                cols = ops.take(time, cols)
            patch_index = rows * pe.t_dim + cols
        flat = ops.reshape(grid, (b, n, d))
        hit = ops.sum(ops.one_hot(patch_index, n, dtype=flat.dtype), axis=1)[..., None]
        token = ops.cast(self.mask_token, flat.dtype)
        flat = flat * (1.0 - hit) + hit * token  # hit: (B, N, 1)
        tokens = pe.tokens_from_grid(
            ops.reshape(flat, (b, pe.f_dim, pe.t_dim, d)), training=training, patchout=False,
            keep=keep,
        )
        encoded, _ = bb.encode_tokens(tokens, training=training)
        encoded = encoded[:, pe.num_prefix_tokens:]  # (B, N or the kept N', D)
        k = ops.shape(index)[1]
        at = ops.broadcast_to(index[..., None], (b, k, d))
        hidden = ops.take_along_axis(encoded, at, axis=1)  # (B, K, D)
        content = ops.stop_gradient(
            ops.cast(patch_targets(x, pe.patch_size, pe.f_dim, pe.t_dim), "float32")
        )
        at = ops.broadcast_to(patch_index[..., None], (b, k, self.patch_dim))
        target = ops.take_along_axis(content, at, axis=1)  # (B, K, P)
        pred = self.disc_out(self.disc_hidden(hidden))
        recon = self.gen_out(self.gen_hidden(hidden))
        return {"logits": retrieval_logits(pred, target), "reconstruction": recon,
                "target": target, "patch_index": patch_index}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        parts = masked_patch_losses(
            y_pred["logits"], y_pred["reconstruction"], y_pred["target"], self.mse_weight
        )
        for tracker, key in ((self.nce_tracker, "nce"), (self.mse_tracker, "mse"),
                             (self.accuracy_tracker, "accuracy")):
            tracker.update_state(parts[key], sample_weight=parts["informative"])
        total = parts["loss"]
        if self.losses:
            total = total + ops.sum(self.losses)
        return _scale_for_replicas(total)

    def get_metrics_result(self):
        """Keras' metrics, with ``loss`` NaN where no masked patch was informative (its
        per-batch mean is 0 over nothing)."""
        result = super().get_metrics_result()
        if "loss" in result:
            result["loss"] = ops.where(self.nce_tracker.count > 0, result["loss"],
                                       float("nan"))
        return result

    def release_backbone(self):
        """The backbone as it was before it was wrapped: its classifier head trainable,
        the stages of ``model.freeze`` frozen (call once pretraining is over, before
        saving it)."""
        for lay in self._head:
            lay.trainable = True
        for lay in self._frozen:
            lay.trainable = False
        return self.backbone

    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=keras.saving.serialize_keras_object(self.backbone),
            mse_weight=self.mse_weight,
            head_hidden=self.head_hidden,
        )
        return config


def _scale_for_replicas(loss):
    """What Keras' own losses do under a distribution strategy: each replica's loss
    divided by the number of replicas, so the summed gradients are those of the mean."""
    try:
        from keras.src.losses.loss import scale_loss_for_distribution
    except ImportError:  # another Keras layout: one replica is exact
        return loss
    return scale_loss_for_distribution(loss)
