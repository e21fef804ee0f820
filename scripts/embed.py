"""Embeddings of every audio file under a folder, from any of the project's models.

    python -m scripts.embed MODEL AUDIO_DIR --out FILE [--timestamps] [--hop-ms 50]
        [--format npz|npy|parquet] [--scene-pooling mean|model] [--batch-size 32]
        [--config RUN_DIR] [--extensions wav,flac]

``MODEL``: a ``.keras`` waveform model (a training run's ``model.keras``, an AST imported
with ``scripts.import_weights --from hf-ast``), a fold or run directory (as
``src.predict``), or a bare pretrained ``SpectrogramTransformer`` backbone: its frontend
is rebuilt from its run's ``config.yaml`` (found beside the model or in its run
directory, or given with ``--config``). ``AUDIO_DIR``: every audio file under it,
recursively (the extensions the folder dataset reads, ``src.data.folder``; hidden files
skipped), decoded and resampled as in training and streamed in windows, so a file of any
length is embedded in bounded memory.

What is written (definitions in ``src.embeddings``): one scene embedding per file (the
mean of the last layer's patch tokens; ``--scene-pooling model``: the vector the model's
head reads) and, with ``--timestamps``, timestamp embeddings every ``--hop-ms`` (at most
50) milliseconds over the whole file.

* ``npz`` (default): ``files`` (paths relative to AUDIO_DIR, in sorted order),
  ``scene`` ``(N, D)``, ``duration_s`` ``(N,)``; with ``--timestamps``
  ``timestamp_embeddings`` ``(sum T_i, D)``, ``timestamps_ms`` ``(sum T_i,)`` and
  ``timestamp_offsets`` ``(N + 1,)``: file ``i`` owns rows
  ``timestamp_offsets[i]:timestamp_offsets[i + 1]``; ``error_files`` / ``error_messages``
  for the files that could not be read; ``metadata``: a JSON string (model, rates,
  windows, definitions, errors). ``np.load`` needs no pickle.
* ``npy``: the same arrays as separate files: ``FILE`` (the scene matrix),
  ``STEM.timestamp_embeddings.npy`` ... beside it, and ``STEM.json`` with ``files`` and
  ``metadata``.
* ``parquet`` (when pyarrow is installed; it is not a dependency): one row per file with
  ``file``, ``duration_s``, ``scene`` and, with ``--timestamps``, ``timestamps_ms`` and
  ``timestamp_embeddings`` (lists); the metadata in the schema's ``embeddings`` key.

A file that cannot be read is reported (on stderr and in the metadata) and the others are
embedded. Exit status: 0 when every file was embedded, 1 when some could not be read (the
output is still written), 2 for bad arguments, a model that cannot give embeddings or a
folder without audio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

FORMATS = ("npz", "npy", "parquet")
FORMAT_VERSION = 1


def _parser() -> argparse.ArgumentParser:
    from src.embeddings import DEFAULT_HOP_MS, MAX_HOP_MS, SCENE_POOLINGS

    parser = argparse.ArgumentParser(
        prog="python -m scripts.embed",
        description="Scene (and timestamp) embeddings of every audio file under a folder.",
    )
    parser.add_argument("model", help="a .keras model, a fold dir or a run dir")
    parser.add_argument("audio_dir", type=Path,
                        help="folder of audio files (recursive), or one audio file")
    parser.add_argument("--out", type=Path, required=True, help="output file")
    parser.add_argument("--timestamps", action="store_true",
                        help="also timestamp embeddings over each whole file")
    parser.add_argument("--hop-ms", type=float, default=DEFAULT_HOP_MS,
                        help=f"timestamp step in ms, at most {MAX_HOP_MS:g} "
                             f"(default {DEFAULT_HOP_MS:g})")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="output format (default: from --out's suffix, else npz)")
    parser.add_argument("--scene-pooling", choices=SCENE_POOLINGS, default="mean",
                        help="mean: mean of the patch tokens (default); model: the vector "
                             "the model's head reads ([CLS] for most supervised models)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per model call")
    parser.add_argument("--config", type=Path, default=None,
                        help="a bare backbone's run config.yaml (or its run dir)")
    parser.add_argument("--extensions", default=None,
                        help="comma-separated audio extensions (default: the folder reader's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def output_format(out: Path, fmt: str | None) -> str:
    """The format asked for, or the one ``out``'s suffix names (default npz); a suffix
    that names another format than ``--format`` is an error (ValueError)."""
    suffix = out.suffix.lower().lstrip(".")
    if fmt is not None:
        if suffix in FORMATS and suffix != fmt:
            raise ValueError(f"--format {fmt} but --out {out} names a .{suffix} file; give "
                             f"one of them, or a matching pair (--out {out.with_suffix('.' + fmt)})")
        return fmt
    return suffix if suffix in FORMATS else "npz"


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        return None
    return pyarrow


def write_output(out: Path, fmt: str, arrays: dict, metadata: dict) -> list[Path]:
    """Write the embeddings; returns the files written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = metadata["errors"]
    if fmt == "npz":
        with open(out, "wb") as fh:  # the exact name (np.savez would append .npz)
            np.savez(
                fh, **arrays,
                error_files=np.array([e["file"] for e in errors], dtype=str),
                error_messages=np.array([e["error"] for e in errors], dtype=str),
                metadata=np.array(json.dumps(metadata)),
            )
        return [out]
    if fmt == "npy":
        written = []
        stem = out.with_suffix("") if out.suffix.lower() == ".npy" else out
        with open(out, "wb") as fh:
            np.save(fh, arrays["scene"])
        written.append(out)
        for key in ("duration_s", "timestamp_embeddings", "timestamps_ms", "timestamp_offsets"):
            if key in arrays:
                path = Path(f"{stem}.{key}.npy")
                np.save(path, arrays[key])
                written.append(path)
        side = Path(f"{stem}.json")
        side.write_text(json.dumps({"files": arrays["files"].tolist(), "metadata": metadata},
                                   indent=1))
        written.append(side)
        return written
    pa = _pyarrow()
    if pa is None:
        raise RuntimeError("--format parquet needs pyarrow, which is not installed "
                           "(pip install pyarrow), or use --format npz")
    columns = {
        "file": pa.array(arrays["files"].tolist(), pa.string()),
        "duration_s": pa.array(arrays["duration_s"], pa.float64()),
        "scene": pa.array(list(arrays["scene"]), pa.list_(pa.float32())),
    }
    if "timestamp_offsets" in arrays:
        off = arrays["timestamp_offsets"]
        spans = list(zip(off[:-1], off[1:]))
        columns["timestamps_ms"] = pa.array(
            [arrays["timestamps_ms"][a:b] for a, b in spans], pa.list_(pa.float32()))
        columns["timestamp_embeddings"] = pa.array(
            [list(arrays["timestamp_embeddings"][a:b]) for a, b in spans],
            pa.list_(pa.list_(pa.float32())))
    table = pa.table(columns).replace_schema_metadata({"embeddings": json.dumps(metadata)})
    pa.parquet.write_table(table, out)
    return [out]


