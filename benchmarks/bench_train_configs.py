"""Training step time of several configs side by side (e.g. the runs of an ablation sweep: each run's
config.yaml), on the same synthetic batch, steps interleaved A B C A B C so that a load change on a shared
machine hits every config alike; the first config is the baseline of the speed-up column.

    python benchmarks/bench_train_configs.py NAME=RUN/config.yaml [NAME=...] [--batch 16] [--repeats 5] [--threads 1]

The batch: images of the first config's model.min_size (square), 3 boxes each of 12-134 px (the shapes
dataset's sizes) with labels in 0..num_classes-1; a step is the losses, backward and an AdamW step.
"""

from __future__ import annotations

import argparse

import torch

from common import machine_report, print_table, time_interleaved
from retinanet.config import load_config  # noqa: E402  (common puts the repository on sys.path)
from retinanet.modeling import build_model  # noqa: E402


def batch(count: int, size: int, num_classes: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(count):
        images.append(torch.rand(3, size, size, generator=g))
        wh = (12 + torch.rand(3, 2, generator=g) * 122) * size / 192
        xy = torch.rand(3, 2, generator=g) * (size - wh)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(0, num_classes, (3,), generator=g)})
    return images, targets


def make_step(path: str, images: list, targets: list, num_classes: int):
    cfg = load_config(path)
    cfg.model.num_classes = num_classes
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="NAME=CONFIG.yaml")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    named = [item.split("=", 1) for item in args.configs]
    if any(len(pair) != 2 for pair in named):
        raise SystemExit("give each config as NAME=CONFIG.yaml")
    size = load_config(named[0][1]).model.min_size
    images, targets = batch(args.batch, size, args.num_classes)
    steps = {name: make_step(path, images, targets, args.num_classes) for name, path in named}
    print(machine_report("cpu"))
    times = time_interleaved(steps, repeats=args.repeats)
    print_table(f"training step (losses, backward, AdamW), batch {args.batch} of {size} px, {args.threads} thread(s)",
                list(times.items()), baseline=named[0][0])


if __name__ == "__main__":
    main()
