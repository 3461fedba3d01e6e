"""`retinanet convert --from torchvision SRC DST`: other projects' weights -> a checkpoint of ours."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert torchvision's retinanet_resnet50_fpn (v1, v2) or fasterrcnn_resnet50_fpn "
                                       "weights into a checkpoint",
                       description="Turn torchvision's retinanet_resnet50_fpn state dict (e.g. "
                                   "retinanet_resnet50_fpn_coco-eeacb38b.pth), retinanet_resnet50_fpn_v2's "
                                   "(retinanet_resnet50_fpn_v2_coco-5905b1c5.pth) or fasterrcnn_resnet50_fpn's "
                                   "(fasterrcnn_resnet50_fpn_coco-258fb6c6.pth) into a checkpoint whose config "
                                   "reproduces torchvision's architecture, anchors, resize, box coding and "
                                   "post-processing. Key mapping: docs/convert.md.")
    p.add_argument("src", help="torchvision weights file (.pth: a state dict, or a dict with 'model')")
    p.add_argument("dst", help="checkpoint to write (.pt)")
    p.add_argument("--from", dest="source", required=True, choices=["torchvision"], help="where the weights come from")
    p.add_argument("--arch", default="auto",
                   choices=["auto", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fasterrcnn_resnet50_fpn"],
                   help="torchvision's model the weights belong to; auto (default) tells them apart by their keys "
                        "(v2: GroupNorm in the heads, P6 from C5; Faster R-CNN: RPN and RoI heads); a named one must "
                        "agree with the keys")
    p.add_argument("--bn-eps", type=float, default=None,
                   help="the backbone's BatchNorm eps; default: what torchvision's COCO weights run with, 0.0 for v1 "
                        "(torchvision sets it when loading them; use 1e-5 for a v1 model built with weights=None) "
                        "and 1e-5 for v2")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..convert import convert_torchvision_retinanet
    from . import check_output_path

    if Path(args.dst).resolve() == Path(args.src).resolve():
        raise ValueError("the output checkpoint must not be the input file")
    check_output_path(args.dst, "the output checkpoint")
    ckpt = convert_torchvision_retinanet(args.src, args.dst, bn_eps=args.bn_eps, arch=args.arch)
    m = ckpt["config"]["model"]
    real = sum(1 for c in ckpt["categories"] if not c.get("placeholder"))
    print(f"wrote {args.dst} ({ckpt['converted_from'].split(':')[0]}): {len(ckpt['model'])} tensors, "
          f"{m['num_classes']} class slots ({real} classes, {m['num_classes'] - real} placeholders left out of "
          f"predictions), model.arch {m['arch']}, anchors '{m['anchor_style']}', resize '{m['resize_rounding']}', "
          f"P6 from {m['p6_from']}, {m['detections_per_image']} detections per image", file=sys.stderr)
    return 0
