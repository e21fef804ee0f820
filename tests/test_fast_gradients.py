"""Hand-written gradients (attention core, LayerNorm, exact GELU) against Keras' ops
differentiated by the backend: the same values, the same gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from src.models.attention import MultiHeadSelfAttention, dense_over_tokens, softmax_attention
from src.models.audio_transformer import SpectrogramTransformer
from src.models.layers import LayerNorm, gelu, layer_norm
from src.models.transformer import TransformerBlock

RNG = np.random.default_rng(0)


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype("float32")


def value_and_grads(fn, *inputs, upstream=None):
    """fn(*inputs), and the gradients of sum(fn(*inputs) * upstream) for each input."""
    inputs = [tf.constant(x) for x in inputs]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = fn(*inputs)
        up = upstream if upstream is not None else rand(*out.shape)
        loss = tf.reduce_sum(tf.cast(out, "float32") * up)
    grads = tape.gradient(loss, inputs)
    return keras.ops.convert_to_numpy(out), [keras.ops.convert_to_numpy(g) for g in grads]


def assert_close(actual, expected, rtol, name=""):
    """Equal to ``rtol`` times the largest magnitude of ``expected``."""
    actual, expected = np.asarray(actual, "float32"), np.asarray(expected, "float32")
    scale = float(np.abs(expected).max()) or 1.0
    err = float(np.abs(actual - expected).max())
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


# ------------------------------------------------------------ attention core


def reference_attention(q, k, v):
    weights = keras.ops.softmax(keras.ops.einsum("bhqd,bhkd->bhqk", q, k), axis=-1)
    return keras.ops.matmul(weights, v)


@pytest.mark.parametrize("queries", [7, 2])  # every row, or the first rows (pooled block)
def test_attention_core_matches_autodiff(queries):
    q, k, v = rand(2, 3, queries, 8, scale=0.7), rand(2, 3, 7, 8), rand(2, 3, 7, 8)
    up = rand(2, 3, queries, 8)
    out, grads = value_and_grads(softmax_attention, q, k, v, upstream=up)
    ref_out, ref_grads = value_and_grads(reference_attention, q, k, v, upstream=up)
    assert out.shape == (2, 3, queries, 8)
    assert_close(out, ref_out, 1e-6, "output")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close(g, r, 1e-5, f"d{name}")


def test_attention_layer_takes_the_explicit_path_where_the_weights_are_needed():
    att = MultiHeadSelfAttention(16, 4, dropout_rate=0.5)
    x = rand(2, 5, 16)
    # Inference (no dropout) goes through softmax_attention; asking for the weights,
    # a mask or dropout in training take the explicit path; all compute the same.
    fast = keras.ops.convert_to_numpy(att(x))
    explicit, w = att(x, return_attention_scores=True)
    np.testing.assert_allclose(fast, keras.ops.convert_to_numpy(explicit), atol=1e-6)
    masked = att(x, mask=np.ones((2, 5), bool))
    np.testing.assert_allclose(fast, keras.ops.convert_to_numpy(masked), atol=1e-6)
    assert w.shape == (2, 4, 5, 5)
    dropped = keras.ops.convert_to_numpy(att(x, training=True))
    assert not np.allclose(dropped, fast)


# ---------------------------------------------------------------------- GELU


def test_gelu_matches_keras_exact_gelu_and_its_gradient():
    x = np.concatenate([rand(3, 500, scale=3.0), [[-12.0] * 500, [0.0] * 500]]).astype("float32")
    up = rand(*x.shape)
    out, (dx,) = value_and_grads(gelu, x, upstream=up)
    ref, (ref_dx,) = value_and_grads(
        lambda t: keras.activations.gelu(t, approximate=False), x, upstream=up
    )
    assert_close(out, ref, 1e-6, "gelu")
    assert_close(dx, ref_dx, 1e-5, "d gelu")
    assert np.isfinite(dx).all()


def test_gelu_in_bfloat16_matches_float32_loosely():
    x = rand(4, 300, scale=2.0)
    up = rand(4, 300)
    out, (dx,) = value_and_grads(lambda t: gelu(tf.cast(t, "bfloat16")), x, upstream=up)
    ref, (ref_dx,) = value_and_grads(gelu, x, upstream=up)
    assert_close(out, ref, 1e-2, "gelu bf16")
    assert_close(dx, ref_dx, 2e-2, "d gelu bf16")


# ----------------------------------------------------------------- LayerNorm


@pytest.mark.parametrize("shape", [(3, 11, 24), (5, 24)])
def test_layer_norm_matches_keras_and_its_gradients(shape):
    x = rand(*shape, scale=2.0) + 1.5
    gamma, beta = rand(shape[-1]), rand(shape[-1])
    up = rand(*shape)

    def ours(x, g, b):
        return layer_norm(x, g, b, 1e-6)

    def keras_ln(x, g, b):
        return keras.ops.layer_normalization(x, g, b, axis=-1, epsilon=1e-6)

    out, grads = value_and_grads(ours, x, gamma, beta, upstream=up)
    ref, ref_grads = value_and_grads(keras_ln, x, gamma, beta, upstream=up)
    assert_close(out, ref, 1e-5, "layer norm")
    for name, g, r in zip(("dx", "dgamma", "dbeta"), grads, ref_grads):
        assert_close(g, r, 1e-5, name)


def test_layer_norm_layer_is_a_keras_layer_normalization():
    x = rand(2, 6, 12)
    ours = LayerNorm(epsilon=1e-6, name="layernorm1")
    ref = keras.layers.LayerNormalization(epsilon=1e-6, name="layernorm1")
    ours.build(x.shape)
    ref.build(x.shape)
    assert isinstance(ours, keras.layers.LayerNormalization)
    assert [w.name for w in ours.weights] == [w.name for w in ref.weights] == ["gamma", "beta"]
    weights = [rand(12), rand(12)]
    ours.set_weights(weights)
    ref.set_weights(weights)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x)),
                               keras.ops.convert_to_numpy(ref(x)), atol=1e-5)
    clone = LayerNorm.from_config(ours.get_config())
    assert clone.epsilon == 1e-6 and clone.name == "layernorm1"
    # Configurations the fast path does not cover use Keras' implementation.
    for kwargs in (dict(axis=1), dict(center=False), dict(scale=False)):
        a, b = LayerNorm(**kwargs), keras.layers.LayerNormalization(**kwargs)
        a.build(x.shape)
        b.build(x.shape)
        b.set_weights(a.get_weights())
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a(x)),
                                   keras.ops.convert_to_numpy(b(x)), atol=1e-6)


def test_layer_norm_under_mixed_bfloat16_returns_bfloat16():
    ln = LayerNorm(epsilon=1e-6, dtype="mixed_bfloat16")
    x = tf.cast(rand(2, 5, 8), "bfloat16")
    y = ln(x)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    ref = keras.layers.LayerNormalization(epsilon=1e-6)(tf.cast(x, "float32"))
    assert_close(tf.cast(y, "float32"), ref, 1e-2)


# ------------------------------------------------------- dense over tokens


@pytest.mark.parametrize("activation", [None, "relu"])
def test_dense_over_tokens_matches_dense_and_its_gradients(activation):
    dense = keras.layers.Dense(6, activation=activation)
    x = rand(3, 5, 4)
    dense.build(x.shape)
    dense.bias.assign(rand(6))
    up = rand(3, 5, 6)
    ours, (dx_ours,) = value_and_grads(lambda t: dense_over_tokens(dense, t), x, upstream=up)
    ref, (dx_ref,) = value_and_grads(dense, x, upstream=up)
    assert ours.shape == (3, 5, 6)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx_ours, dx_ref, rtol=1e-5, atol=1e-5)
    with tf.GradientTape() as tape:  # the weights' gradients, same upstream
        loss_ours = tf.reduce_sum(dense_over_tokens(dense, tf.constant(x)) * up)
    g_ours = tape.gradient(loss_ours, dense.trainable_variables)
    with tf.GradientTape() as tape:
        loss_ref = tf.reduce_sum(dense(tf.constant(x)) * up)
    g_ref = tape.gradient(loss_ref, dense.trainable_variables)
    for a, b in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


def test_dense_over_tokens_under_mixed_bfloat16_lora_and_int8():
    dense = keras.layers.Dense(6, dtype="mixed_bfloat16")
    x = tf.constant(rand(2, 5, 4))
    dense.build(x.shape)
    dense.bias.assign(rand(6))
    out = dense_over_tokens(dense, x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert_close(tf.cast(out, "float32"), tf.cast(dense(x), "float32"), 1e-2)
    dense = keras.layers.Dense(6)
    dense.build(x.shape)
    dense.enable_lora(2)
    dense.lora_kernel_b.assign(rand(2, 6))  # zero at first: make the low-rank part count
    np.testing.assert_allclose(dense_over_tokens(dense, x).numpy(), dense(x).numpy(),
                               rtol=1e-5, atol=1e-5)
    dense = keras.layers.Dense(6)
    dense.build(x.shape)
    dense.quantize("int8")  # a quantized Dense is called as is
    np.testing.assert_allclose(dense_over_tokens(dense, x).numpy(), dense(x).numpy(),
                               rtol=1e-6, atol=1e-6)


# ------------------------------------------------- the model against autodiff


def reference_logits(model, features):
    """SpectrogramTransformer's forward pass (dropout 0, every row of every block)
    written with Keras' ops only, so the backend differentiates every step: the
    explicit attention, keras' LayerNorm and exact GELU."""
    ops = keras.ops

    def ln(layer, t):
        return ops.layer_normalization(t, layer.gamma, layer.beta, epsilon=layer.epsilon)

    def dense(d, t):
        return ops.matmul(t, d.kernel) + d.bias

    def heads(t, num_heads):  # (B, S, D) -> (B, H, S, D/H)
        b, s = ops.shape(t)[0], ops.shape(t)[1]
        return ops.transpose(ops.reshape(t, (b, s, num_heads, -1)), (0, 2, 1, 3))

    x = model.patch_embed(model.normalize(features))
    for block in model.blocks:
        att = block.att
        h = ln(block.layernorm1, x)
        q, k, v = (heads(dense(d, h), att.num_heads)
                   for d in (att.query_dense, att.key_dense, att.value_dense))
        o, _ = att.attention(q, k, v)
        o = ops.reshape(ops.transpose(o, (0, 2, 1, 3)), ops.shape(x))
        x = x + dense(att.combine_heads, o)
        fc1, fc2 = block.ffn.layers
        h = keras.activations.gelu(dense(fc1, ln(block.layernorm2, x)), approximate=False)
        x = x + dense(fc2, h)
    x = ln(model.final_norm, x)
    return dense(model.classifier, ln(model.head_norm, (x[:, 0] + x[:, 1]) / 2.0))


