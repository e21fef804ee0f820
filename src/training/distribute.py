"""Distributed and mixed-precision training from ``trainer.*`` config.

``trainer.strategy``:

* ``default``: one device, TensorFlow's default strategy (the behaviour without this module).
* ``mirrored``: ``tf.distribute.MirroredStrategy``, one replica per GPU; on a machine
  without GPUs, one replica per logical CPU device (``trainer.logical_cpus``).
* ``multi_worker``: ``tf.distribute.MultiWorkerMirroredStrategy`` over the workers listed
  in the ``TF_CONFIG`` environment variable (one process per worker, same command line)::

      TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                  "task": {"type": "worker", "index": 0}}'

  Worker 0 (or the task of type ``chief``) is the chief: only it writes to the run
  directory. The other workers write their checkpoints and results to a scratch
  directory of their own (see :func:`output_dir`), so workers that share a file system
  never write the same files, and a restarted worker resumes from its own backup.

``trainer.batch_size`` stays the global batch size: each of the N replicas gets
``batch_size / N`` examples per step (it must divide evenly), so the updates are those of
single-device training up to the order of the floating-point sums (the gradients of the
replicas are all-reduced). Two things still differ from a single-device run: random layers
(dropout, SpecAugment) draw per replica, and under a strategy Keras' ``fit`` takes one
batch from a fresh iterator to build the model, which advances the seeded reshuffle of the
training set by one epoch (an equally random order, not the same one).

``trainer.logical_cpus``: split the CPU into that many logical devices, so that
``mirrored`` runs on a CPU-only machine (tests, debugging). TensorFlow fixes its devices
when it first runs an op, so :func:`configure_devices` must run before that; when
TensorFlow has already initialised them (``validate_config`` builds a model), the eager
context is reset, which is safe only while no TensorFlow object has to outlive it, i.e.
at the start of a run.

``trainer.mixed_precision``: ``true`` / ``float16``: ``mixed_float16`` (float16 compute,
float32 variables, loss scaling) for the model on a GPU; without a GPU it is ignored with
a warning. ``bfloat16``: ``mixed_bfloat16`` on any device (GPUs from Ampere on, and CPUs
with AVX512-BF16 or AMX, where oneDNN runs bfloat16 matmuls; elsewhere it works but is
slow, with a warning); no loss scaling is needed. The classifier always computes in
float32. Features are always computed in float32, in training (the feature cache does
not depend on the policy) and in the saved waveform model, whose frontend stays float32.

``trainer.jit_compile``: ``true`` | ``false`` | ``auto`` (Keras' default: XLA on a GPU
without a distribution strategy), passed to ``compile``.

In ``src.train``: :func:`setup` at the start of a run, :func:`enter_strategy` right before
the model is built and :func:`exit_strategy` after ``compile`` (the model and its optimizer
are created in the strategy's scope), :func:`jit_compile` for ``compile``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from src.config import ConfigError

log = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored", "multi_worker")
_TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}'
)

# Strategies made in this process, by (strategy, logical_cpus): a process can create only
# one MultiWorkerMirroredStrategy, and every fold of a run uses the same one.
_STRATEGIES: dict = {}


def _trainer(cfg: Mapping) -> Mapping:
    """The ``trainer`` section of a full config, or the section itself."""
    return cfg["trainer"] if "trainer" in cfg else cfg


def _strategy_name(trainer_cfg: Mapping) -> str:
    return str(trainer_cfg.get("strategy", "default") or "default")


def _logical_cpus(trainer_cfg: Mapping) -> int | None:
    n = trainer_cfg.get("logical_cpus")
    return None if n is None else int(n)


def jit_compile(trainer_cfg: Mapping) -> bool | str:
    """``trainer.jit_compile`` as ``compile(jit_compile=...)`` takes it."""
    value = trainer_cfg.get("jit_compile", "auto")
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if value is None:
        value = "auto"
    if not (isinstance(value, bool) or value == "auto"):
        raise ConfigError(f"trainer.jit_compile={value!r} is invalid; use true, false or auto.")
    return value


def check_config(trainer_cfg: Mapping) -> None:
    """Cheap checks of the distribution keys; :class:`ConfigError` names the key."""
    name = _strategy_name(trainer_cfg)
    if name not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={name!r} is unknown; use one of {STRATEGIES}.")
    n = trainer_cfg.get("logical_cpus")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(
            f"trainer.logical_cpus={n!r} is invalid; use a positive number of logical CPU "
            "devices (e.g. 2), or null to leave the CPU as one device."
        )
    mixed = trainer_cfg.get("mixed_precision", False)
    if not isinstance(mixed, bool) and mixed not in PRECISIONS:
        raise ConfigError(
            f"trainer.mixed_precision={mixed!r} is invalid; use false, true (= float16, GPU "
            "only) or bfloat16."
        )
    jit_compile(trainer_cfg)
    if name == "multi_worker":
        read_tf_config()


def read_tf_config() -> dict:
    """The cluster and this process' task from ``TF_CONFIG``, checked."""
    raw = os.environ.get("TF_CONFIG", "")
    hint = f"Set it on every worker, e.g. TF_CONFIG='{_TF_CONFIG_EXAMPLE}' (index 0 is the chief)."
    if not raw.strip():
        raise ConfigError(
            "trainer.strategy=multi_worker needs the TF_CONFIG environment variable "
            f"(the cluster and this worker's task), which is not set. {hint}"
        )
    try:
        conf = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({err}): {raw!r}. {hint}") from None
    cluster = conf.get("cluster") if isinstance(conf, dict) else None
    task = conf.get("task") if isinstance(conf, dict) else None
    if not isinstance(cluster, dict) or not cluster or not all(
        isinstance(v, list) and v for v in cluster.values()
    ):
        raise ConfigError(f"TF_CONFIG has no valid \"cluster\" (job -> list of host:port): {raw!r}. {hint}")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise ConfigError(
            f"TF_CONFIG's \"task\" must name a job of the cluster {sorted(cluster)} as \"type\": "
            f"{raw!r}. {hint}"
        )
    index = task.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not (
        0 <= index < len(cluster[task["type"]])
    ):
        raise ConfigError(
            f"TF_CONFIG's task index {index!r} is not one of the {len(cluster[task['type']])} "
            f"{task['type']} task(s): {raw!r}. {hint}"
        )
    return {"cluster": cluster, "task": {"type": task["type"], "index": index}}


