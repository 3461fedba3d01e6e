"""`retinanet predict`: detections for image files and folders, as COCO results JSON and drawn copies."""

from __future__ import annotations

import collections
import json
import sys
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("predict", help="run a checkpoint (detections of any model.arch; masks too for segment "
                                       "proposals) on image files and folders (COCO results JSON, drawn copies)",
                       description="Run a checkpoint on image files and folders (searched recursively for image "
                                   "files). Writes COCO-format results with each image's file name; a file that "
                                   "cannot be read is reported and skipped, and makes the exit code 1.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders of images")
    p.add_argument("--checkpoint", required=True, help="model checkpoint (.pt) from training or `retinanet convert`")
    p.add_argument("--output", help="write the results JSON here (default: print it to stdout)")
    p.add_argument("--coco-json", metavar="JSON",
                   help="take image ids from this COCO file's images, matched by file_name (the path inside "
                        "the folder, or the file's name), so that `retinanet eval --gt JSON` can score the results")
    p.add_argument("--save-images", metavar="DIR",
                   help="write copies of the images with boxes, class names and scores drawn into DIR "
                        "(never an input folder; inputs are never written)")
    p.add_argument("--draw-threshold", type=float, default=0.3,
                   help="draw only detections with at least this score (default 0.3; the JSON keeps all)")
    p.add_argument("--score-threshold", type=float, help="minimum score (default: the checkpoint's, usually 0.05)")
    p.add_argument("--nms-threshold", type=float, help="NMS IoU threshold (default: the checkpoint's, usually 0.5)")
    p.add_argument("--max-detections", type=int, help="detections kept per image (default: the checkpoint's)")
    p.add_argument("--classes", help="only these classes, by name or category id, comma-separated: 'person,car' or '1,3'")
    p.add_argument("--class-agnostic", action="store_true", help="NMS across classes (default: per class)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--workers", type=int, default=2, help="threads decoding images ahead of the model (default 2)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for the network (torch.set_num_threads; default: PyTorch's). On a machine "
                        "busy with other work, fewer threads than cores is often much faster")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation (box detectors; not segment proposals): shorter side 0.75x, 1x, "
                        "1.25x the model's, each plain and flipped, "
                        "merged by class-aware NMS with box voting (about 6-8x the time)")
    p.add_argument("--tta-scales", type=float, nargs="+", metavar="S",
                   help="with --tta: other scales (factors of the model's size), e.g. --tta-scales 1 1.5")
    p.add_argument("--tile", type=int, metavar="SIZE",
                   help="tiled inference for images much larger than the training images (box detectors): "
                        "SIZE x SIZE px crops, each resized as the model resizes any image (SIZE = the model's "
                        "min_size keeps the image's resolution), plus the whole image; merged by class-aware NMS. "
                        "Raise --max-detections for crowded images")
    p.add_argument("--tile-overlap", type=float, metavar="F",
                   help="with --tile: overlap of neighbouring crops, a fraction of SIZE in [0, 1) (default 0.25)")
    p.add_argument("--tile-merge", choices=("greedy_nmm", "nms"),
                   help="with --tile: merge the crops' detections by class-aware nms (default) or greedy_nmm "
                        "(SAHI's greedy non-maximum merging, IoS 0.5)")
    p.add_argument("--no-full-image", action="store_true",
                   help="with --tile: crops only, without the whole image resized as usual")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the network (CPU with AVX512-BF16/AMX, or GPU)")
    p.set_defaults(func=run)


def collect_images(paths: list) -> tuple:
    """Paths as given -> ([(file, file_name)], [problems], folders, ignored).

    Folders are searched recursively for files with an image extension Pillow knows; file_name is
    the path inside the folder. A file named directly is always tried (file_name: its name).
    """
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    files, problems, folders, seen, ignored = [], [], [], set(), 0
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            folders.append(path.resolve())
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                if f.suffix.lower() not in extensions:
                    ignored += 1
                elif f.resolve() not in seen:
                    seen.add(f.resolve())
                    files.append((f, f.relative_to(path).as_posix()))
        elif path.is_file():
            if path.resolve() not in seen:
                seen.add(path.resolve())
                files.append((path, path.name))
        else:
            problems.append(f"{raw}: no such file or folder")
    return files, problems, folders, ignored


