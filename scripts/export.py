"""Export a trained model for serving.

    python -m scripts.export RUN_DIR_OR_MODEL --format keras|savedmodel|tflite [--out PATH]

``RUN_DIR_OR_MODEL`` is resolved as by ``python -m src.predict``: a ``.keras`` file, a fold
directory, or a run directory (the fold with the best validation metric). Every format
takes a raw mono float32 waveform batch ``(batch, clip_samples)`` at the model's sample
rate and returns logits ``(batch, num_classes)``; the waveform preprocessing (mean
removal, clipping) and the log-mel frontend are part of the model, so every format gives
``python -m src.predict``'s numbers for the same window:

* ``keras``: a copy of the ``.keras`` file (load it with ``src.models.load_model``).
* ``savedmodel``: a TensorFlow SavedModel with a ``serve`` function and a
  ``serving_default`` signature (input ``waveform``, output ``output_0``), batch size free,
  and ``clip_probabilities``: a whole clip of any length -> probabilities averaged over
  the windows ``src.predict`` uses.
* ``tflite``: a TensorFlow Lite flatbuffer converted from that SavedModel with the builtin
  ops only (the STFT becomes TFLite's RFFT2D); when a frontend needs an op TFLite lacks,
  the conversion falls back to TensorFlow ops (``SELECT_TF_OPS``, the Flex delegate).
  Input shape ``(1, clip_samples)``; resize the batch with ``resize_tensor_input``. The
  converted model is run once on silence before it is written: TFLite's RFFT2D needs a
  power-of-two FFT length (``frontend.n_fft``; 512 in the shipped configs).

The class names, in logit order, go to ``labels.txt`` (inside the SavedModel's
``assets.extra/``; next to a ``.tflite`` file as ``<name>.labels.txt``), and the output
type (softmax or sigmoid probabilities), rate and window to ``model.json`` (beside them,
``<name>.json`` for TFLite). Default output:
``export/`` next to the model. Exit status 2 when the model cannot be found or exported.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FORMATS = ("keras", "savedmodel", "tflite")
_DEFAULT_NAMES = {"keras": "model.keras", "savedmodel": "saved_model", "tflite": "model.tflite"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.export",
        description="Export a trained model (raw waveform in, logits out).",
    )
    parser.add_argument(
        "model", metavar="RUN_DIR_OR_MODEL", help="a .keras file, a fold dir or a run dir"
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="export format")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output path (default: export/model.keras, export/saved_model or "
        "export/model.tflite next to the model)",
    )
    return parser


def _class_names(model) -> list[str] | None:
    names = getattr(model, "class_names", None)
    return [str(n) for n in names] if names else None


def _write_labels(path: Path, names: list[str] | None) -> Path | None:
    if not names:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names))
    return path


def export_savedmodel(model, out: Path, hop_s: float | None = None, clip_fn: bool = True) -> Path:
    """TF SavedModel with two functions (and signatures of the same names):

    * ``serve(waveform)``: ``(batch, clip_samples)`` -> logits; also ``serving_default``.
      For a model that takes short input (:func:`src.predict.takes_short_input`: a
      disentangled position embedding, an imported AST checkpoint) ``(batch, samples)``
      of any length from :func:`src.predict.min_input_samples` to ``clip_samples``,
      which the model sees as ``src.predict`` gives it a short file (not zero-padded).
    * ``clip_probabilities(waveform)``: one whole clip ``(samples,)`` of any length ->
      ``(num_classes,)`` probabilities (softmax, or sigmoid for a multi-label model),
      averaged over the windows that ``python -m src.predict`` uses (the same start rule,
      :mod:`src.data.windows`; a clip shorter than a window is zero-padded to the window,
      or, for a model that takes short input, only up to
      :func:`src.predict.min_input_samples`). Left out with ``clip_fn=False``
      (the TFLite conversion converts ``serve`` only).
    """
    import keras
    import tensorflow as tf

    from src.data.windows import window_starts_tf
    from src.models import native
    from src.predict import min_input_samples, takes_short_input

    clip = int(model.clip_samples)
    length = None if takes_short_input(model) else clip  # serve's input length
    rate = int(model.frontend.sample_rate)
    hop = max(1, clip // 2) if hop_s is None else int(round(float(hop_s) * rate))
    multi = bool(getattr(model, "multi_label", False))
    shortest = min_input_samples(model)  # the clip, unless the model takes short input

    def to_probs(logits):
        return tf.sigmoid(logits) if multi else tf.nn.softmax(logits, axis=-1)

    def serve(waveform):
        if length is None:  # any length up to the clip: a longer one goes in windows
            tf.debugging.assert_less_equal(
                tf.shape(waveform)[1], clip,
                message=f"the input is longer than the clip the model takes ({clip} samples): "
                "cut it into windows (clip_probabilities does)")
            # Shorter than the least the model takes (one patch of frames): zero-padded to
            # it, as src.predict pads such a file; in the graph, so TFLite (which drops
            # assertions) does the same.
            missing = tf.maximum(shortest - tf.shape(waveform)[1], 0)
            waveform = tf.pad(waveform, [[0, 0], [0, missing]])
        return model(waveform, training=False)

    def clip_probabilities(waveform):
        n = tf.shape(waveform, out_type=tf.int64)[0]

        def windows():
            starts = window_starts_tf(n, clip, hop)
            idx = starts[:, None] + tf.range(clip, dtype=tf.int64)[None, :]
            return tf.reduce_mean(to_probs(model(tf.gather(waveform, idx), training=False)), 0)

        def short():
            missing = tf.maximum(shortest - tf.shape(waveform)[0], 0)
            piece = tf.pad(waveform[None, :], [[0, 0], [0, missing]])
            return to_probs(model(piece, training=False))[0]

        return tf.cond(n > clip, windows, short)

    # Traced without the compiled kernels (src/models/native.py): the SavedModel holds
    # only TensorFlow's own ops, so it loads where their library is not built.
    with native.disabled():
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            "serve", serve,
            input_signature=[tf.TensorSpec((None, length), tf.float32, name="waveform")],
        )
        if clip_fn:
            archive.add_endpoint(
                "clip_probabilities", clip_probabilities,
                input_signature=[tf.TensorSpec((None,), tf.float32, name="waveform")],
            )
        archive.write_out(str(out), verbose=False)
    _write_metadata(out / "assets.extra" / "model.json", model, hop)
    return out


def _write_metadata(path: Path, model, hop: int) -> Path:
    """What a consumer of the exported model needs to know about its input and output."""
    import json

    from src.predict import min_input_samples, takes_short_input

    path.parent.mkdir(parents=True, exist_ok=True)
    short = takes_short_input(model)
    meta = {
        "sample_rate": int(model.frontend.sample_rate),
        "clip_samples": int(model.clip_samples),
        # The lengths the exported input takes: exactly the clip (zero-pad a shorter
        # file to it), or, for a model that takes short input, min to clip samples as
        # they are (fewer than min: the model zero-pads them to min, as src.predict does).
        # Longer files: windows of the clip (clip_probabilities, src.predict).
        "input_samples": [int(min_input_samples(model)) if short else int(model.clip_samples),
                          int(model.clip_samples)],
        "short_input": "as_is" if short else "zero_pad_to_clip",
        "window_hop_samples": int(hop),
        "output": "logits",
        "probabilities": "sigmoid" if getattr(model, "multi_label", False) else "softmax",
        "multi_label": bool(getattr(model, "multi_label", False)),
        "remove_mean_in_model": bool(getattr(model, "remove_mean", True)),
        "class_names": _class_names(model),
    }
    path.write_text(json.dumps(meta, indent=2))
    return path


def convert_tflite(saved_model_dir: Path) -> tuple[bytes, bool]:
    """TFLite flatbuffer from a SavedModel; returns ``(bytes, uses_tf_ops)``.

    Builtin ops first; if the converter cannot express some op with them, once more with
    TensorFlow ops allowed (the interpreter then needs the Flex delegate, which the
    ``tensorflow`` pip package's ``tf.lite.Interpreter`` links in).
    """
    import tensorflow as tf

    def convert(ops):
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
        converter.target_spec.supported_ops = ops
        return converter.convert()

    builtins = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        return convert(builtins), False
    except Exception as err:  # tf.lite's ConverterError and friends
        logging.getLogger("scripts.export").debug("builtins-only conversion failed: %s", err)
    try:
        return convert(builtins + [tf.lite.OpsSet.SELECT_TF_OPS]), True
    except Exception as err:
        raise ValueError(f"TFLite conversion failed: {err}") from err


def _fft_hint(model) -> str:
    n_fft = getattr(model.frontend, "n_fft", None)
    if isinstance(n_fft, int) and n_fft > 0 and n_fft & (n_fft - 1):
        return (
            f" TFLite's RFFT2D needs a power-of-two FFT length and this model's frontend has "
            f"n_fft={n_fft}: for TFLite, train with a power-of-two FFT length (frontend.n_fft, "
            f"or round_to_power_of_two=true for kaldi_fbank), or export a SavedModel."
        )
    return ""


def check_tflite(flatbuffer: bytes, clip_samples: int, shortest: int | None = None) -> None:
    """Run the converted model on silence, of the clip's length, of the ``shortest``
    input it takes as it is, and (a model that takes short input) of one sample, which
    it pads: a kernel that cannot run, or cannot be resized, fails here."""
    import numpy as np
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    inp = interpreter.get_input_details()[0]
    lengths = [int(clip_samples), int(shortest or clip_samples)]
    if lengths[1] < lengths[0]:
        lengths.append(1)
    for n in dict.fromkeys(lengths):
        interpreter.resize_tensor_input(inp["index"], [1, n])
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], np.zeros((1, n), np.float32))
        interpreter.invoke()
        logits = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        if not np.isfinite(logits).all():
            raise RuntimeError(f"non-finite logits on a silent input of {n} samples")


def export(model, model_path: Path, fmt: str, out: Path) -> list[str]:
    """Write ``model`` (loaded from ``model_path``) as ``fmt`` to ``out``; lines to print."""
    from src.predict import min_input_samples, takes_short_input

    names = _class_names(model)
    lines = []
    if fmt == "keras":
        if out.resolve() == model_path.resolve():
            raise ValueError(f"--out {out} is the model itself; choose another path.")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_path, out)
        lines.append(f"keras model: {out}")
    elif fmt == "savedmodel":
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; a SavedModel is a directory.")
        out.parent.mkdir(parents=True, exist_ok=True)
        export_savedmodel(model, out)
        labels = _write_labels(out / "assets.extra" / "labels.txt", names)
        lines.append(f"SavedModel: {out}")
        if labels:
            lines.append(f"labels: {labels}")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="export-") as tmp:
            saved = export_savedmodel(model, Path(tmp) / "saved_model", clip_fn=False)
            flatbuffer, tf_ops = convert_tflite(saved)
        try:
            check_tflite(flatbuffer, model.clip_samples, min_input_samples(model))
        except RuntimeError as err:
            raise ValueError(
                f"the converted TFLite model does not run: {err}.{_fft_hint(model)}"
            ) from err
        out.write_bytes(flatbuffer)
        labels = _write_labels(out.with_name(f"{out.stem}.labels.txt"), names)
        _write_metadata(out.with_name(f"{out.stem}.json"), model, max(1, model.clip_samples // 2))
        ops = "builtins + SELECT_TF_OPS (needs the Flex delegate)" if tf_ops else "builtins only"
        size = len(flatbuffer)
        lines.append(f"TFLite model: {out} ({size} bytes, {size / 2**20:.2f} MiB; ops: {ops})")
        if labels:
            lines.append(f"labels: {labels}")
    rate = int(model.frontend.sample_rate)
    kind = "sigmoid" if getattr(model, "multi_label", False) else "softmax"
    clip = int(model.clip_samples)
    if takes_short_input(model):
        shape = (f"(batch, n), n <= {clip} (a shorter file as it is, not zero-padded; "
                 f"under {min_input_samples(model)} samples the model pads it to that)")
    else:
        shape = f"(batch, {clip}) (zero-pad a shorter file)"
    lines.append(
        f"input: float32 waveform {shape} at {rate} Hz (the model removes each clip's mean "
        f"and clips it); output: logits (batch, {len(names) if names else '?'}), "
        f"probabilities by {kind}"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from src import import_tensorflow

    tf = import_tensorflow()
    from src.predict import ModelNotFoundError, load_waveform_model, resolve_model

    tf.get_logger().setLevel(logging.ERROR)
    try:
        resolved = resolve_model(args.model)
        model = load_waveform_model(resolved.path)
        out = args.out or resolved.path.parent / "export" / _DEFAULT_NAMES[args.format]
        print(f"model: {resolved.describe()}", flush=True)
        for line in export(model, resolved.path, args.format, Path(out)):
            print(line, flush=True)
    except (ModelNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
