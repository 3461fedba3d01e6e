"""An exported model against PyTorch on a COCO-format validation set: how many images get the same
detections, how large the differences are where they do not, and the AP of each.

    PYTHONPATH=$PWD python benchmarks/check_onnx.py --checkpoint run/final.pt --json val.json \
        --images val/ [--exporter dynamo|torchscript] [--limit 500] [--workdir /tmp/onnx_check]

With --end-to-end, the one-file export (`retinanet export --end-to-end`) run by tools/onnx_detect.py in
a process where neither this package nor PyTorch can be imported, against `Predictor` in this one;
then the latency of each, one thread, one image at a time (median over --latency images). Instead of
--checkpoint, --random-r50 retinanet|faster_rcnn builds torchvision's R50-FPN config (what `retinanet
convert` builds for its weights; 800 px) with random weights whose scores are spread out:

    PYTHONPATH=$PWD python benchmarks/check_onnx.py --end-to-end --checkpoint /work/ckpt/demo/final.pt \
        --json val.json --images val/
    PYTHONPATH=$PWD python benchmarks/check_onnx.py --end-to-end --random-r50 retinanet --json val.json \
        --images val/ --limit 5 --latency 5

Same detections: the same number, the same labels in the same order, boxes within 1e-3 px and scores
within 1e-4. Where they differ, the output says whether the proposals (two-stage models) already
differ: onnxruntime's NonMaxSuppression may break equal scores another way than PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.checkpoint import load_model  # noqa: E402
from retinanet.compare import match_detections  # noqa: E402
from retinanet.evaluate import evaluate_coco  # noqa: E402
from retinanet.export import OnnxDetector, export_onnx  # noqa: E402
from retinanet.predict import Predictor  # noqa: E402


def _same_set(a, b) -> bool:
    """The same detections up to order among near-equal scores (one to one: label, box within 1e-3 px,
    score within 1e-4; retinanet.compare, as `retinanet export`'s check and the tests)."""
    return match_detections(b, a, score_atol=1e-4, box_atol=1e-3, cut_slack=False).same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="model checkpoint (or --random-r50)")
    p.add_argument("--json", required=True, help="COCO ground truth of the images")
    p.add_argument("--images", required=True)
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    p.add_argument("--limit", type=int, default=0, help="the first N images only (0: all)")
    p.add_argument("--workdir", default="/tmp/onnx_check")
    p.add_argument("--end-to-end", action="store_true", help="the one-file export through tools/onnx_detect.py")
    p.add_argument("--random-r50", choices=["retinanet", "faster_rcnn"],
                   help="with --end-to-end, instead of --checkpoint: torchvision's R50-FPN config, random weights")
    p.add_argument("--latency", type=int, default=30, help="with --end-to-end: images timed, one thread")
    p.add_argument("--stretch", help="with --end-to-end: WxH, every image (and its boxes) stretched to that size "
                                     "first (Pillow, bilinear; into --workdir), so that the model resizes it")
    args = p.parse_args()
    if bool(args.checkpoint) == bool(args.random_r50):
        p.error("give --checkpoint or --random-r50 (with --end-to-end)")
    if args.end_to_end:
        end_to_end(args)
        return

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model, cfg, categories = load_model(args.checkpoint, device="cpu")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"model_{args.exporter}.onnx"
    start = time.perf_counter()
    export_onnx(model, cfg, categories, str(path), exporter=args.exporter)
    print(f"{cfg.model.arch}: exported with {args.exporter} in {time.perf_counter() - start:.1f} s")

    ours, theirs = Predictor(model, categories, device="cpu"), OnnxDetector(str(path))
    gt = json.loads(Path(args.json).read_text())
    images = gt["images"][:args.limit] if args.limit else gt["images"]
    results = {"pytorch": [], "onnx": []}
    same = proposals_differ = 0
    worst_box = worst_score = 0.0
    differing = []
    for info in images:
        array = np.asarray(Image.open(Path(args.images) / info["file_name"]).convert("RGB"))
        a, b = ours(array), theirs(array)
        results["pytorch"] += a.to_coco(info["id"])
        results["onnx"] += b.to_coco(info["id"])
        if len(a) == len(b) and np.array_equal(a.labels, b.labels):
            box = float(np.abs(a.boxes - b.boxes).max()) if len(a) else 0.0
            score = float(np.abs(a.scores - b.scores).max()) if len(a) else 0.0
            if box <= 1e-3 and score <= 1e-4:
                same += 1
                worst_box, worst_score = max(worst_box, box), max(worst_score, score)
                continue
        batch = model.preprocess([torch.from_numpy(array).permute(2, 0, 1)])
        with torch.no_grad():
            out_a = model.run_network(batch)
        out_b = theirs.network(batch)
        differ = any(x.shape != y.shape for x, y in zip(out_a, out_b))
        proposals_differ += differ
        differing.append(f"image {info['id']}: {len(a)} vs {len(b)} detections"
                         + (", the same set in another order" if _same_set(a, b) else "")
                         + (", network outputs of different shapes" if differ else ""))
    print(f"{len(images)} images: {same} with the same detections (max box difference {worst_box:.1e} px, "
          f"score {worst_score:.1e}); {len(images) - same} differ, {proposals_differ} of them with network "
          f"outputs of different shapes (proposals)")
    for line in differing[:20]:
        print("  " + line)
    subset = {**gt, "images": images, "annotations": [a for a in gt["annotations"]
                                                      if a["image_id"] in {i["id"] for i in images}]}
    for name, res in results.items():
        m = evaluate_coco(subset, res)
        print(f"{name}: AP {m['AP']:.4f} AP50 {m['AP50']:.4f} AP75 {m['AP75']:.4f}")