def main(argv=None) -> int:
    from src.embeddings import MAX_HOP_MS

    args = _parser().parse_args(argv)
    try:
        fmt = output_format(args.out, args.format)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if fmt == "parquet" and _pyarrow() is None:
        print("error: --format parquet needs pyarrow, which is not installed (pip install "
              "pyarrow); use --format npz or npy", file=sys.stderr)
        return 2
    if not 0 < args.hop_ms <= MAX_HOP_MS:
        print(f"error: --hop-ms {args.hop_ms:g}: the timestamp step must be > 0 and at most "
              f"{MAX_HOP_MS:g} ms", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2

    from tqdm.auto import tqdm

    from src import import_tensorflow

    tf = import_tensorflow()

    from src.data.folder import read_folder
    from src.data.index import DatasetError
    from src.embeddings import Embedder, EmbeddingTable, load_embedding_model
    from src.predict import ModelNotFoundError

    tf.get_logger().setLevel(logging.ERROR)
    try:
        if args.audio_dir.is_file():  # one file
            files = [(args.audio_dir.name, str(args.audio_dir))]
        else:
            files = [(r.key, r.path) for r in
                     read_folder(args.audio_dir, extensions=args.extensions).records]
        model, model_path = load_embedding_model(args.model, args.config)
        embedder = Embedder(model, hop_ms=args.hop_ms, batch_size=args.batch_size,
                            scene_pooling=args.scene_pooling)
    except (DatasetError, ModelNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2

    table = EmbeddingTable()
    with tqdm(total=len(files), desc="embed", unit="file",
              disable=True if args.no_progress else None) as bar:
        results = embedder.embed_files(files, timestamps=args.timestamps)
        for result in results:
            table.add(result)
            if result.error is not None:
                tqdm.write(f"error: {result.error}", file=sys.stderr)
            bar.update(1)

    rate = embedder.sample_rate
    errors = [{"file": k, "error": v} for k, v in table.errors.items()]
    metadata = {
        "format_version": FORMAT_VERSION,
        "model": str(model_path),
        "audio_dir": str(Path(args.audio_dir).absolute()),
        "sample_rate": rate,
        "window_s": embedder.window / rate,
        "window_hop_s": embedder.hop / rate,
        "embedding_size": embedder.embed_dim,
        "num_files": len(table.keys),
        "scene_pooling": args.scene_pooling,
        "scene_embedding": (
            "mean of the last layer's patch tokens (after the final norm; [CLS]/[DIST] "
            "excluded, padding columns excluded) per window, averaged over the file's "
            "windows weighted by coverage" if args.scene_pooling == "mean" else
            f"the vector the model's head reads (pooling={model.backbone.pooling}) per "
            "window, averaged over the file's windows weighted by coverage"
        ),
        "timestamps": bool(args.timestamps),
        "errors": errors,
    }
    if args.timestamps:
        metadata["hop_ms"] = embedder.hop_ms
        metadata["timestamp_embedding"] = (
            "patch tokens averaged over frequency rows, one per patch column at its centre "
            "time, stitched over the file's windows without duplicates, linearly "
            "interpolated onto t = 0, hop_ms, 2 hop_ms, ... up to the file's end"
        )
    arrays = table.arrays(embedder.embed_dim, args.timestamps)
    try:
        written = write_output(args.out, fmt, arrays, metadata)
    except (OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    what = "scene" + (f" and timestamp (every {embedder.hop_ms:g} ms)" if args.timestamps else "")
    print(f"embedded {len(table.keys)} of {len(files)} file(s): {what} embeddings of "
          f"{embedder.embed_dim} values -> {', '.join(map(str, written))}")
    if errors:
        print(f"{len(errors)} file(s) could not be read (listed in the output's metadata).",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
