"""Attention rollout of a trained model over a clip's spectrogram, as a PNG.

    python -m scripts.attention_map RUN_DIR_OR_MODEL AUDIO [--out map.png] [--start SECONDS]

Uses the window of the model's clip length that starts at ``--start``, read as
``python -m src.predict`` reads it (mono, at the model's rate; the model itself removes
the window's mean and clips it, as in training). A window cut short by the end of the file
is zero-padded as prediction pads it (:func:`src.predict.min_input_samples`). The title
shows the predicted class and its probability (softmax, or sigmoid for a multi-label
model). Exit status 2 when the model or the audio cannot be read.
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
    from src import import_tensorflow

    import_tensorflow()
    if not args.start >= 0:
        parser.error(f"--start {args.start}: must be >= 0")

    import numpy as np

    from src.evaluation.attention_maps import attention_maps, plot_map
    from src.predict import (
        AudioReadError,
        ModelNotFoundError,
        load_audio,
        load_waveform_model,
        min_input_samples,
        resolve_model,
    )

    try:
        resolved = resolve_model(args.model)
        model = load_waveform_model(resolved.path)
        rate = int(model.frontend.sample_rate)
        audio = load_audio(args.audio, rate)
    except (ModelNotFoundError, AudioReadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not hasattr(model.backbone, "patch_embed"):
        print(f"error: {resolved.path} has no attention ({type(model.backbone).__name__})",
              file=sys.stderr)
        return 2
    start = int(round(args.start * rate))
    if start >= len(audio):
        print(f"error: --start {args.start:g} s is past the end of {args.audio} "
              f"({len(audio) / rate:.2f} s)", file=sys.stderr)
        return 2
    clip = audio[start : start + model.clip_samples]
    shortest = min_input_samples(model)
    if len(clip) < shortest:
        clip = np.pad(clip, (0, shortest - len(clip)))
    clip = clip[None].astype(np.float32)
    features = np.asarray(model.features(clip))
    maps, probs = attention_maps(model.backbone, features,
                                 multi_label=bool(getattr(model, "multi_label", False)))
    names = model.class_names or [str(i) for i in range(probs.shape[1])]
    pred = int(probs[0].argmax())
    out = Path(args.out or f"{Path(args.audio).stem}_attention.png")
    # Which window of a longer file this is (one window of the model's clip length).
    end = min(len(audio), start + model.clip_samples) / rate
    window = (f" [{start / rate:g}-{end:g} s of {len(audio) / rate:.2f} s; --start moves it]"
              if len(audio) > model.clip_samples or start else "")
    title = f"{Path(args.audio).name}{window}: {names[pred]} (p={probs[0, pred]:.2f})"
    hop = getattr(model.frontend, "hop_samples", None)
    frame_rate = rate / hop if hop else None
    plot_map(features[0], maps[0], out, title, frame_rate)
    if window:
        print(f"{args.audio}: the window{window}", file=sys.stderr)
    print(f"{out}  {names[pred]} {probs[0, pred]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
