"""The embedded "shapes" detection dataset: PNG images plus COCO JSON, generated on the spot.

Four classes (COCO category ids 1-4): rectangle, ellipse (circles included), triangle, cross.
Each image is `image_size` pixels square with a flat, gradient, blotchy or noisy background and 0 to
`MAX_OBJECTS` shapes of random color, size (shorter side about 12 px up to 70% of the image, log-uniform)
and aspect ratio (1:2 to 2:1). About 5% of the images have no shapes.

Boxes are exact: each shape is rasterized to a mask and its box is the mask's extent (pixel column i
spans [i, i + 1)). Later shapes are drawn over earlier ones, but a placement is rejected if it would
hide more than 30% of an earlier shape or any of its extreme pixels; so every shape in an image is
annotated, at least 70% visible, and its box is the same whether read as the visible or the full shape.
Each annotation's `segmentation` is the exact visible mask (the pixels later shapes cover removed, so
a mask may have holes or come in pieces) as compressed RLE; its `area` is that mask's pixel count.
A shape's color differs clearly from the background under it and from the shapes it touches.

Variants (`ShapesParams`, `VARIANTS`): `DEMO` is the above (`retinanet demo`, 192 px); `DENSE` is a
regime closer to the Focal Loss paper's (issue 23): 384 px images with 20 to 60 shapes of 8 px
(shorter side) to 64 px (longer side) among 40 unannotated distractors (thin lines, arcs, hollow rings
and pentagons: none of them a filled shape of the four classes) drawn on the background first; same
occlusion and color rules, exact boxes and masks. `make_shapes_dataset(..., image_size=384,
shapes=DENSE)`; about 50 ms an image on one Zen 3 core. The demo's parameters add nothing to the
hashed parameters, so its files and cached folders are those of before the variants.

Generation is deterministic: image i of a split depends only on (seed, split, i), and the files are
byte-identical for the same parameters. `make_shapes_dataset` writes the dataset into a temporary
folder and renames it into place, so a folder under its final name is always complete; an existing
complete one with the same parameters is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from ..ops.masks import encode_masks

CLASSES = ("rectangle", "ellipse", "triangle", "cross")
VERSION = 2  # bump when the files a seed produces change, so that old caches are not reused (2: masks)
MAX_OBJECTS = 6
EMPTY_FRACTION = 0.05
MIN_OBJECT = 12  # px, the smallest shorter side drawn
MAX_OBJECT_FRACTION = 0.7  # of the image side, the largest longer side drawn
MIN_VISIBLE = 0.7  # an occluded shape keeps at least this fraction of its pixels
MIN_COLOR_DISTANCE = 100.0  # Euclidean RGB distance from the background and touching shapes
PLACEMENT_TRIES = 20
SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class ShapesParams:
    """What a shapes image holds (the image size and seed are make_shapes_dataset's arguments).

    Object counts are uniform in [min_objects, max_objects] (an image is empty with probability
    empty_fraction); a shape that finds no place (occlusion rule) or color in PLACEMENT_TRIES tries is
    left out, so an image may hold fewer. Sizes: shorter side from min_object px, longer side up to
    max_object_fraction of the image side and, if set, max_object px. clutter: unannotated
    distractors (`_clutter`) drawn on the background before the shapes."""

    min_objects: int = 1
    max_objects: int = MAX_OBJECTS
    empty_fraction: float = EMPTY_FRACTION
    min_object: int = MIN_OBJECT
    max_object_fraction: float = MAX_OBJECT_FRACTION
    max_object: Optional[int] = None
    clutter: int = 0

    def check(self, image_size: int) -> None:
        """ValueError (one line) unless these parameters can draw on image_size px images."""
        if not (0 <= self.min_objects <= self.max_objects and 0.0 <= self.empty_fraction <= 1.0
                and 1 <= self.min_object and 0.0 < self.max_object_fraction <= 1.0 and self.clutter >= 0
                and (self.max_object is None or self.max_object >= 2 * self.min_object)
                and image_size >= 4 * self.min_object):
            raise ValueError(f"bad shapes parameters for {image_size} px images: {self} (need 0 <= min_objects <= "
                             f"max_objects, 0 <= empty_fraction <= 1, min_object >= 1, image_size >= 4 * min_object, "
                             f"max_object >= 2 * min_object, 0 < max_object_fraction <= 1, clutter >= 0)")


DEMO = ShapesParams()  # `retinanet demo`'s dataset (192 px)
# A regime closer to the Focal Loss paper's (issue 23): many small objects, among clutter, on larger
# images: ~110k anchors per image (RetinaNet P2-P5, 9 per place; retinanet/sweeps/one_vs_two_stage_dense.yaml)
# against 20-60 objects of 8-64 px (about 40 placed on average). 384 px, not the 512: training time
# scales with pixels and these are trained on 2 CPU cores; 384 px is 4x the demo's pixels, so at batch 8
# (half the demo's 16) the backbone's cost per iteration is about 2x the demo's (the heads' depends on the
# pyramid levels: see the sweep file).
DENSE = ShapesParams(min_objects=20, max_objects=60, empty_fraction=0.0, min_object=8, max_object=64, clutter=40)
DENSE_IMAGE_SIZE = 384
VARIANTS = {"demo": (DEMO, 192), "dense": (DENSE, DENSE_IMAGE_SIZE)}  # name -> (parameters, image size)


@dataclass(frozen=True)
class ShapesPaths:
    """Where a generated shapes dataset lies: COCO JSON files and their image folders."""

    root: Path
    train_json: Path
    train_images: Path
    val_json: Path
    val_images: Path


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/retinanet, else ~/.cache/retinanet."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retinanet"


# ----------------------------------------------------------------------------------------------
# drawing


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 background: flat, gradient, blotches or noise."""
    kind = rng.integers(4)
    base = rng.uniform(0, 255, size=3)
    if kind == 0:  # flat
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if kind == 1:  # linear gradient in a random direction
        other = np.clip(base + rng.uniform(-100, 100, size=3), 0, 255)
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)  # (size, size) each
        t = xs * np.cos(angle) + ys * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)  # (size, size) in [0, 1]
        return (base + t[:, :, None] * (other - base)).astype(np.float32)
    if kind == 2:  # smooth blotches: a coarse random grid upsampled
        cells = int(rng.integers(3, 8))
        coarse = np.clip(base + rng.uniform(-60, 60, size=(cells, cells, 3)), 0, 255).astype(np.uint8)
        return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    grain = rng.normal(0, 12, size=(-(-size // 2), -(-size // 2), 3)).astype(np.float32)  # noise in 2x2 px grains
    return np.clip(base + grain.repeat(2, axis=0).repeat(2, axis=1)[:size, :size], 0, 255)


def _shape_mask(rng: np.random.Generator, cls: int, size: int, params: Optional[ShapesParams] = None) -> np.ndarray:
    """(size, size) bool mask of one shape of class `cls` at a random size, aspect ratio and place
    (sizes from `params`, default ShapesParams())."""
    params = params or DEMO
    longest = params.max_object_fraction * size
    if params.max_object is not None:
        longest = min(longest, float(params.max_object))
    side = np.exp(rng.uniform(np.log(params.min_object), np.log(longest / 2 ** 0.5)))
    ratio = 1.0 if CLASSES[cls] == "ellipse" and rng.random() < 0.3 else np.exp(rng.uniform(np.log(0.5), np.log(2)))
    w = int(min(max(round(side * ratio ** 0.5), params.min_object), longest))
    h = int(min(max(round(side / ratio ** 0.5), params.min_object), longest))
    x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    canvas = Image.new("1", (size, size))
    _draw_shape(ImageDraw.Draw(canvas), rng, CLASSES[cls], x0, y0, w, h)
    return np.asarray(canvas, dtype=bool)


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, name: str, x0: int, y0: int, w: int,
                h: int) -> None:
    """Draw one shape of class `name` filling the w x h px box at (x0, y0) (value 1 on a mode "1" canvas);
    the triangle's apex and the cross's bar widths are drawn from `rng`."""
    x1, y1 = x0 + w - 1, y0 + h - 1  # inclusive pixel corners
    if name == "rectangle":
        draw.rectangle([x0, y0, x1, y1], fill=1)
    elif name == "ellipse":
        draw.ellipse([x0, y0, x1, y1], fill=1)
    elif name == "triangle":  # one side on an edge of the box, the apex anywhere along the opposite edge
        t = rng.uniform(0, 1)
        corners = {0: [(x0, y1), (x1, y1), (x0 + t * w, y0)], 1: [(x0, y0), (x1, y0), (x0 + t * w, y1)],
                   2: [(x1, y0), (x1, y1), (x0, y0 + t * h)], 3: [(x0, y0), (x0, y1), (x1, y0 + t * h)]}
        draw.polygon(corners[int(rng.integers(4))], fill=1)
    else:  # cross: two bars through the middle, each about a third of the box thick
        thick_x = max(3, int(round(w * rng.uniform(0.25, 0.4))))
        thick_y = max(3, int(round(h * rng.uniform(0.25, 0.4))))
        cx, cy = x0 + (w - thick_x) // 2, y0 + (h - thick_y) // 2
        draw.rectangle([x0, cy, x1, cy + thick_y - 1], fill=1)
        draw.rectangle([cx, y0, cx + thick_x - 1, y1], fill=1)


def _extent(mask: np.ndarray) -> tuple:
    """(x1, y1, x2, y2) of a non-empty mask: the pixels' edges, xyxy."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _clutter(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Draw `count` unannotated distractors into the (size, size, 3) float image, in place: thin line
    segments, arcs, and hollow rings and pentagons (1-2 px outlines), each in a random color. None of
    them is one of the four classes (all filled), so they are background the detector must learn to
    reject, as the real world's texture and stray edges."""
    size = image.shape[0]
    for _ in range(count):
        kind = int(rng.integers(4))
        width = int(rng.integers(1, 3))
        canvas = Image.new("1", (size, size))
        draw = ImageDraw.Draw(canvas)
        if kind == 0:  # a line segment, 10 px to half the image long
            length = np.exp(rng.uniform(np.log(10), np.log(size / 2)))
            angle = rng.uniform(0, np.pi)
            cx, cy = rng.uniform(0, size, size=2)
            dx, dy = 0.5 * length * np.cos(angle), 0.5 * length * np.sin(angle)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=1, width=width)
        else:
            d = float(np.exp(rng.uniform(np.log(12), np.log(48))))  # diameter
            x0, y0 = rng.uniform(-d / 2, size - d / 2, size=2)
            box = [x0, y0, x0 + d, y0 + d]
            if kind == 1:  # an open arc of 90-270 degrees
                start = rng.uniform(0, 360)
                draw.arc(box, start, start + rng.uniform(90, 270), fill=1, width=width)
            elif kind == 2:  # a hollow ring
                draw.ellipse(box, outline=1, width=width)
            else:  # a hollow pentagon
                turn = rng.uniform(0, 2 * np.pi)
                corners = [(x0 + d / 2 * (1 + np.cos(turn + 2 * np.pi * k / 5)),
                            y0 + d / 2 * (1 + np.sin(turn + 2 * np.pi * k / 5))) for k in range(5)]
                draw.polygon(corners, outline=1, width=width)
        image[np.asarray(canvas, dtype=bool)] = rng.uniform(0, 255, size=3)


def render_image(rng: np.random.Generator, size: int, params: Optional[ShapesParams] = None) -> tuple:
    """One image -> ((size, size, 3) uint8 RGB, [(class index, (x1, y1, x2, y2) xyxy, visible pixels)])."""
    image, shapes = _render(rng, size, params)
    return image, [(s["cls"], s["box"], int(s["visible"].sum())) for s in shapes]


def _render(rng: np.random.Generator, size: int, params: Optional[ShapesParams] = None) -> tuple:
    """One image -> ((size, size, 3) uint8 RGB, shapes: dicts with "cls", "box" xyxy and "visible":
    the bool mask, over the box (y1:y2, x1:x2), of the shape's pixels that no later shape covers).

    Each shape is kept as its box's crop, and a candidate is tested against only the earlier shapes
    whose boxes meet its own: 60 shapes on 384 px cost far less than with whole-image masks. The
    tests and sums are the same as on whole-image masks (the same pixels, in the same order), so the
    files are the same as before this change (version 2)."""
    params = params or DEMO
    background = _background(rng, size)
    if params.clutter:
        _clutter(rng, background, params.clutter)
    count = 0 if rng.random() < params.empty_fraction else int(rng.integers(params.min_objects,
                                                                             params.max_objects + 1))
    shapes = []  # dicts: cls, box, mask (over the box), visible (mask not covered by later shapes), color
    for _ in range(count):
        for _ in range(PLACEMENT_TRIES):
            cls = int(rng.integers(len(CLASSES)))
            full = _shape_mask(rng, cls, size, params)
            box = _extent(full)
            x1, y1, x2, y2 = box
            mask = full[y1:y2, x1:x2]
            # earlier shapes whose visible pixels this one covers, with the covered region in both crops
            covered, ok = [], True
            for s in shapes:
                sx1, sy1, sx2, sy2 = s["box"]
                ix1, iy1, ix2, iy2 = max(x1, sx1), max(y1, sy1), min(x2, sx2), min(y2, sy2)
                if ix1 >= ix2 or iy1 >= iy2:
                    continue
                mine = mask[iy1 - y1:iy2 - y1, ix1 - x1:ix2 - x1]
                theirs = (slice(iy1 - sy1, iy2 - sy1), slice(ix1 - sx1, ix2 - sx1))
                hidden = s["visible"][theirs] & mine
                if not hidden.any():
                    continue
                left = s["visible"].copy()
                left[theirs] &= ~mine
                if left.sum() < MIN_VISIBLE * s["mask"].sum() or _extent(left) != (0, 0, sx2 - sx1, sy2 - sy1):
                    ok = False
                    break
                covered.append((s, left))
            if not ok:
                continue
            neighbours = [background[y1:y2, x1:x2][mask].mean(axis=0)] + [s["color"] for s, _ in covered]
            color = rng.uniform(0, 255, size=3)
            if min(np.linalg.norm(color - n) for n in neighbours) < MIN_COLOR_DISTANCE:
                continue
            for s, left in covered:
                s["visible"] = left
            shapes.append({"cls": cls, "mask": mask, "visible": mask, "box": box, "color": color})
            break
    image = background
    for s in shapes:
        x1, y1, x2, y2 = s["box"]
        image[y1:y2, x1:x2][s["mask"]] = s["color"]
    return np.round(image).astype(np.uint8), shapes


def _full_mask(shape: dict, size: int) -> np.ndarray:
    """(size, size) bool: a shape's visible pixels in the whole image."""
    out = np.zeros((size, size), dtype=bool)
    x1, y1, x2, y2 = shape["box"]
    out[y1:y2, x1:x2] = shape["visible"]
    return out


# ----------------------------------------------------------------------------------------------
# files


def _write_split(folder: Path, split: str, num_images: int, image_size: int, seed: int, params: dict,
                 shapes_params: Optional[ShapesParams] = None) -> None:
    """PNG files under folder/split/ and the COCO JSON folder/split.json."""
    (folder / split).mkdir()
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, SPLITS[split], i])
        pixels, shapes = _render(rng, image_size, shapes_params)
        file_name = f"{i:06d}.png"
        Image.fromarray(pixels).save(folder / split / file_name, format="PNG", compress_level=1)
        images.append({"id": i + 1, "file_name": file_name, "height": image_size, "width": image_size})
        rles = encode_masks(np.stack([_full_mask(s, image_size) for s in shapes])) if shapes else []
        for s, rle in zip(shapes, rles):
            x1, y1, x2, y2 = s["box"]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": s["cls"] + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(s["visible"].sum()),
                                "segmentation": rle, "iscrowd": 0})
    coco = {"info": {"description": f"retinanet synthetic shapes, {split} split", "parameters": params},
            "images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]}
    (folder / f"{split}.json").write_text(json.dumps(coco))


def _paths(root: Path) -> ShapesPaths:
    return ShapesPaths(root=root, train_json=root / "train.json", train_images=root / "train",
                       val_json=root / "val.json", val_images=root / "val")


def _is_complete(root: Path, params: dict) -> bool:
    try:
        return json.loads((root / "manifest.json").read_text())["parameters"] == params
    except (OSError, ValueError, KeyError, TypeError):
        return False


def shapes_dataset_params(num_train: int, num_val: int, image_size: int, seed: int,
                          shapes: ShapesParams = DEMO) -> dict:
    """The parameters a dataset's manifest records and its default folder name hashes. The demo's
    shape parameters add nothing (its cached folders keep their names); others add "shapes"."""
    params = {"version": VERSION, "num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    if shapes != DEMO:
        params["shapes"] = asdict(shapes)
    return params


def make_shapes_dataset(directory: Optional[str] = None, *, num_train: int = 2000, num_val: int = 500,
                        image_size: int = 192, seed: int = 0, shapes: ShapesParams = DEMO) -> ShapesPaths:
    """Generate (or reuse) the shapes dataset and return its paths.

    directory: where the dataset goes; None: default_cache_dir()/shapes-<hash of the parameters>.
    shapes: what an image holds (DEMO, DENSE, or any ShapesParams; see VARIANTS for the image sizes
    they were made for).
    A complete dataset already there with the same parameters is reused; a folder holding anything
    else is an error (it is never overwritten). manifest.json, written last, marks a complete dataset.
    """
    if min(num_train, num_val) < 0 or seed < 0:
        raise ValueError(f"need num_train, num_val, seed >= 0, got {num_train}, {num_val}, {seed}")
    shapes.check(image_size)
    params = shapes_dataset_params(num_train, num_val, image_size, seed, shapes)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(directory) if directory is not None else default_cache_dir() / f"shapes-{digest}"
    if _is_complete(root, params):
        return _paths(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"{root} exists and is not a shapes dataset made with these parameters; "
                         f"choose another directory or remove it")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()  # (not tempfile.mkdtemp: that makes the folder private, 0700, whatever the umask)
    try:
        for split, count in (("train", num_train), ("val", num_val)):
            _write_split(staging, split, count, image_size, seed, params, shapes)
        (staging / "manifest.json").write_text(json.dumps({"parameters": params, "classes": list(CLASSES)}))
        if root.exists():
            root.rmdir()  # empty (checked above); rename needs the name free
        try:
            os.rename(staging, root)  # atomic: the folder appears complete or not at all
        except OSError:
            if not _is_complete(root, params):  # someone else (another process) finished first: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _paths(root)


# ----------------------------------------------------------------------------------------------
# large scenes: many small shapes on one big image (for tiled inference, retinanet/tiling.py)

LARGE_SCENES_VERSION = 1  # bump when the files a seed produces change
LARGE_SCENES_STREAM = 2  # the random streams of the shapes splits are (seed, 0 | 1, i)
SCENE_MARGIN = 2  # px of background kept between two shapes of a scene


@dataclass(frozen=True)
class LargeScenesPaths:
    """Where a generated large-scene set lies: one COCO JSON file and its image folder."""

    root: Path
    json: Path
    images: Path


def render_large_scene(rng: np.random.Generator, size: int, num_objects: int, min_object: int,
                       max_object: int) -> tuple:
    """One size x size scene with up to `num_objects` shapes of the shapes dataset's classes, each
    min_object..max_object px (sqrt(w h) log-uniform in that range, aspect ratio 1:2 to 2:1, each side
    clamped to it), placed without overlap (SCENE_MARGIN px apart: every shape fully
    visible) on the dataset's backgrounds, in a color >= MIN_COLOR_DISTANCE from the background under it.
    A shape that finds no free place or color in PLACEMENT_TRIES tries is left out.
    -> ((size, size, 3) uint8 RGB, [(class index, (x1, y1, x2, y2) xyxy, pixels)])."""
    image = _background(rng, size)
    occupied = np.zeros((size, size), dtype=bool)
    shapes = []
    for _ in range(num_objects):
        cls = int(rng.integers(len(CLASSES)))
        side = np.exp(rng.uniform(np.log(min_object), np.log(max_object)))
        ratio = np.exp(rng.uniform(np.log(0.5), np.log(2)))
        w = int(min(max(round(side * ratio ** 0.5), min_object), max_object))
        h = int(min(max(round(side / ratio ** 0.5), min_object), max_object))
        patch = Image.new("1", (w, h))
        _draw_shape(ImageDraw.Draw(patch), rng, CLASSES[cls], 0, 0, w, h)
        mask = np.asarray(patch, dtype=bool)  # (h, w)
        for _ in range(PLACEMENT_TRIES):
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            m = SCENE_MARGIN
            if occupied[max(0, y0 - m):y0 + h + m, max(0, x0 - m):x0 + w + m].any():
                continue
            region = image[y0:y0 + h, x0:x0 + w]  # (h, w, 3) view
            under = region[mask].mean(axis=0)
            colors = rng.uniform(0, 255, size=(PLACEMENT_TRIES, 3))
            good = np.linalg.norm(colors - under, axis=1) >= MIN_COLOR_DISTANCE
            if not good.any():
                break
            region[mask] = colors[np.argmax(good)]
            occupied[y0:y0 + h, x0:x0 + w] = True
            bx0, by0, bx1, by1 = _extent(mask)
            shapes.append((cls, (x0 + bx0, y0 + by0, x0 + bx1, y0 + by1), int(mask.sum())))
            break
    return np.round(image).astype(np.uint8), shapes


def make_large_scenes(directory: Optional[str] = None, *, num_images: int = 20, image_size: int = 2048,
                      min_objects: int = 200, max_objects: int = 400, min_object: int = 8, max_object: int = 40,
                      seed: int = 0) -> LargeScenesPaths:
    """Generate (or reuse) a set of large scenes (`render_large_scene`; image i has a uniform
    min_objects..max_objects shapes, from the random stream (seed, LARGE_SCENES_STREAM, i)) as PNG files
    and a COCO JSON (boxes and areas; no masks). Deterministic: the same parameters give the same files.

    directory: where the set goes; None: default_cache_dir()/large-scenes-<hash of the parameters>.
    As `make_shapes_dataset`: an existing complete set with the same parameters is reused, a folder
    holding anything else is an error, and the folder appears complete or not at all.
    """
    if num_images < 1 or seed < 0 or not 1 <= min_object <= max_object or not 0 <= min_objects <= max_objects \
            or image_size < 2 * max_object:
        raise ValueError(f"need num_images >= 1, seed >= 0, 1 <= min_object <= max_object, 0 <= min_objects <= "
                         f"max_objects and image_size >= 2 * max_object, got {num_images}, {seed}, {min_object}, "
                         f"{max_object}, {min_objects}, {max_objects}, {image_size}")
    params = {"version": LARGE_SCENES_VERSION, "num_images": num_images, "image_size": image_size,
              "min_objects": min_objects, "max_objects": max_objects, "min_object": min_object,
              "max_object": max_object, "seed": seed}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(directory) if directory is not None else default_cache_dir() / f"large-scenes-{digest}"
    paths = LargeScenesPaths(root=root, json=root / "scenes.json", images=root / "scenes")
    if _is_complete(root, params):
        return paths
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"{root} exists and is not a large-scene set made with these parameters; "
                         f"choose another directory or remove it")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        (staging / "scenes").mkdir()
        images, annotations = [], []
        for i in range(num_images):
            rng = np.random.default_rng([seed, LARGE_SCENES_STREAM, i])
            count = int(rng.integers(min_objects, max_objects + 1))
            pixels, shapes = render_large_scene(rng, image_size, count, min_object, max_object)
            file_name = f"{i:06d}.png"
            Image.fromarray(pixels).save(staging / "scenes" / file_name, format="PNG", compress_level=1)
            images.append({"id": i + 1, "file_name": file_name, "height": image_size, "width": image_size})
            for cls, (x1, y1, x2, y2), area in shapes:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": 0})
        coco = {"info": {"description": "retinanet synthetic large scenes", "parameters": params},
                "images": images, "annotations": annotations,
                "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]}
        (staging / "scenes.json").write_text(json.dumps(coco))
        (staging / "manifest.json").write_text(json.dumps({"parameters": params, "classes": list(CLASSES)}))
        if root.exists():
            root.rmdir()
        try:
            os.rename(staging, root)
        except OSError:
            if not _is_complete(root, params):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths
