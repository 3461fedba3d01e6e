"""Training step time and peak memory: batch 2, 512x512, SGD, same weights for every configuration.

Each configuration runs in its own process (so its peak RSS is its own), several times, in rounds
A B C A B C ...; a step is forward, loss, backward and the optimizer step.

    python benchmarks/bench_train.py --worker "ours fp32" --weights W.pt --steps 3   (one process)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import (
    ROOT,
    calibrated_model,
    synchronize,
    torchvision_layout_config,
    torchvision_module,
    torchvision_retinanet,
)
from retinanet.optimize import compile_network  # noqa: E402  (common puts the repository on sys.path)

BATCH, SIZE = 2, 512


def configurations(dtypes: list, compile: bool = False) -> list:
    """Names of the configurations this environment can run, the baseline first."""
    names = []
    if torchvision_module() is not None:
        names.append("torchvision fp32")
        names += [f"torchvision {d} channels_last" for d in dtypes if d != "fp32"]
    names += ["ours fp32", "ours fp32 channels_last"]
    names += [f"ours {d} channels_last" for d in dtypes if d != "fp32"]
    if compile:
        names += [f"ours {d} channels_last compiled" for d in dtypes]
    return names


def batch(device: str, seed: int = 0) -> tuple:
    """Two 512x512 images with 4 boxes each (xyxy pixels) and labels in 0..90."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, SIZE, SIZE, generator=g).to(device) for _ in range(BATCH)]
    targets = []
    for _ in range(BATCH):
        xy = torch.rand(4, 2, generator=g) * 300
        wh = 40 + torch.rand(4, 2, generator=g) * 160
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1).to(device),
                        "labels": torch.randint(0, 91, (4,), generator=g).to(device)})
    return images, targets


def worker(name: str, weights: str, steps: int, warmup: int, device: str) -> dict:
    """Run `warmup` + `steps` training steps of one configuration; step times and peak memory."""
    cfg = torchvision_layout_config(min_size=SIZE, max_size=SIZE)
    from retinanet.model import build_model

    model = build_model(cfg)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    if name.startswith("torchvision"):
        model = torchvision_retinanet(model)
    model = model.to(device).train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name.split()[1])
    if "channels_last" in name:
        model = model.to(memory_format=torch.channels_last)
    if name.endswith("compiled") and not compile_network(model, freezing=False):
        raise RuntimeError("torch.compile does not work here")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    images, targets = batch(device)
    times, losses = [], []
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss))
    out = {"times": times, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "losses": losses}
    if device.startswith("cuda"):
        out["peak_cuda"] = torch.cuda.max_memory_allocated()
    return out


def run_train(args) -> None:
    print(f"\n== training step, batch {BATCH}, {SIZE}x{SIZE}, SGD; each configuration in its own process")
    names = configurations(args.dtypes, args.compile)
    rounds, steps = (1, 2) if args.quick else (3, 3)
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "weights.pt")
        torch.save(calibrated_model(torchvision_layout_config(min_size=SIZE, max_size=SIZE)).state_dict(), weights)
        results = {n: {"times": [], "peak_rss": 0, "peak_cuda": 0, "losses": []} for n in names}
        for _ in range(rounds):
            for name in names:
                cmd = [sys.executable, str(Path(__file__)), "--worker", name, "--weights", weights,
                       "--steps", str(steps), "--warmup", "1", "--device", args.device]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    print(f"  {name}: failed\n{proc.stderr[-2000:]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results[name]["times"] += r["times"]
                results[name]["losses"] = r["losses"]
                results[name]["peak_rss"] = max(results[name]["peak_rss"], r["peak_rss"])
                results[name]["peak_cuda"] = max(results[name]["peak_cuda"], r.get("peak_cuda", 0))
    base = statistics.median(results[names[0]]["times"])
    print(f"  {'configuration':<40} {'median ms':>10} {'range ms':>13} {'speed-up':>9} {'peak RSS':>10}"
          + ("   peak CUDA" if args.device.startswith("cuda") else "") + "   first/last loss")
    for name in names:
        t = results[name]["times"]
        if not t:
            continue
        med = statistics.median(t)
        line = (f"  {name:<40} {1000 * med:>10.0f} {1000 * min(t):>6.0f}-{1000 * max(t):<6.0f} {base / med:>8.2f}x "
                f"{results[name]['peak_rss'] / 2 ** 30:>8.2f} GiB")
        if args.device.startswith("cuda"):
            line += f" {results[name]['peak_cuda'] / 2 ** 30:>8.2f} GiB"
        losses = results[name]["losses"]
        line += f"   {losses[0]:.3f} / {losses[-1]:.3f}"
        print(line)
    print(f"  images/s of the fastest: {BATCH / min(statistics.median(r['times']) for r in results.values() if r['times']):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", required=True, help="configuration name to run in this process")
    parser.add_argument("--weights", required=True, help="state dict of our model (torchvision's is converted)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    print(json.dumps(worker(args.worker, args.weights, args.steps, args.warmup, args.device)))


if __name__ == "__main__":
    main()