def is_chief(trainer_cfg: Mapping) -> bool:
    """Whether this process writes the run's checkpoints and results."""
    if _strategy_name(trainer_cfg) != "multi_worker":
        return True
    conf = read_tf_config()
    task = conf["task"]
    if "chief" in conf["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and task["index"] == 0


def output_dir(trainer_cfg: Mapping, run_dir: Path) -> Path:
    """Where this process writes: ``run_dir``, or a non-chief worker's scratch directory.

    The scratch directory (under the system temp dir, ``TMPDIR``) is the same for the same
    run directory and task, so a restarted worker finds its own backup and resumes in step
    with the chief; it is outside the runs directory, so tables never count it.
    """
    run_dir = Path(run_dir)
    if is_chief(trainer_cfg):
        return run_dir
    task = read_tf_config()["task"]
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
    scratch = (
        Path(tempfile.gettempdir()) / "audio-transformer-workers" / digest
        / f"{task['type']}_{task['index']}"
    )
    log.info(
        "multi-worker: %s %d is not the chief; its checkpoints and results go to %s "
        "(the chief writes %s)", task["type"], task["index"], scratch, run_dir,
    )
    return scratch


def _devices_initialised() -> bool:
    from tensorflow.python.eager import context

    return context.context()._context_handle is not None


def _reset_eager_context() -> None:
    """Let TensorFlow initialise its devices again (TensorFlow's own test helper)."""
    from tensorflow.python.eager import context

    _STRATEGIES.clear()
    context._reset_context()


def _set_logical_cpus(n: int | None) -> None:
    """Split the (first) CPU into ``n`` logical devices; no-op for None."""
    if not n:
        return
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) == n:
        return
    devices = [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
    try:
        tf.config.set_logical_device_configuration(cpu, devices)
    except RuntimeError:  # TensorFlow has initialised its devices already
        if len(tf.config.list_logical_devices("CPU")) == n:
            return
        log.info("trainer.logical_cpus=%d: re-initialising TensorFlow's devices", n)
        _reset_eager_context()
        tf.config.set_logical_device_configuration(cpu, devices)


def configure_devices(cfg: Mapping) -> None:
    """Apply ``trainer.*`` device settings; call it before any TensorFlow work of a run.

    Checks the keys, splits the CPU (``logical_cpus``), sets the float32 policy for the
    feature computation, and creates the strategy of ``mirrored`` / ``multi_worker``
    now: a MultiWorkerMirroredStrategy has to exist before the run's first TensorFlow op,
    and the batch size is checked against the number of replicas before any data work.
    """
    import keras

    t = _trainer(cfg)
    check_config(t)
    _set_logical_cpus(_logical_cpus(t))
    keras.mixed_precision.set_global_policy("float32")  # enter_strategy sets the model's
    if _strategy_name(t) != "default":
        get_strategy(t)


def setup(cfg: Mapping, run_dir: Path) -> Path:
    """:func:`configure_devices`, then the directory this process writes the run to."""
    configure_devices(cfg)
    return output_dir(_trainer(cfg), run_dir)


def get_strategy(trainer_cfg: Mapping):
    """The ``tf.distribute.Strategy`` of ``trainer.strategy`` (made once per process).

    ``default`` is ``tf.distribute.get_strategy()``. For the others the CPU is split first
    if ``logical_cpus`` asks for it (see :func:`configure_devices` about when that works).
    """
    import tensorflow as tf

    check_config(trainer_cfg)
    name = _strategy_name(trainer_cfg)
    if name == "default":
        return tf.distribute.get_strategy()
    key = (name, _logical_cpus(trainer_cfg))
    if key in _STRATEGIES:
        return _STRATEGIES[key]
    _set_logical_cpus(_logical_cpus(trainer_cfg))
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            strategy = tf.distribute.MirroredStrategy()
        else:
            cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
            strategy = tf.distribute.MirroredStrategy(devices=cpus)
            if len(cpus) == 1:
                log.warning(
                    "trainer.strategy=mirrored: no GPU and one CPU device, so one replica; "
                    "set trainer.logical_cpus=N to split the CPU into N devices."
                )
    else:
        read_tf_config()  # a clear error before TensorFlow reads it
        if _devices_initialised():  # collective ops can only be set up before that
            log.info("trainer.strategy=multi_worker: re-initialising TensorFlow's devices")
            _reset_eager_context()
            _set_logical_cpus(_logical_cpus(trainer_cfg))
        strategy = _multi_worker_strategy_class()()
    replicas = int(strategy.num_replicas_in_sync)
    batch = int(trainer_cfg.get("batch_size", replicas))
    if batch % replicas:
        raise ConfigError(
            f"trainer.batch_size={batch} (the global batch) is not divisible by the "
            f"{replicas} replicas of trainer.strategy={name}; use a multiple of {replicas}."
        )
    log.info(
        "trainer.strategy=%s: %s, replicas: %d, per-replica batch %d",
        name, type(strategy).__name__, replicas, batch // replicas,
    )
    _STRATEGIES[key] = strategy
    return strategy


@functools.cache
def _multi_worker_strategy_class():
    """``tf.distribute.MultiWorkerMirroredStrategy`` whose ``reduce`` takes what Keras passes.

    Keras 3's TensorFlow trainer calls ``strategy.reduce`` on a whole (nested) data batch
    when it builds the model in ``fit``, and with ``axis=0`` on the scalar metrics of each
    step; MultiWorkerMirroredStrategy reduces one value at a time and needs ``axis=None``
    for scalars (keras-team/keras#20585). Reduce nested values one by one, and scalars
    across replicas (their mean: the replicas see equal shares of each batch).
    """
    import tensorflow as tf

    class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            def one(v):
                rank = self.experimental_local_results(v)[0].shape.rank
                return super(MultiWorkerMirroredStrategy, self).reduce(
                    reduce_op, v, None if rank == 0 else axis
                )

            return tf.nest.map_structure(one, value)

    return MultiWorkerMirroredStrategy


PRECISIONS = ("float16", "bfloat16")


def cpu_has_bf16() -> bool:
    """Whether this (Linux) CPU has native bfloat16 dot products (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_policy(trainer_cfg: Mapping) -> str:
    """The Keras dtype policy for the model (see the module docstring)."""
    mixed = trainer_cfg.get("mixed_precision", False)
    if not mixed:
        return "float32"
    import tensorflow as tf

    gpu = bool(tf.config.list_logical_devices("GPU"))
    if mixed == "bfloat16":
        if not gpu and not cpu_has_bf16():
            log.warning(
                "trainer.mixed_precision=bfloat16: this CPU has no native bfloat16 "
                "(AVX512-BF16/AMX); it will work but run slower than float32."
            )
        return "mixed_bfloat16"
    if gpu:
        return "mixed_float16"
    log.warning(
        "trainer.mixed_precision=%s: no GPU found, so it is ignored (float32); "
        "trainer.mixed_precision=bfloat16 works on CPUs.", str(mixed).lower(),
    )
    return "float32"


def enter_strategy(trainer_cfg: Mapping):
    """Make ``trainer.strategy`` and the dtype policy current for the models built next.

    As entering ``with strategy.scope():`` (``tf.distribute.experimental_set_strategy``):
    the model and the optimizer that ``compile`` creates are mirrored. Call
    :func:`exit_strategy` after ``compile``: the model keeps its strategy for ``fit``,
    ``predict`` and saving, while losses computed outside it (which Keras scales by
    1 / replicas under a strategy) stay as they are. Returns the strategy.
    """
    import keras
    import tensorflow as tf

    tf.distribute.experimental_set_strategy(None)
    strategy = get_strategy(trainer_cfg)
    if _strategy_name(trainer_cfg) != "default":
        tf.distribute.experimental_set_strategy(strategy)
    keras.mixed_precision.set_global_policy(precision_policy(trainer_cfg))
    return strategy


def exit_strategy() -> None:
    """Undo :func:`enter_strategy`: no global strategy, float32 policy."""
    import keras
    import tensorflow as tf

    tf.distribute.experimental_set_strategy(None)
    keras.mixed_precision.set_global_policy("float32")