def coco_image_ids(files: list, coco_json: str) -> list:
    """Image id of each file from a COCO file's `images` (file_name: exact, else by the file's name)."""
    try:
        images = json.loads(Path(coco_json).read_text())["images"]
        by_name = {str(img["file_name"]): int(img["id"]) for img in images}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{coco_json}: not a readable COCO file with images (file_name, id): {e}") from None
    by_base = collections.defaultdict(list)
    for name, image_id in by_name.items():
        by_base[Path(name).name].append(image_id)
    ids, unknown = [], []
    for _, name in files:
        if name in by_name:
            ids.append(by_name[name])
        elif len(by_base.get(Path(name).name, [])) == 1:
            ids.append(by_base[Path(name).name][0])
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{coco_json}: no single image with the file name of {len(unknown)} input(s): "
                         f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}")
    return ids


def output_paths(files: list, out_dir: Path, folders: list) -> list:
    """Where each drawn copy goes: out_dir / file_name, made unique. Refuses to touch any input."""
    from PIL import Image

    out_dir = out_dir.resolve()
    for folder in folders:
        if out_dir == folder or folder in out_dir.parents:
            raise ValueError(f"--save-images {out_dir} is an input folder or inside one ({folder}); "
                             "choose a folder outside the inputs")
    inputs = {f.resolve() for f, _ in files}
    writable = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    used, out = set(), []
    for image_id, (_, name) in enumerate(files):
        target = out_dir / name
        if target.suffix.lower() not in writable:
            target = target.with_name(target.name + ".png")
        if target in used:
            target = target.with_name(f"{target.stem}-{image_id}{target.suffix}")
        if target.resolve() in inputs:
            raise ValueError(f"--save-images would overwrite the input {target}")
        used.add(target)
        out.append(target)
    return out


def load_ahead(files: list, workers: int, ahead: int):
    """Yield (array or None, error or None) per file, in order, decoding up to `ahead` files in threads."""
    from concurrent.futures import ThreadPoolExecutor

    from ..data.images import ImageError, load_image

    def load(path):
        try:
            return load_image(path), None
        except ImageError as e:
            return None, str(e)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = collections.deque()
        queue = iter(files)
        for path, _ in queue:
            pending.append(pool.submit(load, path))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(queue, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt[0]))
            yield result


