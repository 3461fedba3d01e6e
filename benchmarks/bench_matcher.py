"""Anchor matching (`Matcher.match_boxes`) by IoU block size: the whole batch's IoU against every anchor,
computed a few boxes at a time; `ops.matcher.chunk_limit` picks the block by device.

    python benchmarks/bench_matcher.py [--repeats 5] [--threads 1]

Two problems: the dense shapes regime (8 images of 384 px, 50 boxes each, P2-P5 with 9 anchors a place:
110,592 anchors) and a COCO-sized one (2 images of 800 x 1067, 20 boxes each, P3-P7: 120,087 anchors).
Every block size gives the same matches and labels (checked here, and in tests/test_matcher.py).
"""

from __future__ import annotations

import argparse

import torch

from common import machine_report, print_table, time_interleaved
from retinanet.ops.matcher import Matcher  # noqa: E402  (common puts the repository on sys.path)

SIZES = {"1 << 24": 1 << 24, "1 << 22": 1 << 22, "1 << 20 (CPU default)": 1 << 20, "1 << 18": 1 << 18}


def problem(images: int, boxes: int, anchors: int, height: int, width: int, smallest: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(anchors, 2, generator=g) * torch.tensor([width, height])
    sides = smallest * 2 ** (torch.rand(anchors, 2, generator=g) * 4)
    gt_centres = torch.rand(images, boxes, 2, generator=g) * torch.tensor([width, height])
    gt_sides = smallest * 2 ** (torch.rand(images, boxes, 2, generator=g) * 4)
    return (torch.cat([gt_centres - gt_sides / 2, gt_centres + gt_sides / 2], -1),
            torch.cat([centres - sides / 2, centres + sides / 2], -1), torch.ones(images, boxes, dtype=torch.bool))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_report("cpu"))
    problems = {"dense shapes: 8 images x 50 boxes x 110,592 anchors": problem(8, 50, 110592, 384, 384, 8),
                "COCO-sized: 2 images x 20 boxes x 120,087 anchors": problem(2, 20, 120087, 800, 1067, 32)}
    for title, (gt, anchors, valid) in problems.items():
        results = {name: Matcher(0.5, 0.4, chunk_elems=n).match_boxes(gt, anchors, valid) for name, n in SIZES.items()}
        first = next(iter(results.values()))
        assert all(torch.equal(a, b) for r in results.values() for a, b in zip(r, first)), "block sizes disagree"
        fns = {name: (lambda n=n: Matcher(0.5, 0.4, chunk_elems=n).match_boxes(gt, anchors, valid))
               for name, n in SIZES.items()}
        times = time_interleaved(fns, repeats=args.repeats)
        print_table(f"{title}, {args.threads} thread(s)", list(times.items()), baseline="1 << 24")


if __name__ == "__main__":
    main()
