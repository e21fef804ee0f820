"""The compiled CPU kernels (src/models/native.py: attention core, LayerNorm, bias +
GELU, bias (+ residual)): the same numbers and gradients as TensorFlow's ops (in bfloat16: the same
roundings as a reference), used where they may be (inference) and nowhere else
(training, XLA, SavedModel export), and a clear fallback when they cannot be built.

The kernels are built with the machine's C++ compiler; without one the tests that need
them are skipped (the model then runs TensorFlow's ops, which the rest of the suite
tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from src.models import native

ROOT = Path(__file__).resolve().parents[1]
needs_compiler = pytest.mark.skipif(
    native._compiler() is None, reason="no C++ compiler to build the kernels")


def _reference(q, k, v, scale):
    """softmax(scale q k^T) v with TensorFlow ops; (B, S, H, d) layout."""
    import tensorflow as tf

    weights = tf.nn.softmax(tf.einsum("bqhd,bkhd->bhqk", q, k) * scale)
    return tf.einsum("bhqk,bkhd->bqhd", weights, v)


def _inputs(b, sq, sk, h, d, dv, seed=0):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    return [tf.constant(rng.standard_normal(s).astype("float32") * 1.5)
            for s in ((b, sq, h, d), (b, sk, h, d), (b, sk, h, dv))]


@needs_compiler
def test_kernel_builds_and_loads():
    module = native.load()
    assert module is not None, "the kernel did not build: see the warning in the log"
    assert native.usable("float32")
    assert not native.usable("bfloat16")  # float32, unless a kernel says otherwise
    assert native.usable("bfloat16", ("float32", "bfloat16"))


@needs_compiler
@pytest.mark.parametrize("shape", [
    (2, 40, 53, 2, 16, 32),   # AVX-512 tiles: 5 blocks of 8 query rows, a 21-key tail
    (1, 70, 600, 3, 48, 48),  # the benchmark's head size, several key tiles
    (2, 9, 70, 3, 64, 64),    # fewer rows than a tile: the general path
    (3, 13, 17, 2, 8, 5),     # head sizes that are not multiples of 16: Eigen's products
    (2, 2, 600, 4, 48, 48),   # the pooled last block: 2 query rows
])
@pytest.mark.parametrize("block_rows", [0, 32])
def test_kernel_matches_tensorflow_ops(shape, block_rows):
    q, k, v = _inputs(*shape)
    scale = 1.0 / np.sqrt(shape[4])
    got = native.softmax_attention(q, k, v, scale=scale, block_rows=block_rows)
    want = _reference(q, k, v, scale)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-5, rtol=1e-5)
    for _ in range(3):  # deterministic, to the bit
        again = native.softmax_attention(q, k, v, scale=scale, block_rows=block_rows)
        np.testing.assert_array_equal(again.numpy(), got.numpy())


def _layer_norm_results(fns, x, gamma, beta, upstream):
    """Per LayerNorm function: [y, dx, dgamma, dbeta] (epsilon 1e-6)."""
    import tensorflow as tf

    results = []
    for fn in fns:
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y = fn(x, gamma, beta, 1e-6)
        results.append([y, *tape.gradient(y, [x, gamma, beta], output_gradients=upstream)])
    return results


@needs_compiler
@pytest.mark.parametrize("shape", [(3, 7, 192), (5, 33), (2, 1, 3, 8), (4, 300, 40)])
def test_layer_norm_kernel_matches_the_layer(shape):
    import keras
    import tensorflow as tf

    from src.models.layers import layer_norm

    rng = np.random.default_rng(4)
    x = tf.constant(rng.standard_normal(shape).astype("float32") * 3 + 1)
    gamma, beta = (tf.constant(rng.standard_normal(shape[-1:]).astype("float32"))
                   for _ in range(2))
    got = native.layer_norm(x, gamma, beta, 1e-6)
    np.testing.assert_allclose(got.numpy(), layer_norm(x, gamma, beta, 1e-6).numpy(),
                               atol=1e-5, rtol=1e-5)
    ref = keras.layers.LayerNormalization(epsilon=1e-6)
    ref.build(shape)
    ref.set_weights([gamma.numpy(), beta.numpy()])
    np.testing.assert_allclose(got.numpy(), ref(x).numpy(), atol=1e-5, rtol=1e-5)
    upstream = tf.constant(rng.standard_normal(shape).astype("float32"))
    # the inference op (TensorFlow-op gradient), the training op (compiled)
    results = _layer_norm_results(
        (layer_norm, native.layer_norm, native.layer_norm_train), x, gamma, beta, upstream)
    for ours in results[1:]:
        for got, want in zip(ours, results[0]):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4, rtol=1e-4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="gamma and beta"):
        native.layer_norm(x, gamma[:-1], beta[:-1], 1e-6)


@needs_compiler
@pytest.mark.parametrize("shape", [(3, 7, 192), (4, 300, 40), (5, 33)])
def test_layer_norm_kernels_in_bfloat16_match_the_layer_function(shape):
    import tensorflow as tf

    from src.models.layers import layer_norm

    rng = np.random.default_rng(14)
    x = tf.constant(rng.standard_normal(shape) * 3 + 1, tf.bfloat16)
    gamma, beta = (tf.constant(rng.standard_normal(shape[-1:]).astype("float32"))
                   for _ in range(2))
    upstream = tf.constant(rng.standard_normal(shape), tf.bfloat16)
    # the layer's function in bfloat16, the inference op, the training op
    results = _layer_norm_results(
        (lambda *a: layer_norm(*a, dtype="bfloat16"), native.layer_norm,
         native.layer_norm_train), x, gamma, beta, upstream)
    for ours in results[1:]:
        for got, want in zip(ours, results[0]):
            assert got.dtype == want.dtype  # y and dx bfloat16, dgamma and dbeta float32
            got, want = (tf.cast(t, tf.float32).numpy() for t in (got, want))
            # both compute in float32 (sums in another order) and round once: within one
            # bfloat16 unit (up to 2^-7 of the value)
            np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-4 * np.abs(want).max())


@needs_compiler
def test_bias_gelu_kernel_in_bfloat16_matches_tensorflow():
    import tensorflow as tf

    rng = np.random.default_rng(6)
    x = tf.constant(rng.standard_normal((3, 5, 48)) * 3, tf.bfloat16)
    bias = tf.constant(rng.standard_normal(48).astype("float32"))
    got = native.bias_gelu(x, bias)
    assert got.dtype == tf.bfloat16
    want = tf.nn.gelu(tf.cast(x, tf.float32) + bias, approximate=False)
    # float32 arithmetic, one rounding to bfloat16 (8 bits): within half a unit
    np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), want.numpy(),
                               rtol=2 ** -8, atol=1e-6)


@needs_compiler
def test_bias_gelu_kernel_matches_tensorflow():
    import tensorflow as tf

    rng = np.random.default_rng(5)
    x = tf.constant(rng.standard_normal((4, 9, 40)).astype("float32") * 3)
    bias = tf.constant(rng.standard_normal(40).astype("float32"))
    upstream = tf.constant(rng.standard_normal((4, 9, 40)).astype("float32"))
    results = []
    for fn in (native.bias_gelu, lambda a, b: tf.nn.gelu(a + b, approximate=False)):
        with tf.GradientTape() as tape:
            tape.watch([x, bias])
            y = fn(x, bias)
        results.append([y, *tape.gradient(y, [x, bias], output_gradients=upstream)])
    for got, want in zip(*results):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="the bias must have 40"):
        native.bias_gelu(x, bias[:-1])
    module = native.load()
    with pytest.raises(tf.errors.InvalidArgumentError, match="the bias must have 40"):
        module.audio_transformer_bias_gelu_grad(x, bias[:-1], upstream)
    with pytest.raises(tf.errors.InvalidArgumentError, match="dy must have x's shape"):
        module.audio_transformer_bias_gelu_grad(x, bias, upstream[:, :-1])


@needs_compiler
def test_bias_gelu_gradient_is_the_compiled_op_also_in_bfloat16():
    import tensorflow as tf

    rng = np.random.default_rng(7)
    x32 = rng.standard_normal((5, 7, 40)).astype("float32") * 3
    bias = tf.constant(rng.standard_normal(40).astype("float32"))
    upstream32 = rng.standard_normal((5, 7, 40)).astype("float32")

    @tf.function
    def grads(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch([x, bias])
            y = native.bias_gelu(x, bias)
        return tape.gradient(y, [x, bias], output_gradients=upstream)

    x, upstream = tf.constant(x32, tf.bfloat16), tf.constant(upstream32, tf.bfloat16)
    graph = grads.get_concrete_function(x, upstream).graph.as_graph_def()
    assert native.BIAS_GELU_GRAD_OP in {node.op for node in graph.node}
    dx, dbias = grads(x, upstream)
    assert dx.dtype == tf.bfloat16 and dbias.dtype == tf.float32
    # the reference from the same bfloat16 values, in float64
    z = tf.cast(x, tf.float64).numpy() + bias.numpy().astype("float64")
    from math import erf, exp, pi, sqrt

    def slope_at(v):  # d/dz z Phi(z)
        return 0.5 * (1 + erf(v / sqrt(2))) + v * exp(-v * v / 2) / sqrt(2 * pi)

    slope = np.vectorize(slope_at)(z)
    want = tf.cast(upstream, tf.float64).numpy() * slope
    np.testing.assert_allclose(tf.cast(dx, tf.float32).numpy(), want, rtol=2 ** -8, atol=1e-6)
    # the bias's gradient is summed in float32 before any rounding
    np.testing.assert_allclose(dbias.numpy(), want.sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(3, 7, 192), (5, 33), (2, 300, 40)])
def test_bias_add_kernels_and_their_gradients_match_float64(dtype, shape):
    import tensorflow as tf

    rng = np.random.default_rng(8)
    x = tf.constant(rng.standard_normal(shape) * 3, dtype)
    residual = tf.constant(rng.standard_normal(shape) * 3, dtype)
    bias = tf.constant(rng.standard_normal(shape[-1]).astype("float32"))
    upstream = tf.constant(rng.standard_normal(shape), dtype)

    @tf.function
    def run(x, bias, residual, upstream):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, bias, residual])
            plain = native.bias_add(x, bias)
            with_residual = native.bias_add(x, bias, residual)
        return (plain, with_residual,
                tape.gradient(plain, [x, bias], output_gradients=upstream),
                tape.gradient(with_residual, [x, bias, residual], output_gradients=upstream))

    graph = run.get_concrete_function(x, bias, residual, upstream).graph
    assert {native.BIAS_ADD_OP, native.BIAS_ADD_RESIDUAL_OP,
            native.BIAS_GRAD_OP} <= {op.type for op in graph.get_operations()}
    plain, with_residual, grads, grads_residual = run(x, bias, residual, upstream)
    assert plain.dtype == with_residual.dtype == tf.as_dtype(dtype)

    def f64(t):
        return tf.cast(t, tf.float64).numpy()

    # summed in float32, rounded once to the dtype (bfloat16: within half a unit, 2^-8)
    rtol = 1e-6 if dtype == "float32" else 2 ** -8
    np.testing.assert_allclose(f64(plain), f64(x) + f64(bias), rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(f64(with_residual), f64(x) + f64(bias) + f64(residual),
                               rtol=rtol, atol=1e-5)
    dy = f64(upstream)
    rows = tuple(range(len(shape) - 1))
    for dx in (grads[0], grads_residual[0], grads_residual[2]):
        assert dx.dtype == tf.as_dtype(dtype)
        np.testing.assert_array_equal(f64(dx), dy)
    for dbias in (grads[1], grads_residual[1]):  # summed in float32 whatever the dtype
        assert dbias.dtype == tf.float32
        np.testing.assert_allclose(dbias.numpy(), dy.sum(axis=rows),
                                   rtol=1e-5, atol=1e-5 * np.abs(dy).sum(axis=rows).max())


@needs_compiler
def test_bias_add_kernels_reject_mismatched_shapes():
    import tensorflow as tf

    x = tf.zeros((4, 6, 10))
    with pytest.raises(tf.errors.InvalidArgumentError, match="the bias must have 10 values"):
        native.bias_add(x, tf.zeros(9))
    with pytest.raises(tf.errors.InvalidArgumentError, match="residual must have x's shape"):
        native.bias_add(x, tf.zeros(10), tf.zeros((4, 5, 10)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must have an axis"):
        native.load().audio_transformer_bias_grad(tf.zeros(()))


@needs_compiler
@pytest.mark.parametrize("norm_first", [True, False])
def test_a_bfloat16_block_adds_bias_and_residual_in_one_op_unless_dropout_runs(norm_first):
    import keras
    import tensorflow as tf

    from src.models.transformer import TransformerBlock

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        blocks = {rate: TransformerBlock(16, 2, 32, dropout_rate=rate, activation="gelu",
                                         norm_first=norm_first) for rate in (0.0, 0.5)}
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = tf.constant(np.random.default_rng(0).standard_normal((2, 9, 16)), tf.float32)
    for block in blocks.values():
        block(x)
        for w in block.trainable_weights:  # non-zero biases
            w.assign(np.random.default_rng(1).standard_normal(w.shape) * 0.2)
    train = _graph_ops(tf.function(lambda v: blocks[0.5](v, training=True)), x)
    # dropout between the projection and the residual: only the bias in the kernel
    assert native.BIAS_ADD_OP in train and native.BIAS_ADD_RESIDUAL_OP not in train
    assert native.BIAS_ADD_RESIDUAL_OP in _graph_ops(
        tf.function(lambda v: blocks[0.5](v, training=False)), x)

    block = blocks[0.0]  # training without dropout: bias and residual fused, and backward

    def step(v):
        with tf.GradientTape() as tape:
            y = tf.cast(block(v, training=True), tf.float32)
            loss = tf.reduce_sum(y * tf.cos(tf.range(16, dtype=tf.float32)))
        return [y, *tape.gradient(loss, block.trainable_weights)]

    ops = {op.type for op in tf.function(step).get_concrete_function(x).graph.get_operations()}
    assert {native.BIAS_ADD_RESIDUAL_OP, native.BIAS_GRAD_OP} <= ops
    got = tf.function(step)(x)
    with native.disabled():
        want = tf.function(step)(x)
    # bfloat16 on both sides (ours rounds once where TensorFlow's ops round twice); the
    # key bias's gradient is zero up to rounding (softmax ignores a constant per row)
    scale = max(float(np.abs(w.numpy()).max()) for w in want[1:])
    np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=0,
                               atol=3e-2 * np.abs(want[0].numpy()).max())
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0, atol=3e-2 * scale)
    # the pooled last block's rows (num_queries): the residual is sliced to them
    pooled = tf.cast(block(x, training=False, num_queries=2), tf.float32).numpy()
    with native.disabled():
        want = tf.cast(block(x, training=False), tf.float32).numpy()[:, :2]
    np.testing.assert_allclose(pooled, want, rtol=0, atol=3e-2 * np.abs(want).max())


def _bfloat16_reference(q, k, v, scale):
    """What the bfloat16 kernel computes, in NumPy: float32 scores and softmax from the
    bfloat16 inputs, the unnormalised weights rounded to bfloat16 for the weighted sum,
    the output rounded to bfloat16 (returned in float32)."""
    import tensorflow as tf

    q, k, v = (tf.cast(t, tf.float32).numpy() for t in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k)
    e = np.exp((scores - scores.max(-1, keepdims=True)) * np.float32(scale))
    rounded = tf.cast(tf.cast(e, tf.bfloat16), tf.float32).numpy()
    out = np.einsum("bhqk,bkhd->bqhd", rounded, v) / e.sum(-1).transpose(0, 2, 1)[..., None]
    return tf.cast(tf.cast(out, tf.bfloat16), tf.float32).numpy()


@needs_compiler
@pytest.mark.parametrize("shape", [
    (1, 70, 600, 3, 48, 48),  # the benchmark's head size: pair products where the CPU has them
    (2, 40, 53, 2, 16, 32),   # an odd number of keys: the last pair padded
    (2, 2, 600, 4, 48, 48),   # the pooled last block: converted to float32
    (3, 13, 17, 2, 8, 5),     # head sizes that are not multiples of 16
])
@pytest.mark.parametrize("block_rows", [0, 1])  # 1: always the float32 path
def test_kernel_in_bfloat16_matches_a_reference(shape, block_rows):
    import tensorflow as tf

    q, k, v = (tf.cast(t, tf.bfloat16) for t in _inputs(*shape, seed=7))
    scale = 1.0 / np.sqrt(shape[4])
    got = native.softmax_attention(q, k, v, scale=scale, block_rows=block_rows)
    assert got.dtype == tf.bfloat16 and got.shape == (*shape[:2], shape[3], shape[5])
    got = tf.cast(got, tf.float32).numpy()
    # the same roundings as the reference: within one bfloat16 unit (2^-8 relative)
    np.testing.assert_allclose(got, _bfloat16_reference(q, k, v, scale),
                               rtol=2 ** -8, atol=2e-3)
    # the pair products and the float32 path (block_rows=1) agree
    other = native.softmax_attention(q, k, v, scale=scale, block_rows=1 - block_rows)
    np.testing.assert_allclose(got, tf.cast(other, tf.float32).numpy(), rtol=2 ** -7,
                               atol=1e-3)
    # and close to float32 attention on the same inputs
    want = _reference(*(tf.cast(t, tf.float32) for t in (q, k, v)), scale).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


@needs_compiler
def test_gradient_in_bfloat16_is_the_float32_gradient_rounded():
    import tensorflow as tf

    q, k, v = (tf.cast(t, tf.bfloat16) for t in _inputs(2, 40, 41, 2, 16, 16, seed=8))
    upstream = tf.constant(np.random.default_rng(9).standard_normal((2, 40, 2, 16)),
                           tf.bfloat16)
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = native.softmax_attention(q, k, v, 0.25)
    got = tape.gradient(out, [q, k, v], output_gradients=upstream)
    q32, k32, v32 = (tf.cast(t, tf.float32) for t in (q, k, v))
    with tf.GradientTape() as tape:
        tape.watch([q32, k32, v32])
        out = _reference(q32, k32, v32, 0.25)
    want = tape.gradient(out, [q32, k32, v32],
                         output_gradients=tf.cast(upstream, tf.float32))
    for g, w in zip(got, want):
        assert g.dtype == tf.bfloat16
        np.testing.assert_allclose(tf.cast(g, tf.float32).numpy(), w.numpy(),
                                   rtol=2 ** -7, atol=1e-3)


@needs_compiler
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_handles_extreme_scores_and_nan_like_tensorflow(dtype):
    import tensorflow as tf

    q, k, v = _inputs(2, 40, 70, 2, 16, 16, seed=4)
    q = q * 40.0  # scores spread over thousands: most weights underflow to 0
    q = tf.tensor_scatter_nd_update(q, [[0, 3, 1]], tf.fill([1, 16], np.nan))  # one query row
    k = tf.tensor_scatter_nd_update(k, [[1, 5, 0]], tf.fill([1, 16], np.nan))  # one key
    q, k, v = (tf.cast(t, dtype) for t in (q, k, v))
    got = tf.cast(native.softmax_attention(q, k, v, scale=0.25), tf.float32).numpy()
    want = _reference(*(tf.cast(t, tf.float32) for t in (q, k, v)), 0.25).numpy()
    nan = np.isnan(want)
    assert nan[0, 3, 1].all() and nan[1, :, 0].all() and nan.sum() == (1 + 40) * 16
    np.testing.assert_array_equal(np.isnan(got), nan)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(got[~nan], want[~nan], rtol=tol, atol=tol)


@needs_compiler
@pytest.mark.parametrize("shape", [
    (2, 40, 53, 2, 16, 32),   # AVX-512 tiles, a key tail
    (1, 230, 600, 3, 48, 48),  # the benchmark's head size; two blocks of query rows
    (2, 2, 600, 4, 48, 48),   # the pooled last block
    (3, 13, 17, 2, 8, 5),     # head sizes that are not multiples of 16: Eigen's products
])
def test_training_kernel_and_its_backward_match_tensorflow_ops(shape):
    import tensorflow as tf

    q, k, v = _inputs(*shape, seed=10)
    upstream = tf.constant(np.random.default_rng(11).standard_normal(
        (*shape[:2], shape[3], shape[5])).astype("float32"))
    scale = 1.0 / np.sqrt(shape[4])
    results = []
    for fn in (native.softmax_attention_train, _reference):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = fn(q, k, v, scale)
        results.append([out, *tape.gradient(out, [q, k, v], output_gradients=upstream)])
    for got, want in zip(*results):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=3e-5, rtol=1e-4)


@needs_compiler
@pytest.mark.parametrize("shape", [
    (1, 230, 600, 3, 48, 48),  # the benchmark's head size; two blocks of query rows
    (2, 41, 53, 2, 16, 32),   # odd numbers of queries and keys: rows and keys padded
    (2, 2, 600, 4, 48, 48),   # the pooled last block (forward in float32, backward in pairs)
    (3, 13, 17, 2, 8, 5),     # head sizes that are not multiples of 16: float32 copies
])
def test_training_kernel_in_bfloat16_and_its_backward_match_float64(shape):
    import tensorflow as tf

    q, k, v = (tf.cast(t, tf.bfloat16) for t in _inputs(*shape, seed=12))
    upstream = tf.constant(np.random.default_rng(13).standard_normal(
        (*shape[:2], shape[3], shape[5])), tf.bfloat16)
    scale = 1.0 / np.sqrt(shape[4])

    @tf.function
    def ours(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = native.softmax_attention_train(q, k, v, scale)
        return [out, *tape.gradient(out, [q, k, v], output_gradients=upstream)]

    graph = ours.get_concrete_function(q, k, v).graph
    assert native.GRAD_OP in {op.type for op in graph.get_operations()}
    got = ours(q, k, v)
    # the exact result for the same bfloat16 values
    q64, k64, v64 = (tf.cast(t, tf.float64) for t in (q, k, v))
    with tf.GradientTape() as tape:
        tape.watch([q64, k64, v64])
        out = _reference(q64, k64, v64, scale)
    want = [out, *tape.gradient(out, [q64, k64, v64],
                                output_gradients=tf.cast(upstream, tf.float64))]
    for g, w in zip(got, want):
        assert g.dtype == tf.bfloat16 and g.shape == w.shape
        w = w.numpy()
        # bfloat16 inputs and roundings of the weights and their gradient (TensorFlow's
        # bfloat16 ops: 0.5-1.5e-2 of the largest value at these shapes)
        np.testing.assert_allclose(tf.cast(g, tf.float64).numpy(), w, rtol=0,
                                   atol=1e-2 * np.abs(w).max())


@needs_compiler
def test_a_training_step_with_the_kernels_has_the_same_gradients():
    import keras
    import tensorflow as tf

    from src.models.build import build_model

    keras.utils.set_random_seed(0)
    model = build_model(dict(embed_dim=32, num_layers=2, num_heads=2, ff_dim=64,
                             dropout_rate=0.0, activation="gelu", pooling="cls_dist",
                             pooled_last_block=True),
                        {"n_mels": 32}, num_classes=5, clip_samples=16000)
    x = tf.constant(np.random.default_rng(1).standard_normal((3, 16000)) * 0.1, tf.float32)
    labels = tf.constant([0, 3, 1])

    def step(v):
        with tf.GradientTape() as tape:
            logits = model(v, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        return [loss, *tape.gradient(loss, model.trainable_weights)]

    with_kernels = tf.function(step)
    graph = with_kernels.get_concrete_function(x).graph
    assert {native.TRAIN_OP, native.GRAD_OP, native.LAYER_NORM_TRAIN_OP,
            native.LAYER_NORM_GRAD_OP, native.BIAS_GELU_OP,
            native.BIAS_GELU_GRAD_OP} <= {op.type for op in graph.get_operations()}
    got = with_kernels(x)
    with native.disabled():
        want = tf.function(step)(x)
    # (the key bias's gradient is zero up to rounding: softmax ignores a constant per row)
    scale = max(float(np.abs(w.numpy()).max()) for w in want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-5 * scale, rtol=1e-4)


@needs_compiler
def test_kernel_rejects_mismatched_shapes():
    import tensorflow as tf

    q, k, v = _inputs(2, 8, 8, 2, 16, 16)
    with pytest.raises(tf.errors.InvalidArgumentError, match="do not match"):
        native.softmax_attention(q, k[:, :, :1], v)


@needs_compiler
def test_gradient_matches_tensorflow_ops():
    import tensorflow as tf

    q, k, v = _inputs(2, 33, 41, 2, 16, 16, seed=1)
    upstream = tf.constant(np.random.default_rng(2).standard_normal((2, 33, 2, 16)),
                           tf.float32)
    grads = []
    for fn in (native.softmax_attention, _reference):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = fn(q, k, v, 0.25)
        grads.append(tape.gradient(out, [q, k, v], output_gradients=upstream))
    for got, want in zip(*grads):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-5, rtol=1e-4)


def _graph_ops(fn, x):
    return {op.type for op in fn.get_concrete_function(x).graph.get_operations()}


@pytest.fixture(scope="module")
def tiny_model():
    import keras

    from src.models.build import build_model

    keras.utils.set_random_seed(0)
    cfg = dict(embed_dim=32, num_layers=2, num_heads=2, ff_dim=64, norm_first=True,
               activation="gelu", pooling="cls_dist", pooled_last_block=True)
    model = build_model(cfg, {"n_mels": 32}, num_classes=5, clip_samples=16000)
    for w in model.trainable_weights:  # non-zero biases: every term of the product counts
        if "bias" in w.path:
            w.assign(np.random.default_rng(3).standard_normal(w.shape).astype("float32") * 0.1)
    return model


@needs_compiler
def test_model_inference_uses_the_kernel_with_the_same_numbers(tiny_model):
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(0).standard_normal((3, 16000)) * 0.1, tf.float32)
    infer = tf.function(lambda v: tiny_model(v, training=False))
    ours = {native.OP_NAME, native.LAYER_NORM_OP, native.BIAS_GELU_OP}
    assert ours <= _graph_ops(infer, x)
    # the other biases: TensorFlow's float32 BiasAdd is as fast
    assert native.BIAS_ADD_OP not in _graph_ops(infer, x)
    with native.disabled():
        plain = tf.function(lambda v: tiny_model(v, training=False))
        assert not ours & _graph_ops(plain, x)
        want = plain(x).numpy()
    np.testing.assert_allclose(infer(x).numpy(), want, atol=1e-5, rtol=1e-5)


@needs_compiler
def test_which_kernels_run_in_training_xla_and_mixed_precision(tiny_model):
    import keras
    import tensorflow as tf

    from src.models.build import build_model

    x = tf.constant(np.random.default_rng(0).standard_normal((2, 16000)) * 0.1, tf.float32)
    biases = {native.BIAS_ADD_OP, native.BIAS_ADD_RESIDUAL_OP}
    ours = {native.OP_NAME, native.TRAIN_OP, native.LAYER_NORM_OP,
            native.LAYER_NORM_TRAIN_OP, native.BIAS_GELU_OP, *biases}
    train = tf.function(lambda v: tiny_model(v, training=True))
    # training (float32): the attention core, LayerNorm and the MLP's bias + GELU, with
    # compiled backwards (the other biases only in bfloat16)
    assert ours & _graph_ops(train, x) == {native.TRAIN_OP, native.LAYER_NORM_TRAIN_OP,
                                           native.BIAS_GELU_OP}
    xla = tf.function(lambda v: tiny_model(v, training=False), jit_compile=True)
    assert not ours & _graph_ops(xla, x)
    xla_train = tf.function(lambda v: tiny_model(v, training=True), jit_compile=True)
    assert not ours & _graph_ops(xla_train, x)
    with native.disabled():
        want = tiny_model(x, training=False).numpy()
    np.testing.assert_allclose(xla(x).numpy(), want, atol=1e-4, rtol=1e-4)  # XLA runs
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = build_model(dict(embed_dim=32, num_layers=1, num_heads=2, ff_dim=64,
                                 activation="gelu"),
                            {"n_mels": 32}, num_classes=5, clip_samples=16000)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # bfloat16 training (dropout 0.1: the biases without the residual)
    assert ours & _graph_ops(tf.function(lambda v: mixed(v, training=True)), x) == {
        native.TRAIN_OP, native.LAYER_NORM_TRAIN_OP, native.BIAS_GELU_OP, native.BIAS_ADD_OP}
    infer = tf.function(lambda v: mixed(v, training=False))
    # bfloat16 inference: every kernel
    assert ours & _graph_ops(infer, x) == {native.OP_NAME, native.LAYER_NORM_OP,
                                           native.BIAS_GELU_OP, *biases}
    with native.disabled():
        plain = tf.function(lambda v: mixed(v, training=False))
        assert not ours & _graph_ops(plain, x)
        want = tf.cast(plain(x), tf.float32).numpy()
    np.testing.assert_allclose(tf.cast(infer(x), tf.float32).numpy(), want,
                               atol=3e-2, rtol=3e-2)


@needs_compiler
def test_exported_savedmodel_holds_no_kernel_op(tiny_model, tmp_path):
    import tensorflow as tf

    from scripts.export import export_savedmodel

    out = export_savedmodel(tiny_model, tmp_path / "saved")
    graph = (out / "saved_model.pb").read_bytes()
    assert b"Softmax" in graph  # the attention is there, as TensorFlow's ops
    assert native.OP_NAME.encode() not in graph
    assert native.LAYER_NORM_OP.encode() not in graph
    assert native.BIAS_GELU_OP.encode() not in graph
    assert native.BIAS_ADD_OP.encode() not in graph  # (and ...BiasAddResidual)
    x = np.random.default_rng(0).standard_normal((2, 16000)).astype("float32") * 0.1
    loaded = tf.saved_model.load(str(out))
    np.testing.assert_allclose(loaded.serve(tf.constant(x)).numpy(),
                               tiny_model(x, training=False).numpy(), atol=1e-5, rtol=1e-5)


@needs_compiler
def test_build_is_cached(tmp_path):
    first = native.build()  # built by the first test that needed it (or now, once)
    stamp = first.stat().st_mtime_ns
    assert native.build() == first  # not rebuilt
    assert first.stat().st_mtime_ns == stamp
    assert first.parent == native.cache_dir() and first.name.startswith("kernels-")
    # No half-built file is left; checked in a directory of its own (the shared cache may
    # hold another process's build in progress). A stand-in compiler writes the library.
    cxx = tmp_path / "cxx"
    cxx.write_text('#!/bin/sh\nwhile [ "$#" -gt 0 ]; do [ "$1" = -o ] && : > "$2"; shift; done\n')
    cxx.chmod(0o755)
    built = native.build(out_dir=tmp_path / "out", compiler=str(cxx))
    assert built.is_file() and not list((tmp_path / "out").glob("tmp*"))


def test_build_errors_name_the_compiler(tmp_path):
    with pytest.raises(native.BuildError, match="no-such-compiler"):
        native.build(out_dir=tmp_path, compiler=str(tmp_path / "no-such-compiler"))
    failing = tmp_path / "failing-cxx"
    failing.write_text("#!/bin/sh\necho 'error: cannot compile here' >&2\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(native.BuildError, match="exit 3") as err:
        native.build(out_dir=tmp_path / "out", compiler=str(failing))
    assert "cannot compile here" in str(err.value)
    assert not list((tmp_path / "out").glob("*.so"))  # nothing half-built is kept


def test_an_interrupted_build_leaves_no_half_built_file(tmp_path):
    """Ctrl-C while the compiler runs (here it interrupts its parent): the partial library
    goes, so the kernel cache never fills with temporary files."""
    cxx = tmp_path / "cxx"
    cxx.write_text('#!/bin/sh\nkill -INT $PPID\nsleep 2\n')
    cxx.chmod(0o755)
    code = ("import sys\nfrom src.models import native\n"
            "try:\n    native.build(out_dir=sys.argv[1], compiler=sys.argv[2])\n"
            "except KeyboardInterrupt:\n    sys.exit(130)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out"), str(cxx)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 130, out.stderr[-2000:]
    assert (tmp_path / "out").is_dir() and not list((tmp_path / "out").iterdir())


def test_without_a_compiler_the_model_runs_on_tensorflow_ops(tmp_path):
    """A fresh process whose compiler fails: one warning, and inference still works."""
    code = (
        "import logging, numpy as np\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from src.models.build import build_model\n"
        "from src.models import native\n"
        "m = build_model(dict(embed_dim=32, num_layers=1, num_heads=2, ff_dim=64),"
        " {'n_mels': 32}, num_classes=3, clip_samples=16000)\n"
        "y = m.predict(np.zeros((2, 16000), 'float32'), verbose=0)\n"
        "assert y.shape == (2, 3) and np.isfinite(y).all()\n"
        "assert native.load() is None\n"
        "print('ok')\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "missing-c++"),
               AUDIO_TRANSFORMER_NATIVE_DIR=str(tmp_path / "native"),
               TF_CPP_MIN_LOG_LEVEL="3")
    env.pop(native.ENV_SWITCH, None)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    assert result.stderr.count("compiled CPU kernels are not used") == 1
    assert "missing-c++" in result.stderr


@needs_compiler
def test_kernels_are_switched_off_by_name():
    import keras
    import tensorflow as tf

    from src.models.transformer import TransformerBlock

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        block = TransformerBlock(16, 2, 32, dropout_rate=0.0, activation="gelu")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = tf.zeros((2, 9, 16))
    every = {native.OP_NAME, native.LAYER_NORM_OP, native.BIAS_GELU_OP,
             native.BIAS_ADD_RESIDUAL_OP, native.BIAS_ADD_OP}
    assert every - {native.BIAS_ADD_OP} <= _graph_ops(
        tf.function(lambda v: block(v, training=False)), x)
    with native.disabled("bias"):
        assert native.usable("float32", kernel="attention")
        assert not native.usable("bfloat16", native.DTYPES, kernel="bias")
        assert native.usable("float32")  # some kernel still runs
        ops = _graph_ops(tf.function(lambda v: block(v, training=False)), x)
        with native.disabled("attention", "layer_norm"):  # nested: adds to the set
            inner = _graph_ops(tf.function(lambda v: block(v, training=False)), x)
            with native.disabled("bias_gelu"):
                assert not native.usable("float32")  # every kernel is off
    assert ops & every == {native.OP_NAME, native.LAYER_NORM_OP, native.BIAS_GELU_OP}
    assert inner & every == {native.BIAS_GELU_OP}
    assert native.usable("bfloat16", native.DTYPES, kernel="bias")  # restored
    for bad in (lambda: native.disabled("bias", "softmax").__enter__(),
                lambda: native.usable("float32", kernel="softmax")):
        with pytest.raises(ValueError, match="unknown kernel 'softmax': the kernels are "
                                             "attention, layer_norm, bias_gelu, bias"):
            bad()


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.load() is None
    assert not native.usable("float32")


@needs_compiler
@pytest.mark.slow
@pytest.mark.parametrize("march", ["x86-64-v3", "skylake-avx512"])
def test_the_kernels_built_without_avx512_or_its_bfloat16_pass_these_tests(march, tmp_path):
    """The same tests on a library built for CPUs without AVX-512 (x86-64-v3: Eigen's
    products, the float32 roundings of bfloat16) or without AVX512-BF16 (skylake-avx512:
    the float32 tiles, bfloat16 converted)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, AUDIO_TRANSFORMER_NATIVE_MARCH=march,
               AUDIO_TRANSFORMER_NATIVE_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
         __file__], capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and list(tmp_path.glob("kernels-*.so"))
