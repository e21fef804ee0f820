"""Model layers. Importing this package registers every custom layer with Keras."""

from __future__ import annotations

import os

from src.models.attention import MultiHeadSelfAttention
from src.models.audio_transformer import AudioTransformer, SpectrogramTransformer
from src.models.baseline import PooledStatsClassifier
from src.models.frontend import LogMel
from src.models.kaldi import KaldiFbank
from src.models.patch import PatchEmbedding
from src.models.spec import Normalize, SpecAugment
from src.models.transformer import TransformerBlock

__all__ = [
    "AudioTransformer",
    "KaldiFbank",
    "LogMel",
    "MultiHeadSelfAttention",
    "Normalize",
    "PooledStatsClassifier",
    "PatchEmbedding",
    "SpecAugment",
    "SpectrogramTransformer",
    "TransformerBlock",
    "load_model",
]


def load_model(path: str | os.PathLike, compile: bool = False):
    """Load a saved ``.keras`` model (waveform in, logits out)."""
    import keras

    import src.training.optim  # noqa: F401  (registers the LR schedule for compiled models)

    if not os.path.exists(path):
        raise FileNotFoundError(f"no saved model at {path}")
    return keras.saving.load_model(path, compile=compile)
