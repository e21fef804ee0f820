"""Attention rollout (Abnar & Zuidema 2020) over the spectrogram, as pictures.

For each block the head-averaged attention ``A`` is mixed with the residual path,
``0.5 * A + 0.5 * I``, rows renormalised, and the blocks multiplied in order.
The [CLS] row of the product says how much each patch contributed to the
pooled token; the patch values are spread back over the (freq, time) pixels
each patch covers (overlapping patches are averaged) and drawn over the
log-mel spectrogram.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def rollout(weights: list[np.ndarray], residual: float = 0.5) -> np.ndarray:
    """``weights``: per block ``(B, H, N, N)`` -> rollout ``(B, N, N)``."""
    if not weights:
        raise ValueError("attention rollout needs the weights of at least one block")
    result = None
    for w in weights:
        a = np.asarray(w, dtype=np.float64).mean(axis=1)  # (B, N, N), heads fused
        n = a.shape[-1]
        a = residual * np.eye(n)[None] + (1.0 - residual) * a
        a = a / a.sum(axis=-1, keepdims=True)
        result = a if result is None else a @ result
    return result


def patch_relevance(
    roll: np.ndarray, f_dim: int, t_dim: int, num_prefix_tokens: int = 1
) -> np.ndarray:
    """[CLS] row of a rollout ``(B, N, N)`` -> patch grid ``(B, f_dim, t_dim)``."""
    cls = roll[:, 0, num_prefix_tokens:]
    if cls.shape[-1] != f_dim * t_dim:
        raise ValueError(f"{cls.shape[-1]} patch tokens do not form a {f_dim} x {t_dim} grid")
    return cls.reshape(-1, f_dim, t_dim)


def spread_patches(grid, n_mels, frames, patch, f_stride, t_stride) -> np.ndarray:
    """Patch grid ``(f_dim, t_dim)`` -> pixel map ``(n_mels, frames)``, overlaps averaged."""
    f_dim, t_dim = grid.shape
    total = np.zeros((n_mels, frames))
    count = np.zeros((n_mels, frames))
    for i in range(f_dim):
        for j in range(t_dim):
            fs, ts = i * f_stride, j * t_stride
            total[fs : fs + patch, ts : ts + patch] += grid[i, j]
            count[fs : fs + patch, ts : ts + patch] += 1
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def attention_maps(backbone, features, multi_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per clip relevance maps ``(B, n_mels, frames)`` and class probabilities ``(B, K)``
    (softmax, or sigmoid with ``multi_label``). ``frames`` is the features' own: a
    backbone with a disentangled position embedding also takes fewer frames than it was
    trained on, and its patch grid then has fewer columns."""
    import keras

    from src.models.patch import grid_size

    h = backbone.hparams
    frames = int(features.shape[1])
    logits, weights = backbone(features, training=False, return_attention_scores=True)
    act = keras.ops.sigmoid(logits) if multi_label else keras.ops.softmax(logits, axis=-1)
    probs = keras.ops.convert_to_numpy(act)
    roll = rollout([keras.ops.convert_to_numpy(w) for w in weights])
    f_dim, t_dim = grid_size(h["num_mels"], frames, h["patch_size"], h["f_stride"], h["t_stride"])
    grids = patch_relevance(roll, f_dim, t_dim, backbone.patch_embed.num_prefix_tokens)
    maps = np.stack([
        spread_patches(g, h["num_mels"], frames, h["patch_size"], h["f_stride"], h["t_stride"])
        for g in grids
    ])
    return maps, probs


def plot_map(spectrogram, relevance, path, title: str, frame_rate: float | None = None):
    """Log-mel ``(frames, n_mels)`` with the relevance ``(n_mels, frames)`` over it, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = np.asarray(spectrogram).T  # (n_mels, frames): frequency up
    frames = spec.shape[1]
    extent = [0, frames / frame_rate if frame_rate else frames, 0, spec.shape[0]]
    fig, axes = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, constrained_layout=True)
    axes[0].imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=extent)
    axes[0].set_ylabel("mel bin")
    axes[0].set_title(title)
    axes[1].imshow(spec, origin="lower", aspect="auto", cmap="gray", extent=extent)
    rel = np.asarray(relevance)
    rel = (rel - rel.min()) / (np.ptp(rel) + 1e-12)
    im = axes[1].imshow(rel, origin="lower", aspect="auto", cmap="jet", alpha=0.45, extent=extent)
    axes[1].set_ylabel("mel bin")
    axes[1].set_xlabel("time (s)" if frame_rate else "frame")
    fig.colorbar(im, ax=axes[1], label="attention rollout (normalised)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_attention_maps(
    backbone, features, labels, class_names, out_dir, *, frame_rate=None, prefix="clip",
    multi_label: bool = False,
) -> list[Path]:
    """PNG per clip: true class (or classes: ``labels[i]`` may be a list, for
    multi-label clips), predicted class and its probability in the title."""
    maps, probs = attention_maps(backbone, features, multi_label=multi_label)
    paths = []
    for i in range(len(maps)):
        pred = int(probs[i].argmax())
        true = ""
        if labels is not None:
            own = np.atleast_1d(np.asarray(labels[i], dtype=np.int64))
            true = f"true: {', '.join(class_names[int(j)] for j in own) or 'none'} | "
        title = f"{true}predicted: {class_names[pred]} (p={probs[i, pred]:.2f})"
        name = f"{prefix}_{i:02d}_{class_names[pred]}.png".replace(os.sep, "_")
        paths.append(plot_map(features[i], maps[i], Path(out_dir) / name, title, frame_rate))
    return paths
