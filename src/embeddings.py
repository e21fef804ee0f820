"""Embeddings of audio from any of the project's transformer models.

One implementation behind ``python -m scripts.embed`` (folders of audio files) and the
HEAR 2021 API (:mod:`src.hear`: arrays of samples). The model is a waveform model
(``AudioTransformer``: what ``python -m src.train`` saves as ``model.keras``, what
``scripts.import_weights --from hf-ast`` writes), or a bare ``SpectrogramTransformer``
backbone (self-supervised pretraining, ``--from hf-deit``) together with the run's
``config.yaml``, from which its frontend is rebuilt (:func:`load_embedding_model`).

Audio is decoded, resampled and cut into windows exactly as ``src.predict`` does: the
same streaming reader (any length in bounded memory), windows of the model's clip length
every half window, the last one ending at the end of the audio, a sound shorter than one
window given as one window (zero-padded for a model with a fixed position grid, as it is
for one that pads its features or takes any length). Each window goes through the model's
own preprocessing and frontend (:meth:`AudioTransformer.features`) and
:meth:`SpectrogramTransformer.encode` (the last block's tokens, after the final norm of
a pre-norm model). The [CLS]/[DIST] tokens are dropped; the patch tokens are laid out on
the patch grid ``(f_dim, t_dim)`` and averaged over the frequency rows, giving one
vector per patch column (``embed_dim`` values).

Definitions.

* Scene embedding (one per sound, ``embed_dim``): the mean of the patch tokens of each
  window, averaged over the sound's windows weighted by coverage (the fraction of the
  window that holds audio, :mod:`src.data.windows`; 1 for every window of a sound at least
  one window long). Patch columns whose centre frame lies past the audio (the padding of
  a sound shorter than a window, or the feature padding of a model with
  ``target_frames``: AST pads 998 frames to 1024) are left out. Mean pooling rather than
  the [CLS] token: a [CLS] token only learns to summarise the clip when the model is
  trained through it; no loss of a self-supervised model (SSAST: masked patches) reads it,
  and SSAST fine-tunes on mean-pooled patch tokens. The same definition for every model
  keeps embeddings of different models comparable. Measured on generated data (see
  ``SCENE_POOLINGS``): mean pooling is the better probe of an untrained [CLS]; a
  supervised model's own pooled vector is the better probe of the classes it was trained
  on, available with ``scene_pooling="model"``.
* Timestamp embeddings (one per time step, ``embed_dim``): the patch columns of every
  window, each placed at its centre time (the centre of the frames it spans, from the
  frontend's window and hop), stitched over the whole sound without duplicates (where two
  windows overlap, a time is taken from the window whose centre is nearer: the boundary
  is the middle of the overlap, where each column has the most context), then
  resampled to the regular grid
  ``0, hop_ms, 2 hop_ms, ...`` up to the end of the sound by linear interpolation in time
  between neighbouring columns (the first / last column's vector before the first /
  after the last column centre). The grid has ``floor(duration_ms / hop_ms) + 1`` steps;
  ``hop_ms`` is at most 50 ms (HEAR's tolerance for onsets), default 50.

A patch column of an AST-style model spans ``patch_size`` frames every ``t_stride``
frames (100 ms at a 10 ms frame hop and stride 10, 160 ms at stride 16), so the 50 ms
grid is finer than the model's own time resolution: neighbouring steps interpolate
between the same two columns.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_HOP_MS",
    "MAX_HOP_MS",
    "SCENE_POOLINGS",
    "EmbeddingModelError",
    "Embedder",
    "SoundEmbedding",
    "load_embedding_model",
]

DEFAULT_HOP_MS = 50.0
MAX_HOP_MS = 50.0
# Scene pooling: "mean" (the definition above) or "model" (the vector the model's head
# reads). Linear probes on the generated 12-class set (480 clips of 2 s, folds 1-3 ->
# 4-5; embed_dim 64, 2 blocks, [CLS] pooling), test accuracy mean / [CLS]: untrained
# weights (a model never trained through its [CLS]) .54 / .49 and .59 / .52 (two seeds);
# trained on these classes through [CLS] (val. accuracy .83, .79) .84 / .87 and
# .76 / .84. So "model" is better for a supervised model on the sounds it was trained for,
# "mean" for a model whose [CLS] was not trained (self-supervised).
SCENE_POOLINGS = ("mean", "model")
CONFIG_FILE = "config.yaml"


class EmbeddingModelError(ValueError):
    """A model that cannot give embeddings (no transformer backbone, no frontend)."""


# --------------------------------------------------------------------------- model


def _find_config(model_path: Path, run_dir: Path | None) -> Path | None:
    """The ``config.yaml`` of the run a model file was saved in, if any."""
    candidates = [run_dir] if run_dir is not None else []
    candidates += [model_path.parent, model_path.parent.parent]
    for folder in candidates:
        if folder is not None and (folder / CONFIG_FILE).is_file():
            return folder / CONFIG_FILE
    return None


def _wrap_backbone(backbone, config_path: Path, model_path: Path):
    """A bare ``SpectrogramTransformer`` + the frontend described by a run's config."""
    from omegaconf import OmegaConf

    from src.models.audio_transformer import AudioTransformer
    from src.models.build import build_frontend

    cfg = OmegaConf.load(config_path)
    missing = [k for k in ("frontend", "data.sample_rate", "data.clip_seconds")
               if OmegaConf.select(cfg, k) is None]
    if missing:
        raise EmbeddingModelError(
            f"{config_path} does not describe the frontend of {model_path} (missing "
            f"{', '.join(missing)}); pass the config.yaml of the run that trained it."
        )
    frontend_cfg = OmegaConf.to_container(cfg.frontend, resolve=True)
    frontend_cfg["sample_rate"] = int(cfg.data.sample_rate)
    frontend = build_frontend(frontend_cfg)
    clip_samples = int(round(float(cfg.data.clip_seconds) * int(cfg.data.sample_rate)))
    target_frames = OmegaConf.select(cfg, "data.target_frames")
    target_frames = None if target_frames is None else int(target_frames)
    remove_mean = bool(OmegaConf.select(cfg, "data.remove_mean", default=True))
    hp = backbone.hparams
    frames = target_frames if target_frames is not None else frontend.num_frames(clip_samples)
    fits = frames == hp["num_frames"] or (
        hp.get("pos_embedding") == "disentangled" and frames <= hp["num_frames"]
    )
    if frontend.n_mels != hp["num_mels"] or not fits:
        raise EmbeddingModelError(
            f"the frontend of {config_path} gives {frames} frames x {frontend.n_mels} mel bins "
            f"per {clip_samples}-sample clip, but the backbone in {model_path} takes "
            f"{hp['num_frames']} x {hp['num_mels']}; pass the config.yaml of the run that "
            "trained this backbone."
        )
    model = AudioTransformer(
        frontend, backbone, clip_samples=clip_samples, target_frames=target_frames,
        remove_mean=remove_mean, name="audio_model", dtype="float32",
    )
    model.build((None, clip_samples))
    return model


