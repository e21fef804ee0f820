"""Shared by the tests that run the project's commands in subprocesses."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A model and frontend small enough to train in seconds on 1 s clips.
TINY_MODEL = [
    "data.clip_seconds=1.0",
    "frontend.n_mels=32",
    "model.embed_dim=16",
    "model.num_heads=2",
    "model.ff_dim=32",
    "model.num_layers=1",
    "trainer.verbose=0",
]
# The quickstart set generated small: 12 classes x 5 clips of 1 s. With fold 5 as the
# test split: 36 train, 12 validation (one clip per class carved from folds 1-4), 12 test.
TINY_DATA = ["data.generate.clips_per_class=5", "data.generate.duration=1.0"]


def train_env(tmp: Path, **extra) -> dict:
    """Environment for a run under ``tmp``: its own runs, cache, data and HOME (so no
    W&B credentials are found and the auto mode is offline)."""
    env = dict(os.environ)
    env.update(
        AUDIO_RUNS_DIR=str(tmp / "runs"),
        AUDIO_CACHE_DIR=str(tmp / "cache"),
        AUDIO_DATA_DIR=str(tmp / "data"),
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONUNBUFFERED="1",
        HOME=str(tmp / "home"),
    )
    env.update(extra)
    return env
