"""Mask metrics (iou_type segm) and proposal recall: every backend against pycocotools, hand-worked cases,
the CLI, and Detections with masks."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from coco_eval_cases import CATEGORY_IDS, make_segm_case_set, pycocotools_eval, write_json

from retinanet import evaluate
from retinanet.cli import main
from retinanet.evaluate import PROPOSAL_KEYS, STAT_KEYS, evaluate_coco, proposal_recall, run_coco_eval
from retinanet.ops.masks import encode_masks
from retinanet.predict import Detections, draw_detections
from test_evaluate import BACKENDS


@pytest.fixture(scope="module")
def segm_files(tmp_path_factory):
    """The segm case set (results without their bbox: segm scores the masks alone, see evaluate.py)."""
    gt, results = make_segm_case_set(seed=0, many=1500)
    folder = tmp_path_factory.mktemp("segm")
    masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    return gt, results, write_json(folder / "gt.json", gt), write_json(folder / "dt.json", masks_only), folder


def test_segm_case_set_has_the_edge_cases(segm_files):
    gt, results, *_ = segm_files
    anns = gt["annotations"]
    crowd = [a for a in anns if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)  # uncompressed RLE
    assert any(isinstance(a["segmentation"], list) and len(a["segmentation"]) == 2 for a in anns)  # 2-part polygons
    assert any(isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], str) for a in anns)
    image_ids = {im["id"] for im in gt["images"]}
    assert image_ids - {a["image_id"] for a in anns} and image_ids - {r["image_id"] for r in results}
    per_image = [sum(r["image_id"] == i for r in results) for i in image_ids]
    assert max(per_image) > 1000
    # overlapping ground truth masks in one image
    from pycocotools import mask as mask_api

    from retinanet.ops.masks import segmentation_to_rle

    rles = {}
    for a in anns:
        rles.setdefault(a["image_id"], []).append(segmentation_to_rle(a["segmentation"], 120, 160))
    assert any((mask_api.iou(r, r, [0] * len(r)) > 0).sum() > len(r) for r in rles.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_segm_equals_pycocotools(segm_files, backend):
    gt, results, gt_path, dt_path, _ = segm_files
    ref = pycocotools_eval(gt_path, dt_path, "segm")
    ev = run_coco_eval(gt_path, dt_path, backend=backend, iou_type="segm")
    np.testing.assert_allclose(ev.stats, ref.stats, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ev.precision, ref.eval["precision"], rtol=0, atol=1e-6)
    assert ev.cat_ids == list(CATEGORY_IDS)
    assert (ref.stats > 0).all()  # every number is measured on this set
    # the same results with their boxes, as dict and list: a bbox in a segm result is not read; inputs unmodified
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    np.testing.assert_allclose(run_coco_eval(gt, results, backend=backend, iou_type="segm").stats, ref.stats,
                               rtol=0, atol=1e-6)
    assert gt == gt_before and results == results_before


def _one_image_gt(segmentations, iscrowd) -> dict:
    from pycocotools import mask as mask_api

    from retinanet.ops.masks import segmentation_to_rle

    anns = []
    for k, (seg, crowd) in enumerate(zip(segmentations, iscrowd)):
        rle = segmentation_to_rle(seg, 6, 6)
        anns.append({"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": seg, "iscrowd": crowd,
                     "area": float(mask_api.area(rle)), "bbox": mask_api.toBbox(rle).tolist()})
    return {"images": [{"id": 1, "height": 6, "width": 6}], "annotations": anns, "categories": [{"id": 1, "name": "a"}]}


def _result(mask, score) -> dict:
    return {"image_id": 1, "category_id": 1, "score": score, "segmentation": encode_masks(mask[None])[0]}


def test_crowd_region_ignores_a_detection_inside_it():
    # GT: an object, the left 3x3 square (9 px); a crowd region, the right half (columns 3-5, 18 px).
    obj = np.zeros((6, 6), dtype=np.uint8)
    obj[0:3, 0:3] = 1
    crowd_counts = [18, 18]  # column-major: columns 0-2 zero, columns 3-5 one
    gt = _one_image_gt([encode_masks(obj[None])[0], {"size": [6, 6], "counts": crowd_counts}], [0, 1])
    inside = np.zeros((6, 6), dtype=np.uint8)
    inside[2:5, 4:6] = 1  # 6 px, all in the crowd region: IoU with a crowd region is area(d & g) / area(d) = 1
    # The detection in the crowd region scores higher than the true one: were it a false positive,
    # precision at recall 1 would be 1/2; ignored, AP is 1.
    results = [_result(inside, 0.9), _result(obj, 0.8)]
    for backend in ("hotcoco", "pycocotools"):
        assert evaluate_coco(gt, results, backend=backend, iou_type="segm")["AP"] == pytest.approx(1.0)
    outside = np.zeros((6, 6), dtype=np.uint8)
    outside[4:6, 0:3] = 1  # below the object, outside the crowd region: a false positive
    ap = evaluate_coco(gt, [_result(outside, 0.9), _result(obj, 0.8)], iou_type="segm")["AP"]
    assert ap == pytest.approx(evaluate_coco(gt, [_result(outside, 0.9), _result(obj, 0.8)], backend="pycocotools",
                                             iou_type="segm")["AP"])
    assert ap == pytest.approx(0.5)  # precision 1/2 at every recall point


def test_mask_iou_decides_the_match():
    # GT 3x3 square; detection 3x2 inside it: mask IoU 6/9 = 0.667, so matched at IoU .50, .55, .60, .65 only.
    obj = np.zeros((6, 6), dtype=np.uint8)
    obj[0:3, 0:3] = 1
    part = np.zeros((6, 6), dtype=np.uint8)
    part[0:3, 0:2] = 1
    gt = _one_image_gt([encode_masks(obj[None])[0]], [0])
    metrics = evaluate_coco(gt, [_result(part, 0.9)], iou_type="segm")
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == pytest.approx(0.0)
    assert metrics["AP"] == pytest.approx(4 / 10)


def test_segm_input_errors_name_the_entry(segm_files):
    gt, results, gt_path, dt_path, _ = segm_files
    bad = [dict(r) for r in results[:3]]
    bad[1]["segmentation"] = {"size": [10, 10], "counts": bad[1]["segmentation"]["counts"]}
    with pytest.raises(ValueError, match=r"result 1: RLE size \[10, 10\] differs from image"):
        run_coco_eval(gt, bad, iou_type="segm")
    bad[1]["segmentation"] = [[1, 2, 3, 4, 5, 6]]
    with pytest.raises(ValueError, match="result 1: 'segmentation' must be a compressed RLE"):
        run_coco_eval(gt, bad, iou_type="segm")
    no_masks = {**gt, "annotations": [{k: v for k, v in a.items() if k != "segmentation"} for a in gt["annotations"]]}
    with pytest.raises(ValueError, match=r"annotation 0 \(id 1\): no 'segmentation'"):
        run_coco_eval(no_masks, results[:3], iou_type="segm")
    with pytest.raises(ValueError, match="unknown iou_type 'mask'"):
        run_coco_eval(gt, results[:3], iou_type="mask")


@pytest.fixture(scope="module")
def proposal_files(segm_files):
    """The same results as class-agnostic proposals, written with one category id (pycocotools' useCats=0
    orders equal scores by category first; with one id the order is the file's, as ours)."""
    gt, results, gt_path, _, folder = segm_files
    one_cat = [{**r, "category_id": CATEGORY_IDS[0]} for r in results]
    files = {}
    for iou_type, drop in (("bbox", "segmentation"), ("segm", "bbox")):
        files[iou_type] = write_json(folder / f"proposals_{iou_type}.json",
                                     [{k: v for k, v in r.items() if k != drop} for r in one_cat])
    return gt_path, files, results


@pytest.mark.parametrize("backend", evaluate.PROPOSAL_BACKENDS)
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_proposal_recall_equals_pycocotools_use_cats_0(proposal_files, iou_type, backend):
    gt_path, files, results = proposal_files
    ours = proposal_recall(gt_path, files[iou_type], iou_type, backend=backend)
    assert tuple(ours) == PROPOSAL_KEYS
    ref = pycocotools_eval(gt_path, files[iou_type], iou_type, use_cats=0, max_dets=[10, 100, 1000])
    assert [ours[k] for k in PROPOSAL_KEYS[:6]] == pytest.approx(ref.stats[6:12].tolist(), abs=1e-6)
    # AUC: pycocotools' AR at every count 1..1000 (its recall array with maxDets 1..1000), averaged
    curve = pycocotools_eval(gt_path, files[iou_type], iou_type, use_cats=0, max_dets=range(1, 1001))
    recall = curve.eval["recall"][:, 0]  # (T, A, M)
    for key, area in zip(PROPOSAL_KEYS[6:], range(4)):
        assert (recall[:, area] > -1).all()
        assert ours[key] == pytest.approx(recall[:, area].mean(), abs=1e-6)
    assert ours["AR@10"] < ours["AR@100"] <= ours["AR@1000"] and ours["AUC"] <= ours["AR@1000"]


def test_proposal_recall_ignores_categories(proposal_files):
    gt_path, files, results = proposal_files
    one_cat = proposal_recall(gt_path, files["bbox"], "bbox")
    # the original results, categories all over the place (and none at all): the same numbers
    assert proposal_recall(gt_path, results, "bbox") == pytest.approx(one_cat)
    assert proposal_recall(gt_path, [{k: v for k, v in r.items() if k != "category_id"} for r in results],
                           "bbox") == pytest.approx(one_cat)
    with pytest.raises(ValueError, match="faster-coco-eval"):
        proposal_recall(gt_path, results, "bbox", backend="faster-coco-eval")


def test_proposals_beyond_1000_are_cut_per_image(tmp_path):
    # One object; 1000 empty-scoring decoys above it in score: AR@1000 is 0; with 999 decoys it is 1.
    gt = {"images": [{"id": 3, "height": 100, "width": 100}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600,
                           "iscrowd": 0}]}
    hit = {"image_id": 3, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.1}
    decoys = [{"image_id": 3, "category_id": 1, "bbox": [60, 60, 5, 5], "score": 0.5}] * 1000
    assert proposal_recall(gt, decoys + [hit])["AR@1000"] == 0
    recall = proposal_recall(gt, decoys[:999] + [hit])
    assert recall["AR@1000"] == 1 and recall["AR@100"] == 0
    assert recall["AUC"] == pytest.approx(1 / 1000)  # found only at the 1000th count
    assert recall["ARs@1000"] is None and recall["AUCs"] is None  # no small object: undefined


