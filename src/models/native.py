"""Compiled CPU kernels, built on first use: the attention core (float32 and bfloat16;
training with a compiled backward), LayerNorm (float32 and bfloat16; training with a
compiled backward), the MLP's bias + exact GELU (float32 and bfloat16, with a compiled
backward), and the other Dense layers' bias, with the block's residual where one follows
(float32 and bfloat16, used in bfloat16; the bias's gradient compiled).

``softmax(q k^T / sqrt(d)) v`` over heads is, in TensorFlow ops, head transposes, a
scaling, a batched matmul, a softmax and a batched matmul, three of them passes over the
``(B, H, Sq, Sk)`` scores in memory (184 MB per layer at AST's 600 patches, batch 32,
4 heads). ``src/models/native/softmax_attention.cc`` computes it as one op on the
projections' ``(B, S, H, d)`` layout: per (batch, head) and block of query rows, the
scores stay in the core's cache from the matmul through the softmax to the weighted sum.
It matches the TensorFlow ops to float32 rounding (about 1e-6); the time it saves is in
the README's Measured performance. In bfloat16 (``mixed_bfloat16``) the products run
on AVX512-BF16's pair dot products where the CPU has them (float32 sums; the scores and
softmax in float32, the weights rounded to bfloat16 for the weighted sum, as PyTorch's
fused CPU attention does under autocast), otherwise in float32 on converted inputs.
For training the forward op also returns each query row's softmax statistics, and its
gradient is a second compiled op that recomputes the weights from them per block of
rows (never storing the ``(B, H, Sq, Sk)`` weights, as flash attention's backward does)
and forms dQ, dK and dV in the same tiles; in bfloat16 with the pair products, the
weights and their gradient rounded to bfloat16 for the products that read them, dK and
dV summed in float32.

``src/models/native/layer_norm.cc`` normalises each row in one read and one write,
where TensorFlow's ops make about eight passes (bfloat16 rows computed in float32);
``bias_gelu.cc`` adds the MLP's first bias and applies the exact GELU in one pass, where
TensorFlow makes two (also in bfloat16, computed in float32, as under
``mixed_bfloat16``); its gradient op forms the input's gradient and the bias's (summed
in float32) in one more pass. ``bias_add.cc`` adds a Dense layer's bias, and the
residual connection after it, in one pass (TensorFlow: BiasAdd, then AddV2; its
bfloat16 BiasAdd converts element by element), and sums the bias's gradient in float32.

Used by :class:`~src.models.attention.MultiHeadSelfAttention` (attention without a mask,
weights or attention dropout: float32 and bfloat16, inference and training),
:class:`~src.models.layers.LayerNorm` (float32 and bfloat16, inference and training),
:meth:`~src.models.transformer.TransformerBlock.feed_forward` (float32 and bfloat16,
inference and training) and :func:`~src.models.attention.dense_over_tokens` (the biases
of the q/k/v, output and second MLP projections: bfloat16 only, where they pay,
inference and training), and never in an XLA-compiled function (XLA cannot compile the
ops). The inference ops' gradients are registered here too (the attention's and
LayerNorm's recomputed with TensorFlow ops), so a gradient through an inference call
works.

Built with the C++ compiler (``$CXX``, else ``g++``, else ``c++``) against the installed
TensorFlow's headers, once per source, TensorFlow version and CPU, into
``$AUDIO_TRANSFORMER_NATIVE_DIR`` (default ``~/.cache/audio-transformer/native``); about
25-50 s, for ``-march=native`` (``$AUDIO_TRANSFORMER_NATIVE_MARCH`` names another
target, e.g. ``x86-64-v3`` for CPUs without AVX-512; the tests run on such builds too).
Without a compiler, or if the build fails, a warning says why and the TensorFlow ops
are used: the same results, slower. ``AUDIO_TRANSFORMER_NATIVE=0`` turns the kernels
off. A SavedModel written by ``scripts/export.py`` never contains the ops (it is traced
with the kernels off), so it loads anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import keras

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).with_name("native")).glob("*.cc"))
HEADERS = sorted((Path(__file__).with_name("native")).glob("*.h"))  # in the build's hash
OP_NAME = "AudioTransformerSoftmaxAttention"
TRAIN_OP = "AudioTransformerSoftmaxAttentionTrain"
GRAD_OP = "AudioTransformerSoftmaxAttentionGrad"
LAYER_NORM_OP = "AudioTransformerLayerNorm"
LAYER_NORM_TRAIN_OP = "AudioTransformerLayerNormTrain"
LAYER_NORM_GRAD_OP = "AudioTransformerLayerNormGrad"
BIAS_GELU_OP = "AudioTransformerBiasGelu"
BIAS_GELU_GRAD_OP = "AudioTransformerBiasGeluGrad"
BIAS_ADD_OP = "AudioTransformerBiasAdd"
BIAS_ADD_RESIDUAL_OP = "AudioTransformerBiasAddResidual"
BIAS_GRAD_OP = "AudioTransformerBiasGrad"
DTYPES = ("float32", "bfloat16")  # what every kernel takes (see usable)
# Where the models use the bias kernels: TensorFlow's float32 BiasAdd already runs at
# memory speed (A/B end to end: 0.98-1.00x), its bfloat16 one does not (1.05x inference).
BIAS_DTYPES = ("bfloat16",)
# Names of the kernels for disabled() and usable(): the attention core, LayerNorm, the
# MLP's bias + GELU, and the other Dense layers' bias (+ residual).
KERNELS = ("attention", "layer_norm", "bias_gelu", "bias")
ENV_SWITCH = "AUDIO_TRANSFORMER_NATIVE"
ENV_DIR = "AUDIO_TRANSFORMER_NATIVE_DIR"
ENV_MARCH = "AUDIO_TRANSFORMER_NATIVE_MARCH"  # the -march target (default: native)

_lock = threading.Lock()
_state: dict = {}  # "module": the loaded op library, or None after a failed build
_off = threading.local()


class BuildError(RuntimeError):
    """The kernels could not be compiled (no compiler, or the compiler failed)."""


def _compiler() -> str | None:
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    return shutil.which("g++") or shutil.which("c++")


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU model and its flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines))) or platform.machine()


def cache_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "audio-transformer" / "native"


def build(out_dir: Path | None = None, compiler: str | None = None) -> Path:
    """Compile the kernels (if not already there) into one library; return its path.

    The file name holds a hash of the sources, TensorFlow's version and compile flags,
    the compiler and the CPU, so a change to any of them builds a new library.
    Raises :class:`BuildError` with the compiler's output when it fails."""
    import tensorflow as tf

    compiler = compiler or _compiler()
    if not compiler:
        raise BuildError(
            "no C++ compiler found (set CXX, or install g++: e.g. `apt-get install g++`)"
        )
    cflags, lflags = tf.sysconfig.get_compile_flags(), tf.sysconfig.get_link_flags()
    march = os.environ.get(ENV_MARCH, "").strip() or "native"
    flags = ["-std=c++17", "-shared", "-fPIC", "-O3", f"-march={march}", "-fopenmp-simd",
             *cflags]
    sources = b"\0".join(p.name.encode() + b"\0" + p.read_bytes() for p in SOURCES + HEADERS)
    key = hashlib.sha256(
        b"\0".join([sources, tf.__version__.encode(), " ".join(flags + lflags).encode(),
                    compiler.encode(), _cpu_key().encode()])
    ).hexdigest()[:16]
    out_dir = Path(out_dir or cache_dir())
    target = out_dir / f"kernels-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # atomic: parallel builds
    os.close(fd)
    cmd = [compiler, *flags, *map(str, SOURCES), "-o", tmp, *lflags]
    log.info("building the CPU kernels (once per machine and version of their sources, "
             "about 25-50 s) into %s", out_dir)
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise BuildError(f"could not run the C++ compiler {compiler!r}: {err}") from err
    except BaseException:  # Ctrl-C during the build: no half-built file left in the cache
        Path(tmp).unlink(missing_ok=True)
        raise
    if result.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise BuildError(f"{' '.join(cmd)} failed (exit {result.returncode}):\n{tail}")
    os.replace(tmp, target)
    log.info("compiled the CPU kernels in %.0f s: %s", time.perf_counter() - start,
             target)
    return target


