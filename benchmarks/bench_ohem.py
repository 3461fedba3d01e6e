"""OHEM's example selection (`ohem_select`): NMS over every anchor of a batch, ranked by loss.

    python benchmarks/bench_ohem.py [--quick]

The shapes demo's batch: 16 images of 192 px, 6,885 anchors each (P3-P6, 9 per location), boxes
jittered around the anchors as early in training, random losses. Baseline: the native NMS run to the
end ("full"); against it the native NMS that stops each image once the survivors OHEM can pick are
known ("early stop", what training uses without torchvision), and torchvision's kernel where it
imports. Every variant is checked to pick the same anchors as the baseline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_report, print_table, time_interleaved  # noqa: E402
from retinanet import losses  # noqa: E402
from retinanet.ops.anchors import AnchorGenerator  # noqa: E402
from retinanet.ops.nms import native_batched_nms, torchvision_batched_nms  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    print(machine_report("cpu"))
    gen = AnchorGenerator([16, 32, 64, 128], [1, 2 ** (1 / 3), 2 ** (2 / 3)], [0.5, 1, 2], [8, 16, 32, 64])
    anchors = torch.cat(gen([(24, 24), (12, 12), (6, 6), (3, 3)], (192, 192), "cpu"))  # (6885, 4)
    g = torch.Generator().manual_seed(0)
    b, n = 16, anchors.shape[0]
    boxes = anchors[None].expand(b, -1, -1) + torch.randn(b, n, 4, generator=g) * 2
    scores = torch.rand(b, n, generator=g)
    positive = torch.rand(b, n, generator=g) < 0.005
    nms_full = {"full": lambda bx, sc, gr, t, **kw: native_batched_nms(bx, sc, gr, t),
                "early stop": lambda bx, sc, gr, t, **kw: native_batched_nms(bx, sc, gr, t, **kw)}
    tv = torchvision_batched_nms()
    if tv is not None:
        nms_full["torchvision"] = lambda bx, sc, gr, t, **kw: tv(bx, sc, gr, t)
    for batch_size, ratio in ((128, 0), (512, 0), (128, 3)):
        picks, fns = {}, {}
        for name, nms in nms_full.items():
            def select(nms=nms):
                losses.batched_nms = nms  # ohem_select calls the module's batched_nms
                return losses.ohem_select(scores, boxes, positive, batch_size, 0.5, ratio)
            picks[name] = select()
            fns[name] = select
        for name, (img, anchor) in picks.items():
            same = torch.equal(img, picks["full"][0]) and torch.equal(anchor, picks["full"][1])
            print(f"  {name}: {len(img)} anchors picked, {'same as' if same else 'DIFFERENT from'} full NMS")
        times = time_interleaved(fns, repeats=2 if args.quick else 5)
        print_table(f"ohem_select, 16 x 6885 anchors, batch {batch_size}, "
                    f"{'OHEM 1:%d' % ratio if ratio else 'OHEM'}, nms 0.5", list(times.items()), "full")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
