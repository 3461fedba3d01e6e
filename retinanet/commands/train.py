"""`retinanet train CONFIG.yaml [key=value ...] --output DIR`: train the config's model on COCO-format data.

    retinanet train my.yaml train_json=ann/train.json train_images=images/ iterations=20000 --output runs/a
    retinanet train --output runs/a --resume auto           # continue the run in runs/a
    torchrun --nproc_per_node 4 -m retinanet train my.yaml --output runs/b   # 4 processes (DDP)

The YAML file holds any of the config sections (model, loss, data, train; see retinanet/config.py);
model.arch picks the model: retinanet (default), faster_rcnn, or the segment proposal models
deepmask, sharpmask, fpn_masks (data.masks: true; validated by segment AR instead of AP);
`key=value` overrides follow it, with bare leaf names accepted where unique (`lr=0.005` is
`train.lr=0.005`). Unknown keys are an error that suggests the closest key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("train", help="train any model.arch (retinanet, faster_rcnn, deepmask, sharpmask, fpn_masks) "
                                     "on COCO-format data, validating by COCO AP or, for proposals, AR",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                   help="config file (optional with --resume: the run's own config.yaml is used)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied after the file")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="folder for checkpoints, config.yaml, metrics.jsonl and loss_curve.png (new or empty, "
                        "unless resuming)")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue a run: 'auto' takes the newest good checkpoint in --output (a new run if there "
                        "is none), or give a checkpoint_NNNNNNN.pt file (final.pt and best.pt hold weights only: "
                        "start from those with --weights)")
    p.add_argument("--weights", metavar="PATH",
                   help="start from the weights of a checkpoint of this package (training's final.pt or best.pt, "
                        "or `retinanet convert`'s; fine-tuning); tensors whose shape differs, "
                        "e.g. the classifier for another class count, are re-initialized and listed")
    p.add_argument("--device", help="cpu | cuda | cuda:N | auto (same as train.device=...)")
    p.add_argument("--seed", type=int, help="random seed for initialization and data order (train.seed=...)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (train.threads=...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def resolve_config(args):
    """The config from CONFIG.yaml (or the run's config.yaml when resuming without one), the
    overrides, and the --device/--seed/--threads shortcuts."""
    from ..config import ConfigError, load_config

    path = args.config
    overrides = list(args.overrides)
    if path is not None and "=" in path and not Path(path).exists():  # only overrides were given
        overrides.insert(0, path)
        path = None
    if path is None:
        if not args.resume:
            raise ConfigError("give a config file (CONFIG.yaml), or --resume to continue a run with its own config")
        path = str(Path(args.output) / "config.yaml")
        if not Path(path).is_file():
            raise ConfigError(f"no config file given and {path} does not exist")
    for flag, key in (("device", "train.device"), ("seed", "train.seed"), ("threads", "train.threads")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    return load_config(path, overrides)


def run(args) -> int:
    from ..engine import NonFiniteLossError, train

    cfg = resolve_config(args)
    try:
        summary = train(cfg, args.output, resume=args.resume, weights=args.weights, progress=not args.no_progress)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary:
        line = f"done: {summary['iterations']} iterations in {summary['seconds']:.0f} s; weights in {summary['final']}"
        if summary["val"]:
            from ..engine import headline_metrics

            primary, _ = headline_metrics(summary["val"])
            if summary["val"][primary] is not None:
                line += (f"; validation {primary} {summary['val'][primary]:.3f} (best {summary['best_ap']:.3f}, "
                         f"best.pt)")
        print(line)
    return 0
