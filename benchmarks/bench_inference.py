"""Inference: end-to-end latency, a per-stage breakdown, and post-processing alone.

Every configuration runs the same weights on the same image, interleaved (A B C A B C ...).
The baseline is torchvision's retinanet_resnet50_fpn (FrozenBatchNorm2d, fp32, NCHW) when
torchvision imports, else our own model in its plain mode (fp32, NCHW, BatchNorm not folded).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from common import (
    calibrated_model,
    compare_detections,
    loop_postprocess,
    print_table,
    set_candidate_load,
    time_interleaved,
    torchvision_layout_config,
    torchvision_module,
    torchvision_postprocess,
    torchvision_retinanet,
)
from retinanet.modeling.detector import ImageBatch
from retinanet.optimize import autocast, compile_network, optimize_for_inference


@dataclass
class Variant:
    """One way of running a detector: a model, a precision and whether it is torchvision's."""

    name: str
    model: torch.nn.Module
    dtype: Optional[torch.dtype] = None  # autocast dtype; None is fp32
    torchvision: bool = False

    @contextlib.contextmanager
    def context(self):
        with torch.no_grad(), autocast(self.model, self.dtype):
            yield


DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_variants(args, min_size: int, max_size: int, image: torch.Tensor) -> list:
    """Our plain and optimized models (and torchvision's, when it imports), all with the same weights."""
    cfg = torchvision_layout_config(min_size=min_size, max_size=max_size)
    plain = calibrated_model(cfg).to(args.device)
    set_candidate_load(plain, image.to(args.device), args.candidates)
    variants = []
    if torchvision_module() is not None:
        tv = torchvision_retinanet(plain).to(args.device)
        variants.append(Variant("torchvision fp32", tv, torchvision=True))
        if not args.quick:
            variants.append(Variant("torchvision fp32 channels_last",
                                    copy.deepcopy(tv).to(memory_format=torch.channels_last), torchvision=True))
        for name in args.dtypes:
            if name != "fp32":
                variants.append(Variant(f"torchvision {name} channels_last",
                                        copy.deepcopy(tv).to(memory_format=torch.channels_last), DTYPES[name], True))
    variants.append(Variant("ours plain fp32", plain))
    fast = optimize_for_inference(copy.deepcopy(plain))
    for name in args.dtypes:
        variants.append(Variant(f"ours fast {name} (folded, channels_last)", fast, DTYPES[name]))
    if args.compile:
        compiled = optimize_for_inference(copy.deepcopy(plain))
        if compile_network(compiled):
            for name in args.dtypes:
                variants.append(Variant(f"ours fast {name} + torch.compile", compiled, DTYPES[name]))
        else:
            print("  torch.compile unavailable here: compiled variants skipped")
    return variants


def run_inference(args) -> None:
    """End-to-end latency (pre-processing to detections in original pixels) at 800 and 512 px."""
    print("\n== inference: end to end, one image, same weights in every configuration")
    sizes = [(800, 1333, (800, 1067))] + ([] if args.quick else [(512, 1333, (512, 683))])
    for min_size, max_size, (h, w) in sizes:
        torch.manual_seed(1)
        image = torch.rand(3, h, w)
        variants = build_variants(args, min_size, max_size, image)
        for batch_size in args.batch:
            images = [image.to(args.device) for _ in range(batch_size)]
            fns = {v.name: _forward(v, images) for v in variants}
            times = time_interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=args.device)
            print_table(f"{h}x{w} image (padded {-(-h // 32) * 32}x{-(-w // 32) * 32}), batch {batch_size}:",
                        [(n, t) for n, t in times.items()], baseline=variants[0].name)
        _report_agreement(variants, [image.to(args.device)])


def _forward(variant: Variant, images: list) -> Callable:
    def fn():
        with variant.context():
            variant.model(images)
    return fn


def _report_agreement(variants: list, images: list) -> None:
    """Detections of every variant against the baseline's (same labels, boxes within 1e-3 relative)."""
    results = {}
    for v in variants:
        with v.context():
            results[v.name] = v.model(images)
    base = variants[0].name
    print(f"  detections against '{base}' ({len(results[base][0]['scores'])} of them):")
    for name, dets in results.items():
        if name == base:
            continue
        c = compare_detections(dets, results[base], rel=1e-3)
        print(f"    {name:<46} matched {c['matched']}/{c['total']} (has {c['count_ours']}), "
              f"worst box difference {c['worst_rel']:.1e} relative")


