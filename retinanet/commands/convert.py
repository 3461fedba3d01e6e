"""`retinanet convert --from torchvision SRC DST`: other projects' weights -> a checkpoint of ours."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert torchvision's retinanet_resnet50_fpn weights into a checkpoint",
                       description="Turn torchvision's retinanet_resnet50_fpn (v1) state dict (e.g. "
                                   "retinanet_resnet50_fpn_coco-eeacb38b.pth) into a checkpoint whose config "
                                   "reproduces torchvision's anchors, resize, box coding and post-processing. "
                                   "Key mapping: docs/convert.md.")
    p.add_argument("src", help="torchvision weights file (.pth: a state dict, or a dict with 'model')")
    p.add_argument("dst", help="checkpoint to write (.pt)")
    p.add_argument("--from", dest="source", required=True, choices=["torchvision"], help="where the weights come from")
    p.add_argument("--bn-eps", type=float, default=0.0,
                   help="BatchNorm eps the weights were trained with: 0.0 for torchvision's COCO weights (default; "
                        "torchvision sets it when loading them), 1e-5 for a model built with weights=None")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..convert import convert_torchvision_retinanet

    if Path(args.dst).resolve() == Path(args.src).resolve():
        raise ValueError("the output checkpoint must not be the input file")
    ckpt = convert_torchvision_retinanet(args.src, args.dst, bn_eps=args.bn_eps)
    m = ckpt["config"]["model"]
    real = sum(1 for c in ckpt["categories"] if not c.get("placeholder"))
    print(f"wrote {args.dst}: {len(ckpt['model'])} tensors, {m['num_classes']} class slots ({real} classes, "
          f"{m['num_classes'] - real} placeholders left out of predictions), anchors '{m['anchor_style']}', "
          f"resize '{m['resize_rounding']}', P6 from {m['p6_from']}, {m['detections_per_image']} detections per image",
          file=sys.stderr)
    return 0
