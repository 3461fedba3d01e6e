"""`retinanet check-data`: validate a COCO-format dataset alone, the check training runs at start-up.

By default every image is decoded (a truncated file has an intact header), over every core, and
each file's result is cached beside the JSON, so that a second run, and training, decode only new
or changed files. --quick reads the headers only.
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
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.validate import validate_coco

    if args.workers < 0:
        raise ValueError(f"--workers must be 0 (every core) or more, got {args.workers}")
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
    return 0 if report.ok else 1