def load_embedding_model(target: str | os.PathLike, config: str | os.PathLike | None = None):
    """The waveform model meant by ``target`` and where it came from: ``(model, path)``.

    ``target``: a ``.keras`` file, a fold directory or a run directory (as
    ``src.predict``). A waveform model (``AudioTransformer``) is used as it is. A bare
    ``SpectrogramTransformer`` backbone (no frontend) gets the frontend of a run's config:
    ``config`` (a ``config.yaml`` or the run directory holding one), else the
    ``config.yaml`` beside the model or in its run directory; without one it is an error
    that says so. Raises :class:`src.predict.ModelNotFoundError` when nothing is found and
    :class:`EmbeddingModelError` for a model that cannot give embeddings.
    """
    from src.models import load_model
    from src.models.audio_transformer import SpectrogramTransformer
    from src.predict import resolve_model

    resolved = resolve_model(target)
    model = load_model(resolved.path)
    if isinstance(model, SpectrogramTransformer):
        if config is not None:
            config_path = Path(config)
            if config_path.is_dir():
                config_path = config_path / CONFIG_FILE
            if not config_path.is_file():
                raise EmbeddingModelError(f"no run config at {config_path}")
        else:
            config_path = _find_config(resolved.path, resolved.run_dir)
        if config_path is None:
            raise EmbeddingModelError(
                f"{resolved.path} holds a bare SpectrogramTransformer backbone (features in, "
                "no frontend), and no config.yaml was found beside it to rebuild its "
                "frontend. Pass a waveform model (the AudioTransformer a training run saves "
                "as model.keras, or scripts.import_weights --from hf-ast), or give the "
                "config.yaml of the run that trained the backbone (--config RUN_DIR)."
            )
        model = _wrap_backbone(model, config_path, resolved.path)
    check_embedding_model(model, resolved.path)
    return model, resolved.path


