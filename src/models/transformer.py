"""The transformer block from the project's design notes.

Attention + feed-forward network, each wrapped in dropout, a residual
connection and LayerNorm. The default is the notes' post-norm block::

    x = LN1(x + Dropout1(Attn(x)))
    x = LN2(x + Dropout2(FFN(x)))

Fix relative to the notes: the FFN output goes through ``dropout2`` (the notes
reused ``dropout1``). ``norm_first=True`` gives the pre-norm block used by
ViT/DeiT/AST::

    x = x + Dropout1(Attn(LN1(x)))
    x = x + Dropout2(FFN(LN2(x)))
"""

from __future__ import annotations

import keras
from keras import layers

from src.models import native
from src.models.attention import PACKAGE, MultiHeadSelfAttention, dense_over_tokens
from src.models.layers import LayerNorm, gelu

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")


def _bias_gelu(y, bias):
    return native.bias_gelu(y, keras.ops.cast(bias, "float32"))


def _activation(name):
    if name == "relu":
        return "relu"
    if name == "gelu":  # exact (erf) GELU, as in AST/DeiT
        return gelu  # keras.activations.gelu(x, approximate=False), cheaper to train
    if name == "gelu_tanh":
        return lambda x: keras.activations.gelu(x, approximate=True)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r} (model.activation).")


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerBlock(layers.Layer):
    """One transformer encoder block.

    Args:
        embed_dim: token width D.
        num_heads: attention heads (D must be divisible by it).
        ff_dim: hidden width of the feed-forward network.
        dropout_rate: dropout on the attention and FFN outputs.
        attention_dropout: dropout on the attention weights.
        norm_first: pre-norm (ViT/AST) instead of the notes' post-norm.
        activation: "relu" (as in the notes), "gelu" (exact) or "gelu_tanh".
        epsilon: LayerNorm epsilon (1e-6 as in the notes and timm).
        qkv_bias: bias on the q/k/v projections (ViT/DeiT/AST: true).
        fused_qkv: one q/k/v projection matmul instead of three (same function).
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        ff_dim,
        dropout_rate=0.1,
        attention_dropout=0.0,
        norm_first=False,
        activation="relu",
        epsilon=1e-6,
        use_bias=True,
        fused_attention=False,
        qkv_bias=None,
        fused_qkv=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.supports_masking = True  # output tokens = input tokens
        if int(ff_dim) <= 0:
            raise ValueError(f"ff_dim must be positive, got {ff_dim} (model.ff_dim).")
        if not 0.0 <= float(dropout_rate) < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.ff_dim = int(ff_dim)
        self.dropout_rate = float(dropout_rate)
        self.attention_dropout = float(attention_dropout)
        self.norm_first = bool(norm_first)
        self.activation = str(activation)
        self.epsilon = float(epsilon)
        self.use_bias = bool(use_bias)
        self.fused_attention = bool(fused_attention)
        self.qkv_bias = self.use_bias if qkv_bias is None else bool(qkv_bias)
        self.fused_qkv = bool(fused_qkv)

        self.att = MultiHeadSelfAttention(
            self.embed_dim,
            self.num_heads,
            dropout_rate=self.attention_dropout,
            use_bias=use_bias,
            qkv_bias=self.qkv_bias,
            fused=self.fused_attention,
            fused_qkv=self.fused_qkv,
            name="att",
        )
        self.ffn = keras.Sequential(
            [
                layers.Dense(self.ff_dim, activation=_activation(self.activation), name="fc1"),
                layers.Dense(self.embed_dim, name="fc2"),
            ],
            name="ffn",
        )
        self.dropout1 = layers.Dropout(self.dropout_rate)
        self.dropout2 = layers.Dropout(self.dropout_rate)
        # keras.layers.LayerNormalization with a cheaper gradient (same weights).
        self.layernorm1 = LayerNorm(epsilon=self.epsilon, name="layernorm1")
        self.layernorm2 = LayerNorm(epsilon=self.epsilon, name="layernorm2")

    def build(self, input_shape):
        # input_shape: (batch, seq_len, embed_dim)
        self.att.build(input_shape)
        self.ffn.build(input_shape)
        self.layernorm1.build(input_shape)
        self.layernorm2.build(input_shape)
        self.built = True

    def call(
        self, inputs, mask=None, training=None, return_attention_scores=False, num_queries=None
    ):
        """``num_queries``: compute the output rows of the first ``num_queries`` tokens
        only (all tokens are still attended to). Every operation after the attention
        is row-wise, so these rows equal the first rows of the full output; a model
        that pools its [CLS] token needs no other row from its last block."""
        weights = None
        # Without dropout between them (inference, or a rate of 0), the residual is added
        # in the projection's own bias op (one op with the compiled kernels).
        fuse = not (training and self.dropout_rate > 0)

        def attend(x, residual=None):
            nonlocal weights
            kwargs = dict(mask=mask, training=training, num_queries=num_queries)
            if residual is not None:
                kwargs["residual"] = residual
            if return_attention_scores:
                out, weights = self.att(x, return_attention_scores=True, **kwargs)
                return out
            return self.att(x, **kwargs)

        def add(residual, branch, dropout):
            """``residual + dropout(branch(None))``, or with ``fuse`` (no dropout to run)
            ``branch(residual)``, which adds the residual in its last Dense's bias op."""
            if fuse:
                return branch(residual)
            return residual + dropout(branch(None), training=training)

        def ffn(x):
            return lambda r: self.feed_forward(x, training=training, residual=r)

        residual = inputs if num_queries is None else inputs[:, :num_queries]
        if self.norm_first:
            x = add(residual, lambda r: attend(self.layernorm1(inputs), r), self.dropout1)
            out = add(x, ffn(self.layernorm2(x)), self.dropout2)
        else:
            x = self.layernorm1(add(residual, lambda r: attend(inputs, r), self.dropout1))
            out = self.layernorm2(add(x, ffn(x), self.dropout2))
        if return_attention_scores:
            return out, weights
        return out

    def feed_forward(self, x, training=None, residual=None):
        """``self.ffn(x)`` (fc1, activation, fc2), each Dense as one 2-D matmul over the
        tokens (see ``dense_over_tokens``); in float32 and bfloat16, fc1's bias and exact
        GELU run as one compiled op, whose gradient is a second one; ``residual`` is added
        to the output (in bfloat16 in one compiled op with fc2's bias;
        :mod:`src.models.native`)."""
        last = len(self.ffn.layers) - 1
        for i, dense in enumerate(self.ffn.layers):
            fused = (  # bias + GELU after the matmul as one compiled op
                dense.activation is gelu
                and dense.bias is not None
                and native.usable(dense.compute_dtype, native.DTYPES, "bias_gelu")
            )
            x = dense_over_tokens(dense, x, bias_activation=_bias_gelu if fused else None,
                                  residual=residual if i == last else None)
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            ff_dim=self.ff_dim,
            dropout_rate=self.dropout_rate,
            attention_dropout=self.attention_dropout,
            norm_first=self.norm_first,
            activation=self.activation,
            epsilon=self.epsilon,
            use_bias=self.use_bias,
            fused_attention=self.fused_attention,
            qkv_bias=self.qkv_bias,
            fused_qkv=self.fused_qkv,
        )
        return config
