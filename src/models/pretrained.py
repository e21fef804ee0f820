"""Start a model from pretrained weights: copy them into a freshly built backbone.

The source is a ``.keras`` file holding an ``AudioTransformer`` (e.g. an imported
AudioSet AST, or any run's ``model.keras``) or a bare ``SpectrogramTransformer``
(e.g. an imported ImageNet DeiT). Everything whose shape is independent of the
input size is copied as is; the rest is adapted:

* position embedding: the pretrained patch grid (f, t) is mapped to the new one
  per axis, as AST does: cut from the middle when the new axis is shorter,
  linear interpolation (``torch.nn.functional.interpolate(mode="bilinear")``,
  half-pixel centres) when it is longer; ``adapt="bilinear"`` interpolates in
  both cases. Between the two kinds (``model.pos_embedding``):

  - grid -> disentangled (as PaSST from DeiT): the grid is adapted as above, then
    averaged over time for the frequency embedding and over frequency for the
    time embedding;
  - disentangled -> disentangled: each 1-D embedding is resized on its own (the
    time embedding cut to its first positions, as the model reads a shorter
    clip; the frequency embedding cut from the middle; interpolated when longer
    or with ``adapt="bilinear"``);
  - disentangled -> grid: frequency + time broadcast to a grid, then adapted as
    a grid;
* prefix tokens: [CLS] always; the distillation token when the new model has one;
* classifier head (LayerNorm + Dense): copied when the number of classes (and
  the head's layout) match, otherwise left freshly initialised, as AST does
  (a new task gets a new head).

Architecture keys that change weight shapes or meaning (width, depth, heads,
MLP, patch size, block type) must match; the error names the config key.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ADAPT_METHODS = ("auto", "bilinear")
# Keys that must agree between the pretrained file and the model (config key -> hparam).
MUST_MATCH = (
    "embed_dim", "num_layers", "num_heads", "ff_dim", "patch_size", "norm_first",
    "activation", "qkv_bias",
)


# Named checkpoints the AST recipes start from: name -> (import format, hub id).
# ``model.pretrained=NAME`` imports it into ``paths.weights_dir/NAME.keras`` on first use.
KNOWN = {
    # AST-P: AudioSet-trained AST (10-10 strides, 1024 frames, 527 classes).
    "ast_audioset": ("hf-ast", "MIT/ast-finetuned-audioset-10-10-0.4593"),
    # AST-S: ImageNet DeiT-base distilled, 384x384 images (24x24 patch grid).
    "deit_base_distilled_384": ("hf-deit", "facebook/deit-base-distilled-patch16-384"),
}


class PretrainedError(ValueError):
    """A pretrained file that cannot be loaded into the configured model."""


def resolve_pretrained(value, weights_dir="weights", cache_dir=".cache/hub") -> Path:
    """The ``.keras`` file for ``model.pretrained``: a path, or a name from :data:`KNOWN`
    (imported, downloading the checkpoint, the first time it is asked for)."""
    value = str(value)
    if value in KNOWN:
        path = Path(weights_dir) / f"{value}.keras"
        if not path.is_file():
            from src.models.hf_import import import_weights

            fmt, hub_id = KNOWN[value]
            log.info("model.pretrained=%s: importing %s (%s) into %s", value, hub_id, fmt, path)
            model = import_weights(fmt, hub_id, cache_dir=cache_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp.keras")
            model.save(tmp)
            os.replace(tmp, path)
        return path
    path = Path(value).expanduser()
    if path.is_dir() and (path / "backbone.keras").is_file():  # a pretraining run
        return path / "backbone.keras"
    if path.is_dir():
        raise PretrainedError(
            f"model.pretrained={value} is a directory without backbone.keras: give the "
            "file itself, e.g. a pretraining run's backbone.keras or a fold's model.keras."
        )
    if not path.is_file():
        raise PretrainedError(
            f"model.pretrained={value}: no such file. Use a name from {sorted(KNOWN)} "
            "(imported on first use), a file made by `python -m scripts.import_weights`, "
            "or a run's model.keras."
        )
    return path


def resize_axis(x: np.ndarray, axis: int, size: int, method: str = "auto") -> np.ndarray:
    """Cut (middle) or linearly interpolate ``x`` along ``axis`` to ``size`` entries.

    Cutting keeps ``[n // 2 - size // 2, n // 2 - size // 2 + size)`` (AST's slice).
    Interpolation samples at ``(i + 0.5) * n / size - 0.5`` (clamped at 0), as
    PyTorch's bilinear interpolation with ``align_corners=False``.
    """
    if method not in ADAPT_METHODS:
        raise ValueError(f"model.pretrained_adapt must be one of {ADAPT_METHODS}, got {method!r}.")
    n = x.shape[axis]
    if size == n:
        return x
    if size < n and method == "auto":
        start = n // 2 - size // 2
        return np.take(x, np.arange(start, start + size), axis=axis)
    src = (np.arange(size, dtype=np.float64) + 0.5) * (n / size) - 0.5
    src = np.maximum(src, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    frac = src - lo
    shape = [1] * x.ndim
    shape[axis] = size
    frac = frac.reshape(shape)
    x64 = x.astype(np.float64)
    out = np.take(x64, lo, axis=axis) * (1.0 - frac) + np.take(x64, hi, axis=axis) * frac
    return out.astype(x.dtype)


def adapt_position_embedding(
    pos: np.ndarray,
    src_grid: tuple[int, int],
    dst_grid: tuple[int, int],
    src_prefix: int,
    dst_prefix: int,
    method: str = "auto",
) -> np.ndarray:
    """``(1, src_prefix + f*t, D)`` -> ``(1, dst_prefix + f'*t', D)``; the grid is
    frequency-major (row = frequency), as the patch embedding orders patches."""
    (sf, st), (df, dt) = src_grid, dst_grid
    if pos.shape[1] != src_prefix + sf * st:
        raise PretrainedError(
            f"position embedding has {pos.shape[1]} rows, expected {src_prefix} + {sf}x{st}."
        )
    if dst_prefix > src_prefix:
        raise PretrainedError(
            "the model has a distillation token (model.pooling=cls_dist) but the pretrained "
            "weights have none; use model.pooling=cls or mean."
        )
    dim = pos.shape[-1]
    prefix = pos[:, :dst_prefix]
    grid = pos[:, src_prefix:].reshape(1, sf, st, dim)
    grid = resize_axis(grid, 2, dt, method)  # time first, as AST (the order does not matter)
    grid = resize_axis(grid, 1, df, method)
    return np.concatenate([prefix, grid.reshape(1, df * dt, dim)], axis=1)


def _mean_over(x: np.ndarray, axis: int) -> np.ndarray:
    return x.astype(np.float64).mean(axis=axis).astype(x.dtype)


def grid_to_disentangled(
    pos: np.ndarray,
    src_grid: tuple[int, int],
    dst_grid: tuple[int, int],
    src_prefix: int,
    dst_prefix: int,
    method: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A grid embedding ``(1, src_prefix + f*t, D)`` -> ``(prefix (1, dst_prefix, D),
    freq (f', D), time (t', D))``: the grid adapted to ``dst_grid``
    (:func:`adapt_position_embedding`), then averaged over time (frequency embedding)
    and over frequency (time embedding), as PaSST starts from DeiT."""
    adapted = adapt_position_embedding(pos, src_grid, dst_grid, src_prefix, dst_prefix, method)
    df, dt = dst_grid
    grid = adapted[0, dst_prefix:].reshape(df, dt, adapted.shape[-1])  # (f', t', D)
    return adapted[:, :dst_prefix], _mean_over(grid, 1), _mean_over(grid, 0)


def disentangled_to_grid(
    prefix: np.ndarray,
    freq: np.ndarray,
    time: np.ndarray,
    dst_grid: tuple[int, int],
    dst_prefix: int,
    method: str = "auto",
) -> np.ndarray:
    """``prefix (1, p, D)``, ``freq (f, D)``, ``time (t, D)`` -> a grid embedding
    ``(1, dst_prefix + f'*t', D)``: ``freq[i] + time[j]`` at grid cell (i, j) (what the
    disentangled model adds there), then adapted as a grid."""
    f, t, dim = freq.shape[0], time.shape[0], freq.shape[-1]
    grid = (freq[:, None, :] + time[None, :, :]).reshape(1, f * t, dim)
    pos = np.concatenate([prefix, grid.astype(prefix.dtype)], axis=1)
    return adapt_position_embedding(pos, (f, t), dst_grid, prefix.shape[1], dst_prefix, method)


def resize_disentangled(
    prefix: np.ndarray,
    freq: np.ndarray,
    time: np.ndarray,
    dst_grid: tuple[int, int],
    dst_prefix: int,
    method: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disentangled -> disentangled: each 1-D embedding resized on its own. With
    ``"auto"`` a shorter time axis keeps its first positions (what the pretrained
    model itself uses for a shorter clip) and a shorter frequency axis is cut from
    the middle (:func:`resize_axis`); a longer axis, or ``"bilinear"``, is
    interpolated."""
    if dst_prefix > prefix.shape[1]:
        raise PretrainedError(
            "the model has a distillation token (model.pooling=cls_dist) but the pretrained "
            "weights have none; use model.pooling=cls or mean."
        )
    df, dt = dst_grid
    if method == "auto" and dt < time.shape[0]:
        time = time[:dt]
    else:
        time = resize_axis(time, 0, dt, method)
    return prefix[:, :dst_prefix], resize_axis(freq, 0, df, method), time


def adapt_patch_positions(dst, src, method: str = "auto") -> tuple[dict, list]:
    """The position weights of the built ``PatchEmbedding`` ``dst`` from those of ``src``,
    whichever kind each has: ``({weight name: array}, notes)``."""
    src_grid, dst_grid = (src.f_dim, src.t_dim), (dst.f_dim, dst.t_dim)
    sp, dp = src.num_prefix_tokens, dst.num_prefix_tokens
    notes = []
    if src.pos_embedding == "grid":
        pos = src.position_embedding.numpy()
        if dst.pos_embedding == "grid":
            return {"position_embedding": adapt_position_embedding(
                pos, src_grid, dst_grid, sp, dp, method)}, notes
        prefix, freq, time = grid_to_disentangled(pos, src_grid, dst_grid, sp, dp, method)
        notes.append("grid position embedding split into frequency and time embeddings "
                     "(means over time / frequency)")
    else:
        parts = (src.prefix_embedding.numpy(), src.freq_embedding.numpy(),
                 src.time_embedding.numpy())
        if dst.pos_embedding == "grid":
            notes.append("frequency and time embeddings summed into a grid position embedding")
            return {"position_embedding": disentangled_to_grid(
                *parts, dst_grid, dp, method)}, notes
        prefix, freq, time = resize_disentangled(*parts, dst_grid, dp, method)
    return {"prefix_embedding": prefix, "freq_embedding": freq, "time_embedding": time}, notes


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did, for the log and results.json."""

    source: str
    copied: int = 0
    position_grid: tuple = ()
    new_head: bool = False
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)  # things that may hurt the run

    def summary(self) -> str:
        (sf, st), (df, dt) = self.position_grid
        grid = f"position grid {sf}x{st} -> {df}x{dt}" if (sf, st) != (df, dt) else "same grid"
        head = "new classifier head" if self.new_head else "classifier copied"
        return f"{self.source}: {self.copied} tensors copied, {grid}, {head}"


@functools.lru_cache(maxsize=2)
def _load(path: str, mtime: float):
    import zipfile

    from src.models import load_model

    if not zipfile.is_zipfile(path):
        raise PretrainedError(
            f"model.pretrained={path} is not a Keras model file (a .keras file is a zip "
            "archive): use a file made by `python -m scripts.import_weights`, a run's "
            "model.keras or a pretraining run's backbone.keras."
        )
    return load_model(path)


def source_model(model_or_path):
    """``(backbone, frontend or None)`` of a ``.keras`` file (or a loaded model): the
    ``SpectrogramTransformer`` and, for an ``AudioTransformer``, its frontend. Files are
    loaded once per process (every fold starts from the same weights)."""
    from src.models.audio_transformer import AudioTransformer, SpectrogramTransformer

    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        path = resolve_pretrained(model_or_path)
        model = _load(str(path.resolve()), path.stat().st_mtime)
    frontend = None
    if isinstance(model, AudioTransformer):
        model, frontend = model.backbone, model.frontend
    if not isinstance(model, SpectrogramTransformer):
        raise PretrainedError(
            f"model.pretrained={model_or_path}: holds a {type(model).__name__}, not a "
            "transformer (AudioTransformer or SpectrogramTransformer)."
        )
    return model, frontend


def load_pretrained(backbone, source, adapt: str = "auto", frontend=None) -> LoadReport:
    """Copy the weights of ``source`` (path or model) into the built ``backbone``.
    With ``frontend`` (the run's), a warning says when the pretrained model had another."""
    src, theirs = source_model(source)
    name = str(source) if isinstance(source, (str, os.PathLike)) else src.name
    sh, dh = src.hparams, backbone.hparams
    mismatched = [k for k in MUST_MATCH if sh.get(k) != dh.get(k)]
    if mismatched:
        details = ", ".join(f"model.{k}={dh.get(k)!r} (pretrained: {sh.get(k)!r})" for k in mismatched)
        overrides = " ".join(f"model.{k}={sh.get(k)}" for k in mismatched)
        base = (sh.get("embed_dim"), sh.get("num_layers")) == (768, 12)
        raise PretrainedError(
            f"model.pretrained={name} does not fit the configured model: {details}. Set these "
            f"keys to the pretrained values: {overrides}"
            + (" (for AST/DeiT base: model=ast_base384)." if base else ".")
        )
    report = LoadReport(source=name)
    if theirs is not None and frontend is not None and (
        type(theirs).__name__ != type(frontend).__name__ or theirs.n_mels != frontend.n_mels
    ):
        report.warnings.append(
            f"the pretrained model used a {type(theirs).__name__} frontend with "
            f"{theirs.n_mels} bins; this run uses {type(frontend).__name__} with "
            f"{frontend.n_mels} (frontend=kaldi_fbank matches AST's features)"
        )

    def copy(dst_layer, src_layer):
        values = src_layer.get_weights()
        shapes = [tuple(w.shape) for w in dst_layer.weights]
        if [v.shape for v in values] != shapes:
            raise PretrainedError(
                f"model.pretrained={name}: {dst_layer.name} has shapes {shapes}, the pretrained "
                f"layer {[v.shape for v in values]}."
            )
        dst_layer.set_weights(values)
        report.copied += len(values)

    # Patch embedding: projection, tokens, position embedding.
    dpe, spe = backbone.patch_embed, src.patch_embed
    copy(dpe.projection, spe.projection)
    dpe.cls_token.assign(spe.cls_token.numpy())
    report.copied += 1
    if dpe.distillation_token:
        if not spe.distillation_token:
            raise PretrainedError(
                f"model.pooling=cls_dist needs a distillation token; {name} has none. "
                "Use model.pooling=cls or mean."
            )
        dpe.dist_token.assign(spe.dist_token.numpy())
        report.copied += 1
    elif spe.distillation_token:
        report.notes.append("distillation token dropped (model.pooling is not cls_dist)")
    positions, notes = adapt_patch_positions(dpe, spe, adapt)
    for weight, value in positions.items():
        getattr(dpe, weight).assign(value)
        report.copied += 1
    report.notes.extend(notes)
    report.position_grid = ((spe.f_dim, spe.t_dim), (dpe.f_dim, dpe.t_dim))

    for dst_block, src_block in zip(backbone.blocks, src.blocks):
        qkv = src_block.att.get_qkv()
        dst_block.att.set_qkv(qkv)  # either q/k/v layout
        report.copied += sum(len(v) for v in qkv.values())
        for name in ("combine_heads",):
            copy(getattr(dst_block.att, name), getattr(src_block.att, name))
        copy(dst_block.ffn, src_block.ffn)
        copy(dst_block.layernorm1, src_block.layernorm1)
        copy(dst_block.layernorm2, src_block.layernorm2)
    if backbone.final_norm is not None:
        copy(backbone.final_norm, src.final_norm)

    same_head = (
        sh["num_classes"] == dh["num_classes"]
        and (src.head_norm is None) == (backbone.head_norm is None)
    )
    if same_head:
        if backbone.head_norm is not None:
            copy(backbone.head_norm, src.head_norm)
        copy(backbone.classifier, src.classifier)
    else:
        # As AST: a new task gets a new head (LayerNorm + Dense), freshly initialised.
        report.new_head = True
        report.notes.append(
            f"classifier head re-initialised ({sh['num_classes']} -> {dh['num_classes']} classes)"
        )
    return report
