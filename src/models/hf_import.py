"""Import Hugging Face AST and DeiT checkpoints into this project's Keras models.

A checkpoint is a directory with ``config.json`` and ``model.safetensors`` (the
layout ``save_pretrained`` writes and the hub serves), read with numpy and
safetensors only; a ``pytorch_model.bin`` (older checkpoints) is read without
PyTorch too (``src.models.torch_checkpoint``). A hub id (``owner/name``) is downloaded first, file by file,
from ``$HF_ENDPOINT`` (default https://huggingface.co; ``$HF_TOKEN`` is sent
when set) with the project's resumable downloader.

* ``hf-ast`` (``ASTForAudioClassification``, e.g.
  MIT/ast-finetuned-audioset-10-10-0.4593) -> an ``AudioTransformer``: Kaldi
  fbank frontend with the feature extractor's settings, zero-padding to
  ``max_length`` frames, (x - mean) / (2 std), pre-norm blocks, [CLS] +
  distillation pooling, LayerNorm + Dense head, class names from ``id2label``.
  It predicts as the original does (``python -m src.predict FILE.keras ...``).
* ``hf-deit`` (``DeiTForImageClassificationWithTeacher`` / ``DeiTModel``, e.g.
  facebook/deit-base-distilled-patch16-384) -> a ``SpectrogramTransformer`` over
  a one-channel "image" of the checkpoint's size: the RGB patch kernel summed
  into one channel (as AST does), the position grid as pretrained. Its two
  ImageNet heads are not imported (AST trains a new head). ``model.pretrained``
  adapts the grid to the run's spectrogram (see ``src.models.pretrained``).

Parameter names: both the hub layout (``encoder.layer.N.attention.attention.query``,
``intermediate.dense``, ...) and the layout newer transformers versions use in
memory (``layers.N.attention.q_proj``, ``mlp.fc1``, ...) are understood.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMATS = ("hf-ast", "hf-deit")
HUB_ENDPOINT = "https://huggingface.co"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
OPTIONAL_FILES = ("preprocessor_config.json",)
# AudioSet statistics: ASTFeatureExtractor's defaults.
AST_MEAN, AST_STD = -4.2677393, 4.5689974
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu"}

_LAYER_PATTERNS = [
    (r"(?:encoder\.layer|layers)\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)",
     lambda m: (int(m[1]), m[2][0], m[3])),
    (r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)",
     lambda m: (int(m[1]), m[2], m[3])),
    (r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)",
     lambda m: (int(m[1]), "o", m[2])),
    (r"(?:encoder\.layer|layers)\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)",
     lambda m: (int(m[1]), "fc1", m[2])),
    (r"(?:encoder\.layer|layers)\.(\d+)\.(?:output\.dense|mlp\.fc2)\.(weight|bias)",
     lambda m: (int(m[1]), "fc2", m[2])),
    (r"(?:encoder\.layer|layers)\.(\d+)\.(layernorm_before|layernorm_after)\.(weight|bias)",
     lambda m: (int(m[1]), m[2], m[3])),
]


class WeightImportError(ValueError):
    """A checkpoint that cannot be imported; the message names the file and the fix."""


# ------------------------------------------------------------------ fetching


def _is_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not Path(source).exists()


def fetch_checkpoint(
    source: str | os.PathLike,
    cache_dir: str | os.PathLike = ".cache/hub",
    *,
    revision: str = "main",
    progress: bool = True,
) -> Path:
    """A local checkpoint directory for ``source`` (a directory, or a hub id to download)."""
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        missing = [] if (path / "config.json").is_file() else ["config.json"]
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            missing.append(" or ".join(WEIGHT_FILES))
        if missing:
            raise WeightImportError(
                f"{path}: missing {', '.join(missing)} (the files save_pretrained writes)."
            )
        return path
    if not _is_hub_id(source):
        raise WeightImportError(
            f"{source}: not a directory and not a hub id (owner/name). Give a directory with "
            "config.json and model.safetensors, or e.g. MIT/ast-finetuned-audioset-10-10-0.4593."
        )
    from src.data.download import DownloadError, download_file

    endpoint = os.environ.get("HF_ENDPOINT", HUB_ENDPOINT).rstrip("/")
    headers = {}
    if os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    target = Path(cache_dir) / source.replace("/", "--") / revision

    def get(name, optional):
        dest = target / name
        if dest.is_file():
            return True
        url = f"{endpoint}/{source}/resolve/{revision}/{name}"
        try:
            download_file(url, dest, progress=progress, headers=headers, retries=2)
        except DownloadError as err:
            if optional and "HTTP 404" in str(err):
                return False
            raise WeightImportError(str(err)) from None
        return True

    get("config.json", optional=False)
    for name in OPTIONAL_FILES:
        get(name, optional=True)
    if not any(get(name, optional=True) for name in WEIGHT_FILES):
        raise WeightImportError(
            f"{source}: the hub has neither {' nor '.join(WEIGHT_FILES)} at {revision}."
        )
    return target


# ------------------------------------------------------------------ reading


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict, dict, dict]:
    """``(config, preprocessor_config or {}, {name: float32 array})`` of a checkpoint dir."""
    from safetensors.numpy import load_file

    from src.models.torch_checkpoint import TorchCheckpointError, load_state_dict

    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise WeightImportError(f"{directory / 'config.json'}: cannot read it ({err}).") from None
    pre_path = directory / "preprocessor_config.json"
    preprocessor = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    weights = directory / "model.safetensors"
    if weights.is_file():
        try:
            tensors = load_file(str(weights))
        except Exception as err:  # safetensors raises its own error types
            raise WeightImportError(
                f"{weights}: not a readable safetensors file ({err})."
            ) from None
    else:
        try:
            tensors = load_state_dict(directory / "pytorch_model.bin")
        except (TorchCheckpointError, OSError) as err:
            raise WeightImportError(str(err)) from None
    return config, preprocessor, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def canonical_names(tensors: dict, prefix: str) -> tuple[dict, list]:
    """Map checkpoint names to ``("embed", name)``, ``(layer, part, weight|bias)``,
    ``("final", weight|bias)`` or ``("head", ...)`` keys; also return unused names."""
    out, unused = {}, []
    for name, value in tensors.items():
        key = name[len(prefix) + 1:] if name.startswith(prefix + ".") else name
        canon = None
        if key.startswith("embeddings."):
            canon = ("embed", key[len("embeddings."):])
        elif key in ("layernorm.weight", "layernorm.bias"):
            canon = ("final", key.split(".")[-1])
        elif key.startswith("classifier."):
            canon = ("head", key[len("classifier."):])
        else:
            for pattern, build in _LAYER_PATTERNS:
                m = re.fullmatch(pattern, key)
                if m:
                    canon = build(m)
                    break
        if canon is None:
            unused.append(name)
        else:
            out[canon] = value
    return out, unused


# ------------------------------------------------------------------ building


def _image_size(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _architecture(config: dict, source: Path) -> dict:
    act = config.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise WeightImportError(
            f"{source / 'config.json'}: hidden_act={act!r} is not supported "
            f"(supported: {sorted(ACTIVATIONS)})."
        )
    return dict(
        embed_dim=int(config["hidden_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]),
        ff_dim=int(config["intermediate_size"]),
        patch_size=int(config.get("patch_size", 16)),
        dropout_rate=float(config.get("hidden_dropout_prob", 0.0)),
        attention_dropout=float(config.get("attention_probs_dropout_prob", 0.0)),
        embedding_dropout=float(config.get("hidden_dropout_prob", 0.0)),
        norm_first=True,
        activation=ACTIVATIONS[act],
        epsilon=float(config.get("layer_norm_eps", 1e-12)),
        qkv_bias=bool(config.get("qkv_bias", True)),
        pooling="cls_dist",
        head_norm=True,
    )


def _assign_backbone(backbone, canon: dict, source: Path, *, rgb_to_mono: bool) -> list[str]:
    """Set every backbone weight from canonical tensors; returns the names not used."""
    used = set()

    def take(key, shape=None):
        if key not in canon:
            raise WeightImportError(f"{source}: the checkpoint has no tensor for {key}.")
        used.add(key)
        value = canon[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise WeightImportError(
                f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(shape)}."
            )
        return value

    def dense(layer, part, i):
        kernel = take((i, part, "weight")).T  # torch (out, in) -> keras (in, out)
        values = [kernel]
        if layer.use_bias:
            values.append(take((i, part, "bias")))
        layer.set_weights(values)

    pe = backbone.patch_embed
    kernel = take(("embed", "patch_embeddings.projection.weight"))  # (D, C, kh, kw)
    if rgb_to_mono:
        kernel = kernel.sum(axis=1, keepdims=True)
    if kernel.shape[1] != 1:
        raise WeightImportError(
            f"{source}: the patch projection takes {kernel.shape[1]} channels, expected 1."
        )
    pe.projection.set_weights(
        [kernel.transpose(2, 3, 1, 0), take(("embed", "patch_embeddings.projection.bias"))]
    )
    pe.cls_token.assign(take(("embed", "cls_token"), pe.cls_token.shape))
    pe.dist_token.assign(take(("embed", "distillation_token"), pe.dist_token.shape))
    pe.position_embedding.assign(
        take(("embed", "position_embeddings"), pe.position_embedding.shape)
    )
    for i, block in enumerate(backbone.blocks):
        att = block.att
        qkv = {}
        for part in "qkv":
            qkv[part] = [take((i, part, "weight")).T]  # torch (out, in) -> keras (in, out)
            if att.qkv_bias:
                qkv[part].append(take((i, part, "bias")))
        att.set_qkv(qkv)  # three Dense layers, or one with model.fused_qkv
        dense(att.combine_heads, "o", i)
        dense(block.ffn.layers[0], "fc1", i)
        dense(block.ffn.layers[1], "fc2", i)
        block.layernorm1.set_weights(
            [take((i, "layernorm_before", "weight")), take((i, "layernorm_before", "bias"))]
        )
        block.layernorm2.set_weights(
            [take((i, "layernorm_after", "weight")), take((i, "layernorm_after", "bias"))]
        )
    backbone.final_norm.set_weights([take(("final", "weight")), take(("final", "bias"))])
    extra = [k for k in canon if k not in used and k[0] != "head"]
    if extra:
        raise WeightImportError(
            f"{source}: tensors not accounted for (more layers than num_hidden_layers?): "
            f"{sorted(map(str, extra))[:5]}"
        )
    return [k for k in canon if k not in used]


# AudioSet's 527 classes: AST's AudioSet checkpoints were trained as independent sigmoids.
AUDIOSET_CLASSES = 527


def is_multi_label(config: dict, num_classes: int) -> bool:
    """Whether an AST checkpoint's outputs are sigmoids: its ``problem_type`` when given,
    else an AudioSet head (527 classes)."""
    problem = config.get("problem_type")
    if problem:
        return problem == "multi_label_classification"
    return num_classes == AUDIOSET_CLASSES


def import_hf_ast(directory: str | os.PathLike, multi_label: bool | None = None):
    """An ``AudioTransformer`` (waveform in, logits out) from an AST checkpoint directory.

    ``multi_label``: sigmoid outputs (None: :func:`is_multi_label` of the checkpoint)."""
    from src.models.audio_transformer import AudioTransformer, SpectrogramTransformer
    from src.models.kaldi import KaldiFbank

    directory = Path(directory)
    config, pre, tensors = read_checkpoint(directory)
    if config.get("model_type") not in (None, "audio-spectrogram-transformer"):
        raise WeightImportError(
            f"{directory / 'config.json'}: model_type={config.get('model_type')!r} is not an AST "
            "checkpoint; use --from hf-deit for DeiT."
        )
    canon, unused = canonical_names(tensors, "audio_spectrogram_transformer")
    id2label = config.get("id2label") or {}
    num_classes = len(id2label) or int(config.get("num_labels", 2))
    class_names = [id2label.get(str(i), id2label.get(i, str(i))) for i in range(num_classes)]
    sample_rate = int(pre.get("sampling_rate", 16000))
    n_mels = int(config.get("num_mel_bins", pre.get("num_mel_bins", 128)))
    frames = int(config.get("max_length", pre.get("max_length", 1024)))
    if pre.get("do_normalize", True):
        mean, std = float(pre.get("mean", AST_MEAN)), float(pre.get("std", AST_STD))
    else:  # (x - 0) / (2 * 0.5): unchanged
        mean, std = 0.0, 0.5
    frontend = KaldiFbank(sample_rate=sample_rate, n_mels=n_mels, name="frontend")
    backbone = SpectrogramTransformer(
        num_classes=num_classes,
        num_frames=frames,
        num_mels=n_mels,
        f_stride=int(config.get("frequency_stride", 10)),
        t_stride=int(config.get("time_stride", 10)),
        norm_mean=mean,
        norm_std=std,
        name="backbone",
        **_architecture(config, directory),
    )
    clip_samples = frontend.win_samples + (frames - 1) * frontend.hop_samples
    if multi_label is None:
        multi_label = is_multi_label(config, num_classes)
    model = AudioTransformer(
        frontend, backbone, clip_samples=clip_samples, class_names=class_names,
        target_frames=frames, multi_label=bool(multi_label), remove_mean=True,
        short_input="features", name="audio_model",
    )
    model.build((None, clip_samples))
    _assign_backbone(backbone, canon, directory, rgb_to_mono=False)
    names = ("layernorm.weight", "layernorm.bias", "dense.weight", "dense.bias")
    missing = [f"classifier.{n}" for n in names if ("head", n) not in canon]
    if missing:
        raise WeightImportError(
            f"{directory}: no classifier head ({', '.join(missing)}); an AST checkpoint for "
            "audio classification (ASTForAudioClassification) has one."
        )
    ln_w, ln_b, dense_w, dense_b = (canon[("head", n)] for n in names)
    backbone.head_norm.set_weights([ln_w, ln_b])
    backbone.classifier.set_weights([dense_w.T, dense_b])
    if unused:
        log.warning("%s: tensors not imported: %s", directory, unused)
    return model


def import_hf_deit(directory: str | os.PathLike):
    """A ``SpectrogramTransformer`` over a one-channel image from a DeiT checkpoint directory."""
    from src.models.audio_transformer import SpectrogramTransformer

    directory = Path(directory)
    config, _, tensors = read_checkpoint(directory)
    if config.get("model_type") not in (None, "deit", "vit"):
        raise WeightImportError(
            f"{directory / 'config.json'}: model_type={config.get('model_type')!r} is not a "
            "DeiT checkpoint; use --from hf-ast for AST."
        )
    canon, unused = canonical_names(tensors, "deit")
    if ("embed", "distillation_token") not in canon:
        raise WeightImportError(
            f"{directory}: no distillation token; AST starts from the distilled DeiT "
            "(e.g. facebook/deit-base-distilled-patch16-384)."
        )
    height, width = _image_size(config.get("image_size", 224))
    patch = int(config.get("patch_size", 16))
    arch = _architecture(config, directory)
    backbone = SpectrogramTransformer(
        num_classes=max(int(config.get("num_labels", 2)), 2),
        num_frames=width,  # the image's width is the time axis, its height the frequency axis
        num_mels=height,
        f_stride=patch,
        t_stride=patch,
        norm_mean=0.0,  # (x - 0) / (2 * 0.5): the input as given; a run sets its own statistics
        norm_std=0.5,
        name="backbone",
        **arch,
    )
    backbone.build((None, width, height))
    leftover = _assign_backbone(backbone, canon, directory, rgb_to_mono=True)
    skipped = unused + [str(k) for k in leftover]
    if skipped:
        log.info("%s: not imported (ImageNet heads): %s", directory, skipped)
    return backbone


def import_weights(fmt: str, source, cache_dir=".cache/hub", progress: bool = True,
                   multi_label: bool | None = None):
    """Import ``source`` (directory or hub id) as ``fmt`` ('hf-ast' or 'hf-deit');
    ``multi_label`` overrides an AST head's output type (see :func:`is_multi_label`)."""
    if fmt not in FORMATS:
        raise WeightImportError(f"unknown format {fmt!r}; use one of {FORMATS}.")
    directory = fetch_checkpoint(source, cache_dir, progress=progress)
    if fmt == "hf-ast":
        return import_hf_ast(directory, multi_label=multi_label)
    return import_hf_deit(directory)