def check_embedding_model(model, where="the model") -> None:
    """Raise :class:`EmbeddingModelError` unless ``model`` is a waveform model with a
    patch-token transformer backbone."""
    frontend = getattr(model, "frontend", None)
    backbone = getattr(model, "backbone", None)
    if frontend is None or not hasattr(frontend, "sample_rate") or not hasattr(
        model, "clip_samples"
    ):
        raise EmbeddingModelError(
            f"{where} holds a {type(model).__name__}, not a waveform model with a frontend; "
            "pass the AudioTransformer a training run saves as model.keras."
        )
    if not (hasattr(backbone, "encode") and hasattr(backbone, "patch_embed")):
        raise EmbeddingModelError(
            f"{where} has a {type(backbone).__name__} backbone, which has no patch tokens to "
            "embed; embeddings need a transformer backbone (model.type=transformer)."
        )


# --------------------------------------------------------------------------- geometry


def _frame_centre(frontend, frame) -> np.ndarray:
    """Centre (in samples from the window's start) of frontend frame(s) ``frame``: LogMel
    with ``center`` frames are centred on ``k * hop``; Kaldi without ``snip_edges`` on
    ``k * hop + hop // 2``; otherwise frame ``k`` covers ``[k * hop, k * hop + win)``."""
    hop, win = frontend.hop_samples, frontend.win_samples
    frame = np.asarray(frame, np.float64)
    if getattr(frontend, "center", False):
        return frame * hop
    if getattr(frontend, "snip_edges", True) is False:
        return frame * hop + hop // 2
    return frame * hop + win / 2.0


@dataclass
class SoundEmbedding:
    """What one sound (a file or an array) gives.

    ``scene``: ``(D,)``. ``timestamps_ms`` ``(T,)`` and ``embeddings`` ``(T, D)`` with
    timestamps, else None. ``column_times_ms``: the centres of the stitched patch columns
    (before resampling to the grid; with timestamps). ``error``: why the sound could not be
    embedded (then the arrays are None).
    """

    key: str
    scene: np.ndarray | None = None
    timestamps_ms: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    column_times_ms: np.ndarray | None = None
    duration_s: float | None = None
    windows: int = 0
    error: str | None = None


class _Grid:
    """Linear interpolation of points ``(time, vector)`` arriving in increasing time onto
    the grid ``0, step, 2 step, ...`` (constant before the first and after the last point),
    emitted as soon as the points around each grid time are known."""

    def __init__(self, step_ms: float):
        self.step = float(step_ms)
        self.next = 0  # index of the next grid time to emit
        self.prev_t: float | None = None
        self.prev_v: np.ndarray | None = None
        self.out: list[np.ndarray] = []

    def _emit_until(self, t_end: float) -> np.ndarray:
        """The grid times not emitted yet that lie before ``t_end``."""
        stop = math.ceil(t_end / self.step)
        idx = np.arange(self.next, max(stop, self.next))
        self.next = max(stop, self.next)
        return idx * self.step

    def add(self, times: np.ndarray, vectors: np.ndarray) -> None:
        if len(times) == 0:
            return
        if self.prev_t is None:
            before = self._emit_until(float(times[0]))
            if len(before):
                self.out.append(np.repeat(vectors[:1], len(before), axis=0))
            self.prev_t, self.prev_v = float(times[0]), vectors[0]
            times, vectors = times[1:], vectors[1:]
            if len(times) == 0:
                return
        t = np.concatenate([[self.prev_t], times])
        v = np.concatenate([self.prev_v[None], vectors])
        grid = self._emit_until(float(t[-1]))
        if len(grid):
            j = np.clip(np.searchsorted(t, grid, side="right"), 1, len(t) - 1)
            span = t[j] - t[j - 1]
            a = np.where(span > 0, (grid - t[j - 1]) / np.where(span > 0, span, 1.0), 1.0)
            a = np.clip(a, 0.0, 1.0)[:, None].astype(np.float32)
            self.out.append((1.0 - a) * v[j - 1] + a * v[j])
        self.prev_t, self.prev_v = float(t[-1]), v[-1]

    def finish(self, duration_ms: float, dim: int) -> tuple[np.ndarray, np.ndarray]:
        count = math.floor(duration_ms / self.step + 1e-9) + 1
        if self.next < count and self.prev_v is not None:
            self.out.append(np.repeat(self.prev_v[None], count - self.next, axis=0))
            self.next = count
        emb = np.concatenate(self.out, axis=0) if self.out else np.zeros((0, dim), np.float32)
        emb = np.ascontiguousarray(emb[:count], dtype=np.float32)
        times = (np.arange(len(emb)) * self.step).astype(np.float32)
        return times, emb


