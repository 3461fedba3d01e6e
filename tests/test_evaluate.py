"""COCO evaluation: every backend against pycocotools, hand-worked cases, and bad input."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from coco_eval_cases import (CATEGORY_IDS, NO_GT_CATEGORY, make_edge_case_set, pycocotools_reference,
                             reference_ap, write_json)

from retinanet import evaluate
from retinanet.evaluate import (EXTRA_IOU_KEYS, METRIC_KEYS, STAT_KEYS, BackendNotInstalled,
                                detections_to_coco_results, evaluate_coco, run_coco_eval)


def available_backends() -> list:
    """Every backend, marked skip where its package is missing (faster-coco-eval is a test extra)."""
    params = []
    for name, (module, package) in evaluate.BACKENDS.items():
        try:
            __import__(module)
            params.append(name)
        except ImportError:
            params.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{package} not installed")))
    return params


BACKENDS = available_backends()


@pytest.fixture(scope="module")
def edge_case_files(tmp_path_factory):
    gt, results = make_edge_case_set(seed=0)
    folder = tmp_path_factory.mktemp("coco")
    gt_path, dt_path = write_json(folder / "gt.json", gt), write_json(folder / "dt.json", results)
    return gt, results, gt_path, dt_path, pycocotools_reference(gt_path, dt_path)


def test_edge_case_set_has_the_edge_cases(edge_case_files):
    gt, results, *_ = edge_case_files
    gt_images = {a["image_id"] for a in gt["annotations"]}
    dt_images = [r["image_id"] for r in results]
    all_images = {im["id"] for im in gt["images"]}
    assert any(a["iscrowd"] for a in gt["annotations"])
    assert all_images - gt_images and all_images - set(dt_images)  # images without GT, without detections
    assert max(dt_images.count(i) for i in all_images) > 100  # beyond maxDets
    assert NO_GT_CATEGORY in {r["category_id"] for r in results}
    assert NO_GT_CATEGORY not in {a["category_id"] for a in gt["annotations"]}
    areas = np.array([a["area"] for a in gt["annotations"]])
    assert (areas < 32 ** 2).any() and ((areas > 32 ** 2) & (areas < 96 ** 2)).any() and (areas > 96 ** 2).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_equals_pycocotools(edge_case_files, backend):
    gt, results, gt_path, dt_path, ref = edge_case_files
    ev = run_coco_eval(gt_path, dt_path, backend=backend)
    np.testing.assert_allclose(ev.stats, ref.stats, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ev.precision, ref.eval["precision"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ev.recall, ref.eval["recall"], rtol=0, atol=1e-6)
    assert ev.cat_ids == list(CATEGORY_IDS)

    metrics = ev.metrics()
    assert tuple(metrics) == METRIC_KEYS
    for key, value in zip(STAT_KEYS, ref.stats):
        assert metrics[key] == pytest.approx(value, abs=1e-6)  # every stat is defined on this set
    for key, iou in EXTRA_IOU_KEYS.items():
        assert metrics[key] == pytest.approx(reference_ap(ref, iou=iou), abs=1e-6)
    expected = {f"class{c}": reference_ap(ref, category_index=k) for k, c in enumerate(CATEGORY_IDS)}
    assert expected.pop(f"class{NO_GT_CATEGORY}") == -1
    assert metrics["per_category"].pop(f"class{NO_GT_CATEGORY}") is None
    assert metrics["per_category"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dict_and_list_inputs_equal_files_and_stay_unmodified(edge_case_files, backend):
    gt, results, gt_path, dt_path, ref = edge_case_files
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    metrics = evaluate_coco(gt, results, backend=backend)
    assert metrics == evaluate_coco(gt_path, dt_path, backend=backend)
    assert gt == gt_before and results == results_before


def test_single_iou_ap_and_mean_curve_agree_with_summary(edge_case_files):
    *_, gt_path, dt_path, ref = edge_case_files
    ev = run_coco_eval(gt_path, dt_path)
    assert ev.ap_at_iou(0.5) == pytest.approx(ref.stats[1], abs=1e-12)
    assert ev.ap_at_iou(0.75) == pytest.approx(ref.stats[2], abs=1e-12)
    assert ev.mean_pr_curve(0.5).mean() == pytest.approx(ref.stats[1], abs=1e-12)
    assert ev.mean_pr_curve(0.75).shape == (101,)
    with pytest.raises(ValueError, match="0.62"):
        ev.ap_at_iou(0.62)


# Hand-worked cases: one 100x100 GT box (area 10^4 > 96^2: a "large" object).

def one_box_gt(extra_annotations=()):
    anns = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 100, 100], "area": 10000, "iscrowd": 0}]
    return {"images": [{"id": 1, "width": 200, "height": 200}], "annotations": anns + list(extra_annotations),
            "categories": [{"id": 5, "name": "thing"}]}


def det(box, score, category_id=5, image_id=1):
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_detection_is_ap_1(backend):
    m = evaluate_coco(one_box_gt(), [det([10, 10, 100, 100], 0.9)], backend=backend)
    for key in ("AP", "AP50", "AP75", "APl", "AR1", "AR10", "AR100", "ARl", "AP60", "AP70", "AP80", "AP90"):
        assert m[key] == pytest.approx(1.0)
    # No small or medium ground truth: pycocotools writes -1, we write None.
    assert m["APs"] is m["APm"] is m["ARs"] is m["ARm"] is None
    assert m["per_category"] == {"thing": pytest.approx(1.0)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_detection_at_iou_064(backend):
    # [10, 10, 64, 100] inside the GT box: IoU 6400 / 10000 = 0.64, a match at IoU .50, .55, .60 only.
    m = evaluate_coco(one_box_gt(), [det([10, 10, 64, 100], 0.9)], backend=backend)
    assert m["AP50"] == pytest.approx(1.0) and m["AP60"] == pytest.approx(1.0)
    assert m["AP70"] == 0 and m["AP75"] == 0 and m["AP90"] == 0
    assert m["AP"] == pytest.approx(3 / 10) and m["AR100"] == pytest.approx(3 / 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_false_positive_ranked_first_halves_precision(backend):
    # A miss scored 0.9, then the perfect box at 0.8: precision 1/2 at recall 1, so AP = 0.5 at every IoU.
    results = [det([150, 150, 40, 40], 0.9), det([10, 10, 100, 100], 0.8)]
    m = evaluate_coco(one_box_gt(), results, backend=backend)
    assert m["AP"] == pytest.approx(0.5) and m["AP50"] == pytest.approx(0.5)
    assert m["AR1"] == 0 and m["AR10"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_iscrowd_means_not_a_crowd(backend):
    # pycocotools' computeIoU would raise KeyError('iscrowd'); its evaluate() already reads missing as 0.
    gt = one_box_gt()
    del gt["annotations"][0]["iscrowd"]
    results = [det([150, 150, 40, 40], 0.9), det([10, 10, 100, 100], 0.8)]
    assert evaluate_coco(gt, results, backend=backend)["AP"] == pytest.approx(0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_detection_on_crowd_region_is_ignored(backend):
    # A crowd region at [120, 120, 60, 60]; a high-scoring detection inside it neither counts as a
    # false positive nor as a true positive, so the perfect detection keeps AP at 1.
    crowd = {"id": 2, "image_id": 1, "category_id": 5, "bbox": [120, 120, 60, 60], "area": 3600, "iscrowd": 1}
    results = [det([125, 125, 30, 30], 0.95), det([10, 10, 100, 100], 0.5)]
    m = evaluate_coco(one_box_gt([crowd]), results, backend=backend)
    assert m["AP"] == pytest.approx(1.0)
    # The same box as a plain GT instead: now the detection inside it is a poor match, a false positive.
    plain = dict(crowd, iscrowd=0)
    assert evaluate_coco(one_box_gt([plain]), results, backend=backend)["AP"] < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results_give_zero_not_a_crash(edge_case_files, backend):
    gt, *_ = edge_case_files
    m = evaluate_coco(gt, [], backend=backend)
    assert all(m[key] == 0 for key in STAT_KEYS + tuple(EXTRA_IOU_KEYS))
    assert m["per_category"].pop(f"class{NO_GT_CATEGORY}") is None
    assert set(m["per_category"].values()) == {0.0}


def test_pycocotools_itself_crashes_on_empty_results(edge_case_files):
    from pycocotools.coco import COCO

    *_, gt_path, _, _ = edge_case_files
    with pytest.raises(IndexError):
        COCO(gt_path).loadRes([])


def test_only_small_ground_truth_leaves_large_undefined(tmp_path):
    gt = one_box_gt()
    gt["annotations"][0].update(bbox=[10, 10, 20, 20], area=400)  # 400 < 32^2: small
    results = [det([10, 10, 20, 20], 0.9)]
    ref = pycocotools_reference(write_json(tmp_path / "gt.json", gt), write_json(tmp_path / "dt.json", results))
    assert ref.stats[5] == -1  # APl: pycocotools' "undefined"
    for backend in [b for b in BACKENDS if isinstance(b, str)]:
        m = evaluate_coco(gt, results, backend=backend)
        assert m["APs"] == pytest.approx(1.0) and m["APl"] is None and m["APm"] is None


def test_duplicate_category_names_are_told_apart():
    gt = one_box_gt()
    gt["categories"].append({"id": 6, "name": "thing"})
    m = evaluate_coco(gt, [det([10, 10, 100, 100], 0.9)])
    assert m["per_category"] == {"thing (id 5)": pytest.approx(1.0), "thing (id 6)": None}


# Bad input: errors that name the file, the result index, the ids.

def test_unknown_image_ids_are_listed(tmp_path):
    results = [det([10, 10, 5, 5], 0.5), det([10, 10, 5, 5], 0.5, image_id=999), det([1, 1, 5, 5], 0.4, image_id=4)]
    path = write_json(tmp_path / "dt.json", results)
    with pytest.raises(ValueError, match=r"dt\.json: 2 image ids are absent from the ground truth: \[4, 999\]"):
        evaluate_coco(one_box_gt(), path)


def test_unknown_category_ids_are_listed():
    with pytest.raises(ValueError, match=r"results: 1 category ids are absent .*\[77\]"):
        evaluate_coco(one_box_gt(), [det([10, 10, 5, 5], 0.5, category_id=77)])


@pytest.mark.parametrize("field, value", [("bbox", [10, 10, math.nan, 5]), ("bbox", [10, math.inf, 5, 5]),
                                          ("score", math.nan), ("score", -math.inf)])
def test_non_finite_values_name_the_result(tmp_path, field, value):
    results = [det([10, 10, 5, 5], 0.5) for _ in range(5)]
    results[3][field] = value
    with pytest.raises(ValueError, match=rf"results: result 3: '{field}' is not finite"):
        evaluate_coco(one_box_gt(), results)
    # Python's json writes NaN / Infinity tokens; such a file is read and the result named too.
    path = tmp_path / "dt.json"
    path.write_text(json.dumps(results))
    with pytest.raises(ValueError, match=rf"dt\.json: result 3: '{field}' is not finite"):
        evaluate_coco(one_box_gt(), str(path))


@pytest.mark.parametrize("bad, message", [
    ({"bbox": [1, 2, 3]}, r"result 1: 'bbox' must be a list of 4 numbers, got \[1, 2, 3\]"),
    ({"bbox": [1, 2, 3, "x"]}, r"result 1: 'bbox' must be a list of 4 numbers"),
    ({"bbox": [1, 2, -3, 4]}, r"result 1: 'bbox' \[x, y, w, h\] has a negative size"),
    ({"score": "high"}, r"result 1: 'score' must be a number, got 'high'"),
    ({"image_id": 1.5}, r"result 1: 'image_id' must be a 64-bit integer, got 1.5"),
    ({"category_id": "5"}, r"result 1: 'category_id' must be a 64-bit integer, got '5'"),
    ({"score": None}, r"result 1: 'score' must be a number, got None"),
])
def test_malformed_results_name_the_index(bad, message):
    results = [det([10, 10, 5, 5], 0.5), {**det([10, 10, 5, 5], 0.5), **bad}]
    with pytest.raises(ValueError, match=message):
        evaluate_coco(one_box_gt(), results)


def test_missing_key_and_non_object_are_named():
    results = [det([10, 10, 5, 5], 0.5), det([10, 10, 5, 5], 0.5)]
    del results[1]["score"]
    with pytest.raises(ValueError, match=r"result 1 has no 'score'"):
        evaluate_coco(one_box_gt(), results)
    with pytest.raises(ValueError, match=r"result 0 is not a JSON object"):
        evaluate_coco(one_box_gt(), [[1, 1, 2, 3, 4, 0.5, 5]])


def test_malformed_files_are_named(tmp_path):
    gt_path = write_json(tmp_path / "gt.json", one_box_gt())
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image_id": 1,')
    with pytest.raises(ValueError, match=r"broken\.json: not a valid JSON file"):
        evaluate_coco(gt_path, str(broken))
    with pytest.raises(ValueError, match=r"broken\.json: not a valid JSON file"):
        evaluate_coco(str(broken), [])
    not_a_list = write_json(tmp_path / "obj.json", {"annotations": []})
    with pytest.raises(ValueError, match=r"obj\.json: expected a JSON list of results"):
        evaluate_coco(gt_path, not_a_list)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_coco(gt_path, str(tmp_path / "missing.json"))


@pytest.mark.parametrize("mutate, message", [
    (lambda g: g.pop("annotations"), r"gt\.json: 'annotations' must be a list"),
    (lambda g: g["annotations"][0].pop("area"), r"gt\.json: annotation 0 \(id 1\) has no 'area'"),
    (lambda g: g["annotations"][0].update(image_id=8), r"gt\.json: annotations name 1 image_ids absent from 'images'"),
    (lambda g: g["annotations"][0].update(category_id=9), r"1 category_ids absent from 'categories': \[9\]"),
    (lambda g: g["annotations"][0].update(bbox=[0, 0, math.nan, 1]), r"annotation 0 \(id 1\): 'bbox' is not finite"),
    (lambda g: g["annotations"][0].update(iscrowd=2), r"annotation 0 \(id 1\): 'iscrowd' must be 0 or 1"),
    (lambda g: g["images"].append({"id": 1}), r"gt\.json: duplicate image ids \[1\]"),
    (lambda g: g["categories"][0].pop("name"), r"gt\.json: category 0 has no 'name'"),
])
def test_malformed_ground_truth_is_named(tmp_path, mutate, message):
    gt = one_box_gt()
    mutate(gt)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(ValueError, match=message):
        evaluate_coco(str(path), [])


def test_unknown_and_missing_backends(monkeypatch):
    with pytest.raises(ValueError, match="unknown COCO evaluation backend 'detectron'"):
        evaluate_coco(one_box_gt(), [], backend="detectron")
    monkeypatch.setitem(evaluate.BACKENDS, "hotcoco", ("hotcoco_not_installed_here", "hotcoco"))
    with pytest.raises(BackendNotInstalled, match="pip install hotcoco"):
        evaluate_coco(one_box_gt(), [], backend="hotcoco")


# Model outputs -> COCO results.

def test_detections_to_coco_results_round_trips_float32_boxes():
    torch = pytest.importorskip("torch")
    boxes = torch.tensor([[10.1, 20.2, 110.3, 70.4], [0.0, 0.0, 1.5, 2.5]], dtype=torch.float32)  # xyxy
    detections = [{"boxes": boxes, "scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([1, 0])},
                  {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0), "labels": np.zeros(0, int)}]
    out = detections_to_coco_results(detections, image_ids=[42, 43], label_to_cat_id=[3, 90])
    assert [(r["image_id"], r["category_id"]) for r in out] == [(42, 90), (42, 3)]
    assert out[0]["score"] == pytest.approx(0.9) and isinstance(out[0]["score"], float)
    for r, b in zip(out, boxes.double().tolist()):
        x, y, w, h = r["bbox"]
        assert [x, y, x + w, y + h] == b  # exact: widening to float64 loses nothing
    mapped = detections_to_coco_results(detections, [42, 43], label_to_cat_id={0: 3, 1: 90})
    assert mapped == out


def test_detections_to_coco_results_errors():
    det_ = {"boxes": np.zeros((1, 4)), "scores": np.ones(1), "labels": np.array([2])}
    with pytest.raises(ValueError, match="image id 7: labels \\[2\\] have no category id"):
        detections_to_coco_results([det_], [7], [1, 2])
    with pytest.raises(ValueError, match="1 detection dicts but 2 image ids"):
        detections_to_coco_results([det_], [7, 8], [1, 2, 3])
    with pytest.raises(ValueError, match="image id 7: 1 boxes, 2 scores"):
        detections_to_coco_results([dict(det_, scores=np.ones(2))], [7], [1, 2, 3])


def test_ground_truth_made_into_detections_scores_ap_1(edge_case_files):
    gt, *_ = edge_case_files
    cat_ids = [c["id"] for c in gt["categories"]]
    detections, image_ids = [], []
    for im in gt["images"]:
        own = [a for a in gt["annotations"] if a["image_id"] == im["id"] and not a["iscrowd"]]
        xywh = np.array([a["bbox"] for a in own]).reshape(-1, 4)
        detections.append({"boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                           "scores": np.linspace(1, 0.5, len(own)),
                           "labels": np.array([cat_ids.index(a["category_id"]) for a in own], dtype=int)})
        image_ids.append(im["id"])
    m = evaluate_coco(gt, detections_to_coco_results(detections, image_ids, cat_ids))
    assert m["AP"] == pytest.approx(1.0) and m["AP90"] == pytest.approx(1.0)
