"""Optimizers and learning-rate schedules from config.

Schedules are defined per epoch (AST's recipe: constant for k epochs, then
x0.85 each epoch) and evaluated per step, with an optional linear warmup.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import keras
from keras import ops

from src.models.attention import PACKAGE

SCHEDULES = ("constant", "step_decay", "cosine")
OPTIMIZERS = ("adam", "adamw", "sgd")


@keras.saving.register_keras_serializable(package=PACKAGE)
class EpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Per-epoch learning-rate schedule with linear warmup.

    * ``constant``: ``lr``.
    * ``step_decay``: ``lr`` until epoch ``decay_start`` (0-based), then
      ``lr * decay_factor ** (floor((epoch - decay_start) / decay_every) + 1)``, i.e.
      PyTorch's MultiStepLR at epochs decay_start, decay_start + decay_every, ...
      (AST ESC-50: decay_start=5, decay_every=1, factor 0.85; AudioSet balanced: 10, 5,
      0.5; full: 2, 1, 0.5); the factor applies from the start of those epochs).
    * ``cosine``: cosine from ``lr`` to ``min_lr`` over ``total_epochs``.

    Warmup: the first ``warmup_epochs`` (or ``warmup_steps`` steps, when given; AST
    warms AudioSet up over 1000 steps) ramp linearly from ``lr / warmup_steps``.
    """

    def __init__(
        self,
        lr,
        steps_per_epoch,
        kind="constant",
        warmup_epochs=0.0,
        decay_start=5,
        decay_every=1,
        warmup_steps=None,
        decay_factor=0.85,
        total_epochs=1,
        min_lr=0.0,
    ):
        if kind not in SCHEDULES:
            raise ValueError(
                f"trainer.schedule.name must be one of {SCHEDULES}, got {kind!r}."
            )
        if int(steps_per_epoch) < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")
        self.lr = float(lr)
        self.steps_per_epoch = int(steps_per_epoch)
        self.kind = kind
        self.warmup_epochs = float(warmup_epochs)
        self.decay_start = int(decay_start)
        self.decay_every = int(decay_every)
        if self.decay_every < 1:
            raise ValueError(
                f"trainer.schedule.decay_every must be >= 1, got {decay_every}."
            )
        self.warmup_steps = None if warmup_steps is None else int(warmup_steps)
        self.decay_factor = float(decay_factor)
        self.total_epochs = max(1, int(total_epochs))
        self.min_lr = float(min_lr)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        epoch = ops.floor(step / self.steps_per_epoch)
        lr = ops.convert_to_tensor(self.lr, "float32")
        if self.kind == "step_decay":
            n = ops.maximum(
                ops.floor((epoch - self.decay_start) / self.decay_every) + 1.0, 0.0
            )
            lr = lr * ops.power(self.decay_factor, n)
        elif self.kind == "cosine":
            progress = ops.minimum(step / (self.total_epochs * self.steps_per_epoch), 1.0)
            lr = self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + ops.cos(math.pi * progress))
        warmup_steps = (
            self.warmup_steps if self.warmup_steps is not None
            else self.warmup_epochs * self.steps_per_epoch
        )
        if warmup_steps > 0:
            ramp = ops.minimum((step + 1.0) / warmup_steps, 1.0)
            lr = lr * ramp
        return lr

    def get_config(self):
        return dict(
            lr=self.lr,
            steps_per_epoch=self.steps_per_epoch,
            kind=self.kind,
            warmup_epochs=self.warmup_epochs,
            decay_start=self.decay_start,
            decay_every=self.decay_every,
            warmup_steps=self.warmup_steps,
            decay_factor=self.decay_factor,
            total_epochs=self.total_epochs,
            min_lr=self.min_lr,
        )