def run_stages(args) -> None:
    """Time of each stage on its own: pre-processing, backbone, FPN, heads, post-processing."""
    print("\n== inference stages, one 800x1067 image (medians, ms)")
    torch.manual_seed(1)
    image = torch.rand(3, 800, 1067).to(args.device)
    variants = build_variants(args, 800, 1333, image)
    stage_fns, names = {}, []
    for v in variants:
        stages = _tv_stages(v, image) if v.torchvision else _our_stages(v, image)
        for stage, fn in stages.items():
            stage_fns[(v.name, stage)] = fn
        names.append(v.name)
    times = time_interleaved({k: fn for k, fn in stage_fns.items()}, repeats=args.repeats, warmup=args.warmup,
                             device=args.device)
    stages = ["preprocess", "backbone", "fpn", "heads", "postprocess"]
    print(f"  {'configuration':<46}" + "".join(f"{s:>12}" for s in stages) + f"{'sum':>10}")
    for name in names:
        meds = [1000 * sorted(times[(name, s)])[len(times[(name, s)]) // 2] for s in stages]
        print(f"  {name:<46}" + "".join(f"{m:>12.1f}" for m in meds) + f"{sum(meds):>10.1f}")


def _in_context(v: Variant, fn: Callable) -> Callable:
    """fn, called under the variant's context (autocast, no_grad) when timed."""
    def wrapped():
        with v.context():
            fn()
    return wrapped


def _our_stages(v: Variant, image: torch.Tensor) -> dict:
    m = v.model
    with v.context():
        pre = m.preprocess([image], resize=True)
        batch, sizes = pre.tensor, pre.image_sizes
        feats = m.backbone(batch)
        pyramid = m.fpn(feats)
        cls_logits, box_deltas = m.head(pyramid)

    def post():
        level_anchors = m.anchor_generator([f.shape[-2:] for f in pyramid], batch.shape[-2:], batch.device)
        m.postprocess((cls_logits, box_deltas, *level_anchors), pre)

    stages = {"preprocess": lambda: m.preprocess([image], resize=True), "backbone": lambda: m.backbone(batch),
              "fpn": lambda: m.fpn(feats), "heads": lambda: m.head(pyramid), "postprocess": post}
    return {name: _in_context(v, fn) for name, fn in stages.items()}


def _tv_stages(v: Variant, image: torch.Tensor) -> dict:
    net = v.model
    with v.context():
        images, _ = net.transform([image])
        feats = net.backbone.body(images.tensors)
        pyramid = net.backbone.fpn(feats)
        head_outputs = net.head(list(pyramid.values()))

    def post():
        features = list(pyramid.values())
        anchors = net.anchor_generator(images, features)
        level_sizes = [f.shape[2] * f.shape[3] * 9 for f in features]
        split = {k: list(t.split(level_sizes, dim=1)) for k, t in head_outputs.items()}
        dets = net.postprocess_detections(split, [list(a.split(level_sizes)) for a in anchors], images.image_sizes)
        net.transform.postprocess(dets, images.image_sizes, [tuple(image.shape[-2:])])

    stages = {"preprocess": lambda: net.transform([image]), "backbone": lambda: net.backbone.body(images.tensors),
              "fpn": lambda: net.backbone.fpn(feats), "heads": lambda: net.head(list(pyramid.values())), "postprocess": post}
    return {name: _in_context(v, fn) for name, fn in stages.items()}


def run_postprocess(args) -> None:
    """Post-processing alone on real head outputs (163k anchors, ~`candidates` scores above 0.05)."""
    print(f"\n== post-processing alone: 800x1067 image, 163k anchors, 91 classes, ~{args.candidates} candidates")
    torch.manual_seed(1)
    image = torch.rand(3, 800, 1067).to(args.device)
    cfg = torchvision_layout_config()
    model = calibrated_model(cfg).to(args.device)
    set_candidate_load(model, image, args.candidates)
    with torch.no_grad():
        pre = model.preprocess([image], resize=True)
        batch, sizes = pre.tensor, pre.image_sizes
        cls_logits, box_deltas, anchors, level_sizes = model.forward_features(batch)
    above = int((torch.sigmoid(cls_logits) > model.score_thresh).sum())
    print(f"  {cls_logits.shape[1]} anchors x {cls_logits.shape[2]} classes, {above} scores above "
          f"{model.score_thresh}")
    settings = dict(score_thresh=model.score_thresh, topk_candidates=model.topk_candidates,
                    nms_thresh=model.nms_thresh, max_detections=model.detections_per_image,
                    box_weights=model.box_weights, box_clamp=model.box_clamp)
    tv = torchvision_retinanet(model).to(args.device) if torchvision_module() is not None else None
    for batch_size in (1, 2):
        logits = cls_logits.expand(batch_size, -1, -1).contiguous()
        deltas = box_deltas.expand(batch_size, -1, -1).contiguous()
        image_sizes = sizes * batch_size
        split_anchors = anchors.split(level_sizes)

        def ours_post(logits, deltas, sizes=image_sizes, split_anchors=split_anchors):  # boxes stay in these sizes
            return model.postprocess((logits, deltas, *split_anchors), ImageBatch(None, sizes, sizes))

        fns = {}
        if tv is not None:
            fns["torchvision postprocess_detections"] = lambda: torchvision_postprocess(
                tv, logits, deltas, anchors, level_sizes, image_sizes)
        fns["per-image, per-level loop (torchvision's algorithm)"] = lambda: loop_postprocess(
            logits, deltas, anchors, level_sizes, image_sizes, **settings)
        fns["ours, vectorized"] = lambda: ours_post(logits, deltas)
        logits_bf16, deltas_bf16 = logits.bfloat16(), deltas.bfloat16()
        fns["ours, vectorized, bf16 head outputs"] = lambda: ours_post(logits_bf16, deltas_bf16)
        with torch.no_grad():
            times = time_interleaved(fns, repeats=args.repeats * 2, warmup=args.warmup, device=args.device)
        print_table(f"batch {batch_size}:", list(times.items()), baseline=next(iter(fns)))
        with torch.no_grad():
            ours = ours_post(logits, deltas)
            ref = loop_postprocess(logits, deltas, anchors, level_sizes, image_sizes, **settings)
            c = compare_detections(ours, ref)
            print(f"  ours vs loop: matched {c['matched']}/{c['total']} detections, worst box difference "
                  f"{c['worst_rel']:.1e}; box dtype from bf16 outputs: "
                  f"{ours_post(logits_bf16, deltas_bf16)[0]['boxes'].dtype}")
            if tv is not None:
                c = compare_detections(ours, torchvision_postprocess(tv, logits, deltas, anchors, level_sizes,
                                                                     image_sizes))
                print(f"  ours vs torchvision: matched {c['matched']}/{c['total']} detections, worst box difference "
                      f"{c['worst_rel']:.1e}")
