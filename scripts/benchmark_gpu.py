"""Backbone training / inference steps on a GPU, against Hugging Face's AST on the same GPU.

    python -m scripts.benchmark_gpu [--shapes bench,ast_base] [--precisions float32,mixed_bfloat16]
        [--steps 20] [--patchout T,F] [--vs-pytorch] [--json-out FILE]

Times ``SpectrogramTransformer`` (features in, logits out; the shapes below) with
Keras' ``train_on_batch`` (Adam, XLA) and ``predict_on_batch`` on a batch already on
the device, under each Keras dtype policy, and, with ``--vs-pytorch``, ``ASTForAudioClassification`` of the same
dimensions (float32, or ``torch.autocast`` to bfloat16 / float16 for the mixed
policies; its default SDPA attention). Medians of ``--steps`` steps after warm-up.
``--patchout T,F`` also times our model with ``model.patchout`` (T time columns and F
frequency rows dropped in training; PaSST's ESC-50 setting: 10,3), so that one command
gives the AST-base ESC-50 step with patchout, without it and PyTorch's.

It uses only Keras APIs, so it runs on any Keras 3 backend: set ``KERAS_BACKEND``
(``tensorflow`` by default; ``jax`` on machines that have JAX and PyTorch but no
TensorFlow). Without TensorFlow the model modules are imported one by one: the
package's ``__init__`` also imports the frontends, which are written in TensorFlow
ops and are not timed here. float32 matmuls run at full float32 precision on
both sides (no TF32).

Shapes (name: embed / layers / heads / ff, 128 mels x 512 frames, stride 10,
600 patches, [CLS] + [DIST], 50 classes, batch):
  bench:    192 / 4 / 4 / 768, batch 128 (the CPU benchmark's model)
  ast_base: 768 / 12 / 12 / 3072, batch 48 (AST base384 and its ESC-50 recipe)
  audioset_base: 768 / 12 / 12 / 3072, 128 mels x 998 frames (10 s), 12 x 99 = 1188
            patches, batch 12 (AST's AudioSet recipe; PaSST's patchout there: 40,4)
  tiny:     32 / 1 / 2 / 64, 32 mels x 64 frames, stride 16, batch 4 (tests)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import types
from pathlib import Path

from scripts.benchmark import _patchout_counts, _timed, hf_ast_config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "bench": dict(embed=192, layers=4, heads=4, ff=768, mels=128, frames=512, stride=10,
                  batch=128),
    "ast_base": dict(embed=768, layers=12, heads=12, ff=3072, mels=128, frames=512, stride=10,
                     batch=48),
    "audioset_base": dict(embed=768, layers=12, heads=12, ff=3072, mels=128, frames=998,
                          stride=10, batch=12),
    "tiny": dict(embed=32, layers=1, heads=2, ff=64, mels=32, frames=64, stride=16, batch=4),
}
CLASSES = 50


def _import_backbone():
    """``SpectrogramTransformer``, without TensorFlow if need be."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        if "src.models" not in sys.modules:
            package = types.ModuleType("src.models")
            package.__path__ = [str(ROOT / "src" / "models")]
            sys.modules["src.models"] = package
    return importlib.import_module("src.models.audio_transformer").SpectrogramTransformer


def _adam(lr):
    """The optimizer training uses: Adam with the fused update under TensorFlow (one
    ResourceApplyAdam per weight, ``src.training.optim``), Keras' own elsewhere."""
    import keras

    if keras.backend.backend() == "tensorflow":
        from src.training.optim import Adam

        return Adam(lr)
    return keras.optimizers.Adam(lr)


