"""`retinanet check-data`: validate a COCO-format dataset alone, the check training runs at start-up."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("check-data", help="validate a COCO instances JSON and its image folder; "
                                          "list every problem; exit 1 if there are errors")
    p.add_argument("--json", required=True, help="the COCO instances JSON file")
    p.add_argument("--images", required=True, help="the folder that the JSON's file_name entries are relative to")
    p.add_argument("--strict", action="store_true", help="boxes with width or height <= 0 are errors, not warnings")
    p.add_argument("--masks", action="store_true",
                   help="also check every annotation's segmentation (polygons, RLE), as data.masks: true does")
    p.add_argument("--decode", action="store_true",
                   help="decode every image fully (finds truncated files; slow) instead of reading headers")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.validate import validate_coco

    report = validate_coco(args.json, args.images, strict=args.strict,
                           check_images="decode" if args.decode else "header", progress=True,
                           masks=args.masks)
    print(report.format())
    return 0 if report.ok else 1
