"""Time per image of segment proposal checkpoints: the network (pyramid / FPN, top 1000, SharpMask's
refinement) and the post-processing (pasting 1000 masks into the image) apart.

    python benchmarks/bench_segment_proposals.py RUN.pt [RUN.pt ...] --json val.json --images DIR [--count 50]

One image per forward pass, one thread, after two warm-up images; prints ms per image (median).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from retinanet.checkpoint import load_model
    from retinanet.data.coco import CocoDataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--json", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dataset = CocoDataset(args.json, args.images, check_images="exists")
    images = [dataset[i][0] for i in range(min(args.count + 2, len(dataset)))]
    for path in args.checkpoints:
        model, cfg, _ = load_model(path, device="cpu")
        model.eval()
        net, post = [], []
        with torch.inference_mode():
            for image in images:
                batch = model.preprocess([image])
                start = time.perf_counter()
                outputs = model.run_network(batch)
                middle = time.perf_counter()
                model.postprocess(outputs, batch)
                net.append(middle - start)
                post.append(time.perf_counter() - middle)
        net, post = net[2:], post[2:]
        print(f"{path}: {cfg.model.arch}: network {1000 * statistics.median(net):.0f} ms, post-processing "
              f"{1000 * statistics.median(post):.0f} ms per image (median of {len(net)})")


if __name__ == "__main__":
    main()
