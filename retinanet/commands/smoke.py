"""`retinanet smoke`: build a model of any model.arch and run it on one synthetic image (no downloads)."""

from __future__ import annotations

import time

# model.arch -> the shipped config its model is built from (retinanet/configs/NAME.yaml; None: the
# config defaults, the paper's RetinaNet)
ARCH_CONFIGS = {"retinanet": None, "faster_rcnn": "faster_rcnn_paper", "deepmask": "segprop_deepmask_shapes",
                "sharpmask": "segprop_sharpmask_shapes", "fpn_masks": "segprop_fpn_shapes"}


def register(sub) -> None:
    p = sub.add_parser("smoke", help="build a model of any model.arch (default: the paper's RetinaNet) and run one "
                                     "forward pass on a synthetic image")
    p.add_argument("--arch", default="retinanet", choices=list(ARCH_CONFIGS),
                   help="the model: retinanet (the config defaults: RetinaNet-50, 800 px), faster_rcnn "
                        "(faster_rcnn_paper.yaml), or a segment proposal model deepmask, sharpmask, fpn_masks (their "
                        "segprop_*_shapes.yaml configs, 192 px)")
    p.add_argument("--backbone", help="resnet18 | resnet34 | resnet50 | resnet101 | resnext101_32x8d "
                                      "(default: the config's, resnet50 for the detectors)")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1067], metavar=("H", "W"), help="synthetic image size")
    p.add_argument("--num-classes", type=int, default=80,
                   help="number of classes of a detector (default 80; segment proposals have one, 'object')")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..config import Config, load_config
    from ..modeling import build_model
    from .demo import ARCH_NAMES, DEMO_CONFIG

    if args.num_classes < 1:
        raise ValueError(f"--num-classes must be at least 1, got {args.num_classes}")
    if min(args.size) < 1:
        raise ValueError(f"--size must be at least 1 x 1 pixels, got {args.size[0]} x {args.size[1]}")
    name = ARCH_CONFIGS[args.arch]
    cfg = load_config(str(DEMO_CONFIG.parent / f"{name}.yaml")) if name else Config()
    if args.backbone:
        cfg.model.backbone = args.backbone
    proposals = args.arch in Config.PROPOSAL_ARCHS
    cfg.model.num_classes = 1 if proposals else args.num_classes
    torch.manual_seed(0)  # the same random weights every run
    model = build_model(cfg).eval()
    image = torch.rand(3, *args.size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model([image])  # warm-up (anchor cache, allocator)
        start = time.perf_counter()
        out = model([image])[0]
        ms = (time.perf_counter() - start) * 1000
    params = sum(p.numel() for p in model.parameters())
    what = "masks" if "masks" in out else "detections"
    print(f"{ARCH_NAMES[args.arch]} ({cfg.model.backbone}), {cfg.model.num_classes} class(es): {params:,} parameters; "
          f"forward on one {args.size[0]}x{args.size[1]} image (shorter side resized to {cfg.model.min_size} px): "
          f"{ms:.0f} ms fp32, {len(out['boxes'])} {what}")
    return 0
