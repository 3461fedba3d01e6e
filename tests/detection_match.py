"""The one comparison for detections that two code paths compute with different rounding (ONNX vs
PyTorch, a batch of 8 vs one image at a time, GPU vs CPU, AVX2 vs AVX-512 kernels): a one-to-one match
that allows order swaps only among near-equal scores (`retinanet.compare.match_detections`, which
`retinanet export` uses for its check too). Paths that are the same computation are compared exactly.
"""

from __future__ import annotations

from retinanet.compare import DetectionMatch, match_detections


def assert_same_detections(actual, expected, *, score_atol: float = 1e-5, box_atol: float = 1e-3,
                           cut_slack: bool = True, what: str = "") -> DetectionMatch:
    """Assert that `actual` and `expected` are the same detections up to rounding (`match_detections`):
    every detection has a partner with the same label, a score within score_atol and a box within
    box_atol px, except, with `cut_slack`, those within score_atol of the lowest score. -> the match."""
    result = match_detections(actual, expected, score_atol=score_atol, box_atol=box_atol, cut_slack=cut_slack)
    assert result.same, (f"{what}: " if what else "") + result.details
    return result


def coco_results_by_image(results: list) -> dict:
    """COCO results entries ({image_id, category_id, bbox [x, y, w, h], score}) -> {image_id: detections dict}
    with xyxy boxes and the category ids as labels."""
    grouped: dict = {}
    for r in results:
        x, y, w, h = r["bbox"]
        g = grouped.setdefault(r["image_id"], {"boxes": [], "scores": [], "labels": []})
        g["boxes"].append([x, y, x + w, y + h])
        g["scores"].append(r["score"])
        g["labels"].append(r["category_id"])
    return grouped


def assert_same_coco_results(actual: list, expected: list, **tolerances) -> None:
    """`assert_same_detections` image by image for two lists of COCO results entries (the same images)."""
    a, e = coco_results_by_image(actual), coco_results_by_image(expected)
    assert set(a) == set(e), f"images with detections differ: {sorted(set(a) ^ set(e))[:5]}"
    for image_id in e:
        assert_same_detections(a[image_id], e[image_id], what=f"image {image_id}", **tolerances)
