"""Our FPN Faster R-CNN against torchvision's fasterrcnn_resnet50_fpn with the same weights, in one process:
inference end to end (800 x 1067, batch 1) and a training step (batch 2), interleaved rounds, medians.

With torchvision (the environment of BENCHMARKS.md "Side by side with torchvision"):

    PYTHONPATH=$PWD /work/tvenv/bin/python benchmarks/bench_faster_rcnn.py [--quick] [--device cuda]

Without it, the same timings of our model alone (random weights with the same statistics; no
torchvision rows, no torchvision RoIAlign kernel row): `python benchmarks/bench_faster_rcnn.py --quick`.

The weights are random (torchvision's COCO-weights layout: FrozenBatchNorm2d, eps 0), converted with
retinanet.convert; the detections of both are compared before anything is timed. The training step is
timed for our model plain (RoIAlign: ours in training), with torchvision's RoIAlign kernel, with
FrozenBatchNorm2d folded into the convs (train.fold_frozen_bn) and folded + channels_last;
`--profile ROWS` profiles it instead (torch.profiler, by op).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_report  # noqa: E402
from retinanet.convert import from_torchvision_state_dict, torchvision_faster_rcnn_config  # noqa: E402
from retinanet.modeling import build_model  # noqa: E402
from retinanet.modeling.backbone import FrozenBatchNorm2d as OurFrozenBatchNorm2d  # noqa: E402
from retinanet.optimize import fold_frozen_bn_for_training, optimize_for_inference, to_channels_last  # noqa: E402


def torchvision_model():
    from torchvision.models import resnet50
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = FasterRCNN(_resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3), 91)
    overwrite_eps(model, 0.0)
    realistic_statistics(model, FrozenBatchNorm2d, model.roi_heads.box_predictor.cls_score)
    return model


def have_torchvision() -> bool:
    try:
        import torchvision.models.detection  # noqa: F401
    except Exception:  # absent, or a build that does not load with this torch
        return False
    return True


@torch.no_grad()
def realistic_statistics(model, norm_type, cls_score) -> None:
    """Random weights made realistic: FrozenBatchNorm statistics of trained networks, and a classifier
    whose scores pass 0.05 (so that post-processing has work)."""
    for m in model.modules():
        if isinstance(m, norm_type):
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    cls_score.bias.copy_(torch.linspace(-3.0, 3.0, cls_score.bias.numel()))


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def rounds(fns: dict, repeats: int, device) -> dict:
    """Interleaved rounds (each function once per round, after one untimed call): {name: median ms}."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(1000 * timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def report(title: str, medians: dict) -> None:
    base = next(iter(medians.values()))
    print(f"\n{title}")
    for name, ms in medians.items():
        print(f"  {name:45s} {ms:9.1f} ms   {base / ms:5.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="instead of timing the training step, profile it (torch.profiler, ROWS costliest ops)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 2 if args.quick else 5
    cfg = torchvision_faster_rcnn_config(bn_eps=0.0)
    ours = build_model(cfg)
    tv = torchvision_model().to(device).eval() if have_torchvision() else None
    if tv is not None:
        ours.load_state_dict(from_torchvision_state_dict(tv.state_dict(), ours.state_dict()))
    else:
        torch.manual_seed(0)
        realistic_statistics(ours, OurFrozenBatchNorm2d, ours.roi_heads.box_predictor.cls_score)
    ours = ours.to(device).eval()
    fast = optimize_for_inference(_copy(ours, cfg, device))
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, {repeats} rounds")
    print(machine_report(args.device))
    if tv is None:
        print("torchvision is not importable: our model alone (no torchvision rows; ratios against 'ours, plain')")

    image = torch.rand(3, 600, 800, device=device)  # resized to 800 x 1066 by both
    with torch.no_grad():
        b, c = ours([image])[0], fast([image])[0]
        if tv is not None:
            a = tv([image])[0]
            same = torch.equal(a["labels"] - 1, b["labels"])
            print(f"detections: torchvision {len(a['labels'])}, ours {len(b['labels'])}, labels "
                  f"{'identical' if same else 'DIFFER'}"
                  + (f", max |box diff| {(a['boxes'] - b['boxes']).abs().max():.2e} px" if same else "")
                  + f"; fast path {len(c['labels'])}")
        if not args.profile:
            inference = {"torchvision fasterrcnn_resnet50_fpn": lambda: tv([image]),
                         "ours, plain": lambda: ours([image]),
                         "ours, fast (folded BN, channels_last)": lambda: fast([image])}
            if tv is None:
                del inference["torchvision fasterrcnn_resnet50_fpn"]
            report("inference, one 600 x 800 image (800 x 1066 after resizing), end to end",
                   rounds(inference, repeats, device))

    images = [torch.rand(3, 512, 512, device=device), torch.rand(3, 512, 512, device=device)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 200.0, 260.0], [300.0, 100.0, 480.0, 400.0]], device=device),
                "labels": torch.tensor([1, 18], device=device)},
               {"boxes": torch.tensor([[50.0, 60.0, 450.0, 380.0]], device=device),
                "labels": torch.tensor([3], device=device)}]
    ours_targets = [dict(t, labels=t["labels"] - 1) for t in targets]
    ours.train()
    if tv is not None:
        tv.train()
        tv.transform.min_size = (512,)  # torchvision resizes in training too; ours trains on the images as given

    def step(model, tgts):
        losses = model(images, tgts)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)

    tv_pooler = _copy(ours, cfg, device).train()
    tv_pooler.roi_heads.pool_backend = "torchvision"  # torchvision's RoIAlign forward and backward kernels
    folded = _copy(ours, cfg, device).train()
    fold_frozen_bn_for_training(folded)
    folded_nhwc = to_channels_last(_copy(ours, cfg, device)).train()
    fold_frozen_bn_for_training(folded_nhwc)
    steps = {"torchvision fasterrcnn_resnet50_fpn": lambda: step(tv, targets),
             "ours, torchvision's RoIAlign kernel": lambda: step(tv_pooler, ours_targets),
             "ours, plain": lambda: step(ours, ours_targets),
             "ours, folded BN (train.fold_frozen_bn)": lambda: step(folded, ours_targets),
             "ours, folded BN + channels_last": lambda: step(folded_nhwc, ours_targets)}
    if tv is None:
        del steps["torchvision fasterrcnn_resnet50_fpn"], steps["ours, torchvision's RoIAlign kernel"]
    if args.profile:
        profile_steps(steps, args.profile)
        return 0
    report("training step, 2 images of 512 x 512 (forward + backward)", rounds(steps, repeats, device))
    return 0


def profile_steps(steps: dict, rows: int) -> None:
    """torch.profiler of two steps of torchvision's model and of our fastest: the costliest ops (self time)."""
    from torch.profiler import ProfilerActivity, profile

    for name in ("torchvision fasterrcnn_resnet50_fpn", "ours, folded BN + channels_last"):
        if name not in steps:  # no torchvision
            continue
        steps[name]()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                steps[name]()
        print(f"\nprofile, 2 training steps: {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _copy(model, cfg, device):
    copy = build_model(cfg).to(device)
    copy.load_state_dict(model.state_dict())
    return copy


if __name__ == "__main__":
    sys.exit(main())
