"""Compare two sets of detections that two code paths computed with different rounding (ONNX vs
PyTorch, a batch of 8 vs one image at a time, GPU vs CPU, AVX2 vs AVX-512 kernels).

Exact order is not a property of a detector there: two detections whose scores differ by 1e-7 may come
out in either order on another CPU. What is: the same set of detections. `match_detections` matches them
one to one, each to one with the same label, a score within `score_atol` and a box within `box_atol`
(pixels) -- which allows order swaps only among detections whose scores are that close -- and reports
every detection left without a partner, except (with `cut_slack`) one whose score lies within
`score_atol` of the lowest score of either list: a cap (detections per image, top-k) or a score
threshold that falls between two near-equal scores keeps one on one path and the other on the other.

Used by `retinanet export`'s check and by every test that compares two paths (tests/detection_match.py).
Paths that are the same computation (same batches, threads and kernels) need no tolerance: compare those
exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class DetectionMatch:
    """The outcome of `match_detections`: `pairs` (expected index, actual index); the unmatched indices
    that count against the match (`missing`: of expected, `extra`: of actual); the largest differences
    of the matched pairs; `swapped`: matched pairs whose ranks by score differ."""

    pairs: list
    missing: list = field(default_factory=list)
    extra: list = field(default_factory=list)
    max_score_diff: float = 0.0
    max_box_diff: float = 0.0
    swapped: int = 0
    details: str = ""

    @property
    def same(self) -> bool:
        return not self.missing and not self.extra

    def summary(self) -> str:
        if not self.same:
            return self.details
        return (f"{len(self.pairs)} detections matched one to one ({self.swapped} in another order among "
                f"near-equal scores), max |box diff| {self.max_box_diff:.2e} px, max |score diff| "
                f"{self.max_score_diff:.2e}")


def detection_arrays(detections) -> tuple:
    """(boxes (N, 4) float64, scores (N,) float64, labels (N,) int64) from a dict of tensors (the model's
    output), a `Detections` (Predictor, OnnxDetector) or anything with boxes/scores/labels attributes."""
    get = detections.get if isinstance(detections, dict) else lambda k: getattr(detections, k)
    out = []
    for key, dtype in (("boxes", np.float64), ("scores", np.float64), ("labels", np.int64)):
        value = get(key)
        if isinstance(value, torch.Tensor):
            value = value.detach().float().cpu().numpy()
        out.append(np.asarray(value, dtype=dtype))
    boxes, scores, labels = out
    return boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)


def _max_matching(candidates: list, num_right: int) -> list:
    """A maximum one-to-one matching (augmenting paths) of each left i to one of candidates[i] (right
    indices, preferred first). -> match_of_left: a right index or -1 for each left."""
    right_owner = [-1] * num_right

    def augment(i: int, seen: set) -> bool:
        for j in candidates[i]:
            if j in seen:
                continue
            seen.add(j)
            if right_owner[j] < 0 or augment(right_owner[j], seen):
                right_owner[j] = i
                return True
        return False

    for i in range(len(candidates)):
        augment(i, set())
    match = [-1] * len(candidates)
    for j, i in enumerate(right_owner):
        if i >= 0:
            match[i] = j
    return match


def match_detections(actual, expected, *, score_atol: float = 1e-5, box_atol: float = 1e-3,
                     cut_slack: bool = True) -> DetectionMatch:
    """Match `actual` to `expected` one to one (see the module docstring).

    Each is a dict with "boxes" (N, 4) xyxy, "scores" (N,), "labels" (N,) (tensors or arrays) or an object
    with those attributes. A pair has the same label, |score difference| <= score_atol and every box
    coordinate within box_atol. -> DetectionMatch; `.same` when nothing but detections at the cut (with
    `cut_slack`) is left without a partner.
    """
    a_boxes, a_scores, a_labels = detection_arrays(actual)
    e_boxes, e_scores, e_labels = detection_arrays(expected)
    # (Ne, Na) partner candidates: same label, close score, close box
    close = ((e_labels[:, None] == a_labels[None, :])
             & (np.abs(e_scores[:, None] - a_scores[None, :]) <= score_atol)
             & (np.abs(e_boxes[:, None, :] - a_boxes[None, :, :]).max(axis=2, initial=0.0) <= box_atol))
    # nearest score first, so that the matching prefers the obvious partner
    candidates = [sorted(np.flatnonzero(row).tolist(), key=lambda j, i=i: abs(a_scores[j] - e_scores[i]))
                  for i, row in enumerate(close)]
    match = _max_matching(candidates, len(a_scores))
    pairs = [(i, j) for i, j in enumerate(match) if j >= 0]

    matched_a = {j for _, j in pairs}
    lowest = min(np.min(e_scores, initial=np.inf), np.min(a_scores, initial=np.inf))

    def counts(score: float) -> bool:  # an unmatched detection that is not at the cut
        return not (cut_slack and score - lowest <= score_atol)

    missing = [i for i, j in enumerate(match) if j < 0 and counts(e_scores[i])]
    extra = [j for j in range(len(a_scores)) if j not in matched_a and counts(a_scores[j])]
    e_rank = np.argsort(-e_scores, kind="stable").argsort()
    a_rank = np.argsort(-a_scores, kind="stable").argsort()
    result = DetectionMatch(
        pairs=pairs, missing=missing, extra=extra,
        max_score_diff=max((float(abs(e_scores[i] - a_scores[j])) for i, j in pairs), default=0.0),
        max_box_diff=max((float(np.abs(e_boxes[i] - a_boxes[j]).max()) for i, j in pairs), default=0.0),
        swapped=sum(int(e_rank[i] != a_rank[j]) for i, j in pairs))
    if not result.same:
        def describe(boxes, scores, labels, idx):
            return "; ".join(f"#{k} label {labels[k]} score {scores[k]:.7g} box {np.round(boxes[k], 3).tolist()}"
                             for k in idx[:3])
        result.details = (
            f"{len(missing)} expected detection(s) without a partner"
            + (f" ({describe(e_boxes, e_scores, e_labels, missing)})" if missing else "")
            + f", {len(extra)} actual detection(s) without a partner"
            + (f" ({describe(a_boxes, a_scores, a_labels, extra)})" if extra else "")
            + f" [{len(e_scores)} expected, {len(a_scores)} actual, score_atol {score_atol:g}, box_atol {box_atol:g}]")
    return result
