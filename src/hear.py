"""The HEAR 2021 API (hear-eval-kit) over the project's models.

    hear-validator src.hear --model runs/<name>/<overrides>/fold_1/model.keras
    python -m heareval.embeddings.runner src.hear --model MODEL.keras --tasks-dir TASKS

``MODEL`` is anything ``python -m scripts.embed`` takes: a ``.keras`` waveform model (a
training run's ``model.keras``, an imported AST), a fold or run directory, or a bare
pretrained backbone next to (or in the run directory of) its run's ``config.yaml``. The
embeddings are those of :mod:`src.embeddings` (same windows, same definitions): the scene
embedding is the coverage-weighted mean over windows of the mean patch token of the last
layer; timestamp embeddings are the patch columns (tokens averaged over frequency)
stitched over the whole sound and linearly interpolated onto a 50 ms grid starting at 0.

The model's sample rate is the one HEAR gives the audio at when it is one HEAR allows
(16000, 22050, 32000, 44100, 48000 Hz); a model trained at another rate declares the
next allowed rate above it and resamples its input with the project's resampler.
"""

from __future__ import annotations

from src import import_tensorflow

tf = import_tensorflow()

import numpy as np  # noqa: E402

from src.embeddings import DEFAULT_HOP_MS, Embedder, load_embedding_model  # noqa: E402

__all__ = [
    "HEAR_SAMPLE_RATES",
    "HearModel",
    "get_scene_embeddings",
    "get_timestamp_embeddings",
    "load_model",
]

HEAR_SAMPLE_RATES = (16000, 22050, 32000, 44100, 48000)


def hear_sample_rate(model_rate: int) -> int:
    """The rate HEAR should give audio at for a model at ``model_rate`` Hz."""
    model_rate = int(model_rate)
    if model_rate in HEAR_SAMPLE_RATES:
        return model_rate
    above = [r for r in HEAR_SAMPLE_RATES if r > model_rate]
    return above[0] if above else HEAR_SAMPLE_RATES[-1]


class HearModel(tf.Module):
    """A ``tf.Module`` holding a Keras waveform model, with the attributes HEAR reads.

    ``sample_rate``: the rate of the audio HEAR passes in (default: the model's, or the
    next rate HEAR allows above it); ``scene_embedding_size`` and
    ``timestamp_embedding_size``: the model's ``embed_dim``. ``hop_ms``, ``batch_size``,
    ``scene_pooling``: see :class:`src.embeddings.Embedder`. ``keras_model`` is the model;
    ``embedder`` computes the embeddings (:class:`src.embeddings.Embedder`).
    """

    def __init__(self, keras_model, *, hop_ms: float = DEFAULT_HOP_MS, batch_size: int = 32,
                 sample_rate: int | None = None, scene_pooling: str = "mean"):
        super().__init__(name="hear_model")
        self.keras_model = keras_model
        self.embedder = Embedder(keras_model, hop_ms=hop_ms, batch_size=batch_size,
                                 scene_pooling=scene_pooling)
        self.model_sample_rate = int(self.embedder.sample_rate)
        rate = hear_sample_rate(self.model_sample_rate) if sample_rate is None else sample_rate
        if int(rate) not in HEAR_SAMPLE_RATES:
            raise ValueError(f"sample_rate={rate}: HEAR allows {list(HEAR_SAMPLE_RATES)}")
        self.sample_rate = int(rate)
        self.scene_embedding_size = int(self.embedder.embed_dim)
        self.timestamp_embedding_size = int(self.embedder.embed_dim)

    def sounds(self, audio) -> np.ndarray:
        """HEAR's ``[n_sounds, n_samples]`` audio (tf.Tensor or array) as float32 numpy at
        the model's rate."""
        if isinstance(audio, tf.Tensor):
            audio = audio.numpy()
        elif hasattr(audio, "detach"):  # a torch tensor
            audio = audio.detach().cpu().numpy()
        x = np.asarray(audio, np.float32)
        if x.ndim != 2:
            raise ValueError(f"audio must be [n_sounds, n_samples], got shape {x.shape}")
        if x.shape[1] == 0:
            raise ValueError("audio holds no samples (n_samples = 0)")
        if self.sample_rate != self.model_sample_rate and x.shape[0]:
            from src.data.audio import resample

            x = resample(np.ascontiguousarray(x.T), self.sample_rate,
                         self.model_sample_rate).T
        return np.ascontiguousarray(x, np.float32)


def load_model(model_file_path: str = "", **kwargs) -> HearModel:
    """Load a model for HEAR: ``model_file_path`` is a ``.keras`` file, a fold or run
    directory, or a bare backbone beside its run's ``config.yaml`` (see
    :func:`src.embeddings.load_embedding_model`). Keyword arguments go to
    :class:`HearModel` (``hop_ms``, ``batch_size``, ``sample_rate``, ``scene_pooling``;
    hear-eval-kit passes them with ``--model-options '{"scene_pooling": "model"}'``)."""
    if not model_file_path:
        raise ValueError(
            "src.hear has no default model: pass --model PATH (a .keras model saved by "
            "python -m src.train or scripts.import_weights, or a run directory)."
        )
    model, _ = load_embedding_model(model_file_path)
    return HearModel(model, **kwargs)


def _check_model(model) -> HearModel:
    if not isinstance(model, HearModel):
        raise TypeError(f"model must come from src.hear.load_model, got {type(model).__name__}")
    return model


def get_scene_embeddings(audio, model: HearModel) -> tf.Tensor:
    """``[n_sounds, n_samples]`` audio -> ``[n_sounds, scene_embedding_size]`` float32."""
    model = _check_model(model)
    x = model.sounds(audio)
    results = model.embedder.embed_arrays(list(x), timestamps=False)
    if not results:
        return tf.zeros((0, model.scene_embedding_size), tf.float32)
    return tf.convert_to_tensor(np.stack([r.scene for r in results]).astype(np.float32))


def get_timestamp_embeddings(audio, model: HearModel) -> tuple[tf.Tensor, tf.Tensor]:
    """``[n_sounds, n_samples]`` audio -> (``[n_sounds, T, timestamp_embedding_size]``
    float32 embeddings, ``[n_sounds, T]`` float32 timestamps in ms: ``0, hop, 2 hop, ...``
    up to the end of the audio, hop 50 ms)."""
    model = _check_model(model)
    x = model.sounds(audio)
    dim = model.timestamp_embedding_size
    if x.shape[0] == 0:  # nothing to embed (and nothing was resampled)
        duration_ms = x.shape[1] * 1000.0 / model.sample_rate
        steps = int(np.floor(duration_ms / model.embedder.hop_ms + 1e-9)) + 1
        return tf.zeros((0, steps, dim), tf.float32), tf.zeros((0, steps), tf.float32)
    results = model.embedder.embed_arrays(list(x), timestamps=True)
    steps = min(len(r.timestamps_ms) for r in results)  # equal for sounds of equal length
    emb = np.stack([r.embeddings[:steps] for r in results]).astype(np.float32)
    times = np.stack([r.timestamps_ms[:steps] for r in results]).astype(np.float32)
    return tf.convert_to_tensor(emb), tf.convert_to_tensor(times)
