"""`retinanet smoke`: build a RetinaNet and run it on one synthetic image (no downloads)."""

from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("smoke", help="build a RetinaNet and run one forward pass on a synthetic image")
    p.add_argument("--backbone", default="resnet50", help="resnet18 | resnet34 | resnet50 | resnet101 | resnext101_32x8d")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1067], metavar=("H", "W"), help="synthetic image size")
    p.add_argument("--num-classes", type=int, default=80, help="number of classes")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..config import Config
    from ..modeling import build_model

    if args.num_classes < 1:
        raise ValueError(f"--num-classes must be at least 1, got {args.num_classes}")
    if min(args.size) < 1:
        raise ValueError(f"--size must be at least 1 x 1 pixels, got {args.size[0]} x {args.size[1]}")
    cfg = Config()
    cfg.model.backbone, cfg.model.num_classes = args.backbone, args.num_classes
    torch.manual_seed(0)  # the same random weights every run
    model = build_model(cfg).eval()
    image = torch.rand(3, *args.size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model([image])  # warm-up (anchor cache, allocator)
        start = time.perf_counter()
        out = model([image])[0]
        ms = (time.perf_counter() - start) * 1000
    params = sum(p.numel() for p in model.parameters())
    print(f"RetinaNet {args.backbone}-FPN, {args.num_classes} classes: {params:,} parameters; "
          f"forward on one {args.size[0]}x{args.size[1]} image: {ms:.0f} ms fp32, {len(out['boxes'])} detections")
    return 0