class _Sound:
    """Accumulates one sound's windows (in order) into its scene and timestamp embeddings."""

    def __init__(self, embedder: Embedder, key: str, timestamps: bool):
        self.e = embedder
        self.result = SoundEmbedding(key=key)
        self.timestamps = timestamps
        self.scene_sum: np.ndarray | None = None
        self.weight = 0.0
        self.length = 0  # samples
        self.queued = 0  # windows waiting in the batch queue
        self.closed = False  # every window has been queued
        self.pending: tuple[int, np.ndarray, np.ndarray] | None = None
        self.lower = -math.inf  # stitched columns so far end before this time (samples)
        self.grid = _Grid(embedder.hop_ms) if timestamps else None
        self.column_times: list[np.ndarray] = []

    def add(self, start: int, length: int, columns: np.ndarray, pooled: np.ndarray) -> None:
        """A window starting at ``start`` holding ``length`` samples of audio, its patch
        columns ``(t, D)`` that hold audio and the model's own pooled vector ``(D,)``."""
        window = self.e.window
        weight = min(length, window) / window
        if self.e.scene_pooling == "mean":
            mean = columns.mean(axis=0, dtype=np.float64)
        else:
            mean = pooled.astype(np.float64)
        self.scene_sum = weight * mean if self.scene_sum is None else self.scene_sum + weight * mean
        self.weight += weight
        self.length = max(self.length, start + min(length, window))
        self.result.windows += 1
        if not self.timestamps:
            return
        times = start + self.e.column_offsets[: len(columns)]
        if self.pending is not None:
            p_start = self.pending[0]
            # The middle of the overlap [start, p_start + window] of the two windows.
            self._stitch(upper=(start + p_start + window) / 2.0)
        self.pending = (start, times, columns)

    def _stitch(self, upper: float) -> None:
        _, times, columns = self.pending
        keep = (times >= self.lower) & (times < upper)
        self.lower = upper
        if keep.any():
            t_ms = times[keep] * (1000.0 / self.e.sample_rate)
            self.column_times.append(t_ms)
            self.grid.add(t_ms, columns[keep])
        self.pending = None

    def finish(self) -> SoundEmbedding:
        r = self.result
        if r.error is not None:
            return r
        if self.weight == 0:
            r.error = f"{r.key}: the sound holds no audio samples"
            return r
        rate = self.e.sample_rate
        r.duration_s = self.length / rate
        r.scene = (self.scene_sum / self.weight).astype(np.float32)
        if self.timestamps:
            if self.pending is not None:
                self._stitch(upper=math.inf)
            r.column_times_ms = (
                np.concatenate(self.column_times).astype(np.float64)
                if self.column_times else np.zeros(0)
            )
            r.timestamps_ms, r.embeddings = self.grid.finish(
                self.length * 1000.0 / rate, self.e.embed_dim
            )
        return r