def logits_and_grads(fn, model, x, y):
    with tf.GradientTape() as tape:
        logits = fn(x)
        loss = keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
    grads = tape.gradient(loss, model.trainable_variables)
    return keras.ops.convert_to_numpy(logits), grads


@pytest.mark.parametrize("pooled_last_block", [False, True])
def test_model_logits_and_every_gradient_match_autodiff(pooled_last_block):
    model = SpectrogramTransformer(
        5, 48, 32, embed_dim=32, num_layers=2, num_heads=4, ff_dim=64, dropout_rate=0.0,
        norm_first=True, activation="gelu", pooling="cls_dist", head_norm=True,
        pooled_last_block=pooled_last_block,
    )
    model.build((None, 48, 32))
    # Non-trivial LayerNorm weights and a spread of scores.
    for w in model.trainable_variables:
        if w.path.endswith(("gamma", "beta")):
            w.assign(rand(*w.shape, scale=0.5) + (1.0 if w.path.endswith("gamma") else 0.0))
    x, y = rand(3, 48, 32), np.array([0, 3, 4])
    logits, grads = logits_and_grads(model, model, x, y)
    ref_logits, ref_grads = logits_and_grads(lambda t: reference_logits(model, t), model, x, y)
    assert_close(logits, ref_logits, 1e-5, "logits")
    floor = 1e-5 * max(float(np.abs(g).max()) for g in ref_grads)
    for g, r, var in zip(grads, ref_grads, model.trainable_variables):
        g, r = keras.ops.convert_to_numpy(g), keras.ops.convert_to_numpy(r)
        # Relative to each gradient, with a floor for those that are zero in exact
        # arithmetic (the key bias: a softmax ignores a constant shift of its scores).
        assert np.abs(g - r).max() <= 1e-4 * float(np.abs(r).max()) + floor, var.path