# tools/onnx_detect.py with `retinanet` and `torch` made unimportable (as tests/test_export_e2e.py runs it)
_WITHOUT_PACKAGE = """
import runpy, sys
sys.modules["retinanet"] = sys.modules["torch"] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def random_r50(arch: str) -> tuple:
    """(model, config, categories): torchvision's R50-FPN RetinaNet or Faster R-CNN config as `retinanet convert`
    makes it, random weights (seed 0) with the classifier's scores spread so that an image has many detections."""
    from retinanet.convert import torchvision_categories, torchvision_faster_rcnn_config, torchvision_retinanet_config
    from retinanet.modeling import build_model

    torch.manual_seed(0)
    if arch == "retinanet":
        cfg, categories = torchvision_retinanet_config(91), torchvision_categories(91)
    else:
        cfg, categories = torchvision_faster_rcnn_config(91), torchvision_categories(91)[1:]
    cfg.model.backbone_weights = None
    model = build_model(cfg).eval()
    with torch.no_grad():
        if arch == "retinanet":
            model.head.cls_subnet.predictor.bias.normal_(-3.0, 1.0)
        else:
            model.roi_heads.box_predictor.cls_score.bias.normal_(0.0, 2.0)
            model.roi_heads.box_predictor.cls_score.weight.normal_(std=0.05)
    return model, cfg, categories