def _median_time(fn, steps):
    times = sorted(_timed(fn) for _ in range(steps))
    return times[len(times) // 2]


def time_keras(shape, precision, steps, jit=True, fused=False, patchout=None):
    import keras
    import numpy as np

    backbone_cls = _import_backbone()
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = backbone_cls(
            CLASSES, shape["frames"], shape["mels"], embed_dim=shape["embed"],
            num_layers=shape["layers"], num_heads=shape["heads"], ff_dim=shape["ff"],
            f_stride=shape["stride"], t_stride=shape["stride"], dropout_rate=0.0,
            norm_first=True, activation="gelu", pooling="cls_dist",
            fused_attention=fused, fused_qkv=fused, patchout=patchout,
        )
        model.build((None, shape["frames"], shape["mels"]))
        model.compile(optimizer=_adam(1e-4),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((shape["batch"], shape["frames"], shape["mels"])).astype("float32")
    y = rng.integers(0, CLASSES, shape["batch"]).astype("int32")
    # The batch as a backend tensor (on the GPU where there is one), as PyTorch's below:
    # the steps then time the model, not a host-to-device copy per step.
    x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
    start = time.perf_counter()
    first_loss = float(np.asarray(model.train_on_batch(x, y)).ravel()[0])
    compile_train = time.perf_counter() - start
    for _ in range(2):
        model.train_on_batch(x, y)
    train = _median_time(lambda: model.train_on_batch(x, y), steps)  # returns numpy: synced
    start = time.perf_counter()
    model.predict_on_batch(x)
    compile_infer = time.perf_counter() - start
    model.predict_on_batch(x)
    infer = _median_time(lambda: model.predict_on_batch(x), steps)
    last_loss = float(np.asarray(model.train_on_batch(x, y)).ravel()[0])
    return {
        "parameters": int(model.count_params()),
        "train_clips_per_s": shape["batch"] / train,
        "infer_clips_per_s": shape["batch"] / infer,
        "compile_train_s": compile_train,
        "compile_infer_s": compile_infer,
        "first_loss": first_loss,
        "loss_after_steps": last_loss,
    }


def time_pytorch(shape, precision, steps):
    import torch
    from transformers import ASTConfig, ASTForAudioClassification

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    config = hf_ast_config(ASTConfig, shape["embed"], shape["layers"], shape["heads"],
                           shape["ff"], shape["mels"], shape["frames"], shape["stride"], CLASSES)
    model = ASTForAudioClassification(config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(shape["batch"], shape["frames"], shape["mels"], device=device)
    y = torch.randint(0, CLASSES, (shape["batch"],), device=device)
    dtype = {"mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device, enabled=dtype is torch.float16)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def cast():
        return torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None)

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        with cast():
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sync()

    def infer():
        model.eval()
        with torch.inference_mode(), cast():
            model(x)
        sync()

    for _ in range(3):
        train()
        infer()
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_clips_per_s": shape["batch"] / _median_time(train, steps),
        "infer_clips_per_s": shape["batch"] / _median_time(infer, steps),
    }


def _device():
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return backend, str(jax.devices()[0])
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return backend, str(gpus[0]) if gpus else "CPU"
    return backend, "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="bench,ast_base")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-jit", action="store_true", help="without XLA")
    parser.add_argument("--fused", action="store_true",
                        help="model.fused_attention (keras.ops.dot_product_attention: cuDNN's "
                             "flash attention under JAX on a GPU where it applies) and "
                             "model.fused_qkv")
    parser.add_argument("--patchout", type=_patchout_counts, default=None, metavar="T,F",
                        help="also time our model with T time columns and F frequency rows "
                             "dropped in training (PaSST's ESC-50 setting: 10,3)")
    parser.add_argument("--vs-pytorch", action="store_true")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for name in shapes:
        if name not in SHAPES:
            parser.error(f"unknown shape {name!r}; choose from {sorted(SHAPES)}")
    for p in precisions:
        if p not in ("float32", "mixed_bfloat16", "mixed_float16"):
            parser.error(f"unknown precision {p!r}")

    import keras

    if keras.backend.backend() == "jax":
        import jax

        # float32 means float32 here (JAX's GPU default would round matmul inputs to TF32).
        jax.config.update("jax_default_matmul_precision", "highest")
    backend, device = _device()
    print(f"Keras {keras.__version__}, backend {backend}, device {device}", flush=True)
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        for precision in precisions:
            row = {"shape": name, **shape, "precision": precision, "backend": backend,
                   "device": device, "jit_compile": not args.no_jit, "fused": args.fused}
            try:
                row["ours"] = time_keras(shape, precision, args.steps, jit=not args.no_jit,
                                         fused=args.fused)
            except Exception as err:  # report and go on with the other settings
                row["ours_error"] = f"{type(err).__name__}: {err}"[:2000]
            if args.patchout:
                row["patchout"] = dict(zip(("time", "freq", "random"), args.patchout))
                try:
                    row["ours_patchout"] = time_keras(shape, precision, args.steps,
                                                      jit=not args.no_jit, fused=args.fused,
                                                      patchout=row["patchout"])
                except Exception as err:
                    row["ours_patchout_error"] = f"{type(err).__name__}: {err}"[:2000]
            if args.vs_pytorch:
                try:
                    row["pytorch"] = time_pytorch(shape, precision, args.steps)
                except Exception as err:
                    row["pytorch_error"] = f"{type(err).__name__}: {err}"[:2000]
            rows.append(row)
            _print_row(row)
            if args.json_out:
                args.json_out.write_text(json.dumps(rows, indent=1))
    ok = all("ours" in r and ("patchout" not in r or "ours_patchout" in r) for r in rows)
    return 0 if ok else 1


def _print_row(row):
    head = (f"{row['shape']} (batch {row['batch']}), {row['precision']}"
            f"{', fused' if row['fused'] else ''}:")
    if "ours" not in row:
        print(f"{head} ours failed: {row['ours_error']}", flush=True)
        return
    o = row["ours"]
    text = (f"{head} ours train {o['train_clips_per_s']:.1f} clips/s, infer "
            f"{o['infer_clips_per_s']:.1f} clips/s (compile {o['compile_train_s']:.0f} s + "
            f"{o['compile_infer_s']:.0f} s, loss {o['first_loss']:.3f} -> "
            f"{o['loss_after_steps']:.3f})")
    if "ours_patchout" in row:
        q, po = row["ours_patchout"], row["patchout"]
        text += (f"; with patchout t={po['time']}, f={po['freq']}: train "
                 f"{q['train_clips_per_s']:.1f} clips/s "
                 f"({q['train_clips_per_s'] / o['train_clips_per_s']:.2f}x), infer "
                 f"{q['infer_clips_per_s']:.1f}")
    elif "ours_patchout_error" in row:
        text += f"; with patchout failed: {row['ours_patchout_error']}"
    if "pytorch" in row:
        t = row["pytorch"]
        text += (f"; PyTorch train {t['train_clips_per_s']:.1f}, infer "
                 f"{t['infer_clips_per_s']:.1f}; ours/theirs "
                 f"{o['train_clips_per_s'] / t['train_clips_per_s']:.2f}x, "
                 f"{o['infer_clips_per_s'] / t['infer_clips_per_s']:.2f}x")
    elif "pytorch_error" in row:
        text += f"; PyTorch failed: {row['pytorch_error']}"
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
