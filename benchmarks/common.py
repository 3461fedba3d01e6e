"""Shared pieces of the benchmarks: the machine report, interleaved timing, the models under test.

The models are R50-FPN RetinaNets in torchvision's pretrained layout (FrozenBatchNorm2d, P6 from
P5, torchvision's anchors, 91 classes; `retinanet.convert` maps the keys), so that our model and
torchvision's run the same weights.
The weights are random but realistic: BatchNorm statistics are calibrated on random images (so
activations stay normalized through 50 layers) and the classification bias is set so that a given
number of (anchor, class) scores pass the 0.05 threshold, which gives post-processing real work.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from retinanet.config import Config  # noqa: E402
from retinanet.convert import to_torchvision_state_dict, torchvision_retinanet_config  # noqa: E402
from retinanet.modeling import RetinaNet, build_model  # noqa: E402


# ---------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def library_versions() -> dict:
    import numpy

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    tv = torchvision_module()
    versions["torchvision"] = tv.__version__ if tv is not None else "absent"
    for name in ("hotcoco", "pycocotools", "faster_coco_eval"):
        try:
            from importlib.metadata import version

            versions[name] = version(name.replace("_", "-"))
        except Exception:
            versions[name] = "absent"
    return versions


def machine_report(device: str) -> str:
    lines = [f"cpu: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
             f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}",
             f"load average (1, 5, 15 min): {load_average()}",
             "versions: " + ", ".join(f"{k} {v}" for k, v in library_versions().items())]
    if device.startswith("cuda"):
        lines.append(f"gpu: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict, *, repeats: int, warmup: int = 1, device: str = "cpu") -> dict:
    """Run each callable `warmup` times, then `repeats` rounds of A B C ... A B C (interleaved, so
    that a load change on the shared machine hits every configuration alike). -> name -> [seconds]."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(samples: list) -> float:
    return 1000.0 * statistics.median(samples)


def spread(samples: list) -> str:
    """'min-max' in ms, to show the noise next to a median."""
    return f"{1000 * min(samples):.0f}-{1000 * max(samples):.0f}"


def print_table(title: str, rows: list, baseline: str) -> None:
    """rows: (name, samples) in seconds; prints median, range and speed-up against `baseline`."""
    base = dict(rows)[baseline]
    print(f"\n{title}")
    print(f"  {'configuration':<46} {'median ms':>10} {'range ms':>13} {'speed-up':>9}")
    for name, samples in rows:
        ratio = statistics.median(base) / statistics.median(samples)
        print(f"  {name:<46} {median_ms(samples):>10.1f} {spread(samples):>13} {ratio:>8.2f}x")


# ---------------------------------------------------------------------------------------------- models


@functools.lru_cache(maxsize=1)
def torchvision_module():
    """torchvision if it imports and its compiled ops load with this torch build, else None."""
    try:
        import torchvision
        from torchvision.ops import nms

        nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
        return torchvision
    except Exception:
        return None


def torchvision_layout_config(num_classes: int = 91, min_size: int = 800, max_size: int = 1333) -> Config:
    """Our config for torchvision's retinanet_resnet50_fpn (v1) in its COCO weights' layout
    (FrozenBatchNorm2d; eps 1e-5, torchvision's default), at the given input size."""
    cfg = torchvision_retinanet_config(num_classes=num_classes, bn_eps=1e-5)
    cfg.model.min_size, cfg.model.max_size = min_size, max_size
    cfg.loss.smooth_l1_beta = 0.0  # torchvision's RetinaNet uses L1 for boxes
    return cfg


@torch.no_grad()
def calibrated_model(cfg: Config, seed: int = 0) -> RetinaNet:
    """A model with random weights whose BatchNorm statistics are those of random images.

    BatchNorm affine parameters are drawn around 1 and 0 (so that folding them is not a no-op),
    then the statistics are measured in train mode on a small random batch (momentum 1: the running
    statistics become the batch's), and the model is rebuilt with the requested norm.
    """
    torch.manual_seed(seed)
    norm = cfg.model.backbone_norm
    cfg.model.backbone_norm = "bn"
    model = build_model(cfg)
    cfg.model.backbone_norm = norm
    for m in model.backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.2)
            m.momentum = 1.0
    model.backbone.train()
    for m in model.backbone.modules():  # the frozen stages too: every statistic gets calibrated
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    model.backbone(torch.randn(2, 3, 256, 256))
    state = model.state_dict()
    torch.manual_seed(seed)
    target = build_model(cfg)
    target.load_state_dict(state)
    return target.eval()


