"""Import pretrained Hugging Face AST / DeiT weights as a ``.keras`` file.

    python -m scripts.import_weights --from hf-ast SOURCE --out FILE.keras
    python -m scripts.import_weights --from hf-deit SOURCE --out FILE.keras
    python -m scripts.import_weights --known ast_audioset [--out weights/ast_audioset.keras]

``SOURCE`` is a directory with ``config.json`` and ``model.safetensors`` (what
``save_pretrained`` writes) or ``pytorch_model.bin``, or a hub id (``owner/name``),
downloaded once into ``--cache-dir`` (``$HF_ENDPOINT``, ``$HF_TOKEN`` are honoured).
numpy and safetensors read the checkpoint (a ``.bin`` with an allow-list unpickler);
PyTorch is not needed.

* ``hf-ast``: a complete waveform -> logits model (Kaldi fbank, padding,
  normalisation, AST) that ``python -m src.predict FILE.keras audio=...`` runs.
* ``hf-deit``: the DeiT backbone with its RGB patch kernel summed to one channel,
  for ``model.pretrained=FILE.keras`` (the position grid is adapted at training time).

``--known NAME`` imports one of the checkpoints the AST recipes start from
(see ``KNOWN`` below). The file is loaded back and compared with the model in
memory before the command reports success. Exit status 2 on any error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger("import_weights")


def _parser() -> argparse.ArgumentParser:
    from src.models.hf_import import FORMATS
    from src.models.pretrained import KNOWN

    parser = argparse.ArgumentParser(
        prog="python -m scripts.import_weights",
        description="Import Hugging Face AST / DeiT weights into a .keras file.",
    )
    parser.add_argument("source", nargs="?", help="checkpoint directory or hub id (owner/name)")
    parser.add_argument("--from", dest="fmt", choices=FORMATS, help="checkpoint format")
    parser.add_argument(
        "--known", choices=sorted(KNOWN), help="a named checkpoint (sets --from and SOURCE)"
    )
    parser.add_argument("--out", type=Path, help="output .keras file")
    parser.add_argument(
        "--cache-dir", type=Path,
        default=Path(os.environ.get("AUDIO_CACHE_DIR", ".cache")) / "hub",
        help="where hub downloads go (default: $AUDIO_CACHE_DIR/hub, .cache/hub)",
    )
    parser.add_argument(
        "--weights-dir", type=Path, default=Path(os.environ.get("AUDIO_WEIGHTS_DIR", "weights")),
        help="default output directory for --known (default: $AUDIO_WEIGHTS_DIR, weights), "
        "where model.pretrained looks",
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--multi-label", dest="multi_label", action="store_const", const=True, default=None,
        help="hf-ast: sigmoid outputs (default: the checkpoint's problem_type, else "
             "multi-label for AudioSet's 527 classes)",
    )
    kind.add_argument(
        "--single-label", dest="multi_label", action="store_const", const=False,
        help="hf-ast: softmax outputs",
    )
    return parser


def run(args) -> Path:
    import numpy as np

    from src.models import load_model
    from src.models.hf_import import import_weights
    from src.models.pretrained import KNOWN

    if args.known:
        fmt, source = KNOWN[args.known]
        out = args.out or args.weights_dir / f"{args.known}.keras"
    else:
        if not (args.fmt and args.source and args.out):
            raise ValueError("give --from FORMAT SOURCE --out FILE.keras, or --known NAME.")
        fmt, source, out = args.fmt, args.source, args.out
    if out.suffix != ".keras":
        raise ValueError(f"--out {out}: the file name must end in .keras.")
    model = import_weights(fmt, source, cache_dir=args.cache_dir,
                           multi_label=getattr(args, "multi_label", None))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.keras")
    model.save(tmp)
    # Load it back and compare before it replaces anything.
    loaded = load_model(tmp)
    backbone = getattr(model, "backbone", model)
    shape = (2,) + tuple(backbone.get_build_config()["input_shape"][1:])
    if fmt == "hf-ast":
        shape = (2, model.clip_samples)
    x = np.random.default_rng(0).standard_normal(shape).astype("float32") * 0.1
    diff = float(np.max(np.abs(np.asarray(model(x)) - np.asarray(loaded(x)))))
    if diff > 1e-5:
        tmp.unlink()
        raise RuntimeError(f"the saved file gives different outputs (max diff {diff:.2e}).")
    os.replace(tmp, out)
    h = backbone.hparams
    grid = backbone.grid
    print(
        f"{out}: {fmt} from {source}: {backbone.count_params():,} parameters, "
        f"{h['embed_dim']} wide, {h['num_layers']} layers, {h['num_heads']} heads, "
        f"patch grid {grid[0]}x{grid[1]} ({h['num_mels']} x {h['num_frames']} input), "
        f"{h['num_classes']} classes"
        + (f", {getattr(model, 'output_activation', 'softmax')} outputs" if fmt == "hf-ast" else "")
    )
    return out


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    from src.models.hf_import import WeightImportError
    from src.models.pretrained import PretrainedError

    try:
        run(args)
    except (WeightImportError, PretrainedError, ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
