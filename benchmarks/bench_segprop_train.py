"""Training step of the FPN segment proposals under the FPN appendix's rules: the MLPs run at the sampled
locations only (`FPNMaskProposals.outputs_at`, now) against the dense outputs read at those locations (before).
The same model, batch and sampled locations; forward and backward, interleaved A B A B.

    python benchmarks/bench_segprop_train.py [--config segprop_fpn_shapes] [--batch 16] [--repeats 5] [--threads 1]

The batch: 192 px random images, each with 4 random rectangles of 12-134 px (the shapes dataset's sizes) and
their masks.
"""

from __future__ import annotations

import argparse

import torch

from common import machine_report, print_table, time_interleaved
from retinanet.ablate import CONFIGS_DIR  # noqa: E402  (common puts the repository on sys.path)
from retinanet.config import load_config  # noqa: E402
from retinanet.modeling import build_model  # noqa: E402


def batch(count: int, size: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(count):
        images.append(torch.rand(3, size, size, generator=g))
        wh = 12 + torch.rand(4, 2, generator=g) * 122
        xy = torch.rand(4, 2, generator=g) * (size - wh)
        boxes = torch.cat([xy, xy + wh], 1).round()
        masks = torch.zeros(4, size, size, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            m[y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.zeros(4, dtype=torch.int64), "masks": masks})
    return images, targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="segprop_fpn_shapes", help="a shipped config's name or a YAML file")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shipped = CONFIGS_DIR / f"{args.config}.yaml"
    cfg = load_config(str(shipped) if shipped.is_file() else args.config)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    if model.labels != "appendix":
        raise SystemExit(f"{args.config}: segprop_fpn_labels {model.labels}; this measures the appendix rules")
    images, targets = batch(args.batch, cfg.model.min_size)
    sampled_at = model.outputs_at

    def dense_at(feats, b, n, with_mask):
        scores, masks, _, _ = model._dense_outputs(feats)
        return scores[b, n], masks[b, n][with_mask]

    def step(outputs_at):
        def run():
            model.outputs_at = outputs_at
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            sum(model(images, targets).values()).backward()
        return run

    print(machine_report("cpu"))
    times = time_interleaved({"dense outputs (before)": step(dense_at), "sampled locations": step(sampled_at)},
                             repeats=args.repeats)
    print_table(f"{args.config}: training step (forward + backward), batch {args.batch} of "
                f"{cfg.model.min_size} px, {args.threads} thread(s)", list(times.items()),
                baseline="dense outputs (before)")


if __name__ == "__main__":
    main()
