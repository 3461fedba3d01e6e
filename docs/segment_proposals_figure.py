"""docs/segment_proposals.png: DeepMask vs SharpMask on the same objects (as the thesis's Fig. 3.2).

    python docs/segment_proposals_figure.py SHARPMASK.pt --json val.json --images DIR [--out docs/segment_proposals.png]

A SharpMask checkpoint holds both models: its feedforward path (frozen during the refinement stage) is
DeepMask-ours, so running it with the refinement switched off gives DeepMask's coarse masks for the same
windows and scores. For every ground-truth object of the first images that have objects, the proposal
(of the 1000) with the highest mask IoU is drawn, with that IoU; top row DeepMask, bottom row SharpMask.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def best_masks(model, image: torch.Tensor, gt: torch.Tensor) -> tuple:
    """(G, H, W) bool: each object's best proposal mask, and (G,) its IoU."""
    from retinanet.ops.masks import mask_iou

    with torch.no_grad():
        det = model([image])[0]
    if len(det["masks"]) == 0:
        return torch.zeros_like(gt, dtype=torch.bool), torch.zeros(len(gt))
    masks = torch.from_numpy(np.asarray(det["masks"]))  # (D, H, W) bool, decoded from the run lengths
    iou = mask_iou(gt, masks)  # (G, D)
    best = iou.argmax(1)
    return masks[best], iou.max(1).values


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from retinanet.checkpoint import load_model
    from retinanet.data.coco import CocoDataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--json", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--count", type=int, default=5, help="images shown")
    p.add_argument("--out", default="docs/segment_proposals.png")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, _, _ = load_model(args.checkpoint, device="cpu")
    model.eval()
    dataset = CocoDataset(args.json, args.images, check_images="exists", masks=True)
    fig, axes = plt.subplots(2, args.count, figsize=(3 * args.count, 6.4), dpi=110)
    shown, index = 0, 0
    rng = np.random.default_rng(0)
    while shown < args.count and index < len(dataset):
        image, target = dataset[index]
        index += 1
        gt = target["masks"].bool()
        if len(gt) < 2:
            continue
        refine_k = model.refine_k
        rows = []
        for k in (0, refine_k):  # 0: the feedforward path only (DeepMask)
            model.refine_k = k
            rows.append(best_masks(model, image, gt))
        model.refine_k = refine_k
        colors = rng.uniform(0.2, 1.0, (len(gt), 3))
        pixels = image.permute(1, 2, 0).numpy().astype(np.float32)
        pixels = pixels / 255.0 if pixels.max() > 1 else pixels
        for row, (masks, ious) in enumerate(rows):
            canvas = pixels.copy()
            for mask, color in zip(masks.numpy(), colors):
                canvas[mask] = 0.4 * canvas[mask] + 0.6 * color
            ax = axes[row, shown]
            ax.imshow(canvas)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{'DeepMask' if row == 0 else 'SharpMask'}: IoU " + " ".join(f"{v:.2f}" for v in ious.tolist()),
                         fontsize=7)
        shown += 1
    fig.suptitle("Best of 1000 proposals per object (shapes validation images); top: DeepMask-ours (coarse), "
                 "bottom: SharpMask (refined), same windows", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