def stretched(gt: dict, images: list, files: list, size: str, work: Path) -> tuple:
    """The images stretched to size "WxH" (PNG files in work/), and the ground truth with them."""
    w, h = (int(v) for v in size.lower().split("x"))
    folder = work / f"stretched_{w}x{h}"
    folder.mkdir(parents=True, exist_ok=True)
    out_files, scale = [], {}
    for info, f in zip(images, files):
        with Image.open(f) as img:
            scale[info["id"]] = (w / img.width, h / img.height)
            out_files.append(str(folder / Path(f).name))
            img.convert("RGB").resize((w, h), Image.BILINEAR).save(out_files[-1])
    annotations = []
    for a in gt["annotations"]:
        if a["image_id"] in scale:
            sx, sy = scale[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            annotations.append({**a, "bbox": [x * sx, y * sy, bw * sx, bh * sy], "area": a["area"] * sx * sy})
    images = [{**info, "width": w, "height": h} for info in images]
    return {**gt, "images": images, "annotations": annotations}, images, out_files


def end_to_end(args) -> None:
    import os
    import subprocess
    import tempfile

    import onnxruntime

    from retinanet.export import export_end_to_end

    torch.set_num_threads(1)
    if args.random_r50:
        model, cfg, categories = random_r50(args.random_r50)
        name = f"random R50-FPN {args.random_r50} (torchvision config)"
    else:
        model, cfg, categories = load_model(args.checkpoint, device="cpu")
        name = args.checkpoint
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"model_e2e_{cfg.model.arch}.onnx"
    start = time.perf_counter()
    export_end_to_end(model, cfg, categories, str(path))
    size_mb = path.stat().st_size / 2 ** 20
    print(f"{name}: exported end to end in {time.perf_counter() - start:.1f} s ({size_mb:.1f} MiB)")
    gt = json.loads(Path(args.json).read_text())
    images = gt["images"][:args.limit] if args.limit else gt["images"]
    files = [str(Path(args.images) / info["file_name"]) for info in images]
    if args.stretch:
        gt, images, files = stretched(gt, images, files, args.stretch, work)
    predictor = Predictor(model, categories, device="cpu")
    start = time.perf_counter()
    ours = [predictor(f) for f in files]
    print(f"Predictor: {len(files)} images in {time.perf_counter() - start:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "detections.json"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        tool = Path(__file__).resolve().parents[1] / "tools" / "onnx_detect.py"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-c", _WITHOUT_PACKAGE, str(tool), str(path), *files, "--output",
                        str(out), "--threads", "1"], env=env, check=True)
        theirs = json.loads(out.read_text())
    print(f"tools/onnx_detect.py (no retinanet, no torch): {len(files)} images in {time.perf_counter() - start:.1f} s")
    identical = swapped = 0
    worst_box = worst_score = 0.0
    differing, results = [], {"pytorch": [], "onnx": []}
    for info, a, r in zip(images, ours, theirs):
        dets = r["detections"]
        b = {"boxes": np.array([d["box"] for d in dets], dtype=np.float64).reshape(-1, 4),
             "scores": np.array([d["score"] for d in dets]), "labels": np.array([d["category_id"] for d in dets])}
        expected = {"boxes": a.boxes, "scores": a.scores, "labels": a.category_ids}
        results["pytorch"] += a.to_coco(info["id"])
        results["onnx"] += [{"image_id": info["id"], "category_id": d["category_id"], "score": d["score"],
                             "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]]}
                            for d in dets]
        if len(a) == len(dets) and np.array_equal(a.category_ids, b["labels"]):
            box = float(np.abs(a.boxes - b["boxes"]).max()) if len(a) else 0.0
            score = float(np.abs(a.scores - b["scores"]).max()) if len(a) else 0.0
            if box <= 1e-2 and score <= 1e-4:
                identical += 1
                worst_box, worst_score = max(worst_box, box), max(worst_score, score)
                continue
        match = match_detections(b, expected, score_atol=1e-4, box_atol=1e-2)
        if match.same:
            swapped += 1
            worst_box, worst_score = max(worst_box, match.max_box_diff), max(worst_score, match.max_score_diff)
        else:
            differing.append(f"image {info['id']}: {len(a)} vs {len(dets)} detections: {match.details}")
    counts = [len(a) for a in ours]
    print(f"{len(images)} images ({sum(counts)} detections, {min(counts)}..{max(counts)} per image): {identical} "
          f"identical (labels in order, boxes within 1e-2 px, scores within 1e-4), {swapped} the same up to a swap "
          f"of near-equal scores, {len(differing)} different; over those matched: max box difference "
          f"{worst_box:.1e} px, max score difference {worst_score:.1e}")
    for line in differing[:10]:
        print("  " + line)
    if not args.random_r50:
        subset = {**gt, "images": images, "annotations": [a for a in gt["annotations"]
                                                          if a["image_id"] in {i["id"] for i in images}]}
        for key, res in results.items():
            m = evaluate_coco(subset, res)
            print(f"{key}: AP {m['AP']:.4f} AP50 {m['AP50']:.4f} AP75 {m['AP75']:.4f}")
    # latency: the same decoded arrays, one thread each, alternating, one warm-up run each
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    arrays = [np.array(Image.open(f).convert("RGB")) for f in files[:args.latency]]
    predictor(arrays[0]), session.run(None, {"image": arrays[0]})
    times = {"Predictor (PyTorch)": [], "end-to-end ONNX (onnxruntime)": []}
    load = os.getloadavg()[0]
    for array in arrays:
        start = time.perf_counter()
        predictor(array)
        times["Predictor (PyTorch)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        session.run(None, {"image": array})
        times["end-to-end ONNX (onnxruntime)"].append(time.perf_counter() - start)
    load = max(load, os.getloadavg()[0])
    print(f"latency, one thread, one image, {len(arrays)} images ({arrays[0].shape[0]}x{arrays[0].shape[1]} first), "
          f"load average {load:.1f} on {os.cpu_count()} cores:")
    print("| path | median ms | min ms |\n|---|---|---|")
    for key, t in times.items():
        print(f"| {key} | {1e3 * float(np.median(t)):.1f} | {1e3 * min(t):.1f} |")


if __name__ == "__main__":
    main()