class Embedder:
    """Scene and timestamp embeddings of sounds from a waveform model (see the module's
    docstring for the definitions).

    ``hop_ms``: the timestamp grid's step (0 < hop_ms <= 50). ``batch_size``: windows per
    model call (windows of consecutive sounds share batches). ``scene_pooling``: "mean"
    (the definition above) or "model": per window the vector the model's head reads (its
    ``pooling``: the [CLS] token, [CLS] + [DIST] averaged, or the mean of all patch
    tokens), averaged over windows the same way; for a supervised model used on its own
    kind of sounds (see ``SCENE_POOLINGS``).
    """

    def __init__(self, model, *, hop_ms: float = DEFAULT_HOP_MS, batch_size: int = 32,
                 scene_pooling: str = "mean"):
        import tensorflow as tf

        from src.predict import takes_short_input, window_samples

        check_embedding_model(model)
        hop_ms = float(hop_ms)
        if not (0.0 < hop_ms <= MAX_HOP_MS) or not math.isfinite(hop_ms):
            raise ValueError(
                f"hop_ms={hop_ms:g}: the timestamp grid's step must be > 0 and at most "
                f"{MAX_HOP_MS:g} ms (HEAR's tolerance for event onsets)."
            )
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if scene_pooling not in SCENE_POOLINGS:
            raise ValueError(
                f"scene_pooling={scene_pooling!r}: choose one of {list(SCENE_POOLINGS)}")
        self.scene_pooling = scene_pooling
        self.model = model
        self.backbone = model.backbone
        self.frontend = model.frontend
        self.hop_ms = hop_ms
        self.batch_size = int(batch_size)
        self.sample_rate = int(self.frontend.sample_rate)
        self.window, self.hop = window_samples(model)
        pe = self.backbone.patch_embed
        self.f_dim = int(pe.f_dim)
        self.prefix = int(pe.num_prefix_tokens)
        self.patch_size, self.t_stride = int(pe.patch_size), int(pe.t_stride)
        self.embed_dim = int(self.backbone.hparams["embed_dim"])
        self.takes_short = takes_short_input(model)
        # Centre of each patch column (samples from the window's start): the middle of the
        # patch_size frames it spans.
        max_columns = int(pe.t_dim)
        centres = np.arange(max_columns) * self.t_stride + (self.patch_size - 1) / 2.0
        self.column_offsets = _frame_centre(self.frontend, centres)
        # The fewest samples that give one patch's frames (a disentangled model refuses
        # fewer; a padded model gets them anyway).
        self.min_samples = int(self.frontend.win_samples
                               + (self.patch_size - 1) * self.frontend.hop_samples)
        self._columns = tf.function(self._columns_eager, reduce_retracing=True)

    # ------------------------------------------------------------------ the model

    def _columns_eager(self, waveform):
        """``(B, samples)`` -> patch columns ``(B, t, D)`` (tokens averaged over frequency)
        and the model's pooled vector ``(B, D)``."""
        from keras import ops

        features = self.model.features(waveform)  # (B, frames, n_mels)
        tokens, _ = self.backbone.encode(features, training=False)  # (B, prefix + f*t, D)
        pooled = ops.cast(self.backbone.pool(tokens), "float32")  # (B, D)
        patches = ops.cast(tokens[:, self.prefix:], "float32")
        grid = ops.reshape(patches, (ops.shape(patches)[0], self.f_dim, -1, self.embed_dim))
        return ops.mean(grid, axis=1), pooled  # (B, t, D), (B, D)

    def _prepare(self, piece: np.ndarray) -> np.ndarray:
        """A window's samples as the model takes them (see ``src.predict``): a short one
        padded to the model's clip unless the model takes short input, and to at least one
        patch's frames in any case."""
        n = len(piece)
        if n >= self.window:
            return piece
        size = max(n, self.min_samples) if self.takes_short else self.window
        return np.pad(piece, (0, size - n)) if size > n else piece

    def _valid_columns(self, length: int, available: int) -> int:
        """How many of a window's ``available`` patch columns hold audio: those whose centre
        frame lies within the frames of its ``length`` samples (the others cover the
        padding of a short sound, or the feature padding of a model with
        ``target_frames``); at least one."""
        frames = int(self.frontend.num_frames(min(int(length), self.window)))
        count = math.ceil((frames - (self.patch_size - 1) / 2.0) / self.t_stride)
        return max(1, min(available, count))

    def columns(self, pieces: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Of each window's samples: its patch columns holding audio ``(t_i, D)`` and the
        model's pooled vector ``(D,)``, float32."""
        out: list = [None] * len(pieces)
        prepared = [self._prepare(np.asarray(p, np.float32)) for p in pieces]
        by_length: dict[int, list[int]] = {}
        for i, x in enumerate(prepared):
            by_length.setdefault(len(x), []).append(i)
        for idx in by_length.values():
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k: k + self.batch_size]
                x = np.stack([prepared[i] for i in chunk])
                cols, pooled = self._columns(x)
                cols, pooled = np.asarray(cols, np.float32), np.asarray(pooled, np.float32)
                for i, c, p in zip(chunk, cols, pooled):
                    out[i] = (c[: self._valid_columns(len(pieces[i]), c.shape[0])], p)
        return out

    # ------------------------------------------------------------------ sounds

    def embed(
        self, sounds: Iterable[tuple[str, Iterable[np.ndarray]]], *, timestamps: bool = False
    ) -> Iterator[SoundEmbedding]:
        """Embed sounds given as ``(key, blocks of samples at the model's rate)``, in order.

        Each sound's blocks are cut into windows as they arrive (bounded memory); windows of
        consecutive sounds share model batches. A sound whose blocks raise
        :class:`src.predict.AudioReadError` gives a result with its ``error`` and the others
        go on; any other exception propagates.
        """
        from src.predict import AudioReadError, stream_windows

        queue: list[tuple[_Sound, int, np.ndarray]] = []
        open_sounds: deque[_Sound] = deque()

        def flush() -> None:
            if not queue:
                return
            cols = self.columns([p for _, _, p in queue])
            for (sound, start, piece), (c, pooled) in zip(queue, cols):
                sound.queued -= 1
                if sound.result.error is None:
                    sound.add(start, len(piece), c, pooled)
            queue.clear()

        def finished() -> Iterator[SoundEmbedding]:
            while open_sounds and open_sounds[0].closed and open_sounds[0].queued == 0:
                yield open_sounds.popleft().finish()

        for key, blocks in sounds:
            sound = _Sound(self, str(key), timestamps)
            open_sounds.append(sound)
            try:
                for start, piece in stream_windows(blocks, self.window, self.hop):
                    queue.append((sound, start, piece))
                    sound.queued += 1
                    if len(queue) >= self.batch_size:
                        flush()
                        yield from finished()
            except AudioReadError as err:
                sound.result.error = str(err)
            sound.closed = True
            yield from finished()
        flush()
        yield from finished()

    def embed_arrays(self, arrays, *, timestamps: bool = False) -> list[SoundEmbedding]:
        """Embed in-memory sounds (each ``(samples,)`` at the model's rate)."""
        sounds = []
        for i, a in enumerate(arrays):
            a = np.asarray(a, np.float32).reshape(-1)
            if a.size == 0:
                raise ValueError(f"sound {i} holds no samples")
            if not np.isfinite(a).all():
                raise ValueError(f"sound {i} holds NaN or infinite samples")
            sounds.append((str(i), [a]))
        return list(self.embed(sounds, timestamps=timestamps))

    def embed_files(
        self, paths: Iterable[tuple[str, str | os.PathLike]], *, timestamps: bool = False
    ) -> Iterator[SoundEmbedding]:
        """Embed audio files ``(key, path)``, streamed as ``src.predict`` reads them: any
        format libsndfile reads, mono, resampled to the model's rate, in blocks. A file that
        cannot be read gives a result with its ``error``."""
        from src.predict import read_blocks

        # About one batch of windows per block read: the reader and the window buffer hold
        # a few blocks, whatever the file's length.
        block_s = max(self.window, self.batch_size * self.hop) / self.sample_rate

        def sounds():
            for key, path in paths:
                yield key, read_blocks(os.fspath(path), self.sample_rate, block_s)

        return self.embed(sounds(), timestamps=timestamps)