def test_cli_iou_types_and_proposals(segm_files, tmp_path, capsys):
    gt, results, gt_path, dt_path, folder = segm_files
    both = write_json(tmp_path / "both.json", results)  # bbox and segmentation in every result
    out = tmp_path / "m.json"
    assert main(["eval", "--gt", gt_path, "--results", both, "--iou-type", "bbox,segm", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"bbox", "segm"}
    assert metrics["bbox"]["AP"] == pytest.approx(evaluate_coco(gt_path, both)["AP"], abs=1e-9)
    ref = pycocotools_eval(gt_path, dt_path, "segm")
    assert [metrics["segm"][k] for k in STAT_KEYS] == pytest.approx(ref.stats.tolist(), abs=1e-6)
    assert main(["eval", "--gt", gt_path, "--results", both, "--iou-type", "segm", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["AP"] == pytest.approx(ref.stats[0], abs=1e-6)  # one type: flat, as bbox
    assert main(["eval", "--gt", gt_path, "--results", both, "--iou-type", "segm", "--proposals",
                 "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == pytest.approx(proposal_recall(gt_path, both, "segm"))
    assert "AR@1000) @[ IoU=0.50:0.95 | area=   all | proposals=   1000 ]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--gt", gt_path, "--results", both, "--iou-type", "bbox,mask"])
    capsys.readouterr()
    assert main(["eval", "--gt", gt_path, "--results", both, "--proposals", "--plots", str(tmp_path / "p")]) == 1
    assert "proposals do not have" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--json", gt_path, "--images", str(tmp_path),
                 "--iou-type", "segm"]) == 1  # a mask model may be there: looked for (box models: test_segment_proposals)
    assert "checkpoint not found" in capsys.readouterr().err


def test_detections_with_masks_write_rle_and_draw_overlays():
    masks = np.zeros((2, 60, 80), dtype=bool)
    masks[0, 10:40, 20:50] = True
    masks[1, 45:60, 0:20] = True
    det = Detections(boxes=np.array([[20, 10, 50, 40], [0, 45, 20, 60]], dtype=np.float32),
                     scores=np.array([0.9, 0.3], dtype=np.float32), labels=np.array([0, 1]),
                     category_ids=np.array([7, 9]), names=["a", "b"], image_size=(60, 80), masks=masks)
    entries = det.to_coco(image_id=4)
    assert [e["segmentation"] for e in entries] == encode_masks(masks)
    json.dumps(entries)  # JSON-ready: str counts
    gt = {"images": [{"id": 4, "height": 60, "width": 80}],
          "categories": [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}],
          "annotations": [{"id": 1, "image_id": 4, "category_id": 7, "segmentation": entries[0]["segmentation"],
                           "area": 900.0, "bbox": [20, 10, 30, 30], "iscrowd": 0}]}
    assert evaluate_coco(gt, entries, iou_type="segm")["AP"] == pytest.approx(1.0)  # the mask is its own GT
    no_masks = Detections(det.boxes, det.scores, det.labels, det.category_ids, det.names, det.image_size)
    assert "segmentation" not in no_masks.to_coco(4)[0]

    image = np.zeros((60, 80, 3), dtype=np.uint8)
    drawn = np.asarray(draw_detections(image, det, min_score=0.5))
    plain = np.asarray(draw_detections(image, no_masks, min_score=0.5))
    from retinanet.predict import _PALETTE, MASK_ALPHA

    expected = np.round(MASK_ALPHA * np.array(_PALETTE[0])).astype(np.uint8)
    assert (drawn[30, 35] == expected).all() and (plain[30, 35] == 0).all()  # inside the first mask: tinted
    assert (drawn[55, 10] == 0).all()  # the second detection is below min_score: no overlay
