"""The edge inputs users have, for every detector, through every path: one matrix.

Rows: each `model.arch` (RetinaNet with sigmoid and softmax heads, Faster R-CNN, DeepMask, SharpMask in
its feedforward and refinement stages, FPN mask proposals), built from its shipped config made tiny.
Columns: an image with no boxes, only crowd boxes, a 1-pixel-wide box, an extreme aspect ratio (resized
to 1 px in height), a tiny image, a large image, a mixed-size batch, bf16 autocast on the CPU.
Paths: a training step (through the training transforms, as the engine feeds it), evaluation
(`evaluate_model`, scored by COCO's metrics), `Predictor`, and ONNX export + `OnnxDetector`.

Every cell works: finite losses and gradients; finite detections inside their image, at most the
model's cap, masks of the image's size; ONNX gives PyTorch's detections up to rounding. (bf16 x ONNX is
no cell: the exported graph is float32.)
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet.config import load_config
from retinanet.data.coco import CocoDataset
from retinanet.data.loader import build_train_transforms, collate
from retinanet.engine import DistEnv, evaluate_model
from retinanet.modeling import build_model
from retinanet.predict import Predictor

from detection_match import assert_same_detections

CONFIGS = Path(__file__).resolve().parents[1] / "retinanet" / "configs"
TINY = ["model.backbone_width=8", "model.min_size=64", "model.max_size=96", "model.detections_per_image=30",
        "model.score_thresh=0.0", "data.batch_size=1"]
SEGPROP = ["model.segprop_window=32", "model.segprop_context=16", "model.segprop_features=8",
           "model.segprop_head_dim=16", "model.segprop_mask_size=8", "model.segprop_scales=[-1.0,0.0,0.5]",
           "model.segprop_windows_per_image=4", "model.segprop_top_n=30"]
ARCHS = {  # name: (shipped config, overrides)
    "retinanet_sigmoid": ("demo", ["model.fpn_channels=16"]),  # the demo's 64-channel GroupNorm subnets
    "retinanet_softmax": ("demo", ["model.fpn_channels=16", "loss.cls=softmax_focal"]),
    "faster_rcnn": ("faster_rcnn_shapes", ["model.fpn_channels=16", "model.roi_head_dim=32",
                                           "model.roi_batch_per_image=32"]),
    "deepmask": ("segprop_deepmask_shapes", SEGPROP),
    "sharpmask_feedforward": ("segprop_sharpmask_shapes", SEGPROP + ["model.segprop_refine_k=8",
                                                                      "model.segprop_refine_after=1000000"]),
    "sharpmask_refinement": ("segprop_sharpmask_shapes", SEGPROP + ["model.segprop_refine_k=8",
                                                                     "model.segprop_refine_after=0"]),
    "fpn_masks": ("segprop_fpn_shapes", ["model.fpn_channels=8", "model.segprop_mlp_hidden=16",
                                         "model.segprop_fpn_mask_size=6", "model.segprop_top_n=30"]),
}
CATEGORIES = [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]
ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

# The images, (height, width) and boxes [x, y, w, h, iscrowd], and the columns that use them
IMAGES = {
    "plain": ((72, 96), [[8, 10, 30, 24, 0], [50, 30, 36, 30, 0]]),
    "no_boxes": ((72, 96), []),
    "crowd_only": ((72, 96), [[10, 10, 40, 30, 1]]),
    "thin_box": ((72, 96), [[40, 8, 1, 50, 0]]),
    "extreme_aspect": ((10, 3000), [[100, 2, 400, 6, 0]]),  # 300:1, resized to 1 x 96 px
    "tiny": ((8, 8), [[1, 1, 5, 5, 0]]),
    "large": ((1080, 1920), [[300, 200, 700, 500, 0], [1200, 600, 500, 400, 0]]),
}
COLUMNS = {
    "no_boxes": ["no_boxes"], "crowd_only": ["crowd_only"], "thin_box": ["thin_box"],
    "extreme_aspect": ["extreme_aspect"], "tiny": ["tiny"], "large": ["large"],
    "mixed_batch": ["plain", "tiny", "large", "no_boxes"], "bf16": ["plain"],
}
PATHS = ["train_step", "evaluation", "predictor", "onnx"]


@functools.lru_cache(maxsize=None)
def _image(name: str) -> np.ndarray:
    """(H, W, 3) uint8: a gradient background with each annotated box filled (so there is something to find)."""
    (h, w), boxes = IMAGES[name]
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), np.full((h, w), 90)], -1)
    for k, (x, y, bw, bh, _) in enumerate(boxes):
        image[y:y + bh, x:x + bw] = (230, 40 + 100 * k, 20)
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """One folder of PNGs, and one COCO JSON per column with exactly its images (polygon masks)."""
    root = tmp_path_factory.mktemp("edge")
    ids = {name: i + 1 for i, name in enumerate(IMAGES)}
    for name in IMAGES:
        Image.fromarray(_image(name)).save(root / f"{name}.png")
    jsons = {}
    for column, names in COLUMNS.items():
        images, anns = [], []
        for name in dict.fromkeys(names):
            (h, w), boxes = IMAGES[name]
            images.append({"id": ids[name], "file_name": f"{name}.png", "height": h, "width": w})
            for k, (x, y, bw, bh, crowd) in enumerate(boxes):
                anns.append({"id": 100 * ids[name] + k, "image_id": ids[name], "category_id": 1 + k % 2,
                             "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": crowd,
                             "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
        path = root / f"{column}.json"
        path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
        jsons[column] = path
    return {"root": root, "jsons": jsons}


_models: dict = {}


def _config(arch: str):
    base, extra = ARCHS[arch]
    return load_config(str(CONFIGS / f"{base}.yaml"), TINY + extra + ["model.num_classes=2"])


def _model(arch: str):
    """A tiny model of `arch` in eval mode (score threshold 0: every image has detections to check)."""
    if arch not in _models:
        cfg = _config(arch)
        torch.manual_seed(0)
        _models[arch] = (cfg, build_model(cfg).eval())
    return _models[arch]


def _arrays(column: str) -> list:
    return [_image(name) for name in COLUMNS[column]]


def _check_detections(det: dict, size: tuple, cap: int) -> None:
    """Finite detections inside the (h, w) image, best first, at most `cap`; masks (if any) per detection."""
    h, w = size
    boxes, scores = det["boxes"], det["scores"]
    assert boxes.shape[0] == scores.shape[0] == det["labels"].shape[0] <= cap
    assert torch.isfinite(boxes).all() and torch.isfinite(scores).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all(), boxes
    assert (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all(), (size, boxes)
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert (scores[:-1] >= scores[1:]).all()
    if "masks" in det:
        assert len(det["masks"]) == boxes.shape[0]


def _train_step(arch: str, column: str, data: dict) -> None:
    cfg, model = _model(arch)
    model = copy.deepcopy(model).train()  # BatchNorm's statistics change in train mode: keep the shared model
    dataset = CocoDataset(data["jsons"][column], data["root"], transforms=build_train_transforms(cfg),
                          masks=cfg.data.masks)
    images, targets = collate([dataset[(i, i)] for i in range(len(dataset))])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=column == "bf16")
    with autocast:
        losses = model(images, targets)
    assert losses and all(torch.isfinite(v).all() for v in losses.values()), losses
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def _evaluation(arch: str, column: str, data: dict) -> None:
    cfg, model = _model(arch)
    dataset = CocoDataset(data["jsons"][column], data["root"])
    recorded = []
    forward = model.forward

    def record(images, targets=None):  # the detections evaluate_model scores, checked too
        out = forward(images, targets)
        recorded.extend(zip(out, images))
        return out

    model.forward = record
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=column == "bf16"):
            metrics = evaluate_model(model, dataset, ENV, batch_size=len(dataset))
    finally:
        del model.forward
    assert len(recorded) == len(dataset)
    for det, image in recorded:
        _check_detections(det, tuple(image.shape[-2:]), model.detections_per_image)
    headline = "AR@100" if getattr(model, "class_agnostic_proposals", False) else "AP"
    value = metrics[headline]
    # with no ground truth to find, no number (COCO's -1); otherwise a recall or precision
    has_objects = any(not crowd for name in COLUMNS[column] for *_, crowd in IMAGES[name][1])
    assert (value is None) == (not has_objects), (headline, value)


_predicted: dict = {}


def _predictor(arch: str, column: str) -> list:
    cfg, model = _model(arch)
    arrays = _arrays(column)
    predictor = Predictor(model, CATEGORIES[:model.num_classes], device="cpu", bf16=column == "bf16", batch_size=len(arrays))
    dets = predictor(arrays) if len(arrays) > 1 else [predictor(arrays[0])]
    for det, array in zip(dets, arrays):
        assert det.image_size == array.shape[:2]
        as_dict = {k: torch.as_tensor(getattr(det, k)) for k in ("boxes", "scores", "labels")}
        if det.masks is not None:
            as_dict["masks"] = det.masks
            assert det.masks.shape[1:] == array.shape[:2]
        _check_detections(as_dict, array.shape[:2], model.detections_per_image)
    _predicted[arch, column] = dets
    return dets


_exported: dict = {}


def _onnx(arch: str, column: str, tmp_path_factory) -> None:
    from retinanet.export import OnnxDetector, export_onnx

    cfg, model = _model(arch)
    if arch not in _exported:
        path = tmp_path_factory.mktemp("onnx") / f"{arch}.onnx"
        export_onnx(model, cfg, CATEGORIES[:model.num_classes], str(path), exporter="torchscript")
        _exported[arch] = str(path)
    arrays = _arrays(column)
    ours = _predicted.get((arch, column)) or _predictor(arch, column)
    theirs = OnnxDetector(_exported[arch], batch_size=len(arrays))(arrays)
    theirs = theirs if isinstance(theirs, list) else [theirs]
    for a, b in zip(theirs, ours):
        assert_same_detections(a, b, score_atol=1e-4, box_atol=0.05)


CELLS = [(arch, column, path) for arch in ARCHS for column in COLUMNS for path in PATHS
         if not (column == "bf16" and path == "onnx")]


@pytest.mark.parametrize("arch,column,path", CELLS, ids=["-".join(c) for c in CELLS])
def test_edge_input(arch, column, path, data, tmp_path_factory):
    torch.manual_seed(0)
    if path == "train_step":
        _train_step(arch, column, data)
    elif path == "evaluation":
        _evaluation(arch, column, data)
    elif path == "predictor":
        _predictor(arch, column)
    else:
        _onnx(arch, column, tmp_path_factory)
