"""`retinanet check-data`: validate a COCO-format dataset alone, the check training runs at start-up.

By default every image is decoded (a truncated file has an intact header), over every core, and
each file's result is cached beside the JSON, so that a second run, and training, decode only new
or changed files. --quick reads the headers only.

With --config (a shipped config's name or a YAML file, as `retinanet demo --config` takes them), it also
reports how well the config's anchors cover the boxes (retinanet/anchor_coverage.py), and with
--fit-anchors it searches anchors that cover them better and prints them as a config snippet.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("check-data", help="validate a COCO instances JSON and its image folder; "
                                          "list every problem; exit 1 if there are errors")
    p.add_argument("--json", required=True, help="the COCO instances JSON file")
    p.add_argument("--images", required=True, help="the folder that the JSON's file_name entries are relative to")
    p.add_argument("--strict", action="store_true", help="boxes with width or height <= 0 are errors, not warnings")
    p.add_argument("--masks", action="store_true",
                   help="also check every annotation's segmentation (polygons, RLE), as data.masks: true does")
    p.add_argument("--quick", action="store_true",
                   help="read only the image headers (sizes, EXIF orientation): fast, but misses truncated files")
    p.add_argument("--workers", type=int, default=0,
                   help="processes that decode the images (default 0: every core)")
    p.add_argument("--config", metavar="NAME|FILE",
                   help="also report the anchor coverage of this config (a shipped config, e.g. demo, or a YAML "
                        "file): the fraction of boxes with an anchor of IoU >= the matcher's foreground threshold, "
                        "with the images resized as training resizes them")
    p.add_argument("--fit-anchors", action="store_true",
                   help="with --config: search anchor sizes, scales and ratios that cover more boxes; print them as "
                        "a config snippet with the coverage before and after")
    p.add_argument("--worst", type=int, default=10, help="with --config: list this many boxes of lowest best IoU")
    p.add_argument("--generations", type=int, default=300,
                   help="with --fit-anchors: generations of the evolutionary search (default 300)")
    p.set_defaults(func=run)


def load_anchor_config(name: str):
    """--config NAME|FILE -> the Config (errors: one line naming the config)."""
    from ..config import load_config
    from .demo import demo_config

    cfg = load_config(str(demo_config(name)))
    if cfg.model.arch not in ("retinanet", "faster_rcnn"):
        raise ValueError(f"--config {name}: model.arch '{cfg.model.arch}' has no anchors "
                         f"(anchor coverage is for retinanet and faster_rcnn)")
    return cfg


def run(args) -> int:
    from ..data.validate import validate_coco

    if args.workers < 0:
        raise ValueError(f"--workers must be 0 (every core) or more, got {args.workers}")
    if args.fit_anchors and not args.config:
        raise ValueError("--fit-anchors needs --config (the config whose anchors to fit)")
    if args.generations < 0 or args.worst < 0:
        raise ValueError("--generations and --worst must be 0 or more")
    cfg = load_anchor_config(args.config) if args.config else None  # a bad config fails before the images are read
    report = validate_coco(args.json, args.images, strict=args.strict,
                           check_images="header" if args.quick else "decode", progress=True, workers=args.workers,
                           masks=args.masks)
    print(report.format())
    stats = report.read_stats
    if not args.quick and (stats.decoded or stats.cached):  # nothing read when the JSON or folder is missing
        where = f"cached in {stats.cache_file}" if stats.cache_file else f"not cached ({stats.cache_problem})"
        print(f"images decoded: {stats.decoded}, taken from the cache: {stats.cached}; results {where}")
    if report.unreadable:
        print(f"{len(report.unreadable)} unreadable image(s): training stops on them at start-up, or leaves "
              f"them out with data.skip_unreadable: true")
    if cfg is not None:
        if not report.ok:
            print("anchor coverage: not measured until the errors above are fixed")
        else:
            from ..anchor_coverage import anchor_coverage, fit_anchors, load_boxes

            boxes = load_boxes(report)
            print(anchor_coverage(boxes, cfg).format(worst=args.worst))
            if args.fit_anchors:
                print(fit_anchors(boxes, cfg, generations=args.generations).format())
    return 0 if report.ok else 1
