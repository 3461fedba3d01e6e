"""Anchor coverage (retinanet/anchor_coverage.py): hand-worked IoUs, the fast best IoU against `box_iou` with
every anchor a real model uses, the buckets, resizing, crowd boxes, empty images, anchor fitting and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from retinanet.anchor_coverage import (COVERED, LOW_QUALITY, NEVER, anchor_coverage, anchor_generator,
                                       best_anchor_iou, fit_anchors, load_boxes, padded_size, resized_boxes)
from retinanet.cli import main
from retinanet.config import Config, config_from_dict, load_config
from retinanet.modeling import build_model
from retinanet.ops.boxes import box_iou, scale_boxes
from retinanet.ops.transform import resized_size

from conftest import tiny_config

CONFIGS = "retinanet/configs"


def write_coco(path, images, annotations, categories=("a", "b"), image_dir=None):
    """images: [(height, width)], ids 1..; annotations: [(image_id, [x, y, w, h], extra dict)], ids 1..
    With image_dir, also writes each image as a grey PNG of its size (for the CLI's header check)."""
    data = {"images": [{"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w) in enumerate(images)],
            "annotations": [{"id": j + 1, "image_id": im, "category_id": extra.get("category_id", 1), "bbox": list(b),
                             "area": extra.get("area", b[2] * b[3]), "iscrowd": extra.get("iscrowd", 0)}
                            for j, (im, b, extra) in enumerate(annotations)],
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(categories)]}
    path.write_text(json.dumps(data))
    if image_dir is not None:
        image_dir.mkdir(exist_ok=True)
        for i, (h, w) in enumerate(images):
            Image.new("RGB", (w, h), (128, 128, 128)).save(image_dir / f"{i}.png")
    return path


def one_anchor_config(**model) -> Config:
    """P3 only, one 32 px square anchor per location (stride 8, centres at 8k), 64 x 64 input."""
    m = {"min_level": 3, "max_level": 3, "anchor_sizes": [32], "anchor_scales": [1.0], "anchor_ratios": [1.0],
         "min_size": 64, "max_size": 64, **model}
    return config_from_dict({"model": m})


# ---------------------------------------------------------------------------------------------- by hand


def test_iou_worked_out_by_hand(tmp_path):
    # the anchor centred at (16, 16) is [0, 0, 32, 32]: the same box -> 1; a 12 px box centred there lies
    # inside it -> 144 / 1024 = 0.140625; a 32 x 14.4 box centred there -> 32 * 14.4 / 1024 = 0.45
    gt = write_coco(tmp_path / "gt.json", [(64, 64)], [(1, [0, 0, 32, 32], {}), (1, [10, 10, 12, 12], {}),
                                                       (1, [0, 8.8, 32, 14.4], {})])
    report = anchor_coverage(gt, one_anchor_config())
    assert report.best_iou[0] == 1.0
    assert report.best_iou[1] == 0.140625
    assert report.best_iou[2] == pytest.approx(0.45, abs=1e-6)
    assert report.status.tolist() == [COVERED, LOW_QUALITY, LOW_QUALITY]
    s = report.summary()
    assert s["covered"] == pytest.approx(1 / 3) and s["low_quality"] == pytest.approx(2 / 3)
    assert s["low_quality_below_bg"] == pytest.approx(1 / 3)  # 0.140625 < 0.4; 0.45 is in [0.4, 0.5)
    assert s["never"] == 0.0
    # without the low-quality rule nothing makes the two smaller boxes foreground
    off = anchor_coverage(gt, one_anchor_config(allow_low_quality=False))
    assert off.status.tolist() == [COVERED, NEVER, NEVER]
    # the RPN's thresholds for Faster R-CNN: 0.7 / 0.3, the low-quality rule always on
    rpn = anchor_coverage(gt, one_anchor_config(arch="faster_rcnn", min_level=2, max_level=2,
                                                allow_low_quality=False))
    assert (rpn.fg, rpn.bg, rpn.low_quality) == (0.7, 0.3, True)


def test_a_box_between_grid_points_and_a_box_in_the_corner(tmp_path):
    # a 32 px box centred at (20, 16), between the centres 16 and 24: overlap 28 x 32 -> 896 / (2048 - 896)
    gt = write_coco(tmp_path / "gt.json", [(64, 64)], [(1, [4, 0, 32, 32], {})])
    assert anchor_coverage(gt, one_anchor_config()).best_iou[0] == pytest.approx(896 / 1152, abs=1e-7)
    # a 2 x 2 px box in the corner, centre 63, beyond the last grid centre 56 (8 columns at stride 8: the
    # search clamps to the grid): the anchor [40, 40, 72, 72] contains it -> 4 / 1024, low quality only
    report = anchor_coverage(write_coco(tmp_path / "g2.json", [(64, 64)], [(1, [62, 62, 2, 2], {})]), one_anchor_config())
    assert report.best_iou[0] == pytest.approx(4 / 1024, abs=1e-8) and report.status[0] == LOW_QUALITY


# ---------------------------------------------------------------------------------------------- exact and fast


def random_boxes(g: torch.Generator, height: int, width: int, count: int) -> torch.Tensor:
    """(n, 4) xyxy inside the image, 1-150 px sides (log-uniform), any aspect ratio; empty ones dropped."""
    xy = torch.rand(count, 2, generator=g) * torch.tensor([width, height])
    wh = torch.exp(torch.rand(count, 2, generator=g) * 5.0)
    b = torch.cat([xy - wh / 2, xy + wh / 2], dim=1)
    b = torch.stack([b[:, 0].clamp(0, width), b[:, 1].clamp(0, height), b[:, 2].clamp(0, width),
                     b[:, 3].clamp(0, height)], dim=1)
    return b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]


@pytest.mark.parametrize("name, overrides", [
    ("demo.yaml", []),
    (None, ["model.min_size=160", "model.max_size=256"]),  # the paper's anchors, P3-P7 from 32 px
    ("faster_rcnn_shapes.yaml", ["model.min_size=150", "model.max_size=250"]),  # the RPN's, P2-P6
    (None, ["model.anchor_style=torchvision", "model.size_divisibility=1", "model.min_size=100", "model.max_size=333"]),
    (None, ["model.anchor_offset=0.5", "model.size_divisibility=1", "model.min_size=120", "model.max_size=200"]),
])
def test_fast_best_iou_equals_box_iou_with_every_anchor(name, overrides):
    cfg = load_config(f"{CONFIGS}/{name}" if name else None, overrides)
    generator = anchor_generator(cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        h, w = (int(v) for v in torch.randint(37, 400, (2,), generator=g))
        ph, pw = (int(v) for v in padded_size(h, w, cfg.model.size_divisibility))
        boxes = random_boxes(g, h, w, 200)
        feature_sizes = [(-(-ph // s), -(-pw // s)) for s in generator.strides]
        every = torch.cat(generator(feature_sizes, (ph, pw), "cpu"))  # (N, 4) every anchor of the image
        expected = box_iou(boxes, every).amax(dim=1)
        fast = best_anchor_iou(boxes, torch.tensor([[ph, pw]] * len(boxes)), generator)
        # equal up to float32 rounding: a box wider than several anchors overlaps each by the anchor's
        # width, computed from its own centre, which may differ in the last bit
        torch.testing.assert_close(fast, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch, divisibility", [("retinanet", 32), ("retinanet", 1), ("faster_rcnn", 32)])
def test_coverage_equals_the_models_own_anchors(tmp_path, arch, divisibility):
    """Through the model: each image resized and padded by `preprocess`, the anchors of its own feature maps
    (RetinaNet: the network's outputs; Faster R-CNN: the RPN's), IoU with the resized boxes by `box_iou`."""
    overrides = {"size_divisibility": divisibility, "min_size": 96, "max_size": 150}
    if arch == "faster_rcnn":
        overrides.update(arch="faster_rcnn", min_level=2, max_level=6, p6_from="pool",
                         anchor_sizes=[16.0, 32.0, 64.0, 128.0, 256.0], anchor_scales=[1.0])
    cfg = tiny_config(**overrides)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    sizes = [(70, 101), (200, 133), (96, 96), (61, 250)]
    annotations = []
    for i, (h, w) in enumerate(sizes):
        for b in random_boxes(g, h, w, 30).tolist():
            annotations.append((i + 1, [b[0], b[1], b[2] - b[0], b[3] - b[1]], {}))
    gt = write_coco(tmp_path / "gt.json", sizes, annotations)
    report = anchor_coverage(gt, cfg)
    expected = []
    with torch.no_grad():
        for i, (h, w) in enumerate(sizes):
            batch = model.preprocess([torch.zeros(3, h, w)])
            if arch == "retinanet":
                anchors = torch.cat(model.run_network(batch)[2:])
            else:
                anchors = torch.cat(model.rpn.anchors(model.fpn(model.backbone(batch.tensor)), batch.tensor.shape[-2:]))
            nh, nw = batch.image_sizes[0]
            mine = torch.tensor([a[1] for a in annotations if a[0] == i + 1], dtype=torch.float32)
            mine = torch.cat([mine[:, :2], mine[:, :2] + mine[:, 2:]], dim=1)
            expected.append(box_iou(scale_boxes(mine, nw / w, nh / h), anchors).amax(dim=1))
    torch.testing.assert_close(torch.from_numpy(report.best_iou), torch.cat(expected), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the data


def test_buckets_count_coco_area_of_the_original_image_and_aspect(tmp_path):
    # COCO's `area` field decides the size bucket (a 40 x 40 box with area 500 is small), not the box;
    # areas 500, 1600, 10000, 400, 400, 1200 -> small (< 32^2), medium, large (>= 96^2), small, small, medium
    anns = [(1, [0, 0, 40, 40], {"area": 500}), (1, [0, 0, 40, 40], {}), (1, [0, 0, 100, 100], {"category_id": 2}),
            (1, [0, 0, 10, 40], {}), (1, [0, 0, 40, 10], {}), (1, [0, 0, 30, 40], {})]
    report = anchor_coverage(write_coco(tmp_path / "gt.json", [(200, 200)], anns), load_config(None))
    b = report.breakdown()
    assert {k: v["boxes"] for k, v in b["size"].items()} == {"small": 3, "medium": 2, "large": 1}
    # h/w: 1, 1, 1, 4, 1/4, 4/3
    assert {k: v["boxes"] for k, v in b["aspect"].items()} == {"h/w < 1/3": 1, "2/3-3/2": 4, "h/w > 3": 1}
    assert {k: v["boxes"] for k, v in b["category"].items()} == {"a": 5, "b": 1}
    worst = report.worst(2)
    assert [w["annotation_id"] for w in worst] == list(np.argsort(report.best_iou, kind="stable")[:2] + 1)


def test_resizing_is_applied_and_buckets_use_the_original_size(tmp_path):
    # the same boxes in a 100 px image and, doubled, in a 200 px one: both resized to 100 px -> equal IoUs;
    # the 20 px box is small (400 px^2), its 40 px double medium; 50 x 25 and 100 x 50 are both medium
    small = [[3, 5, 20, 20], [30, 40, 50, 25]]
    anns = [(1, b, {}) for b in small] + [(2, [2 * v for v in b], {}) for b in small]
    gt = write_coco(tmp_path / "gt.json", [(100, 100), (200, 200)], anns)
    report = anchor_coverage(gt, load_config(None, ["model.min_size=100", "model.max_size=100"]))
    assert report.best_iou[:2].tolist() == report.best_iou[2:].tolist()
    assert report.size_bucket.tolist() == [0, 1, 1, 1]
    # not resized (the model's size = the image's), the doubled boxes fit the anchors differently
    big = anchor_coverage(gt, load_config(None, ["model.min_size=200", "model.max_size=200"]))
    assert big.best_iou[2:].tolist() != report.best_iou[2:].tolist()
    assert big.resized_wh[2].tolist() == [40.0, 40.0] and report.resized_wh[2].tolist() == [20.0, 20.0]
    # multi-scale training is named: the report is at the model's (test) size
    jitter = anchor_coverage(gt, load_config(None, ["model.min_size=100", "model.max_size=100",
                                                    "data.train_sizes=[80,100]"]))
    assert "training also draws other sizes" in jitter.format() and "training also" not in report.format()
    # the resize is the model's rule: 375 x 500 -> 800 x 1067
    boxes = load_boxes(write_coco(tmp_path / "g3.json", [(375, 500)], [(1, [0, 0, 50, 50], {})]))
    resized, padded = resized_boxes(boxes, 800, 1333, "round", 32)
    assert resized_size(375, 500, 800, 1333) == (800, 1067) and padded.tolist() == [[800, 1088]]
    assert resized[0].tolist() == pytest.approx([0, 0, 50 * 1067 / 500, 50 * 800 / 375], rel=1e-6)


def test_crowd_boxes_are_left_out_and_empty_images_counted(tmp_path):
    anns = [(1, [0, 0, 32, 32], {}), (1, [0, 0, 60, 60], {"iscrowd": 1})]
    report = anchor_coverage(write_coco(tmp_path / "gt.json", [(64, 64), (64, 64), (50, 80)], anns),
                             one_anchor_config())
    assert report.num_boxes == 1 and report.boxes.num_crowd == 1 and report.boxes.num_images == 3
    assert "1 boxes in 3 images (1 crowd boxes left out)" in report.format()
    empty = anchor_coverage(write_coco(tmp_path / "empty.json", [(64, 64)], []), one_anchor_config())
    assert empty.num_boxes == 0 and empty.covered == 1.0 and empty.warning() is None
    assert "0 boxes in 1 images" in empty.format()


# ---------------------------------------------------------------------------------------------- fitting


def test_fitted_anchors_cover_tiny_boxes(tmp_path):
    # 10-16 px boxes at random places in 192 px images: the paper's 32 px anchors give them IoU < 0.25
    rng = np.random.default_rng(0)
    anns = []
    for image in range(40):
        for _ in range(10):
            w, h = rng.uniform(10, 16, size=2)
            x, y = rng.uniform(0, 192 - 16, size=2)
            anns.append((image + 1, [float(x), float(y), float(w), float(h)], {}))
    gt = write_coco(tmp_path / "gt.json", [(192, 192)] * 40, anns)
    cfg = load_config(None, ["model.min_size=192", "model.max_size=192"])
    result = fit_anchors(gt, cfg, generations=150)
    assert result.before == 0.0 and result.chosen != "config"
    assert result.after > 0.5 and result.after == max(c["covered"] for c in result.candidates.values())
    # the snippet is a config that measures what it says, with the heads' shape (A anchors per location)
    snippet = yaml.safe_load(result.snippet())["model"]
    fitted = load_config(None, ["model.min_size=192", "model.max_size=192"]
                         + [f"model.{k}={v}" for k, v in snippet.items()])
    assert anchor_coverage(gt, fitted).covered == result.after
    assert anchor_generator(fitted).num_anchors == anchor_generator(cfg).num_anchors
    assert snippet["anchor_scales"][0] == 1


# ---------------------------------------------------------------------------------------------- the CLI


def test_cli_reports_coverage_and_warns_below_95_percent(tmp_path, capsys):
    anns = [(1, [0, 0, 32, 32], {}), (1, [10, 10, 12, 12], {})]
    gt = write_coco(tmp_path / "gt.json", [(64, 64)], anns, image_dir=tmp_path / "images")
    config = tmp_path / "one.yaml"
    config.write_text(yaml.safe_dump({"model": {"min_level": 3, "max_level": 3, "anchor_sizes": [32],
                                                "anchor_scales": [1.0], "anchor_ratios": [1.0], "min_size": 64,
                                                "max_size": 64}}))
    argv = ["check-data", "--json", str(gt), "--images", str(tmp_path / "images"), "--quick", "--config", str(config)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "  all                      2    50.0%   50.0%   50.0%    0.0%" in out
    assert "warning: only 50.0% of the boxes have an anchor with IoU >= 0.5" in out
    assert "       2        1  a            12 x 12  0.141 (low-quality only)" in out
    gt = write_coco(tmp_path / "gt.json", [(64, 64)], anns[:1], image_dir=tmp_path / "images")
    assert main(argv + ["--fit-anchors", "--generations", "5"]) == 0
    out = capsys.readouterr().out
    assert "100.0%" in out and "warning: only" not in out
    assert "the config's anchors are the best found (100.0% covered): keep them" in out
    # a dataset with errors: they are listed, the coverage waits for them to be fixed
    gt = write_coco(tmp_path / "gt.json", [(64, 64)], [(1, [0, 0, 32, 32], {"category_id": 9})],
                    image_dir=tmp_path / "images")
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "anchor coverage: not measured until the errors above are fixed" in out and "covered" not in out


@pytest.mark.parametrize("config, expected", [
    ("no-such-config", "--config no-such-config: neither a shipped config"),
    ("{typo}", "unknown config key 'model.anchor_size' (did you mean 'anchor_sizes'?)"),
    ("segprop_deepmask_shapes", "model.arch 'deepmask' has no anchors"),
])
def test_a_bad_config_is_one_error_line(tmp_path, capsys, config, expected):
    gt = write_coco(tmp_path / "gt.json", [(64, 64)], [(1, [0, 0, 32, 32], {})], image_dir=tmp_path / "images")
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  anchor_size: [32, 64, 128, 256, 512]\n")
    argv = ["check-data", "--json", str(gt), "--images", str(tmp_path / "images"), "--config",
            config.format(typo=typo)]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert "Traceback" not in out + err and "images" not in out  # the config fails before the images are read