def _register_gradient(tf) -> None:
    @tf.RegisterGradient(OP_NAME)
    def _grad(op, d_output):  # of softmax(scale q k^T) v, the weights recomputed
        dtype = op.inputs[0].dtype  # float32, or bfloat16: recomputed in float32
        query, key, value = (tf.cast(t, tf.float32) for t in op.inputs)  # (B, S, H, d)
        d_output = tf.cast(d_output, tf.float32)
        scale = op.get_attr("scale")
        weights = tf.nn.softmax(tf.einsum("bqhd,bkhd->bhqk", query, key) * scale)
        d_out = tf.transpose(d_output, (0, 2, 1, 3))  # (B, H, Sq, dv)
        if dtype == tf.float32:
            output = tf.transpose(op.outputs[0], (0, 2, 1, 3))
        else:  # not the rounded output: delta below would carry its rounding
            output = tf.einsum("bhqk,bkhd->bhqd", weights, value)
        d_value = tf.einsum("bhqk,bhqd->bkhd", weights, d_out)
        delta = tf.reduce_sum(d_out * output, axis=-1, keepdims=True)
        d_scores = weights * (tf.einsum("bhqd,bkhd->bhqk", d_out, value) - delta) * scale
        grads = (tf.einsum("bhqk,bkhd->bqhd", d_scores, key),
                 tf.einsum("bhqk,bqhd->bkhd", d_scores, query), d_value)
        return tuple(tf.cast(g, dtype) for g in grads)

    @tf.RegisterGradient(TRAIN_OP)
    def _train_grad(op, d_output, _d_stats):  # the compiled backward (stats: not differentiable)
        query, key, value = op.inputs
        output, stats = op.outputs
        return tuple(_state["module"].audio_transformer_softmax_attention_grad(
            query, key, value, output, stats, d_output, scale=op.get_attr("scale")))

    @tf.RegisterGradient(LAYER_NORM_TRAIN_OP)
    def _layer_norm_train_grad(op, dy, _d_mean, _d_rstd):  # the compiled backward
        x, gamma, _ = op.inputs
        _, mean, rstd = op.outputs
        return tuple(_state["module"].audio_transformer_layer_norm_grad(
            x, gamma, mean, rstd, dy))

    @tf.RegisterGradient(BIAS_GELU_OP)
    def _bias_gelu_grad(op, dy):  # the compiled backward: dx and the bias's in one pass
        x, bias = op.inputs
        return tuple(_state["module"].audio_transformer_bias_gelu_grad(x, bias, dy))

    @tf.RegisterGradient(BIAS_ADD_OP)
    def _bias_add_grad(op, dy):  # dx = dy; the bias's: dy summed over rows in float32
        return dy, _state["module"].audio_transformer_bias_grad(dy)

    @tf.RegisterGradient(BIAS_ADD_RESIDUAL_OP)
    def _bias_add_residual_grad(op, dy):
        return dy, _state["module"].audio_transformer_bias_grad(dy), dy

    @tf.RegisterGradient(LAYER_NORM_OP)
    def _layer_norm_grad(op, dy):  # bfloat16: computed in float32, dx rounded
        x, gamma, _ = op.inputs
        x_dtype = x.dtype
        x, dy = tf.cast(x, tf.float32), tf.cast(dy, tf.float32)
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        rstd = tf.math.rsqrt(var + op.get_attr("epsilon"))
        xhat = (x - mean) * rstd
        g = dy * gamma
        dx = rstd * (g - tf.reduce_mean(g, -1, keepdims=True)
                     - xhat * tf.reduce_mean(g * xhat, -1, keepdims=True))
        rows = list(range(len(dy.shape) - 1))
        return tf.cast(dx, x_dtype), tf.reduce_sum(dy * xhat, rows), tf.reduce_sum(dy, rows)


def load():
    """The op library, built if needed; ``None`` when it is switched off or cannot be
    built (logged once, with the reason)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    with _lock:
        if "module" not in _state:
            import tensorflow as tf

            try:
                _state["module"] = tf.load_op_library(str(build()))
                _register_gradient(tf)
            except (BuildError, tf.errors.NotFoundError, OSError) as err:
                _state["module"] = None
                log.warning(
                    "The compiled CPU kernels are not used (attention, LayerNorm, "
                    "GELU and the biases run as TensorFlow ops: the same results, "
                    "slower): %s. Set %s=0 to skip the build.", err, ENV_SWITCH)
    return _state["module"]


@contextlib.contextmanager
def disabled(*kernels: str):
    """Trace without the kernels in this block (this thread): all of them (for graphs
    that are saved and loaded elsewhere: SavedModel export), or those named, of
    :data:`KERNELS` (to measure what one is worth: ``scripts/benchmark.py model
    --ab``)."""
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise ValueError(f"unknown kernel {', '.join(map(repr, unknown))}: the kernels are "
                         f"{', '.join(KERNELS)}")
    previous = getattr(_off, "value", frozenset())
    _off.value = previous | frozenset(kernels or KERNELS)
    try:
        yield
    finally:
        _off.value = previous


def prepare(model_cfg, trainer_cfg) -> None:
    """Build (once per machine: 25-50 s) and load the kernels before training where the
    model would use them (a transformer, not under XLA, the TensorFlow backend on a
    CPU), so the build is not counted in the first epoch's time and throughput."""
    if model_cfg.get("type", "transformer") != "transformer":
        return
    if str(trainer_cfg.get("jit_compile", "auto")).lower() == "true":
        return
    start = time.time()
    if usable("float32") and time.time() - start > 1.0:
        log.info("compiled CPU kernels ready (%.0f s)", time.time() - start)


