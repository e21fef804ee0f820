"""Export a trained model for serving.

    python -m scripts.export RUN_DIR_OR_MODEL --format keras|savedmodel|tflite [--out PATH]

``RUN_DIR_OR_MODEL`` is resolved as by ``python -m src.predict``: a ``.keras`` file, a fold
directory, or a run directory (the fold with the best accuracy). Every format takes a raw
mono float32 waveform batch ``(batch, clip_samples)`` at the model's sample rate (the
log-mel frontend is part of the model) and returns logits ``(batch, num_classes)``:

* ``keras``: a copy of the ``.keras`` file (load it with ``src.models.load_model``).
* ``savedmodel``: a TensorFlow SavedModel with a ``serve`` function and a
  ``serving_default`` signature (input ``waveform``, output ``output_0``), batch size free.
* ``tflite``: a TensorFlow Lite flatbuffer converted from that SavedModel with the builtin
  ops only (the STFT becomes TFLite's RFFT2D); when a frontend needs an op TFLite lacks,
  the conversion falls back to TensorFlow ops (``SELECT_TF_OPS``, the Flex delegate).
  Input shape ``(1, clip_samples)``; resize the batch with ``resize_tensor_input``. The
  converted model is run once on silence before it is written: TFLite's RFFT2D needs a
  power-of-two FFT length (``frontend.n_fft``; 512 in the shipped configs).

The class names, in logit order, go to ``labels.txt`` (inside the SavedModel's
``assets.extra/``; next to a ``.tflite`` file as ``<name>.labels.txt``). Default output:
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


def export_savedmodel(model, out: Path) -> Path:
    """TF SavedModel: ``serve(waveform)`` and ``serving_default`` over ``(None, clip)``."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, int(model.clip_samples)), tf.float32, name="waveform")
    model.export(str(out), format="tf_saved_model", verbose=False, input_signature=[spec])
    return out


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


def check_tflite(flatbuffer: bytes, clip_samples: int) -> None:
    """Run the converted model once on silence: a kernel that cannot run fails here."""
    import numpy as np
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], [1, int(clip_samples)])
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], np.zeros((1, int(clip_samples)), np.float32))
    interpreter.invoke()
    logits = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    if not np.isfinite(logits).all():
        raise RuntimeError("non-finite logits on a silent clip")


def export(model, model_path: Path, fmt: str, out: Path) -> list[str]:
    """Write ``model`` (loaded from ``model_path``) as ``fmt`` to ``out``; lines to print."""
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
            saved = export_savedmodel(model, Path(tmp) / "saved_model")
            flatbuffer, tf_ops = convert_tflite(saved)
        try:
            check_tflite(flatbuffer, model.clip_samples)
        except RuntimeError as err:
            raise ValueError(
                f"the converted TFLite model does not run: {err}.{_fft_hint(model)}"
            ) from err
        out.write_bytes(flatbuffer)
        labels = _write_labels(out.with_name(f"{out.stem}.labels.txt"), names)
        ops = "builtins + SELECT_TF_OPS (needs the Flex delegate)" if tf_ops else "builtins only"
        size = len(flatbuffer)
        lines.append(f"TFLite model: {out} ({size} bytes, {size / 2**20:.2f} MiB; ops: {ops})")
        if labels:
            lines.append(f"labels: {labels}")
    rate = int(model.frontend.sample_rate)
    lines.append(
        f"input: float32 waveform (batch, {int(model.clip_samples)}) at {rate} Hz; "
        f"output: logits (batch, {len(names) if names else '?'})"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    import tensorflow as tf

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
