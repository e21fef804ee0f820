"""Multi-head self-attention, written out by hand.

This is the layer from the project's design notes (``MultiHeadSelfAttention``),
with its bugs fixed and its structure kept: three ``Dense`` projections, a
``split_heads`` reshape, a scaled dot-product ``attention`` method and a
``combine_heads`` projection.

Fixes relative to the notes: ``__init__`` (not ``__init``), ``super()`` of the
right class, the scaling line no longer carries a stray ``, axis=-1`` (the
softmax runs over the keys axis, the last one), and ``call`` is a valid method.

Additions: a clear error when ``embed_dim`` is not divisible by ``num_heads``,
an optional key padding mask, attention dropout, and the option to return the
attention weights (for attention maps).
"""

from __future__ import annotations

import contextlib
import math

import keras
import numpy as np
from keras import layers, ops

from src.models import native

PACKAGE = "audio_transformer"

# Added to the scores of masked keys before the softmax. Large enough to give
# exactly zero weight in float32 after exp(), small enough not to overflow fp16.
_MASK_PENALTY = -1e9


def dense_over_tokens(dense, x, bias_activation=None, residual=None):
    """``dense(x)`` for tokens ``(B, S, D_in)``: the same numbers, computed as one 2-D
    matmul over the B * S rows, then the bias and the activation.

    On CPU, TensorFlow runs a 2-D MatMul faster than the broadcast batched matmul it
    uses for 3-D inputs (about 4% of inference end to end in float32). The bias is
    not fused into the matmul: TensorFlow's fused MatMul + BiasAdd kernel runs bfloat16
    at a third of the plain bfloat16 MatMul's speed on AMX CPUs (1.19x inference, 1.09x
    training end to end under ``mixed_bfloat16``; float32 unchanged). In bfloat16, where
    the compiled kernels run (:mod:`src.models.native`), a layer without an activation
    adds its bias, and ``residual`` if given, in one compiled op (float32 sums, rounded
    once; 1.05x inference end to end); else the bias is added after the reshape back to
    3-D, where TensorFlow's graph optimiser does not fuse it into the matmul. A
    quantized Dense is called as is.

    ``bias_activation(y, bias)``: applied to the 2-D matmul output in place of the bias
    and the activation (a fused kernel for both; ``bias`` is the layer's variable).
    ``residual``: a tensor of the output's shape added to it (a residual connection)."""
    shape = ops.shape(x)
    if getattr(dense, "quantization_mode", None) is not None:
        y = dense(ops.reshape(x, (-1, shape[-1])))
        y = ops.reshape(y, (shape[0], shape[1], dense.units))
        return y if residual is None else ops.add(residual, y)
    dtype = dense.compute_dtype
    with keras.name_scope(dense.name):
        y = ops.matmul(ops.reshape(ops.cast(x, dtype), (-1, shape[-1])),
                       ops.cast(dense.kernel, dtype))
        if bias_activation is not None:
            y = ops.reshape(bias_activation(y, dense.bias), (shape[0], shape[1], dense.units))
            return y if residual is None else ops.add(residual, y)
        if (
            dense.bias is not None
            and dense.activation in (None, keras.activations.linear)
            and native.usable(dtype, native.BIAS_DTYPES, "bias")
        ):
            if residual is not None:
                residual = ops.reshape(ops.cast(residual, dtype), (-1, dense.units))
            y = native.bias_add(y, ops.cast(dense.bias, "float32"), residual)
            return ops.reshape(y, (shape[0], shape[1], dense.units))
        y = ops.reshape(y, (shape[0], shape[1], dense.units))
        if dense.bias is not None:
            y = ops.add(y, ops.cast(dense.bias, dtype))
        if dense.activation is not None:
            y = dense.activation(y)
    return y if residual is None else ops.add(residual, y)


def gradient_scope():
    """A context for the ops of a hand-written gradient, named the way TensorFlow names
    generic gradients (``gradient_tape/<forward scope>/...``) so that profiles
    attribute them to their layer. Call it in the forward pass, enter it in the
    gradient. A no-op on other backends."""
    if keras.backend.backend() != "tensorflow":
        return contextlib.nullcontext
    import tensorflow as tf

    scope = tf.get_current_name_scope()
    if not scope:
        return contextlib.nullcontext
    return lambda: tf.name_scope(f"gradient_tape/{scope}/")


