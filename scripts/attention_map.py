"""Attention rollout of a trained model over a clip's spectrogram, as a PNG.

    python -m scripts.attention_map RUN_DIR_OR_MODEL AUDIO [--out map.png] [--start SECONDS]

Uses the first window of the model's clip length (from ``--start``), decoded
as in training; the title shows the predicted class and its probability.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a .keras file, a fold dir or a run dir")
    parser.add_argument("audio", help="an audio file (any format libsndfile reads)")
    parser.add_argument("--out", default=None, help="PNG path (default: <audio stem>_attention.png)")
    parser.add_argument("--start", type=float, default=0.0, help="window start in seconds")
    args = parser.parse_args(argv)

    import numpy as np

    from src.evaluation.attention_maps import attention_maps, plot_map
    from src.predict import (
        AudioReadError,
        ModelNotFoundError,
        load_audio,
        load_waveform_model,
        resolve_model,
        run_remove_mean,
    )

    try:
        resolved = resolve_model(args.model)
        model = load_waveform_model(resolved.path)
        audio = load_audio(args.audio, model.frontend.sample_rate, run_remove_mean(resolved))
    except (ModelNotFoundError, AudioReadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not hasattr(model.backbone, "patch_embed"):
        print(f"error: {resolved.path} has no attention ({type(model.backbone).__name__})",
              file=sys.stderr)
        return 2
    start = int(args.start * model.frontend.sample_rate)
    clip = audio[start : start + model.clip_samples]
    if model.target_frames is None or model.frontend.num_frames(len(clip)) <= 0:
        clip = np.pad(clip, (0, model.clip_samples - len(clip)))
    # else: as predict, a short clip goes in as it is and its features are zero-padded
    clip = clip[None].astype(np.float32)
    features = np.asarray(model.features(clip))
    maps, probs = attention_maps(model.backbone, features)
    names = model.class_names or [str(i) for i in range(probs.shape[1])]
    pred = int(probs[0].argmax())
    out = Path(args.out or f"{Path(args.audio).stem}_attention.png")
    title = f"{Path(args.audio).name}: {names[pred]} (p={probs[0, pred]:.2f})"
    hop = getattr(model.frontend, "hop_samples", None)
    frame_rate = model.frontend.sample_rate / hop if hop else None
    plot_map(features[0], maps[0], out, title, frame_rate)
    print(f"{out}  {names[pred]} {probs[0, pred]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
