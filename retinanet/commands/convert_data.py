"""`retinanet convert-data`: YOLO, Pascal VOC, LabelMe or CVAT annotations -> a COCO instances JSON,
and COCO -> YOLO or VOC (`--to`). The rules (coordinates, ids, `difficult`) are in retinanet/data/formats/."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("convert-data", help="convert YOLO / Pascal VOC / LabelMe / CVAT annotations into a COCO "
                                            "instances JSON (or COCO into YOLO / VOC with --to)",
                       description="--from FORMAT INPUT --output instances.json: INPUT is the image folder (yolo; "
                                   "labels found as ultralytics finds them, or --labels), the folder of XML files "
                                   "(voc), of JSON files (labelme), or the annotations.xml (cvat). "
                                   "--to FORMAT INSTANCES.json --images DIR --output FOLDER writes the other way. "
                                   "Images without objects are kept; category ids are 1..K in the names' order.")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source", choices=["yolo", "voc", "labelme", "cvat"],
                           help="read this format, write COCO")
    direction.add_argument("--to", dest="target", choices=["yolo", "voc"], help="read COCO, write this format")
    p.add_argument("input", metavar="INPUT", help="what to convert (see the description)")
    p.add_argument("--output", required=True,
                   help="the COCO JSON to write (--from), or the folder to write the labels into (--to)")
    p.add_argument("--images", help="--from: the folder the COCO file_names are relative to, the one to give "
                                    "`check-data --images` (default: INPUT for yolo and labelme; for voc a JPEGImages "
                                    "folder beside INPUT, else INPUT; for cvat an images folder beside the XML, else "
                                    "its folder). --to: the COCO dataset's image folder (required)")
    p.add_argument("--labels", help="yolo: the folder of the label files (default: images/ -> labels/, else beside "
                                    "the images)")
    p.add_argument("--names", help="the class names, in category-id order: a data.yaml (names) or a text file with "
                                   "one name a line (default: yolo finds data.yaml / classes.txt; voc, labelme: every "
                                   "name found, sorted; cvat: the labels of its <meta>)")
    p.add_argument("--difficult", choices=["crowd", "keep"], default="crowd",
                   help="voc: a difficult object becomes a crowd region, ignored by training and COCO evaluation as "
                        "VOC's evaluation ignores it (crowd, default), or an ordinary object (keep); both keep "
                        "\"difficult\": 1 on the annotation")
    p.add_argument("--split", help="voc: only the image ids listed in this file (ImageSets/Main/train.txt)")
    p.add_argument("--voc-zero-based", action="store_true",
                   help="voc: the XML corners are 0-based continuous pixels (x = xmin, width = xmax - xmin), not "
                        "VOC's 1-based inclusive indices")
    p.add_argument("--overwrite", action="store_true", help="--from: replace --output if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data import formats
    from ..data.validate import validate_coco
    from . import check_output_path

    if args.target:
        return _write_other(args)
    output = Path(args.output)
    check_output_path(output, "--output")
    if output.exists() and not args.overwrite:
        raise ValueError(f"--output {output} exists; give another file, or --overwrite to replace it")
    if Path(args.input).exists() and Path(args.input).resolve() == output.resolve():
        raise ValueError("--output must not be the input file")
    for flag, value, fmt in (("--labels", args.labels, "yolo"), ("--voc-zero-based", args.voc_zero_based, "voc"),
                             ("--split", args.split, "voc")):
        if value and args.source != fmt:
            raise ValueError(f"{flag} applies to --from {fmt} only")
    names = formats.read_names(args.names) if args.names else None
    kwargs = {"names": names}
    if args.source == "yolo":  # the file itself, so that the JSON's info says where the names came from
        kwargs.update(names=args.names, labels=args.labels, image_root=args.images)
    elif args.source == "labelme":
        kwargs.update(image_root=args.images)
    else:
        kwargs.update(images=args.images)
    if args.source == "voc":
        kwargs.update(difficult=args.difficult, one_based=not args.voc_zero_based, split=args.split)
    coco = formats.READERS[args.source](args.input, **kwargs)
    formats.write_coco(coco, output, overwrite=args.overwrite)

    image_root = _image_root(args)
    crowd = sum(a["iscrowd"] for a in coco["annotations"])
    polygons = sum("segmentation" in a for a in coco["annotations"])
    negatives = len(coco["images"]) - len({a["image_id"] for a in coco["annotations"]})
    print(f"wrote {output}: {len(coco['images'])} images ({negatives} without objects), {len(coco['annotations'])} "
          f"annotations ({crowd} crowd, {polygons} with polygons), {len(coco['categories'])} categories: "
          f"{', '.join(str(c['id']) + ' ' + c['name'] for c in coco['categories'])}", file=sys.stderr)
    if "names" in coco["info"]:
        print(f"class names from {coco['info']['names']}; label layout: {coco['info']['layout']}", file=sys.stderr)
    report = validate_coco(output, image_root, check_images="exists")  # the sizes were read while converting
    for warning in report.warnings[:10]:
        print(f"warning: {warning}", file=sys.stderr)
    if len(report.warnings) > 10:
        print(f"... and {len(report.warnings) - 10} more warnings (retinanet check-data lists them all)",
              file=sys.stderr)
    report.raise_if_errors()
    print(f"check it, and decode every image: retinanet check-data --json {output} --images {image_root}",
          file=sys.stderr)
    return 0


def _image_root(args) -> Path:
    """The folder the written file_names are relative to: --images, else the reader's default."""
    if args.images:
        return Path(args.images)
    source = Path(args.input)
    if args.source == "voc" and (source.absolute().parent / "JPEGImages").is_dir():
        return source.absolute().parent / "JPEGImages"
    if args.source == "cvat":
        return source.parent / "images" if (source.parent / "images").is_dir() else source.parent
    return source


def _write_other(args) -> int:
    from ..data import formats
    from . import check_output_path

    if args.overwrite:
        raise ValueError("--overwrite applies to --from only: --to never replaces a file")
    if not args.images:
        raise ValueError(f"--to {args.target} needs --images, the COCO dataset's image folder")
    check_output_path(args.output, "--output", folder=True)
    written = formats.WRITERS[args.target](args.input, args.images, args.output)
    for warning in written["warnings"][:10]:
        print(f"warning: {warning}", file=sys.stderr)
    if args.target == "yolo":
        left_out = f", {written['crowd_left_out']} crowd regions left out (YOLO has none)" \
            if written["crowd_left_out"] else ""
        print(f"wrote {written['images']} label files ({written['boxes']} boxes{left_out}) and "
              f"{written['data_yaml']} to {args.output}; read back with: retinanet convert-data --from yolo "
              f"{args.images} --labels {args.output} --output instances.json", file=sys.stderr)
    else:
        print(f"wrote {written['images']} XML files ({written['boxes']} boxes) and {written['classes_txt']} to "
              f"{args.output}; read back with: retinanet convert-data --from voc {args.output} --images "
              f"{args.images} --names {written['classes_txt']} --output instances.json", file=sys.stderr)
    return 0