class _FusedAdamUpdate:
    """Adam's update of a variable as one TensorFlow op (``ResourceApplyAdam``, the op
    ``tf.compat.v1.train.AdamOptimizer`` ran) instead of Keras' dozen element-wise ops
    per variable: one pass over the weight, its gradient and moments rather than one per
    op, and a few hundred fewer ops per step. The same update, to float rounding: m and v
    move by ``(1 - beta) * (g - m)`` and ``(1 - beta) * (g^2 - v)``, and the weight by
    ``lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)``; decoupled
    weight decay stays Keras' own, applied before. The optimizer's variables are Keras',
    in Keras' order, so weight files and backups of either load into the other.

    Keras' update runs instead (the same numbers) on another backend, with ``amsgrad``,
    for a variable that is not float32/float64, and with ``fused=False``."""

    def __init__(self, *args, fused: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused = bool(fused)

    def _fusable(self, gradient, variable) -> bool:
        return (self.fused and not self.amsgrad and keras.backend.backend() == "tensorflow"
                and keras.backend.standardize_dtype(variable.dtype) in ("float32", "float64"))

    def update_step(self, gradient, variable, learning_rate):
        if not self._fusable(gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=m.value.handle, v=v.value.handle,
            beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
            lr=tf.cast(learning_rate, dtype), beta1=tf.cast(self.beta_1, dtype),
            beta2=tf.cast(self.beta_2, dtype), epsilon=tf.cast(self.epsilon, dtype),
            # A sparse gradient (IndexedSlices) is made dense, as Keras' update does.
            grad=tf.cast(tf.convert_to_tensor(gradient), dtype), use_locking=False,
            use_nesterov=False)

    def get_config(self):
        return {**super().get_config(), "fused": self.fused}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Adam(_FusedAdamUpdate, keras.optimizers.Adam):
    """Keras' Adam with the fused update of :class:`_FusedAdamUpdate`."""


@keras.saving.register_keras_serializable(package=PACKAGE)
class AdamW(_FusedAdamUpdate, keras.optimizers.AdamW):
    """Keras' AdamW (decoupled weight decay) with the fused update of
    :class:`_FusedAdamUpdate`."""


def build_schedule(schedule_cfg: Mapping, lr: float, steps_per_epoch: int, epochs: int):
    cfg = dict(schedule_cfg or {})
    return EpochSchedule(
        lr=lr,
        steps_per_epoch=steps_per_epoch,
        kind=cfg.get("name", "constant"),
        warmup_epochs=cfg.get("warmup_epochs", 0.0),
        decay_start=cfg.get("decay_start", 5),
        decay_every=cfg.get("decay_every", 1),
        warmup_steps=cfg.get("warmup_steps"),
        decay_factor=cfg.get("decay_factor", 0.85),
        total_epochs=epochs,
        min_lr=cfg.get("min_lr", 0.0),
    )


def build_optimizer(optimizer_cfg: Mapping, schedule):
    """The optimizer of ``trainer.optimizer``: every key does what it says (no hidden
    defaults: ``weight_decay: 0.0`` is no decay for every optimizer, ``epsilon`` reaches
    Adam and AdamW alike); a key the optimizer does not take is an error."""
    cfg = dict(optimizer_cfg)
    name = cfg.pop("name", "adam")
    cfg.pop("lr", None)
    allowed = {
        "adam": {"beta_1", "beta_2", "epsilon", "weight_decay", "clipnorm", "amsgrad"},
        "adamw": {"beta_1", "beta_2", "epsilon", "weight_decay", "clipnorm", "amsgrad"},
        "sgd": {"momentum", "nesterov", "weight_decay", "clipnorm", "beta_1", "beta_2",
                "epsilon"},
    }
    if name not in allowed:
        raise ValueError(f"trainer.optimizer.name must be one of {OPTIMIZERS}, got {name!r}.")
    unknown = sorted(set(cfg) - allowed[name])
    if unknown:
        raise ValueError(
            f"trainer.optimizer.{unknown[0]} is not an option of {name}; its options are "
            f"{sorted(allowed[name] | {'name', 'lr'})}."
        )
    common = {}
    if cfg.get("clipnorm") is not None:
        common["clipnorm"] = float(cfg["clipnorm"])
    decay = cfg.get("weight_decay")
    decay = None if decay is None or float(decay) == 0.0 else float(decay)
    if name in ("adam", "adamw"):
        cls = Adam if name == "adam" else AdamW
        kwargs = dict(
            learning_rate=schedule,
            beta_1=float(cfg.get("beta_1", 0.9)),
            beta_2=float(cfg.get("beta_2", 0.999)),
            epsilon=float(cfg.get("epsilon", 1e-7)),
            amsgrad=bool(cfg.get("amsgrad", False)),
            **common,
        )
        # Adam: L2-style decay added to the gradient is not Keras' meaning of weight_decay
        # either; both apply decoupled decay lr * wd * w, AdamW's default of 0.01 included
        # only when asked for.
        return cls(weight_decay=decay if name == "adam" else (decay or 0.0), **kwargs)
    # SGD ignores Adam's keys if a shared trainer config carries them.
    return keras.optimizers.SGD(
        learning_rate=schedule,
        momentum=float(cfg.get("momentum", 0.9)),
        nesterov=bool(cfg.get("nesterov", False)),
        weight_decay=decay,
        **common,
    )