@ops.custom_gradient
def softmax_attention(query, key, value):
    """``softmax(query key^T) value`` over split heads, with a hand-written gradient.

    query ``(B, H, Sq, d)`` (already scaled), key and value ``(B, H, Sk, d)``;
    returns ``(B, H, Sq, d)``. The forward pass is :meth:`MultiHeadSelfAttention.attention`'s
    (same ops, same numbers). The backward pass: with P = softmax(S), O = P V and the
    upstream gradient dO, the gradient of the scores is ``P * (dO V^T - rowsum(dO * O))``
    (the generic softmax gradient computes ``rowsum(dP * P)`` over the (Sq, Sk)
    weights; it equals ``rowsum(dO * O)``, over (Sq, d)). The subtraction is folded
    into the ``dO V^T`` matmul by appending the row sums to dO and a column of -1 to
    V, which leaves one multiply over the (Sq, Sk) weights where the generic gradient
    takes two multiplies, a sum and a subtraction.
    """
    weights = ops.softmax(ops.einsum("bhqd,bhkd->bhqk", query, key), axis=-1)  # (B, H, Sq, Sk)
    output = ops.matmul(weights, value)  # (B, H, Sq, d)
    scope = gradient_scope()

    def grad(*args, upstream=None):
        d_output = ops.cast(args[0] if upstream is None else upstream, output.dtype)
        with scope():
            d_value = ops.einsum("bhqk,bhqd->bhkd", weights, d_output)  # (B, H, Sk, d)
            # rowsum(dO * O) in float32: d products summed, then one rounding.
            delta = ops.sum(
                ops.cast(d_output, "float32") * ops.cast(output, "float32"),
                axis=-1, keepdims=True,
            )  # (B, H, Sq, 1)
            d_scores = weights * ops.einsum(  # P * ([dO, delta] [V, -1]^T)
                "bhqe,bhke->bhqk",
                ops.concatenate([d_output, ops.cast(delta, d_output.dtype)], axis=-1),
                ops.concatenate([value, -ops.ones_like(value[..., :1])], axis=-1),
            )
            d_query = ops.matmul(d_scores, key)
            d_key = ops.einsum("bhqk,bhqd->bhkd", d_scores, query)
        return d_query, d_key, d_value

    return output, grad


