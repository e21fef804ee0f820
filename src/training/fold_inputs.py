"""What a fold's result was computed from, besides its config.

A finished fold is skipped on the next run, and a killed one resumes from its backup;
the run directory's config check (:mod:`src.training.rundir`) makes sure the config is
the same. This module does the same for the inputs the config only points at: the clips
of each split with their labels, the stored features (or waveforms) of those clips, and
the pretrained weights' file. Each fold writes them, as digests, to
``fold_<k>/inputs.json`` when it starts; a later run that finds other inputs stops with
what changed, instead of skipping to an old result or resuming onto new data.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from src.config import ConfigError
from src.data.store import file_sha256, json_digest

INPUTS_FILE = "inputs.json"
SPLITS = ("train", "val", "test")


@functools.lru_cache(maxsize=8)
def _weights_sha256(path: str, size: int, mtime_ns: int) -> str:
    """A weights file's sha256, once per run for all its folds (keyed by its stat)."""
    return file_sha256(path)


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def fold_inputs(index, store, splits, pretrained: str | os.PathLike | None = None) -> dict:
    """The inputs of one fold as digests (a dataset at another root is another
    ``data.root``, which the config check sees).

    * ``splits``: per split, its clips with their labels (a relabelled clip, a clip moved
      to another fold or another split changes them);
    * ``features``: the feature store (its directory: the key of the frontend, decoder
      and library versions) and a digest of the decoded audio of each of the fold's
      clips, with one per data fold (a file whose audio changed changes them; one only
      touched or copied does not, nor how the store groups clips into shards); for a
      store written before the per-clip digests, the checksums of the shards that hold
      the clips (kept beside, for the records of older runs);
    * ``pretrained``: the weights file's sha256, when the model starts from one.
    """
    root = Path(index.root)
    out: dict = {"splits": {}}
    paths = []
    for name in SPLITS:
        rows = sorted(
            (_relative(index.records[i].path, root), index.records[i].label,
             int(index.records[i].fold))
            for i in getattr(splits, name)
        )
        paths.extend(index.records[i].path for i in getattr(splits, name))
        out["splits"][name] = {"clips": len(rows), "digest": json_digest(rows)}
    shards = store.shards_for(paths)
    out["features"] = {
        "shards": len(shards),
        "digest": json_digest(sorted(s.sha256 for s in shards)),
        "by_data_fold": {str(f): json_digest(sorted(s.sha256 for s in shards if s.fold == f))
                         for f in sorted({s.fold for s in shards})},
    }
    if shards and all(len(s.clips) == len(s.keys) for s in shards):
        wanted = set(paths)
        by_fold: dict[int, list] = {}
        for s in shards:
            by_fold.setdefault(s.fold, []).extend(
                (_relative(k, root), d) for k, d in zip(s.keys, s.clips) if k in wanted)
        per_fold = {str(f): json_digest(sorted(v)) for f, v in sorted(by_fold.items())}
        out["features"].update(
            store=Path(store.directory).name,
            clips_digest=json_digest(sorted(per_fold.items())),
            clips_by_data_fold=per_fold,
        )
    if pretrained is not None:
        st = os.stat(pretrained)
        out["pretrained"] = {"file": str(pretrained), "sha256": _weights_sha256(
            str(pretrained), int(st.st_size), int(st.st_mtime_ns))}
    return out


def _changed_folds(before: dict, now: dict) -> str:
    folds = sorted((f for f in set(before) | set(now) if before.get(f) != now.get(f)), key=int)
    return (f"the stored features of data fold(s) {', '.join(folds) or '?'} (an audio file "
            "in them changed)")


def changes(before: dict, now: dict) -> list[str]:
    """What differs between two :func:`fold_inputs`, in words (empty: the same)."""
    found = []
    for name in SPLITS:
        a, b = before.get("splits", {}).get(name), now["splits"][name]
        if a != b:
            counts = (f"{a['clips']} -> {b['clips']} clips" if a and a["clips"] != b["clips"]
                      else "the same number of clips")
            found.append(f"the {name} split ({counts}; its files, labels or folds differ)")
    a, b = before.get("features", {}), now["features"]
    if "clips_digest" in a and "clips_digest" in b:  # per clip: whatever the shards
        if a.get("store") != b.get("store"):
            # Another store key (an upgraded library, say): the same input only if the
            # features came out the same, byte for byte (the same shard checksums).
            if a.get("digest") != b["digest"]:
                found.append(f"the feature store ({a.get('store')} -> {b.get('store')}: "
                             "another frontend, decoder or library version computed other "
                             "features)")
        elif a["clips_digest"] != b["clips_digest"]:
            found.append(_changed_folds(a["clips_by_data_fold"], b["clips_by_data_fold"]))
    elif a.get("digest") != b["digest"]:  # a record or a store from before the clip digests
        found.append(_changed_folds(a.get("by_data_fold", {}), b["by_data_fold"]))
    a, b = before.get("pretrained"), now.get("pretrained")
    if a != b:
        if a is None or b is None:
            found.append(f"model.pretrained ({'none' if a is None else a['file']} -> "
                         f"{'none' if b is None else b['file']})")
        else:
            same_file = a["file"] == b["file"]
            found.append(f"model.pretrained ({b['file'] if same_file else a['file'] + ' -> ' + b['file']}"
                         f": sha256 {a['sha256'][:12]} -> {b['sha256'][:12]})")
    return found


def check_fold_inputs(fold_dir: Path, inputs: dict, fold: int | None,
                      finished: bool | None = None) -> None:
    """Stop if fold ``fold`` was computed from other inputs than ``inputs``; record them
    when the fold starts (or when a fold of an older run directory has no record yet).
    ``fold=None``: a pretraining run directory (``finished``: whether it is complete)."""
    path = Path(fold_dir) / INPUTS_FILE
    try:
        before = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        before = None  # unreadable: recorded anew
    if before is not None:
        found = changes(before, inputs)
        if found:
            if finished is None:
                finished = (Path(fold_dir) / "results.json").exists()
            state = "finished" if finished else "begun"
            what = (f"fold {fold} in {Path(fold_dir).parent}" if fold is not None
                    else f"the pretraining in {fold_dir}")
            raise ConfigError(
                f"{what} was {state} on other inputs than "
                f"this run has, with the same config: {'; '.join(found)}. Its results would "
                "be reported as if they came from these inputs. Run with "
                "trainer.resume=false to move the earlier results aside and train again, "
                "or restore the earlier inputs (or use another run directory: name=...)."
            )
        if "clips_digest" in before.get("features", {}) or (
                "clips_digest" not in inputs.get("features", {})):
            return
        # A record from before the per-clip digests, on the same shards: add them, so
        # that the store may be re-sharded from now on.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(inputs, indent=1))
    os.replace(tmp, path)
