"""Building blocks with hand-written gradients: the same functions as Keras', with
passes that touch the activations fewer times.

On CPU, TensorFlow runs every elementwise operation as its own pass over memory,
so an exact GELU (five operations forward, about ten in its generic gradient) or a
LayerNorm (a dozen, forward and backward) costs several times its arithmetic. Each
is written here with a hand-written gradient (``keras.ops.custom_gradient``,
TensorFlow and JAX backends). The GELU's forward and backward passes are, on
TensorFlow, compiled with XLA into one loop each (``fused``), while the matmuls
around them stay with TensorFlow's oneDNN kernels. The LayerNorm stays with
TensorFlow's operations: XLA's CPU loops run on one thread, which for the
LayerNorm's row reductions cost more than the passes saved. On JAX the whole step
is compiled anyway and the same code runs as is.
"""

from __future__ import annotations

import math

import keras
from keras import layers, ops

from src.models import native
from src.models.attention import PACKAGE, gradient_scope

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_LOG_INV_SQRT_2PI = -0.5 * math.log(2.0 * math.pi)


def custom_gradients_supported() -> bool:
    """Whether the backend runs ``keras.ops.custom_gradient`` (TensorFlow, JAX)."""
    return keras.backend.backend() in ("tensorflow", "jax")


def fused(fn):
    """``fn`` (keras ops, elementwise work and reductions) compiled as one XLA
    computation on the TensorFlow backend, which fuses it into a few loops instead of
    one pass over memory per operation; ``fn`` itself on other backends."""
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    return tf.function(fn, jit_compile=True, autograph=False, reduce_retracing=True)


# ---------------------------------------------------------------------- GELU


@fused
def _gelu_forward(x):
    return x * (0.5 * (1.0 + ops.erf(x * ops.cast(_SQRT_HALF, x.dtype))))


@fused
def _gelu_backward(dy, x):
    # d/dx x Phi(x) = Phi(x) + x phi(x); phi(x) = exp(-x^2 / 2 - log sqrt(2 pi))
    cdf = 0.5 * (1.0 + ops.erf(x * ops.cast(_SQRT_HALF, x.dtype)))
    pdf = ops.exp(ops.square(x) * ops.cast(-0.5, x.dtype) + ops.cast(_LOG_INV_SQRT_2PI, x.dtype))
    return ops.cast(dy, x.dtype) * (cdf + x * pdf)


@ops.custom_gradient
def gelu(x):
    """Exact (erf) GELU, ``x * Phi(x)`` (Phi: the standard normal CDF), as
    ``keras.activations.gelu(x, approximate=False)``: one fused pass forward, one
    backward (``dy * (Phi(x) + x * phi(x))``, Phi recomputed from x rather than
    stored)."""
    scope = gradient_scope()

    def grad(*args, upstream=None):
        dy = args[0] if upstream is None else upstream
        with scope():
            return _gelu_backward(dy, x)

    return _gelu_forward(x), grad


# ----------------------------------------------------------------- LayerNorm


def _layer_norm_forward(x, gamma, beta, epsilon, dtype):
    """``(y, xhat, rstd)``: the output in ``dtype``, the normalised input and
    1 / std (float32 or wider)."""
    x = ops.cast(x, gamma.dtype)
    centered = x - ops.mean(x, axis=-1, keepdims=True)
    rstd = ops.rsqrt(ops.mean(ops.square(centered), axis=-1, keepdims=True) + epsilon)
    xhat = centered * rstd
    return ops.cast(xhat * gamma + beta, dtype), xhat, rstd


def _layer_norm_backward(dy, xhat, rstd, gamma, x_dtype):
    """``(dx, dgamma, dbeta)``: with ``g = dy * gamma``,
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``; dgamma and dbeta sum
    ``dy * xhat`` and ``dy`` over the rows."""
    dy = ops.cast(dy, gamma.dtype)
    rows = tuple(range(len(dy.shape) - 1))
    g = dy * gamma
    mean_g = ops.mean(g, axis=-1, keepdims=True)
    mean_gx = ops.mean(g * xhat, axis=-1, keepdims=True)
    dx = (g - mean_g - xhat * mean_gx) * rstd
    return ops.cast(dx, x_dtype), ops.sum(dy * xhat, axis=rows), ops.sum(dy, axis=rows)


def layer_norm(x, gamma, beta, epsilon, dtype=None):
    """LayerNorm over the last axis, ``(x - mean) / sqrt(var + epsilon) * gamma + beta``,
    as ``keras.layers.LayerNormalization``: computed in float32 (or x's dtype if
    wider), returned in ``dtype`` (default: x's), with a hand-written gradient.

    x ``(..., D)``; gamma, beta ``(D,)``. The forward pass keeps the normalised input
    and the per-row 1 / std for the backward pass, whose input gradient takes four
    elementwise passes (after ``dy * gamma``) where the generic gradient of the
    forward operations takes about twice as many.
    """
    dtype = dtype or keras.backend.standardize_dtype(x.dtype)
    compute = keras.backend.result_type(x.dtype, "float32")
    epsilon = float(epsilon)

    @ops.custom_gradient
    def forward(x, gamma, beta):
        y, xhat, rstd = _layer_norm_forward(x, gamma, beta, epsilon, dtype)
        scope = gradient_scope()

        def grad(*args, upstream=None):
            dy = args[0] if upstream is None else upstream
            with scope():
                return _layer_norm_backward(dy, xhat, rstd, gamma, x.dtype)

        return y, grad

    # Casting reads variables into tensors: the gradient is taken with respect to
    # the three inputs only.
    return forward(x, ops.cast(gamma, compute), ops.cast(beta, compute))


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerNorm(layers.LayerNormalization):
    """``keras.layers.LayerNormalization`` (same arguments, weights, weight names and
    config, so it loads the same saved weights) computed by :func:`layer_norm`, or, in
    float32 and bfloat16, by the compiled ops of :mod:`src.models.native` where they
    can be built (in training with a compiled gradient). Normalising over other axes
    than the last, ``center=False``, ``scale=False`` and ``rms_scaling`` use Keras' own
    implementation."""

    def call(self, inputs, training=None):
        if (
            self.gamma is None
            or self.beta is None
            or self.rms_scaling
            or list(self.axis) not in ([len(inputs.shape) - 1], [-1])
            or not custom_gradients_supported()
        ):
            return super().call(inputs)
        if native.usable(self.compute_dtype, native.DTYPES, "layer_norm"):
            # One compiled op (src/models/native.py; bfloat16 computed in float32); in
            # training with the rows' statistics kept for its compiled gradient.
            kernel = native.layer_norm_train if training else native.layer_norm
            return kernel(
                ops.cast(inputs, self.compute_dtype), ops.cast(self.gamma, "float32"),
                ops.cast(self.beta, "float32"), self.epsilon,
            )
        return layer_norm(inputs, self.gamma, self.beta, self.epsilon, self.compute_dtype)

