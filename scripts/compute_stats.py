"""Dataset mean/std of the model's log-mel input (AST's normalisation), over the training
split only.

    python -m scripts.compute_stats data=esc50 [frontend.n_mels=...] [--fold K] [--json]

Prints the values to put into ``data.norm_mean`` / ``data.norm_std``. By default
training derives them from each run's own training split; fixing them makes runs on
different test folds share one normalisation, which is only honest if the numbers come
from data that no test fold contains: here, the training split of test fold ``K``
(default: the first of ``data.folds``; validation and test clips excluded), after the
padding / cropping to ``data.target_frames`` that the model applies. Uses the same
config composition, reader, feature store and splits as training.
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=esc50")
    parser.add_argument("--fold", type=int, default=None,
                        help="the test fold whose training split is used (default: the first "
                             "of data.folds)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_intermixed_args(argv)

    from src import import_tensorflow

    import_tensorflow()  # before the modules below import it
    from src.config import ConfigError, unknown_override_keys
    from src.data.datasets import load_index
    from src.data.index import DatasetError
    from src.data.pipeline import feature_stats
    from src.data.splits import check_split_config, fold_list, make_splits
    from src.train import build_features

    unknown = unknown_override_keys(args.overrides, "train")
    if unknown:
        print(f"error: {unknown}", file=sys.stderr)
        return 2
    cfg = compose(args.overrides)
    fold = int(args.fold if args.fold is not None else fold_list(cfg.data.folds)[0])
    try:
        check_split_config(cfg.data)
        index = load_index(cfg.data)
        if fold not in index.folds():
            raise ConfigError(f"--fold {fold} is not a fold of the dataset ({index.folds()})")
        store, index, _skipped = build_features(cfg, index)
        splits = make_splits(index, fold, cfg.data)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    target_frames = cfg.data.get("target_frames")
    mean, std = feature_stats(store, index, splits.train, target_frames=target_frames,
                              max_clips=cfg.data.get("stats_max_clips"),
                              seed=int(cfg.data.get("split_seed", 0)))
    frames = int(target_frames or store.clip_frames)
    out = {"dataset": cfg.data.name, "test_fold": fold, "clips": int(len(splits.train)),
           "norm_mean": mean, "norm_std": std, "frames": frames, "n_mels": store.n_mels}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{cfg.data.name}: training split of test fold {fold}: {len(splits.train)} clips, "
              f"features ({frames}, {store.n_mels})")
        print(f"data.norm_mean={mean:.7g} data.norm_std={std:.7g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
