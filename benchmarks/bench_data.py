"""Data-loading throughput: training batches per second from the shapes dataset, as `retinanet demo`
trains on it (192 px PNGs, resize, flip, batch 16), with 0 and 2 loader worker processes.

    python benchmarks/bench_data.py [--batches 40] [--quick]

The dataset is the demo's (generated once into the cache, reused after). The figure is images
per second of the whole pipeline: decoding, annotation lookup, transforms and collation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from retinanet.commands.demo import DATA_SEED, DEMO_CONFIG, IMAGE_SIZE, NUM_TRAIN, NUM_VAL  # noqa: E402
from retinanet.config import load_config  # noqa: E402
from retinanet.data import build_train_dataset, build_train_loader, make_shapes_dataset  # noqa: E402


def images_per_second(cfg, dataset, batches: int) -> float:
    """Images/s over `batches` batches, after the first (worker start-up) is excluded."""
    loader = iter(build_train_loader(cfg, dataset, seed=0))
    next(loader)
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        images, _ = next(loader)
        count += len(images)
    return count / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per worker count, interleaved")
    parser.add_argument("--quick", action="store_true", help="10 batches, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.rounds = 10, 1
    paths = make_shapes_dataset(num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=IMAGE_SIZE, seed=DATA_SEED)
    cfg = load_config(str(DEMO_CONFIG), [f"data.train_json={paths.train_json}",
                                         f"data.train_images={paths.train_images}"])
    dataset = build_train_dataset(cfg)
    print(f"shapes training set: {len(dataset)} images of {IMAGE_SIZE} px, batch {cfg.data.batch_size}, "
          f"{args.batches} batches x {args.rounds} round(s)")
    rates = {0: [], 2: []}
    for _ in range(args.rounds):
        for workers in rates:
            cfg.data.num_workers = workers
            rates[workers].append(images_per_second(cfg, dataset, args.batches))
    for workers, r in rates.items():
        print(f"  {workers} worker processes: {statistics.median(r):7.0f} images/s (range {min(r):.0f}-{max(r):.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
