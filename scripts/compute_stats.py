"""Dataset mean/std of the frontend's log-mel features (AST's normalisation).

    python -m scripts.compute_stats data=esc50 [frontend.n_mels=...] [--folds 1,2,3,4]

Prints the values to put into ``data.norm_mean`` / ``data.norm_std`` (by
default training derives them from the training folds of each run). Uses the
same config composition, reader, decoder and frontend as training, and the
same feature cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=esc50")
    parser.add_argument("--folds", default=None, help="comma-separated folds (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)

    import numpy as np

    from src.data.datasets import load_index
    from src.data.esc50 import DatasetError
    from src.data.pipeline import compute_features, feature_stats
    from src.models.build import build_frontend

    cfg = compose(args.overrides)
    try:
        index = load_index(cfg.data)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    records = index.records
    if args.folds:
        wanted = {int(f) for f in args.folds.split(",")}
        records = [r for r in records if r.fold in wanted]
        if not records:
            print(f"error: no clips in folds {sorted(wanted)} (dataset folds: {index.folds()})",
                  file=sys.stderr)
            return 2
    frontend = build_frontend(cfg.frontend)
    clip_samples = int(round(float(cfg.data.clip_seconds) * int(cfg.data.sample_rate)))
    feats = compute_features(
        frontend,
        [r.path for r in records],
        sample_rate=int(cfg.data.sample_rate),
        clip_samples=clip_samples,
        remove_mean=bool(cfg.data.remove_mean),
        cache_dir=Path(cfg.paths.cache_dir) / "features" if cfg.data.feature_cache else None,
    )
    mean, std = feature_stats(feats)
    out = {"dataset": cfg.data.name, "clips": len(records), "norm_mean": mean, "norm_std": std,
           "frames": int(feats.shape[1]), "n_mels": int(feats.shape[2]),
           "finite": bool(np.isfinite(feats).all())}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{cfg.data.name}: {len(records)} clips, features {feats.shape[1:]}")
        print(f"data.norm_mean={mean:.7g} data.norm_std={std:.7g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