@dataclass
class EmbeddingTable:
    """Embeddings of many sounds as flat arrays (what ``scripts.embed`` writes).

    ``keys``: the sounds embedded, in order; ``scene`` ``(N, D)``. With timestamps, the
    ragged per-sound sequences are concatenated: sound ``i`` has rows
    ``offsets[i]:offsets[i + 1]`` of ``timestamps_ms`` and ``timestamp_embeddings``.
    ``errors``: ``{key: reason}`` of the sounds that could not be embedded.
    """

    keys: list[str] = field(default_factory=list)
    scene: list[np.ndarray] = field(default_factory=list)
    timestamps_ms: list[np.ndarray] = field(default_factory=list)
    timestamp_embeddings: list[np.ndarray] = field(default_factory=list)
    durations_s: list[float] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def add(self, result: SoundEmbedding) -> None:
        if result.error is not None:
            self.errors[result.key] = result.error
            return
        self.keys.append(result.key)
        self.scene.append(result.scene)
        self.durations_s.append(float(result.duration_s))
        if result.embeddings is not None:
            self.timestamps_ms.append(result.timestamps_ms)
            self.timestamp_embeddings.append(result.embeddings)

    def arrays(self, dim: int, timestamps: bool) -> dict[str, np.ndarray]:
        """The table as named arrays (``files``, ``scene``, ``duration_s``; with
        ``timestamps`` also ``timestamp_offsets``, ``timestamps_ms``,
        ``timestamp_embeddings``)."""
        out = {
            "files": np.array(self.keys, dtype=str),
            "scene": (np.stack(self.scene).astype(np.float32) if self.scene
                      else np.zeros((0, dim), np.float32)),
            "duration_s": np.array(self.durations_s, np.float64),
        }
        if timestamps:
            lengths = [len(t) for t in self.timestamps_ms]
            out["timestamp_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            out["timestamps_ms"] = (np.concatenate(self.timestamps_ms).astype(np.float32)
                                    if lengths else np.zeros(0, np.float32))
            out["timestamp_embeddings"] = (
                np.concatenate(self.timestamp_embeddings).astype(np.float32)
                if lengths else np.zeros((0, dim), np.float32)
            )
        return out
