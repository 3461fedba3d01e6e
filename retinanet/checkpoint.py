"""Checkpoints are data, never code: plain dicts of tensors, numbers, strings and lists.

Layout (FORMAT_VERSION 1):
    {"format_version": 1,
     "config": config_to_dict(cfg),             # rebuilds the model exactly
     "model": model.state_dict(),
     "categories": [{"id": 1, "name": "cat"}, ...],  # contiguous label i -> categories[i]
     # training checkpoints (retinanet/engine.py) add:
     "iteration": 5000,                         # optimizer steps taken
     "optimizer": optimizer.state_dict(),       # SGD momentum buffers
     "scaler": scaler.state_dict() or None,     # fp16 gradient scaler
     "data_position": {"micro_batches": 5000, "seed": 0, "world_size": 1},  # data order to resume from
     "rng": [rng_state() of each process],      # torch, cuda, numpy, python
     "best_ap": 0.37 or None}                   # best validation AP so far
     # with train.ema > 0 (retinanet/ema.py), every checkpoint the engine writes has:
     #   "model": the moving average (what evaluation, best.pt and final.pt use),
     #   "raw_model": the trained weights (what resuming continues from), "ema_updates": 5000

There is no scheduler state: the learning rate is a pure function of the iteration (engine.get_lr).

Written atomically (temp file in the same folder, fsync, os.replace), read with
`torch.load(..., weights_only=True)`, so a checkpoint from a stranger cannot run anything.
"""

from __future__ import annotations

import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .config import Config, config_from_dict, config_to_dict

FORMAT_VERSION = 1


def save_atomic(obj: dict, path: str) -> None:
    """torch.save to `path` so that a crash leaves either the old file or the new one, never half of one
    (a temp file beside it, fsync, os.replace, fsync of the folder: retinanet.atomic.atomic_write)."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def load_data_file(path: str, kind: str = "checkpoint"):
    """torch.load as data only (`weights_only=True`: nothing in the file can run), on the CPU.
    Errors are one line naming the file: missing, or unreadable (not a PyTorch file, truncated,
    corrupt, or holding Python objects that weights_only loading refuses)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{kind} not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        if not zipfile.is_zipfile(p):  # torch.save writes a zip archive (since PyTorch 1.6)
            why = "not a torch.save file (an ONNX model, a text file, another format?), or a truncated one"
        elif isinstance(e, pickle.UnpicklingError):  # weights_only: plain data only
            why = "it holds Python objects, not only tensors and plain data (save a state dict instead)"
        else:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = f"truncated or corrupt? {type(e).__name__}: {first}"
        raise ValueError(f"{p}: not a readable {kind}: {why}") from None


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint as data only. Errors name the file."""
    p = Path(path)
    ckpt = load_data_file(p, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{p}: not a retinanet checkpoint (no 'model' and 'config' entries)")
    version = ckpt.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise ValueError(f"{p}: checkpoint format {version} is newer than this retinanet supports ({FORMAT_VERSION})")
    return ckpt


def make_checkpoint(model: torch.nn.Module, cfg: Config, categories: list, **extra) -> dict:
    model = getattr(model, "module", model)  # unwrap DDP
    return {"format_version": FORMAT_VERSION, "config": config_to_dict(cfg), "model": model.state_dict(),
            "categories": list(categories), **extra}


def load_model(path: str, device: str = "cpu"):
    """(model in eval mode, config, categories) from a checkpoint file."""
    from .modeling import build_model

    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    cfg.model.backbone_weights = None  # the checkpoint already holds the weights
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    categories = ckpt.get("categories") or [{"id": i, "name": str(i)} for i in range(cfg.model.num_classes)]
    return model.to(device).eval(), cfg, categories


# ----------------------------------------------------------------------------------------------
# training checkpoints: a numbered series in the output folder, RNG states, fine-tuning weights

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)\.pt$")


def checkpoint_name(iteration: int) -> str:
    return f"checkpoint_{iteration:07d}.pt"


def list_checkpoints(folder: str) -> list:
    """The numbered training checkpoints in `folder`, oldest first, as (iteration, path)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return sorted(found)


def latest_good_checkpoint(folder: str) -> tuple:
    """(path, checkpoint) of the newest numbered checkpoint in `folder` that loads, or (None, None).

    A newer checkpoint that does not load (truncated by a crash, a full disk) is reported with a
    warning naming it and skipped in favour of the one before (the engine keeps the last two).
    """
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(str(path))
        except ValueError as e:
            warnings.warn(f"skipping a checkpoint that does not load: {e}", stacklevel=2)
    return None, None


def prune_checkpoints(folder: str, keep: int) -> None:
    """Delete all but the `keep` newest numbered checkpoints in `folder`."""
    for _, path in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        path.unlink()


def rng_state() -> dict:
    """This process's random number generator states, as plain data (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def load_weights(model: torch.nn.Module, path: str) -> dict:
    """Initialize `model` from the weights in a retinanet checkpoint, for fine-tuning.

    Tensors whose shape differs (the classifier's last conv when the class count changes, the
    predictors when the anchor count changes) keep the model's own initialization (the classifier
    bias gets the prior, sec. 4.1). Returns {"loaded": [keys], "skipped": ["key: (shape) in file,
    (shape) in model", ...], "missing": [keys not in the file], "unexpected": [file keys not in the model]}.
    """
    model = getattr(model, "module", model)
    source = load_checkpoint(path)["model"]
    own = model.state_dict()
    usable, skipped = {}, []
    for key, value in source.items():
        if key in own and own[key].shape != value.shape:
            skipped.append(f"{key}: {tuple(value.shape)} in {path}, {tuple(own[key].shape)} in the model")
        elif key in own:
            usable[key] = value
    model.load_state_dict(usable, strict=False)
    return {"loaded": sorted(usable), "skipped": skipped,
            "missing": sorted(k for k in own if k not in source),
            "unexpected": sorted(k for k in source if k not in own)}