def check_arguments(args) -> None:
    """The numeric options, the device and the outputs, refused at start-up when out of range or not
    writable (a score threshold above 1 would silently give no detections)."""
    from ..engine import resolve_device
    from . import check_output_path

    for flag, value, low, high in (("--score-threshold", args.score_threshold, 0.0, 1.0),
                                   ("--nms-threshold", args.nms_threshold, 0.0, 1.0),
                                   ("--draw-threshold", args.draw_threshold, 0.0, 1.0)):
        if value is not None and not low <= value <= high:
            raise ValueError(f"{flag} must be in [{low:g}, {high:g}], got {value:g}")
    for flag, value, low in (("--max-detections", args.max_detections, 1), ("--batch-size", args.batch_size, 1),
                             ("--workers", args.workers, 0), ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.tta_scales and not args.tta:
        raise ValueError("--tta-scales needs --tta")
    if args.tta_scales and min(args.tta_scales) <= 0:
        raise ValueError(f"--tta-scales must be positive, got {args.tta_scales}")
    tiling = [flag for flag, given in (("--tile-overlap", args.tile_overlap is not None),
                                       ("--tile-merge", args.tile_merge is not None),
                                       ("--no-full-image", args.no_full_image)) if given]
    if tiling and args.tile is None:
        raise ValueError(f"{tiling[0]} needs --tile")
    if args.tile is not None and args.tile < 1:
        raise ValueError(f"--tile must be >= 1 (pixels), got {args.tile}")
    if args.tile_overlap is not None and not 0.0 <= args.tile_overlap < 1.0:
        raise ValueError(f"--tile-overlap must be in [0, 1), got {args.tile_overlap:g}")
    if args.tile is not None and args.tta:
        raise ValueError("--tile and --tta do not combine: choose one")
    if args.device:
        resolve_device(args.device)  # a GPU asked for and absent: one line now
    if args.output:
        check_output_path(args.output, "--output")
    if args.save_images:
        check_output_path(args.save_images, "--save-images", folder=True)


def run(args) -> int:
    from tqdm import tqdm

    from ..atomic import atomic_write
    from ..predict import Predictor, draw_detections

    check_arguments(args)

    files, problems, folders, ignored = collect_images(args.paths)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if ignored:
        print(f"ignored {ignored} file(s) without an image extension in the folders", file=sys.stderr)
    if not files:
        if not problems:  # otherwise each missing input has had its error line
            print("error: no image files found", file=sys.stderr)
        return 1
    image_ids = coco_image_ids(files, args.coco_json) if args.coco_json else list(range(len(files)))
    save_dir = Path(args.save_images) if args.save_images else None
    targets = output_paths(files, save_dir, folders) if save_dir else None
    if args.output and Path(args.output).resolve() in {f.resolve() for f, _ in files}:
        raise ValueError(f"--output {args.output} is one of the input images")
    classes = [c for c in args.classes.split(",") if c.strip()] if args.classes else None
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, bf16=args.bf16,
                                          score_threshold=args.score_threshold, nms_threshold=args.nms_threshold,
                                          max_detections=args.max_detections, classes=classes,
                                          class_agnostic=True if args.class_agnostic else None,
                                          batch_size=args.batch_size,
                                          tta=(args.tta_scales or True) if args.tta else False,
                                          tile=args.tile, tile_full_image=not args.no_full_image,
                                          **({} if args.tile_overlap is None else {"tile_overlap": args.tile_overlap}),
                                          **({"tile_merge": args.tile_merge} if args.tile_merge else {}))
    print(f"{len(files)} image(s); model on {predictor.device}{' (bf16)' if args.bf16 else ''}"
          f"{f', TTA at scales {list(predictor.tta_scales)} x flip' if predictor.tta_scales else ''}"
          f"{_tiling_text(predictor) if predictor.tile else ''}, "
          f"score > {predictor.score_threshold}, {len(predictor.labels)} of {len(predictor.categories)} classes",
          file=sys.stderr)

    results, failed, done = [], len(problems), 0
    model_times = []  # (images, seconds) per batch; the first includes one-time warm-up
    batch = []  # (index into files, array)

    def flush():
        nonlocal done
        if not batch:
            return
        start = time.perf_counter()
        dets = predictor.predict_arrays([a for _, a in batch])
        model_times.append((len(batch), time.perf_counter() - start))
        for (index, array), det in zip(batch, dets):
            results.extend(det.to_coco(image_ids[index], files[index][1]))
            if targets:
                canvas = draw_detections(array, det, min_score=args.draw_threshold)
                target = targets[index]
                with atomic_write(target, "wb") as f:
                    canvas.save(f, format=_format_of(target), **_save_options(target))
            done += 1
        batch.clear()

    start = time.perf_counter()
    bar = tqdm(total=len(files), unit="img", file=sys.stderr, dynamic_ncols=True)
    for index, (array, error) in enumerate(load_ahead(files, args.workers, ahead=2 * args.batch_size)):
        if error is not None:
            failed += 1
            bar.write(f"skipped {error}", file=sys.stderr)
        else:
            batch.append((index, array))
            if len(batch) == args.batch_size:
                flush()
        bar.update(1)
    flush()
    bar.close()
    seconds = time.perf_counter() - start

    text = json.dumps(results)
    if args.output:
        with atomic_write(args.output, "w") as f:
            f.write(text)
    else:
        print(text)
    steady = model_times[1:] or model_times
    model_rate = sum(n for n, _ in steady) / max(sum(t for _, t in steady), 1e-9)
    print(f"{done} image(s) in {seconds:.1f} s: {done / max(seconds, 1e-9):.2f} images/s end to end, model "
          f"{model_rate:.2f} images/s{' after the first batch' if len(model_times) > 1 else ''}; "
          f"{len(results)} detections"
          + (f" -> {args.output}" if args.output else "")
          + (f"; drawn copies in {save_dir}" if save_dir else ""), file=sys.stderr)
    if failed:
        print(f"error: {failed} input(s) could not be read (see above)", file=sys.stderr)
        return 1
    return 0


def _tiling_text(predictor) -> str:
    t = predictor.tiling
    return (f", {predictor.tile} px tiles ({t['overlap']:g} overlap{', + the whole image' if t['full_image'] else ''}, "
            f"merged by {t['merge']})")


def _format_of(path: Path) -> str:
    from PIL import Image

    return Image.registered_extensions()[path.suffix.lower()]


def _save_options(path: Path) -> dict:
    return {"quality": 95} if _format_of(path) == "JPEG" else {}
