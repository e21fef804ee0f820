"""Build models from (Hydra) config dictionaries."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping

from src.models.audio_transformer import AudioTransformer, SpectrogramTransformer
from src.models.baseline import PooledStatsClassifier
from src.models.frontend import LogMel
from src.models.kaldi import KaldiFbank

log = logging.getLogger(__name__)

FRONTENDS = {"logmel": LogMel, "kaldi_fbank": KaldiFbank}
BACKBONES = {"transformer": SpectrogramTransformer, "linear": PooledStatsClassifier}

# Keys of the config groups that describe the run, not the layer
# (model.pretrained* are applied after building: src.models.pretrained).
_META_KEYS = {"name", "type", "pretrained", "pretrained_adapt"}
# Keys about patches (position embedding, patchout): a backbone without patches
# (model.type=linear) has no use for them, so an experiment that sets them (e.g.
# experiment=esc50_passt) still runs with any model.
_PATCH_KEYS = ("pos_embedding", "patchout")


def _kwargs(cls, cfg: Mapping, group: str) -> dict:
    params = inspect.signature(cls.__init__).parameters
    allowed = {k for k in params if k not in ("self", "kwargs")}
    out = {}
    for key, value in cfg.items():
        if key in _META_KEYS:
            continue
        if key not in allowed:
            raise ValueError(
                f"unknown config key {group}.{key} for {cls.__name__}; valid keys: "
                f"{sorted(allowed)}."
            )
        out[key] = value
    return out


def build_frontend(frontend_cfg: Mapping):
    kind = frontend_cfg.get("name", "logmel")
    if kind not in FRONTENDS:
        raise ValueError(f"unknown frontend.name={kind!r}; choose one of {sorted(FRONTENDS)}.")
    cls = FRONTENDS[kind]
    # Always float32, also under a mixed-precision policy: a waveform rounded to 8 or 11
    # mantissa bits loses the quiet parts of the spectrum, and training computes its
    # cached features in float32 (the backbone casts them to its compute dtype).
    return cls(**_kwargs(cls, frontend_cfg, "frontend"), name="frontend", dtype="float32")


def build_model(
    model_cfg: Mapping,
    frontend_cfg: Mapping,
    *,
    num_classes: int,
    clip_samples: int,
    augment_cfg: Mapping | None = None,
    norm_mean: float = 0.0,
    norm_std: float = 1.0,
    class_names=None,
    target_frames: int | None = None,
    multi_label: bool = False,
    remove_mean: bool = True,
) -> AudioTransformer:
    """Waveform model for clips of ``clip_samples`` samples, built and ready.

    ``target_frames``: zero-pad / crop the features to this many frames (AST: 512).
    ``multi_label``: sigmoid outputs (tagging); ``remove_mean``: the model subtracts each
    clip's mean (as the training features were computed).
    """
    frontend = build_frontend(frontend_cfg)
    num_frames = frontend.num_frames(clip_samples) if target_frames is None else int(target_frames)
    if num_frames <= 0:
        raise ValueError(
            f"clips of {clip_samples} samples are shorter than one frontend window; "
            f"raise data.clip_seconds."
        )
    kind = model_cfg.get("type", "transformer")
    if kind not in BACKBONES:
        raise ValueError(f"unknown model.type={kind!r}; choose one of {sorted(BACKBONES)}.")
    cls = BACKBONES[kind]
    model_cfg = dict(model_cfg)
    # model.stride is the one source of both strides (conf/model/small.yaml interpolates
    # f_stride and t_stride from it); a per-axis value given explicitly wins.
    stride = model_cfg.pop("stride", None)
    if stride is not None:
        model_cfg.setdefault("f_stride", int(stride))
        model_cfg.setdefault("t_stride", int(stride))
    params = inspect.signature(cls.__init__).parameters
    for key in _PATCH_KEYS:
        if key in model_cfg and key not in params:
            log.debug("model.%s does not apply to model.type=%s; ignored", key, kind)
            del model_cfg[key]
    kwargs = _kwargs(cls, model_cfg, "model")
    aug = dict(augment_cfg or {})
    for key in ("freq_mask_param", "time_mask_param", "freq_masks", "time_masks"):
        if key in aug:
            kwargs[key] = aug[key]
    backbone = cls(
        num_classes=num_classes,
        num_frames=num_frames,
        num_mels=frontend.n_mels,
        norm_mean=norm_mean,
        norm_std=norm_std,
        name="backbone",
        **kwargs,
    )
    model = AudioTransformer(
        frontend, backbone, clip_samples=clip_samples, class_names=class_names,
        target_frames=target_frames, multi_label=multi_label, remove_mean=remove_mean,
        name="audio_model", dtype="float32",  # no weights of its own; keeps the waveform in float32
    )
    model.build((None, clip_samples))
    return model
