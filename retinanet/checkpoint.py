"""Checkpoints are data, never code: plain dicts of tensors, numbers, strings and lists.

Layout (FORMAT_VERSION 1):
    {"format_version": 1,
     "config": config_to_dict(cfg),             # rebuilds the model exactly
     "model": model.state_dict(),
     "categories": [{"id": 1, "name": "cat"}, ...],  # contiguous label i -> categories[i]
     ... training state added by the engine (optimizer, scheduler, iteration, rng, ...)}

Written atomically (temp file in the same folder, fsync, os.replace), read with
`torch.load(..., weights_only=True)`, so a checkpoint from a stranger cannot run anything.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .config import Config, config_from_dict, config_to_dict

FORMAT_VERSION = 1


def save_atomic(obj: dict, path: str) -> None:
    """torch.save to `path` so that a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint as data only. Errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{p}: not a readable checkpoint (truncated or corrupt?): {type(e).__name__}: {e}") from None
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
    from .model import build_model

    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    cfg.model.backbone_weights = None  # the checkpoint already holds the weights
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    categories = ckpt.get("categories") or [{"id": i, "name": str(i)} for i in range(cfg.model.num_classes)]
    return model.to(device).eval(), cfg, categories