@keras.saving.register_keras_serializable(package=PACKAGE)
class MultiHeadSelfAttention(layers.Layer):
    """Self-attention over a sequence of tokens.

    Args:
        embed_dim: model width D. Must be divisible by ``num_heads``.
        num_heads: number of heads H; each head attends in D / H dimensions.
        dropout_rate: dropout on the attention weights (training only).
        use_bias: whether the q/k/v/output projections have a bias.
        qkv_bias: whether the q/k/v projections have a bias (default: ``use_bias``);
            ViT/DeiT/AST checkpoints with ``qkv_bias=False`` keep the output bias.
        fused_qkv: one ``Dense(3 * embed_dim)`` (``qkv_dense``, kernel = [Wq | Wk | Wv])
            instead of the three projections: one matmul and one head transpose
            instead of three. Same function; ``get_qkv``/``set_qkv`` read and write
            either layout.
        fused: compute softmax(QK^T / sqrt(d)) V with ``keras.ops.dot_product_attention``
            (one fused op, no head transposes) when no weights are requested and no
            attention dropout applies; otherwise, and by default, the explicit path.

    Without a mask, weights or attention dropout, the attention core runs as one
    compiled op where it can be built (:mod:`src.models.native`: the same numbers to
    float32 rounding, to bfloat16 rounding in bfloat16, no head transposes, the scores
    never in memory), in float32 and bfloat16, in training with a compiled backward.
    float16 and XLA use the TensorFlow ops below.

    Call args:
        inputs: ``(batch, seq_len, embed_dim)``.
        mask: optional key padding mask ``(batch, seq_len)``, true/1 for keys
            that may be attended to, false/0 for padding.
        return_attention_scores: also return the weights
            ``(batch, num_heads, seq_len, seq_len)``.
        num_queries: attend from the first ``num_queries`` tokens only (keys and
            values still come from all tokens); the output is then
            ``(batch, num_queries, embed_dim)``, equal to the first rows of the
            full output. ``None`` (default): every token.
    """

    def __init__(
        self,
        embed_dim,
        num_heads=8,
        dropout_rate=0.0,
        use_bias=True,
        fused=False,
        qkv_bias=None,
        fused_qkv=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.supports_masking = True  # output tokens = input tokens
        embed_dim, num_heads = int(embed_dim), int(num_heads)
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be positive, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}."
            )
        if embed_dim % num_heads != 0:
            divisors = [h for h in range(1, embed_dim + 1) if embed_dim % h == 0 and h <= 64]
            raise ValueError(
                f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}: each head "
                f"needs embed_dim / num_heads dimensions. Choose model.num_heads from "
                f"{divisors} or change model.embed_dim."
            )
        if not 0.0 <= float(dropout_rate) < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.projection_dim = embed_dim // num_heads  # per-head size
        self.dropout_rate = float(dropout_rate)
        self.use_bias = bool(use_bias)
        self.qkv_bias = self.use_bias if qkv_bias is None else bool(qkv_bias)
        self.fused = bool(fused)
        self.fused_qkv = bool(fused_qkv)

        qkv_bias = self.qkv_bias
        if self.fused_qkv:
            self.qkv_dense = layers.Dense(3 * embed_dim, use_bias=qkv_bias, name="qkv_dense")
        else:
            self.query_dense = layers.Dense(embed_dim, use_bias=qkv_bias, name="query_dense")
            self.key_dense = layers.Dense(embed_dim, use_bias=qkv_bias, name="key_dense")
            self.value_dense = layers.Dense(embed_dim, use_bias=qkv_bias, name="value_dense")
        self.combine_heads = layers.Dense(embed_dim, use_bias=use_bias, name="combine_heads")
        self.attention_dropout = layers.Dropout(self.dropout_rate)

    def build(self, input_shape):
        # input_shape: (batch, seq_len, embed_dim)
        if input_shape[-1] is not None and input_shape[-1] != self.embed_dim:
            raise ValueError(
                f"{self.name}: inputs have {input_shape[-1]} features but embed_dim="
                f"{self.embed_dim}."
            )
        shape = tuple(input_shape[:-1]) + (self.embed_dim,)
        if self.fused_qkv:
            self.qkv_dense.build(shape)
        else:
            for dense in (self.query_dense, self.key_dense, self.value_dense):
                dense.build(shape)
        self.combine_heads.build(shape)
        self.built = True

    def get_qkv(self) -> dict:
        """``{"q", "k", "v"}: [kernel (D, D), bias (D,)]`` (no bias without qkv_bias), as
        numpy arrays, whichever the layout."""
        if not self.fused_qkv:
            dense = {"q": self.query_dense, "k": self.key_dense, "v": self.value_dense}
            return {name: [w.numpy() for w in d.weights] for name, d in dense.items()}
        d = self.embed_dim
        values = [w.numpy() for w in self.qkv_dense.weights]
        return {
            name: [v[..., i * d : (i + 1) * d] for v in values] for i, name in enumerate("qkv")
        }

    def set_qkv(self, weights: dict) -> None:
        """Inverse of :meth:`get_qkv`."""
        if not self.fused_qkv:
            for name, dense in (("q", self.query_dense), ("k", self.key_dense),
                                ("v", self.value_dense)):
                dense.set_weights(weights[name])
            return
        parts = [weights[name] for name in "qkv"]
        self.qkv_dense.set_weights(
            [np.concatenate([p[i] for p in parts], axis=-1) for i in range(len(parts[0]))]
        )

    def _project(self, inputs, batch_size, num_queries=None):
        """q ``(B, Sq, H, D/H)``, k and v ``(B, S, H, D/H)``; Sq = S or ``num_queries``."""
        shape = (batch_size, -1, self.num_heads, self.projection_dim)
        if self.fused_qkv:
            qkv = ops.reshape(
                dense_over_tokens(self.qkv_dense, inputs),
                (batch_size, -1, 3, self.num_heads, self.projection_dim),
            )
            query = qkv[:, :, 0] if num_queries is None else qkv[:, :num_queries, 0]
            return query, qkv[:, :, 1], qkv[:, :, 2]
        queries = inputs if num_queries is None else inputs[:, :num_queries]
        return (
            ops.reshape(dense_over_tokens(self.query_dense, queries), shape),
            ops.reshape(dense_over_tokens(self.key_dense, inputs), shape),
            ops.reshape(dense_over_tokens(self.value_dense, inputs), shape),
        )

    def attention(self, query, key, value, mask=None, training=None):
        """Scaled dot-product attention for already split heads.

        query/key/value: ``(batch, heads, seq_len, projection_dim)``.
        mask: ``(batch, seq_len)`` key padding mask or None.
        Returns ``(output (batch, heads, seq_len, projection_dim),
        weights (batch, heads, seq_len, seq_len))``.
        """
        # Dot products grow with the head size; scale them by 1 / sqrt(d) so the
        # softmax does not saturate into a near one-hot distribution. Scaling the
        # queries (S x d values) instead of the scores (S x S) is the same product and
        # ~10% faster end to end on CPU, as is the einsum, which multiplies by K^T
        # without materialising the transpose.
        query = query * ops.cast(1.0 / math.sqrt(self.projection_dim), query.dtype)
        scores = ops.einsum("bhqd,bhkd->bhqk", query, key)  # (B, H, Sq, Sk)
        if mask is not None:
            keep = ops.cast(mask, "bool")[:, None, None, :]  # (B, 1, 1, Sk)
            scores = ops.where(keep, scores, ops.cast(_MASK_PENALTY, scores.dtype))
        weights = ops.softmax(scores, axis=-1)  # over the keys
        weights = self.attention_dropout(weights, training=training)
        output = ops.matmul(weights, value)  # (B, H, Sq, projection_dim)
        return output, weights

    def split_heads(self, x, batch_size):
        # (B, S, D) -> (B, S, H, D/H) -> (B, H, S, D/H)
        x = ops.reshape(x, (batch_size, -1, self.num_heads, self.projection_dim))
        return ops.transpose(x, (0, 2, 1, 3))

    def _fused_call(self, inputs, mask, batch_size, num_queries=None, residual=None):
        q, k, v = self._project(inputs, batch_size, num_queries)  # (B, S, H, D/H)
        if mask is not None:
            mask = ops.cast(mask, "bool")[:, None, None, :]  # (B, 1, 1, Sk)
        out = ops.dot_product_attention(q, k, v, mask=mask)  # (B, S, H, D/H)
        return dense_over_tokens(
            self.combine_heads, ops.reshape(out, (batch_size, -1, self.embed_dim)),
            residual=residual,
        )

    def call(
        self, inputs, mask=None, training=None, return_attention_scores=False, num_queries=None,
        residual=None,
    ):
        """``residual``: a tensor of the output's shape added to the output (the block's
        residual connection: with the compiled kernels, one op with the output
        projection's bias)."""
        batch_size = ops.shape(inputs)[0]
        if (
            self.fused
            and not return_attention_scores
            and not (training and self.dropout_rate > 0)
        ):
            return self._fused_call(inputs, mask, batch_size, num_queries, residual)
        if (
            mask is None
            and not return_attention_scores
            and not (training and self.dropout_rate > 0)
            and native.usable(self.compute_dtype, native.DTYPES, "attention")
        ):
            # The compiled kernels (float32 or bfloat16; in training with the compiled
            # backward): the same numbers, one op on the (B, S, H, D/H) layout, no head
            # transposes.
            query, key, value = self._project(inputs, batch_size, num_queries)
            kernel = native.softmax_attention_train if training else native.softmax_attention
            attention = kernel(query, key, value, scale=1.0 / math.sqrt(self.projection_dim))
            return dense_over_tokens(
                self.combine_heads, ops.reshape(attention, (batch_size, -1, self.embed_dim)),
                residual=residual,
            )
        if self.fused_qkv:
            qkv = ops.reshape(
                dense_over_tokens(self.qkv_dense, inputs),
                (batch_size, -1, 3, self.num_heads, self.projection_dim),
            )
            qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))  # (3, B, H, S, D/H): one transpose
            query, key, value = qkv[0], qkv[1], qkv[2]
            if num_queries is not None:
                query = query[:, :, :num_queries]
        else:
            queries = inputs if num_queries is None else inputs[:, :num_queries]
            query = self.split_heads(dense_over_tokens(self.query_dense, queries), batch_size)
            key = self.split_heads(dense_over_tokens(self.key_dense, inputs), batch_size)
            value = self.split_heads(dense_over_tokens(self.value_dense, inputs), batch_size)
            # query (B, H, Sq, D/H); key, value (B, H, S, D/H)

        if mask is None and not return_attention_scores and not (
            training and self.dropout_rate > 0
        ):
            # Nothing needs the weights: the same numbers with a cheaper gradient.
            query = query * ops.cast(1.0 / math.sqrt(self.projection_dim), query.dtype)
            attention, weights = softmax_attention(query, key, value), None
        else:
            attention, weights = self.attention(
                query, key, value, mask=mask, training=training
            )
        attention = ops.transpose(attention, (0, 2, 1, 3))  # (B, S, H, D/H)
        concat = ops.reshape(attention, (batch_size, -1, self.embed_dim))  # (B, S, D)
        # mixes the heads back into D
        output = dense_over_tokens(self.combine_heads, concat, residual=residual)
        if return_attention_scores:
            return output, weights
        return output

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            use_bias=self.use_bias,
            qkv_bias=self.qkv_bias,
            fused=self.fused,
            fused_qkv=self.fused_qkv,
        )
        return config