@torch.no_grad()
def set_candidate_load(model: RetinaNet, image: torch.Tensor, candidates: int, score_thresh: float = 0.05) -> None:
    """Shift the classification bias so that about `candidates` (anchor, class) scores of `image`
    pass `score_thresh` (random weights otherwise give none: every score starts at the prior 0.01)."""
    head = model.head.cls_subnet.predictor
    head.weight.mul_(20.0)  # spread the logits (std ~0.2 -> ~4) so candidates are not a flat plateau
    batch = model.preprocess([image], resize=True).tensor
    cls_logits, *_ = model.forward_features(batch)
    kth = torch.topk(cls_logits.flatten(), candidates).values[-1]
    head.bias.add_(math.log(score_thresh / (1 - score_thresh)) - kth)


# ---------------------------------------------------------------------------------------------- torchvision


def torchvision_retinanet(model: RetinaNet):
    """torchvision's retinanet_resnet50_fpn in its pretrained layout (FrozenBatchNorm2d, conv1 and
    layer1 frozen), with `model`'s weights and inference settings."""
    tv = torchvision_module()
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.retinanet import RetinaNet as TVRetinaNet, _default_anchorgen
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    assert tv is not None
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    net = TVRetinaNet(backbone, num_classes=model.num_classes, anchor_generator=_default_anchorgen(),
                      min_size=model.min_size, max_size=model.max_size,
                      score_thresh=model.score_thresh, nms_thresh=model.nms_thresh,
                      detections_per_img=model.detections_per_image, topk_candidates=model.topk_candidates)
    net.load_state_dict(to_torchvision_state_dict(model.state_dict()), strict=True)
    return net.eval()


def torchvision_postprocess(net, cls_logits, box_deltas, anchors, level_sizes, image_sizes) -> list:
    """torchvision's own post-processing on our head outputs, exactly as its forward calls it."""
    head_outputs = {"cls_logits": list(cls_logits.split(level_sizes, dim=1)),
                    "bbox_regression": list(box_deltas.split(level_sizes, dim=1))}
    split_anchors = [list(anchors.split(level_sizes)) for _ in range(cls_logits.shape[0])]
    return net.postprocess_detections(head_outputs, split_anchors, image_sizes)


# ---------------------------------------------------------------------------------------------- baselines


def loop_postprocess(cls_logits, box_deltas, anchors, level_sizes, image_sizes, *, score_thresh=0.05,
                     topk_candidates=1000, nms_thresh=0.5, max_detections=100,
                     box_weights=(1.0, 1.0, 1.0, 1.0), box_clamp=math.log(1000.0 / 16)) -> list:
    """The per-image, per-level post-processing torchvision's RetinaNet does (the baseline when
    torchvision is absent): sigmoid of every score, threshold, top-k, decode, clip, NMS."""
    from retinanet.ops.boxes import decode
    from retinanet.ops.nms import batched_nms

    num_classes = cls_logits.shape[-1]
    results = []
    for i, (h, w) in enumerate(image_sizes):
        all_boxes, all_scores, all_labels = [], [], []
        for logits, deltas, level_anchors in zip(cls_logits[i].split(level_sizes), box_deltas[i].split(level_sizes),
                                                 anchors.split(level_sizes)):
            scores = torch.sigmoid(logits).flatten()  # (N_l * K,)
            keep = torch.where(scores > score_thresh)[0]
            top = scores[keep].topk(min(topk_candidates, keep.numel()))
            scores, keep = top.values, keep[top.indices]
            anchor_idx, labels = keep // num_classes, keep % num_classes
            boxes = decode(level_anchors[anchor_idx], deltas[anchor_idx], box_weights, box_clamp)
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                                 boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
            all_boxes.append(boxes)
            all_scores.append(scores)
            all_labels.append(labels)
        boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_detections]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return results


def compare_detections(ours: list, theirs: list, rel: float = 1e-3) -> dict:
    """How far two detection lists agree: per image, each of `theirs` needs one of `ours` with the
    same label and a box within `rel` (relative to the box size, at least 1 pixel's worth)."""
    matched = total = 0
    worst = 0.0
    for a, b in zip(ours, theirs):
        total += len(b["scores"])
        if len(b["scores"]) == 0 or len(a["scores"]) == 0:
            continue
        scale = (b["boxes"][:, 2:] - b["boxes"][:, :2]).abs().amax(dim=1).clamp(min=1.0)  # (D_b,)
        diff = (a["boxes"][None, :, :] - b["boxes"][:, None, :]).abs().amax(dim=-1) / scale[:, None]  # (D_b, D_a)
        diff = torch.where(a["labels"][None, :] == b["labels"][:, None], diff, torch.full_like(diff, math.inf))
        best = diff.min(dim=1).values
        matched += int((best <= rel).sum())
        worst = max(worst, float(best[best.isfinite()].max()) if best.isfinite().any() else math.inf)
    return {"matched": matched, "total": total, "count_ours": sum(len(a["scores"]) for a in ours),
            "worst_rel": worst}

