"""RoIAlign from an FPN pyramid: `retinanet.ops.poolers.pool_pyramid` vs torchvision's MultiScaleRoIAlign.

    python benchmarks/bench_roi_align.py                  # 2 images of 800 x 1088, 1000 RoIs each, C = 256
    python benchmarks/bench_roi_align.py --rois 512 --threads 2 --rounds 5 --backward

The RoIs are proposal-like (random positions, sizes from 8 px to 800 px, all aspect ratios); each
variant runs interleaved with the other, round after round; the median over rounds is reported.
Needs torchvision for the comparison (without it only ours is timed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retinanet.ops.poolers import pool_pyramid  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rois", type=int, default=1000, help="RoIs per image")
    ap.add_argument("--channels", type=int, default=256, help="feature channels")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--sampling-ratio", type=int, default=2, help="RoIAlign sampling ratio (<= 0: adaptive)")
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    h, w, strides = 800, 1088, (4, 8, 16, 32)
    feats = [torch.randn(2, args.channels, h // s, w // s, generator=g) for s in strides]
    boxes = []
    for _ in range(2):
        xy = torch.rand(args.rois, 2, generator=g) * torch.tensor([w - 8.0, h - 8.0])
        wh = 8 + torch.rand(args.rois, 2, generator=g) ** 2 * 792
        boxes.append(torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], 1))
    variants = {"ours": lambda f: pool_pyramid(f, boxes, strides, 7, args.sampling_ratio)}
    try:
        from torchvision.ops import MultiScaleRoIAlign

        tv = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, args.sampling_ratio)
        variants["torchvision"] = lambda f: tv(OrderedDict(zip("0123", f)), boxes, [(h, w)] * 2)
    except Exception as e:  # noqa: BLE001
        print(f"torchvision not available ({e}); timing ours only")

    def run(fn):
        f = [x.clone().requires_grad_(args.backward) for x in feats]
        start = time.perf_counter()
        out = fn(f)
        if args.backward:
            out.sum().backward()
        return time.perf_counter() - start

    times = {k: [] for k in variants}
    for fn in variants.values():
        run(fn)  # warm-up
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(run(fn))
    what = "forward + backward" if args.backward else "forward"
    print(f"{2 * args.rois} RoIs, C={args.channels}, sampling_ratio {args.sampling_ratio}, {args.threads} thread(s), "
          f"{what}, torch {torch.__version__}")
    for name, t in times.items():
        print(f"  {name:12s} median {statistics.median(t) * 1000:8.1f} ms   (rounds: "
              f"{', '.join(f'{x * 1000:.0f}' for x in t)})")


if __name__ == "__main__":
    main()