def test_block_gradients_flow_through_every_input_and_weight():
    block = TransformerBlock(16, 2, 32, dropout_rate=0.0, norm_first=True, activation="gelu")
    x = tf.constant(rand(2, 5, 16))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(block(x, training=True) ** 2)
    grads = tape.gradient(loss, [x] + block.trainable_variables)
    assert all(g is not None and np.isfinite(keras.ops.convert_to_numpy(g)).all()
               for g in grads)


# ------------------------------------------------------------ mixed precision


def test_mixed_bfloat16_fit_trains_and_matches_float32_loosely():
    kw = dict(num_classes=3, num_frames=32, num_mels=16, embed_dim=32, num_layers=2,
              num_heads=4, ff_dim=64, dropout_rate=0.0, norm_first=True, activation="gelu",
              pooling="cls_dist")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 48).astype("int32")
    x = (rng.standard_normal((48, 32, 16)) * 0.5 + y[:, None, None]).astype("float32")
    f32 = SpectrogramTransformer(**kw)
    f32.build((None, 32, 16))
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        bf16 = SpectrogramTransformer(**kw)
        bf16.build((None, 32, 16))
        bf16.set_weights(f32.get_weights())
        a = keras.ops.convert_to_numpy(bf16(x[:8]))
        b = keras.ops.convert_to_numpy(f32(x[:8]))
        assert_close(a, b, 0.1, "bf16 logits")
        bf16.compile(optimizer=keras.optimizers.Adam(3e-3),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = bf16.fit(x, y, batch_size=16, epochs=6, verbose=0).history["loss"]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(history).all()
    assert history[-1] < 0.7 * history[0], history
