"""retinanet/error_analysis.py and `retinanet analyze errors`: TIDE errors built one kind at a time on
hand-made ground truth, with the AP gains worked out by hand; a confusion matrix and an ECE counted
by hand; the CLI's files and its one-line errors; the demo's TIDE line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from retinanet.error_analysis import TIDE_MAIN, analyze_errors, format_tide_line

CATS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]


def coco_ap(hits: list, num_gt: int) -> float:
    """COCO's AP of one category by hand: `hits` the detections best score first (True: true positive),
    precision made non-increasing from the right, read at the 101 recalls 0, 0.01, ..., 1."""
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / num_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.mean([precision[recall >= r].max() if (recall >= r).any() else 0.0
                          for r in np.linspace(0, 1, 101)]))


def dataset(extra_dets=(), extra_gt=(), b_found=5):
    """Six 100x100 images; each has a 10x10 'a' at (0, 0), found at score 0.9, and a 10x10 'b' at (50, 50),
    found at score 0.8 in the first `b_found` images. extra_*: (image_id, category_id, [x, y, w, h], score)."""
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in range(1, 7)]
    anns, dets = [], []

    def gt(image, cat, box, crowd=0):
        anns.append({"id": len(anns) + 1, "image_id": image, "category_id": cat, "bbox": box,
                     "area": box[2] * box[3], "iscrowd": crowd})

    for i in range(1, 7):
        gt(i, 1, [0, 0, 10, 10])
        gt(i, 2, [50, 50, 10, 10])
        dets.append({"image_id": i, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9})
    dets += [{"image_id": i, "category_id": 2, "bbox": [50, 50, 10, 10], "score": 0.8} for i in range(1, b_found + 1)]
    for image, cat, box, score in extra_dets:
        dets.append({"image_id": image, "category_id": cat, "bbox": box, "score": score})
    for image, cat, box in extra_gt:
        gt(image, cat, box)
    return {"images": images, "annotations": anns, "categories": CATS[:2]}, dets


B6 = [50, 50, 10, 10]  # image 6's 'b'
IOU_09 = [50, 50, 10, 9]  # IoU 0.9 with it
IOU_03 = [50, 50, 10, 3]  # IoU 0.3 with it
A, B = 1, 2
# kind -> (image 6's extra detections, b_found, the expected AP per category [a, b] before any fix,
#          after fixing that kind, with every false positive removed (FP), with every unmatched object dropped (FN))
OK6, MISS6 = [True] * 6, [True] * 5
CASES = {
    # 'a' at IoU 0.9 on 'b' scores 0.95: first an 'a' false positive, 'b' misses one; fixed, it is 'b''s true positive
    "Cls": ([(6, A, IOU_09, 0.95)], 5, [([False] + OK6, 6), (MISS6, 6)], [(OK6, 6), ([True] + MISS6, 6)],
            [(OK6, 6), (MISS6, 6)], [([False] + OK6, 6), (MISS6, 5)]),
    # 'b' at IoU 0.3 on 'b' scores 0.95: a 'b' false positive above five hits; fixed, the sixth hit
    "Loc": ([(6, B, IOU_03, 0.95)], 5, [(OK6, 6), ([False] + MISS6, 6)], [(OK6, 6), ([True] + MISS6, 6)],
            [(OK6, 6), (MISS6, 6)], [(OK6, 6), ([False] + MISS6, 5)]),
    # 'a' at IoU 0.3 on 'b': wrong class and poor box; fixed means removed (and the 'b' is a Miss as well)
    "Both": ([(6, A, IOU_03, 0.95)], 5, [([False] + OK6, 6), (MISS6, 6)], [(OK6, 6), (MISS6, 6)],
             [(OK6, 6), (MISS6, 6)], [([False] + OK6, 6), (MISS6, 5)]),
    # 'b' found at 0.9, then found again at 0.85, above the other images' 0.8 hits
    "Dupe": ([(6, B, B6, 0.9), (6, B, IOU_09, 0.85)], 5, [(OK6, 6), ([True, False] + MISS6, 6)],
             [(OK6, 6), (OK6, 6)], [(OK6, 6), (OK6, 6)], [(OK6, 6), ([True, False] + MISS6, 6)]),
    # 'b' found, and a 'b' at 0.95 on empty background
    "Bkg": ([(6, B, B6, 0.8), (6, B, [80, 80, 10, 10], 0.95)], 5, [(OK6, 6), ([False] + OK6, 6)],
            [(OK6, 6), (OK6, 6)], [(OK6, 6), (OK6, 6)], [(OK6, 6), ([False] + OK6, 6)]),
    # image 6's 'b' found by nothing
    "Miss": ([], 5, [(OK6, 6), (MISS6, 6)], [(OK6, 6), (MISS6, 5)], [(OK6, 6), (MISS6, 6)], [(OK6, 6), (MISS6, 5)]),
}


def _map(per_category) -> float:
    return float(np.mean([coco_ap(hits, n) for hits, n in per_category]))


@pytest.mark.parametrize("kind", list(CASES))
def test_each_tide_error_alone(kind):
    extra, b_found, base, fixed, no_fp, no_fn = CASES[kind]
    gt, dets = dataset(extra, b_found=b_found)
    tide = analyze_errors(gt, dets).tide
    expected_counts = dict.fromkeys(TIDE_MAIN, 0)
    expected_counts[kind] = 1
    if kind == "Both":  # TIDE can fix no detection onto the 'b' object: it is also missed
        expected_counts["Miss"] = 1
    assert tide["counts"] == expected_counts
    assert tide["AP50"] == pytest.approx(_map(base), abs=1e-12)
    gain = _map(fixed) - _map(base)
    assert gain > 0.01
    assert tide["dAP"][kind] == pytest.approx(gain, abs=1e-12)
    for other in TIDE_MAIN:
        if expected_counts[other] == 0:
            assert tide["dAP"][other] == 0.0, other
    assert tide["special"]["FP"] == pytest.approx(_map(no_fp) - _map(base), abs=1e-12)
    assert tide["special"]["FN"] == pytest.approx(_map(no_fn) - _map(base), abs=1e-12)


def test_perfect_detections_have_no_errors():
    gt, dets = dataset(b_found=6)
    tide = analyze_errors(gt, dets).tide
    assert tide["AP50"] == 1.0 and set(tide["counts"].values()) == {0}
    assert set(tide["dAP"].values()) == {0.0} and set(tide["special"].values()) == {0.0}


def test_confusion_matrix_by_hand():
    images = [{"id": i, "width": 100, "height": 100} for i in range(1, 8)]
    objects = [(1, 1, [0, 0, 10, 10], 0), (2, 2, [0, 0, 10, 10], 0), (3, 2, [0, 0, 10, 10], 0),
               (5, 3, [0, 0, 10, 10], 0), (6, 1, [0, 0, 10, 10], 0), (7, 3, [0, 0, 20, 20], 1)]
    anns = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": crowd}
            for k, (i, c, b, crowd) in enumerate(objects)]
    dets = [(1, 1, [0, 0, 10, 10], 0.9),  # a found: (a, a)
            (2, 1, [0, 0, 10, 9], 0.9),  # b taken for an a at IoU 0.9: (b, a)
            (3, 2, [0, 0, 10, 3], 0.9),  # b's box too poor (IoU 0.3): (b, background) and (background, b)
            (4, 3, [0, 0, 10, 10], 0.9),  # a c on an empty image: (background, c)
            # image 5: its c found by nothing: (c, background)
            (6, 1, [0, 0, 10, 10], 0.6), (6, 2, [0, 0, 10, 10], 0.9),  # the b outscores the a: (a, b), (bg, a)
            (7, 3, [0, 0, 10, 10], 0.9)]  # on a crowd region: matched to nothing here, (background, c)
    results = [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in dets]
    confusion = analyze_errors({"images": images, "annotations": anns, "categories": CATS}, results).confusion
    assert confusion["categories"] == ["a", "b", "c", "background"] and confusion["cat_ids"] == [1, 2, 3]
    assert confusion["matrix"] == [[1, 1, 0, 0],   # ground truth a: as a, as b
                                   [1, 0, 0, 1],   # b: as a, missed
                                   [0, 0, 0, 1],   # c: missed
                                   [1, 1, 2, 0]]   # detections of nothing: an a, a b, two c


def test_ece_by_hand():
    images = [{"id": 1, "width": 100, "height": 100}]
    boxes = [[0, 0, 10, 10], [20, 0, 10, 10], [40, 0, 10, 10]]
    anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 100, "iscrowd": 0}
            for k, b in enumerate(boxes)]
    # score, true positive at IoU 0.5?
    dets = [(boxes[0], 0.95, True), ([70, 70, 10, 10], 0.92, False), (boxes[1], 0.55, True),
            ([70, 0, 10, 10], 0.37, False), (boxes[2], 0.31, True)]
    results = [{"image_id": 1, "category_id": 1, "bbox": b, "score": s} for b, s, _ in dets]
    cal = analyze_errors({"images": images, "annotations": anns, "categories": CATS[:1]}, results).calibration
    # bins [0.9, 1): 0.95, 0.92, half right; [0.5, 0.6): 0.55, right; [0.3, 0.4): 0.37, 0.31, half right
    gaps = {9: (abs(0.5 - 0.935), 2), 5: (abs(1 - 0.55), 1), 3: (abs(0.5 - 0.34), 2)}
    assert cal["num_detections"] == 5
    assert cal["ece"] == pytest.approx(sum(g * n for g, n in gaps.values()) / 5, abs=1e-9)  # 0.328
    assert cal["mce"] == pytest.approx(0.45, abs=1e-9)
    assert [b["count"] for b in cal["bins"]] == [0, 0, 0, 2, 0, 1, 0, 0, 0, 2]
    assert cal["bins"][9]["accuracy"] == 0.5 and cal["bins"][9]["confidence"] == pytest.approx(0.935)
    assert cal["bins"][0]["accuracy"] is None  # an empty bin has no accuracy


def _mask_case():
    """One 20x20 square object; two results with its box, one with its mask (a hit), one with its outline only
    (mask IoU 144/400 = 0.36), the outline scored higher."""
    import torch

    from retinanet.ops.masks import encode_masks

    images = [{"id": 1, "width": 40, "height": 40}]
    square = [[0, 0, 20, 0, 20, 20, 0, 20]]  # polygon of the 20x20 square at the origin
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0,
             "segmentation": square}]
    masks = torch.zeros(2, 40, 40, dtype=torch.bool)
    masks[0, :20, :20] = True  # the object's mask: a hit
    masks[1, :20, :2] = masks[1, :2, :20] = masks[1, 18:20, :20] = masks[1, :20, 18:20] = True  # its outline only
    rles = encode_masks(masks)
    results = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "score": s, "segmentation": r}
               for s, r in ((0.8, rles[0]), (0.9, rles[1]))]
    return {"images": images, "annotations": anns, "categories": CATS[:1]}, results


def test_masks_are_scored_as_masks():
    """Boxes that match but masks that do not: the segm analysis finds a localization error the bbox one does not."""
    gt, results = _mask_case()
    boxes, segm = analyze_errors(gt, results, "bbox"), analyze_errors(gt, results, "segm")
    assert boxes.tide["counts"]["Dupe"] == 1 and boxes.tide["counts"]["Loc"] == 0  # same box twice
    assert segm.tide["counts"]["Loc"] == 1 and segm.tide["counts"]["Dupe"] == 0  # outline IoU 144/400 = 0.36


def test_format_tide_line():
    tide = {"AP50": 0.91234, "dAP": {"Cls": 0.0123, "Loc": 0.04567, "Both": 0.0012, "Dupe": 0.0, "Bkg": 0.02346,
                                     "Miss": 0.03456}, "special": {"FP": 0.05678, "FN": 0.06789}}
    assert format_tide_line(tide, "bbox") == ("TIDE bbox (AP50 91.23): dAP Cls 1.23 Loc 4.57 Both 0.12 Dupe 0.00 "
                                              "Bkg 2.35 Miss 3.46 | FP 5.68 FN 6.79")
    assert format_tide_line({**tide, "AP50": None}, "segm").startswith("TIDE segm (AP50 n/a): dAP Cls 1.23")


def test_bad_thresholds_are_refused():
    gt, dets = dataset()
    with pytest.raises(ValueError, match="bg_thr < pos_thr"):
        analyze_errors(gt, dets, pos_thr=0.1, bg_thr=0.5)


# ---------------------------------------------------------------------------------------------
# The CLI


def _files(tmp_path, extra=(), b_found=5):
    gt, dets = dataset(extra, b_found=b_found)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    return str(tmp_path / "gt.json"), str(tmp_path / "dt.json")


def test_cli_writes_json_and_figures_and_refuses_to_overwrite(tmp_path, capsys):
    from retinanet.cli import main

    gt, dt = _files(tmp_path, CASES["Loc"][0])
    out = tmp_path / "errors"
    assert main(["analyze", "errors", "--json", gt, "--results", dt, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "errors.json").read_text())
    assert list(report) == ["source", "bbox"]  # no segmentations: boxes only
    bbox = report["bbox"]
    assert bbox["tide"] == analyze_errors(gt, dt).tide
    assert bbox["tide"]["counts"]["Loc"] == 1 and format_tide_line(bbox["tide"]) in printed
    assert bbox["confusion"]["matrix"] == [[6, 0, 0], [0, 5, 1], [0, 1, 0]]
    curves = bbox["pr_curves"]
    assert len(curves["recall"]) == 101 and set(curves) == {"recall", "0.5", "0.75"}
    assert curves["0.5"]["a"] == [1.0] * 101  # every 'a' found, nothing wrong above them
    for name in ("tide", "confusion_matrix", "pr_per_category", "calibration"):
        with Image.open(out / f"bbox_{name}.png") as im:
            assert im.format == "PNG" and im.size[0] >= 300
    before = (out / "errors.json").read_bytes()
    assert main(["analyze", "errors", "--json", gt, "--results", dt, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "errors.json" in err and len(err.strip().splitlines()) == 1
    assert (out / "errors.json").read_bytes() == before


@pytest.mark.parametrize("problem", ["missing_results", "unknown_image", "both_inputs", "no_gt"])
def test_cli_one_line_errors(tmp_path, capsys, problem):
    from retinanet.cli import main

    gt, dt = _files(tmp_path)
    if problem == "unknown_image":
        dets = json.loads((tmp_path / "dt.json").read_text()) + [
            {"image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]
        (tmp_path / "dt.json").write_text(json.dumps(dets))
    argv = {"missing_results": ["--json", gt, "--results", str(tmp_path / "nope.json")],
            "unknown_image": ["--json", gt, "--results", dt],
            "both_inputs": ["--json", gt, "--results", dt, "--checkpoint", "m.pt", "--images", str(tmp_path)],
            "no_gt": ["--results", dt]}[problem]
    expected = {"missing_results": "nope.json: not found", "unknown_image": "1 image ids are absent from",
                "both_inputs": "either --results R.json or --checkpoint", "no_gt": "needs --json"}[problem]
    assert main(["analyze", "errors", *argv, "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    if problem == "unknown_image":
        assert "dt.json" in err and "[99]" in err
    assert not (tmp_path / "out" / "errors.json").exists()


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_cli_checkpoint_equals_its_saved_results(tmp_path, arch):
    """--checkpoint predicts through `retinanet eval`'s path: the same analysis as the results that
    `retinanet eval --save-results` writes for the same checkpoint."""
    from conftest import tiny_config
    from retinanet.checkpoint import make_checkpoint, save_atomic
    from retinanet.cli import main
    from retinanet.data.synthetic import make_shapes_dataset
    from retinanet.modeling import build_model

    paths = make_shapes_dataset(str(tmp_path / "shapes"), num_train=1, num_val=2, image_size=64, seed=0)
    two_stage = {"arch": "faster_rcnn", "min_level": 2, "max_level": 6, "p6_from": "pool",
                 "anchor_sizes": [8.0, 16.0, 32.0, 64.0, 128.0], "anchor_scales": [1.0], "roi_head_dim": 32,
                 "rpn_pre_nms_top_n": [200, 100], "rpn_post_nms_top_n": [100, 50]}
    # prior 0.1: an untrained RetinaNet's scores start above the 0.05 threshold, so that it detects
    cfg = tiny_config(num_classes=4, min_size=64, max_size=64,
                      **(two_stage if arch == "faster_rcnn" else {"prior_prob": 0.1}))
    cats = [{"id": i + 1, "name": n} for i, n in enumerate("abcd")]
    save_atomic(make_checkpoint(build_model(cfg), cfg, cats), str(tmp_path / "m.pt"))
    data = ["--json", str(paths.val_json), "--images", str(paths.val_images)]
    assert main(["eval", "--checkpoint", str(tmp_path / "m.pt"), *data, "--workers", "0", "--device", "cpu",
                 "--save-results", str(tmp_path / "dt.json")]) == 0
    assert len(json.loads((tmp_path / "dt.json").read_text())) > 0  # an untrained model still detects
    assert main(["analyze", "errors", "--checkpoint", str(tmp_path / "m.pt"), *data, "--device", "cpu",
                 "--output", str(tmp_path / "a")]) == 0
    ours = json.loads((tmp_path / "a" / "errors.json").read_text())["bbox"]
    saved = analyze_errors(str(paths.val_json), str(tmp_path / "dt.json"))
    assert ours["tide"] == saved.tide and ours["confusion"] == saved.confusion
    assert ours["calibration"] == saved.calibration


def test_cli_masks_analyzed_when_results_have_them(tmp_path, capsys):
    from retinanet.cli import main

    gt, results = _mask_case()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    args = ["analyze", "errors", "--json", str(tmp_path / "gt.json"), "--results", str(tmp_path / "dt.json")]
    assert main([*args, "--output", str(tmp_path / "auto")]) == 0
    report = json.loads((tmp_path / "auto" / "errors.json").read_text())
    assert [k for k in report if k != "source"] == ["bbox", "segm"]
    assert report["segm"]["tide"]["counts"]["Loc"] == 1 and report["bbox"]["tide"]["counts"]["Dupe"] == 1
    assert (tmp_path / "auto" / "segm_calibration.png").is_file()
    printed = capsys.readouterr().out
    # boxes: the hit first (equal boxes, higher score), a duplicate after it; masks: the outline first, a miss
    assert coco_ap([True, False], 1) == 1.0 and coco_ap([False, True], 1) == 0.5
    assert "TIDE bbox (AP50 100.00): dAP Cls 0.00 Loc 0.00" in printed
    assert "TIDE segm (AP50 50.00): dAP Cls 0.00 Loc 50.00" in printed
    # boxes only, and a refusal of masks that are not there
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes_only))
    argv = ["analyze", "errors", "--json", str(tmp_path / "gt.json"), "--results", str(tmp_path / "boxes.json"),
            "--iou-type", "segm", "--output", str(tmp_path / "segm")]
    assert main(argv) == 1
    assert "--iou-type segm: " in capsys.readouterr().err and not (tmp_path / "segm" / "errors.json").exists()


def test_cli_refuses_a_segment_proposal_checkpoint_and_a_missing_one(tmp_path, capsys):
    from conftest import tiny_deepmask_config
    from retinanet.checkpoint import make_checkpoint, save_atomic
    from retinanet.cli import main
    from retinanet.modeling import build_model

    gt, _ = _files(tmp_path)
    cfg = tiny_deepmask_config()
    save_atomic(make_checkpoint(build_model(cfg), cfg, [{"id": 1, "name": "object"}]), str(tmp_path / "dm.pt"))
    for checkpoint, expected in ((tmp_path / "dm.pt", "is a segment proposal model (model.arch deepmask)"),
                                 (tmp_path / "nope.pt", f"checkpoint not found: {tmp_path / 'nope.pt'}")):
        argv = ["analyze", "errors", "--json", gt, "--images", str(tmp_path), "--checkpoint", str(checkpoint),
                "--output", str(tmp_path / "out")]
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# AP by IoU threshold, and TIDE at another IoU (--iou)

# One category, two 10x10 objects in one 100x100 image: the one at (50, 50) found at IoU 0.92 (score
# 0.9), the one at (0, 0) at IoU 0.63 (score 0.8), both IoUs away from COCO's thresholds.
# By hand, COCO's 101-point AP at IoU t: t <= 0.63 (0.50, 0.55, 0.60) both are hits: 1.0;
# 0.63 < t <= 0.92 (0.65 ... 0.90, six thresholds) the first is a hit and the second a false positive:
# precision 1 up to recall 0.5, nothing above: 51 of the 101 recall points, 51/101; t = 0.95: 0.
# The AP is their mean, (3 + 6 * 51/101) / 10 = 609/1010.
TWO_OBJECTS_AP = {**dict.fromkeys(["0.5", "0.55", "0.6"], 1.0),
                  **dict.fromkeys(["0.65", "0.7", "0.75", "0.8", "0.85", "0.9"], 51 / 101), "0.95": 0.0}


def two_objects():
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.png"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "area": 100,
                           "iscrowd": 0}],
          "categories": CATS[:1]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 9.2], "score": 0.9},  # IoU 0.92
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 6.3], "score": 0.8}]  # IoU 0.63
    return gt, dets


def test_ap_by_iou_by_hand_and_against_evaluate_coco():
    from retinanet.evaluate import evaluate_coco

    gt, dets = two_objects()
    analysis = analyze_errors(gt, dets)
    by_iou = analysis.ap_by_iou()
    assert list(by_iou) == list(TWO_OBJECTS_AP)
    for t, expected in TWO_OBJECTS_AP.items():
        assert by_iou[t] == pytest.approx(expected, abs=1e-12), t
    metrics = evaluate_coco(gt, dets)  # the package's evaluation: its AP, AP50, AP75
    assert metrics["AP"] == pytest.approx(609 / 1010, abs=1e-12)
    assert np.mean(list(by_iou.values())) == pytest.approx(metrics["AP"], abs=1e-12)
    assert by_iou["0.5"] == metrics["AP50"] and by_iou["0.75"] == metrics["AP75"]
    assert analysis.to_dict()["ap_by_iou"] == by_iou
    from retinanet.error_analysis import format_ap_by_iou_line
    assert format_ap_by_iou_line(by_iou) == ("AP by IoU bbox: .50 100.00 .55 100.00 .60 100.00 .65 50.50 .70 50.50 "
                                             ".75 50.50 .80 50.50 .85 50.50 .90 50.50 .95 0.00 | mean 60.30")


def test_tide_at_iou_075_counts_the_iou_063_box_as_loc():
    gt, dets = two_objects()
    at_50 = analyze_errors(gt, dets).tide
    assert at_50["AP50"] == 1.0 and set(at_50["counts"].values()) == {0}
    at_75 = analyze_errors(gt, dets, pos_thr=0.75).tide
    assert at_75["pos_thr"] == 0.75 and "AP50" not in at_75
    assert at_75["AP@0.75"] == pytest.approx(51 / 101, abs=1e-12)
    assert at_75["counts"] == {**dict.fromkeys(TIDE_MAIN, 0), "Loc": 1}
    assert at_75["dAP"]["Loc"] == pytest.approx(1 - 51 / 101, abs=1e-12)  # its box fixed: both hits, AP 1
    assert format_tide_line(at_75).startswith("TIDE bbox (AP@0.75 50.50): dAP Cls 0.00 Loc 49.50 ")


def test_cli_iou_option(tmp_path, capsys):
    from retinanet.cli import main

    gt, dets = two_objects()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    argv = ["analyze", "errors", "--json", str(tmp_path / "gt.json"), "--results", str(tmp_path / "dt.json")]
    assert main(argv + ["--iou", "0.75", "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "errors.json").read_text())["bbox"]
    assert report["tide"]["pos_thr"] == report["confusion"]["iou_thr"] == report["calibration"]["iou_thr"] == 0.75
    assert report["tide"]["counts"]["Loc"] == 1
    assert "TIDE bbox (AP@0.75 50.50)" in printed and "AP by IoU bbox: .50 100.00" in printed
    assert report["ap_by_iou"] == pytest.approx(TWO_OBJECTS_AP, abs=1e-12)
    # the default is unchanged: IoU 0.5, both boxes right
    assert main(argv + ["--output", str(tmp_path / "out50")]) == 0
    assert "TIDE bbox (AP50 100.00)" in capsys.readouterr().out
    for bad in ("0.1", "1", "0.05", "nan"):
        assert main(argv + ["--iou", bad, "--output", str(tmp_path / f"bad{bad}")]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--iou must be above TIDE's background IoU 0.1 and below 1" in err
        assert not (tmp_path / f"bad{bad}").exists()
    assert main(["analyze", "curves", "--iou", "0.75", "--output", str(tmp_path / "c")]) == 1
    assert "--iou is for analyze errors" in capsys.readouterr().err