def usable(dtype, dtypes=("float32",), kernel: str | None = None) -> bool:
    """Whether the kernels may run now for a layer computing in ``dtype``, one of
    ``dtypes`` (every kernel takes :data:`DTYPES`, float32 and bfloat16): ``kernel``
    (one of :data:`KERNELS`) unless :func:`disabled` switched it off, or, without a
    name, any kernel unless all are off."""
    off = getattr(_off, "value", frozenset())
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: the kernels are {', '.join(KERNELS)}")
    if kernel in off or off >= set(KERNELS):
        return False
    if keras.backend.backend() != "tensorflow":
        return False
    if keras.backend.standardize_dtype(dtype) not in dtypes:
        return False
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        return False
    if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        return False  # the op has only a CPU kernel
    return load() is not None


def softmax_attention(query, key, value, scale: float = 1.0, block_rows: int = 0):
    """``softmax(scale * query key^T) value`` per head, by the kernel: query
    ``(B, Sq, H, d)``, key ``(B, Sk, H, d)``, value ``(B, Sk, H, dv)`` (tokens before
    heads, as the projections' outputs reshape), all float32 or all bfloat16; returns
    ``(B, Sq, H, dv)`` in their dtype.
    ``block_rows``: query rows per work item (0: as many as keep the scores within
    about 1 MB)."""
    module = load()
    if module is None:
        raise RuntimeError(f"the CPU kernels are not available (see the log, or {ENV_SWITCH})")
    return module.audio_transformer_softmax_attention(
        query, key, value, scale=float(scale), block_rows=int(block_rows))


def softmax_attention_train(query, key, value, scale: float = 1.0):
    """:func:`softmax_attention` for training (float32, bfloat16): the forward kernel
    also keeps each row's softmax statistics, and the gradient is the compiled backward
    (the weights recomputed from them, never stored)."""
    module = load()
    if module is None:
        raise RuntimeError(f"the CPU kernels are not available (see the log, or {ENV_SWITCH})")
    output, _ = module.audio_transformer_softmax_attention_train(
        query, key, value, scale=float(scale))
    return output


def layer_norm(x, gamma, beta, epsilon: float):
    """LayerNorm over the last axis by the kernel: ``x (..., D)`` float32 or bfloat16
    (computed in float32, returned in x's dtype), ``gamma`` and ``beta (D,)`` float32."""
    module = load()
    if module is None:
        raise RuntimeError(f"the CPU kernels are not available (see the log, or {ENV_SWITCH})")
    return module.audio_transformer_layer_norm(x, gamma, beta, epsilon=float(epsilon))


def layer_norm_train(x, gamma, beta, epsilon: float):
    """:func:`layer_norm` for training: the forward op also keeps each row's mean and
    1 / std, and the gradient is a compiled op (one pass per row for dx, dgamma and
    dbeta summed per shard of rows)."""
    module = load()
    if module is None:
        raise RuntimeError(f"the CPU kernels are not available (see the log, or {ENV_SWITCH})")
    y, _, _ = module.audio_transformer_layer_norm_train(x, gamma, beta, epsilon=float(epsilon))
    return y


def bias_gelu(x, bias):
    """Exact (erf) GELU of ``x + bias`` by the kernel: ``x (..., N)`` float32 or
    bfloat16 (computed in float32, returned in x's dtype), ``bias (N,)`` float32."""
    module = load()
    if module is None:
        raise RuntimeError(f"the CPU kernels are not available (see the log, or {ENV_SWITCH})")
    return module.audio_transformer_bias_gelu(x, bias)


def bias_add(x, bias, residual=None):
    """``x + bias`` (``+ residual``) by the kernel: ``x (..., N)`` and ``residual`` (x's
    shape) float32 or bfloat16 (summed in float32, rounded once to x's dtype), ``bias
    (N,)`` float32. Its gradient sums ``dy`` over the rows in float32 for the bias."""
    module = load()
    if module is None:
        raise RuntimeError(f"the CPU kernels are not available (see the log, or {ENV_SWITCH})")
    if residual is None:
        return module.audio_transformer_bias_add(x, bias)
    return module.audio_transformer_bias_add_residual(x, bias, residual)
