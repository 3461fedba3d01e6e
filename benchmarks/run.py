"""All benchmarks from one command; figures are medians, printed as ratios against a baseline
measured in the same run (torchvision's RetinaNet when it imports, else our plain fp32 mode).

    python benchmarks/run.py                       # everything (about 15 minutes on 2 CPU cores)
    python benchmarks/run.py --quick               # fewer repeats and configurations
    python benchmarks/run.py --only inference,postprocess
    python benchmarks/run.py --device cuda --batch 1,8 --dtypes fp32,bf16,fp16

Sections: inference (end to end at 800 and 512 px), stages (backbone, FPN, heads, post-processing),
postprocess, train (step time and peak memory, one process per configuration), focal (the focal
loss alone), eval (COCO evaluation of a generated 5000-image set), data (data-loading throughput),
precision (COCO AP of a trained model plain, folded and in bf16), ohem (OHEM's NMS with and without
early stopping).
See BENCHMARKS.md for the figures and for making an environment where torchvision imports.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import ROOT, machine_report, torchvision_module  # noqa: E402

SECTIONS = ["inference", "stages", "postprocess", "train", "focal", "eval", "data", "precision", "ohem"]


def run_script(name: str, extra: list) -> None:
    """Run another benchmark script of this folder in its own process, if it exists on this branch."""
    script = HERE / name
    if not script.is_file():
        print(f"  {name} is not on this branch yet: skipped")
        return
    proc = subprocess.run([sys.executable, str(script), *extra], cwd=ROOT)
    if proc.returncode != 0:
        print(f"  {name} exited with status {proc.returncode}")


def run_focal(args) -> None:
    print("\n== focal loss alone, forward + backward on (2, 120000, 80)")
    extra = ["--quick"] if args.quick else ["--rounds", "3"]
    run_script("bench_focal.py", extra + ["--device", args.device])


def run_eval(args) -> None:
    print("\n== COCO evaluation through `retinanet eval`, generated set")
    run_script("bench_eval.py", ["--images", "500", "--skip-pycocotools"] if args.quick else [])


def run_data(args) -> None:
    print("\n== data loading")
    if importlib.util.find_spec("retinanet.data") is None:
        print("  retinanet.data is not on this branch yet: skipped")
        return
    run_script("bench_data.py", ["--quick"] if args.quick else [])


def run_ohem(args) -> None:
    print("\n== OHEM's example selection: native NMS to the end vs stopping early")
    run_script("bench_ohem.py", ["--quick"] if args.quick else [])


def run_precision(args) -> None:
    print("\n== accuracy of the fast path: COCO AP on the shapes validation set, fp32 vs folded vs bf16")
    if args.checkpoint:
        run_script("bench_precision.py", ["--checkpoint", args.checkpoint])
    elif args.quick:
        print("  needs a trained model: pass --checkpoint (e.g. a `retinanet demo` output's final.pt); skipped")
    else:
        run_script("bench_precision.py", [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, fewer configurations")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtypes", default="fp32,bf16", help="inference/training precisions: fp32,bf16,fp16")
    parser.add_argument("--batch", default="1", help="inference batch sizes, e.g. 1,8")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per configuration (default 5, quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each configuration first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--candidates", type=int, default=5000,
                        help="(anchor, class) scores above 0.05 in the inference image (the post-processing load)")
    parser.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    parser.add_argument("--checkpoint", help="precision section: a trained checkpoint whose validation set to "
                                             "evaluate (default: train `retinanet demo` first, several minutes)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.dtypes = [d.strip() for d in args.dtypes.split(",")]
    if any(d not in ("fp32", "bf16", "fp16") for d in args.dtypes):
        parser.error(f"--dtypes takes fp32, bf16, fp16; got {args.dtypes}")
    args.batch = [int(b) for b in args.batch.split(",")]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")

    print(f"retinanet benchmarks, {time.strftime('%Y-%m-%d %H:%M')}: python benchmarks/run.py {' '.join(argv or sys.argv[1:])}")
    print(machine_report(args.device))
    print("baseline: " + ("torchvision's retinanet_resnet50_fpn, FrozenBatchNorm2d, fp32, NCHW, same weights"
                          if torchvision_module() is not None else
                          "torchvision does not import here: our plain mode (fp32, NCHW, BatchNorm not folded)"))
    from bench_inference import run_inference, run_postprocess, run_stages
    from bench_train import run_train

    runners = {"inference": run_inference, "stages": run_stages, "postprocess": run_postprocess,
               "train": run_train, "focal": run_focal, "eval": run_eval, "data": run_data,
               "precision": run_precision, "ohem": run_ohem}
    for section in sections:
        start = time.perf_counter()
        runners[section](args)
        print(f"  ({section}: {time.perf_counter() - start:.0f} s; load average now {machine_report(args.device).splitlines()[1].split(': ')[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
