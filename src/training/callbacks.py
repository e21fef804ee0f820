"""Keras callbacks used by the training loop."""

from __future__ import annotations

import keras


class LearningRateLogger(keras.callbacks.Callback):
    """Adds ``learning_rate`` (the value used in the last step) to the epoch logs.

    Put it first in the callback list so CSVLogger and W&B see the value.
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        opt = self.model.optimizer
        lr = opt.learning_rate
        if isinstance(opt._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            lr = opt._learning_rate(max(int(opt.iterations.numpy()) - 1, 0))
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
